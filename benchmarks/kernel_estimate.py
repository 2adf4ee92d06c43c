"""Lowering time, compile time and libtpu's static cycle estimate of the exact selection's Pallas
TPU kernels (no TPU needed: compiled ahead of time through libtpu)::

  PYTHONPATH=$PWD /work/main/.venv-tpu/bin/python benchmarks/kernel_estimate.py [--lower-only]

Cases: one f32[8192, 2048] leaf, and a group of 16 f32[2048, 2048] leaves, each
``select_group`` with the last step's thresholds (the bracketed search), for v6e:1x1. The
estimate is the ``bundle_analysis_data.estimated_cycles`` of each kernel's custom call in the
static bundle profile libtpu dumps (``--xla_jf_dump_static_llo_profile_to``); the dumps make the
compile itself slower, so its seconds here are not the step's.
"""

import argparse
import glob
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CASES = {"leaf-8192x2048": ((8192, 2048), 1), "group-16x2048x2048": ((2048, 2048), 16)}


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--lower-only", action="store_true")
  parser.add_argument("--cases", default=",".join(CASES))
  parser.add_argument("--topology", default="v6e:1x1")
  args = parser.parse_args(argv)
  # libtpu writes a dump per compiled program: kept only while this run reads them.
  with tempfile.TemporaryDirectory(prefix="kernel_estimate_") as dump:
    if not args.lower_only:
      os.environ["LIBTPU_INIT_ARGS"] = (
        f"--xla_jf_dump_to={dump} --xla_jf_dump_static_llo_profile_to={dump}"
      )
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies

    import mofo_jax
    from mofo_jax import _pallas_selection as ps

    topo = topologies.get_topology_desc(
      platform="tpu", topology_name=args.topology, chips_per_host_bounds=(1, 1, 1)
    )
    mesh = jax.sharding.Mesh([topo.devices[0]], ("chip",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    adam = mofo_jax._transform._Adam.at(jnp.int32(1), 0.9, 0.999, 1e-8, jnp.float32, jnp.float32)
    for name in args.cases.split(","):
      shape, group = CASES[name]
      t = ps.tiling(shape, mofo_jax.BlockSpec(), (jnp.float32,) * 3, ps.TILE_ENTRIES // group)
      x = [jax.ShapeDtypeStruct((t.rows, t.cols), jnp.float32, sharding=sharding)] * group
      prev = [jax.ShapeDtypeStruct((t.num_blocks,), jnp.float32, sharding=sharding)] * group

      def step(g, mu, nu, previous, t=t):
        return ps.select_group(g, mu, nu, t, 0.1, adam.first_moment, adam.second_moment, previous)

      before = set(glob.glob(dump + "/**", recursive=True))
      start = time.perf_counter()
      lowered = jax.jit(step).lower(x, x, x, prev)
      lowered_at = time.perf_counter()
      if args.lower_only:
        print(f"{name}: lower {lowered_at - start:.2f} s", flush=True)
        continue
      lowered.compile()
      print(
        f"{name}: lower {lowered_at - start:.2f} s, compile {time.perf_counter() - lowered_at:.2f} s",
        flush=True,
      )
      pattern = r'HLO: %(mofo_\w+)[^\n]*?bundle_analysis_data":\{"estimated_cycles":"(\d+)'
      for path in sorted(set(glob.glob(dump + "/**", recursive=True)) - before):
        if "static-bundle-profile" in path and os.path.isfile(path):
          with open(path, errors="ignore") as f:
            for m in re.finditer(pattern, f.read()):
              print(f"  {m.group(1)}: {m.group(2)} estimated cycles", flush=True)


if __name__ == "__main__":
  main()
