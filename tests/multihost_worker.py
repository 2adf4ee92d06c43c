"""One process of the two-process MoFO test (tests/test_multihost.py); not a test itself.

Run as ``python -m tests.multihost_worker PROCESS_ID PORT OUT.npz`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``: two such processes form one 8-device
2x4 mesh, take 3 sharded MoFO steps, and process 0 writes the gathered params and moments.
"""

import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

import mofo_jax
from tests import sharded_model as sm


def main(process_id: int, port: int, out: str) -> None:
  # Cross-process collectives on CPU need an implementation; gloo ships with jaxlib (and is the
  # default in recent jax, but older ones had none).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}",
    num_processes=2,
    process_id=process_id,
    initialization_timeout=30,
  )
  assert jax.device_count() == 8 and jax.local_device_count() == 4, jax.devices()
  mesh = sm.mesh("2d")
  shards = sm.shardings("2d", mesh)
  opt = sm.opt()
  state_sh = mofo_jax.state_shardings(opt, sm.abstract(shards))

  def put(tree):
    # Every process holds the whole (seeded) host array and hands over its devices' slices.
    return {
      k: jax.make_array_from_callback(v.shape, shards[k], lambda idx, v=v: v[idx])
      for k, v in tree.items()
    }

  p = put(sm.params())
  state = jax.jit(opt.init, out_shardings=state_sh)(p)
  step = jax.jit(
    sm.step_fn(opt), in_shardings=(shards, state_sh, shards), out_shardings=(shards, state_sh)
  )
  for i in range(3):
    p, state = step(p, state, put(sm.grads(i)))
  gathered = multihost_utils.process_allgather(
    {"p": p, "mu": state[0].mu, "nu": state[0].nu}, tiled=True
  )
  if process_id == 0:
    np.savez(
      out,
      **{
        f"{group}/{k}": np.asarray(v) for group, tree in gathered.items() for k, v in tree.items()
      },
    )
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
