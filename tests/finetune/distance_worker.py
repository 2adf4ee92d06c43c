"""One process of the two-process distance test (tests/finetune/test_distance.py); not a test.

Run as ``python -m tests.finetune.distance_worker PROCESS_ID PORT`` with 4 CPU devices each: the
two processes form the 2x4 mesh of ``test_distance._trees`` and print, as one ``RESULT`` JSON
line, the fingerprint and the distance metrics with the device and the host copy.
"""

import json
import sys

from tests.processes import initialize


def main(process_id: int, port: int) -> None:
  initialize(process_id, port)
  from mofo_jax.finetune import distance
  from tests.finetune.test_distance import _trees

  before, after, _ = _trees()
  copy = distance.pretrained_copy("host", before)
  result = {
    "fingerprint": distance.fingerprint(before),
    "device": distance.distance_from_pretrained(after, distance.pretrained_copy("device", before)),
    "host": distance.distance_from_pretrained(after, copy),
    "host_bytes": copy.nbytes,
  }
  print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]))
