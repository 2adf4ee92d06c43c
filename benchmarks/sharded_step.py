"""Step time of sharded MoFO vs sharded optax.adamw on 8 simulated CPU devices, same run.

Run from the repository root: python benchmarks/sharded_step.py [--width 1024] [--steps 20]
Prints the median ms per optimizer step (update + apply, donated), the ratio to adamw, and the
bytes each step all-reduces, read from the compiled HLO.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mofo_jax
from tests.sharded_model import collectives


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--width", type=int, default=1024)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--steps", type=int, default=20)
  args = parser.parse_args()
  d, n = args.width, args.layers
  mesh = jax.make_mesh((2, 4), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  specs = {
    "embed": P("fsdp", "tp"),
    "stack": P(None, "fsdp", "tp"),
    "head": P("fsdp", "tp"),
    "norm": P(),
  }
  shapes = {"embed": (4 * d, d), "stack": (n, d, 4 * d), "head": (d, 4 * d), "norm": (d,)}
  shards = {k: NamedSharding(mesh, s) for k, s in specs.items()}
  rng = np.random.default_rng(0)
  params = {
    k: jax.device_put(rng.normal(size=s).astype(np.float32), shards[k]) for k, s in shapes.items()
  }
  grads = {
    k: jax.device_put(rng.normal(size=s).astype(np.float32), shards[k]) for k, s in shapes.items()
  }
  abstract = {k: jax.ShapeDtypeStruct(shapes[k], jnp.float32, sharding=shards[k]) for k in shapes}
  print(
    f"{sum(np.prod(s) for s in shapes.values()) / 1e6:.1f}M params on a 2x4 mesh of "
    f"{jax.devices()[0].platform} devices"
  )

  opts = {
    "optax.adamw": optax.adamw(1e-3),
    "mofo (exact)": mofo_jax.mofo(
      1e-3,
      0.1,
      partition={
        "embed": mofo_jax.BlockSpec(),
        "stack": mofo_jax.BlockSpec(split_axes=(0,)),
        "head": mofo_jax.BlockSpec(),
        "norm": mofo_jax.BlockSpec(),
      },
    ),
    "mofo (local)": mofo_jax.mofo(1e-3, 0.1, selection=mofo_jax.local_selection(mesh, specs)),
  }
  results = {}
  for name, opt in opts.items():
    state_sh = mofo_jax.state_shardings(opt, abstract)

    def step(p, s, g, opt=opt):
      u, s = opt.update(g, s, p)
      return optax.apply_updates(p, u), s

    fn = jax.jit(
      step,
      in_shardings=(shards, state_sh, shards),
      out_shardings=(shards, state_sh),
      donate_argnums=(0, 1),
    )
    comm = collectives(
      fn.lower(abstract, jax.eval_shape(opt.init, abstract), abstract).compile().as_text()
    )
    p = jax.tree.map(jnp.copy, params)
    s = jax.jit(opt.init, out_shardings=state_sh)(p)
    p, s = fn(p, s, grads)  # compile
    times = []
    for _ in range(args.steps):
      t0 = time.perf_counter()
      p, s = fn(p, s, grads)
      jax.block_until_ready((p, s))
      times.append(time.perf_counter() - t0)
    results[name] = (float(np.median(times)) * 1e3, comm)
  base = results["optax.adamw"][0]
  for name, (ms, comm) in results.items():
    print(
      f"{name:14s} {ms:8.2f} ms  x{ms / base:5.2f} adamw  all-reduce {comm['all_reduce_bytes']:6d} "
      f"B/step ({comm['all-reduce']} ops), all-gathers {comm['all-gather']}"
    )


if __name__ == "__main__":
  main()
