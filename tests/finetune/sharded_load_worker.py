"""One process of the two-process loading test (test_sharded_loading.py); not a test itself.

Run as ``python -m tests.finetune.sharded_load_worker PROCESS_ID PORT CHECKPOINT OUT_DIR`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``: two such processes form one 8-device
mesh (fsdp=4, tensor=2), load the checkpoint sharded while counting the bytes read from the
file, check their shards against the file, and save it back (process 0 writes).
"""

import json
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from mofo_jax.finetune import checkpoints_hf
from mofo_jax.finetune.checkpoints_hf import naming as hf_naming
from mofo_jax.finetune.checkpoints_hf import save as hf_save


def main(process_id: int, port: int, ckpt: str, out: str) -> None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}",
    num_processes=2,
    process_id=process_id,
    initialization_timeout=30,
  )
  assert jax.device_count() == 8 and jax.local_device_count() == 4, jax.devices()
  bytes_read = 0
  real_read = checkpoints_hf.SafetensorsSource.read

  def counting_read(self, name, index):
    nonlocal bytes_read
    arr = real_read(self, name, index)
    bytes_read += arr.nbytes
    return arr

  checkpoints_hf.SafetensorsSource.read = counting_read
  mesh = jax.make_mesh((1, 4, 2), ("data", "fsdp", "tensor"))
  config, model = checkpoints_hf.load_hf_checkpoint(ckpt, scan_layers=True, mesh=mesh)
  checkpoints_hf.SafetensorsSource.read = real_read

  # every local shard holds the file's values; count the distinct local slices' bytes
  tensors = load_file(Path(ckpt) / "model.safetensors")
  own = 0
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    arr = var.get_value()
    assert not arr.is_fully_addressable
    names, stacked = hf_naming.hf_names(path, config)
    whole = np.stack([tensors[n] for n in names]) if stacked else tensors[names[0]]
    if path[-1] == "kernel":
      whole = np.swapaxes(whole, -1, -2)
    seen = set()
    for shard in arr.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), whole[shard.index])
      key = hf_naming.index_key(shard.index, arr.shape)
      if key not in seen:
        seen.add(key)
        own += shard.data.nbytes
  save_host_bytes = 0
  real_to_host = hf_save._to_host

  def counting_to_host(*args):
    nonlocal save_host_bytes
    host = real_to_host(*args)
    save_host_bytes += 0 if host is None else host.nbytes
    return host

  hf_save._to_host = counting_to_host
  # Gathers in runs of at most 4 KiB (rows permitting): record each run length traced.
  hf_save.GATHER_BYTES = 4096
  real_rows, run_bytes = hf_save._rows, []

  def recording_rows(arr, start, size):
    run_bytes.append(size * arr.nbytes // arr.shape[0])
    return real_rows(arr, start, size)

  hf_save._rows = recording_rows
  checkpoints_hf.save_hf_checkpoint(model, config, Path(out) / "saved")
  report = {"bytes_read": bytes_read, "own_slices_bytes": own, "save_host_bytes": save_host_bytes}
  (Path(out) / f"read-{process_id}.json").write_text(json.dumps(report | {"runs": run_bytes}))
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
