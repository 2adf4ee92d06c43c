"""Step time of MoFO against optax.adamw on Llama-shaped parameter trees.

Every mode runs the full donated step (update + apply_updates) in this one process, one mode
after another, on the same parameters and gradients; the time of a mode is the median of
``--steps`` steps after warm-up. Runs unchanged on CPU, GPU and TPU.

  python benchmarks/step_time.py --preset small --steps 7 --out small.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

# Run from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mofo_jax  # noqa: E402

# (vocab, d_model, layers, heads, kv_heads, head_dim, ffn), tied embeddings, as in Llama.
PRESETS = {
  "tiny": (2048, 128, 4, 4, 2, 32, 512),
  "small": (8192, 384, 6, 6, 2, 64, 1024),
  "125m": (49152, 768, 12, 12, 12, 64, 2048),
  "1b": (128256, 2048, 16, 32, 8, 64, 8192),  # Llama-3.2-1B
}
FRACTION = 0.1
LR = 1e-4


def llama_shapes(preset: str) -> dict:
  vocab, d, layers, heads, kv, hd, ffn = PRESETS[preset]
  layer = {
    "attn_norm": (d,),
    "q": (d, heads * hd),
    "k": (d, kv * hd),
    "v": (d, kv * hd),
    "o": (heads * hd, d),
    "mlp_norm": (d,),
    "gate": (d, ffn),
    "up": (d, ffn),
    "down": (ffn, d),
  }
  return {
    "embed": (vocab, d),
    "final_norm": (d,),
    "layers": {f"{i:02d}": dict(layer) for i in range(layers)},
  }


def random_tree(shapes: dict, seed: int, scale: float) -> dict:
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return treedef.unflatten(
    [scale * jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, leaves)]
  )


def topk_filter(fraction: float) -> optax.GradientTransformation:
  """The naive baseline: each matrix's threshold from jax.lax.top_k on its |momentum|."""

  def init_fn(params):
    return optax.scale_by_adam().init(params)

  def update_fn(updates, state, params=None):
    direction, state = optax.scale_by_adam().update(updates, state, params)

    def keep(u, m):
      if m.ndim < 2:
        return u
      k = max(1, math.floor(fraction * m.size))
      tau = jax.lax.top_k(jnp.abs(m).reshape(-1), k)[0][-1]
      return jnp.where(jnp.abs(m) >= tau, u, 0.0)

    return jax.tree.map(keep, direction, state.mu), state

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(mode: str) -> optax.GradientTransformation:
  if mode == "adamw":
    return optax.adamw(LR, weight_decay=0.0)
  if mode == "topk":
    return optax.chain(topk_filter(FRACTION), optax.scale_by_learning_rate(LR))
  return mofo_jax.mofo(LR, FRACTION, selection=mode)


def selected(mode: str, state, updates) -> tuple[int, int]:
  """Entries of the filtered (ndim >= 2) leaves that moved, and how many there are."""
  del state
  moved, total = 0, 0
  for u in jax.tree.leaves(updates):
    if u.ndim >= 2:
      moved += int(jnp.sum(u != 0))
      total += u.size
  return (total if mode == "adamw" else moved), total


def target_fraction(params) -> float:
  mats = [x.size for x in jax.tree.leaves(params) if x.ndim >= 2]
  return sum(max(1, math.floor(FRACTION * n)) for n in mats) / sum(mats)


def run_mode(mode: str, shapes: dict, grads: list, steps: int, warmup: int) -> dict:
  opt = make_optimizer(mode)

  def step(params, state, g):
    updates, state = opt.update(g, state, params)
    return optax.apply_updates(params, updates), state

  params = random_tree(shapes, 0, 0.02)
  state = opt.init(params)
  jitted = jax.jit(step, donate_argnums=(0, 1))
  compiled = jitted.lower(params, state, grads[0]).compile()
  mem = compiled.memory_analysis()
  temp = int(mem.temp_size_in_bytes) if mem is not None else None
  times = []
  for i in range(warmup + steps):
    g = grads[i % len(grads)]
    start = time.perf_counter()
    params, state = compiled(params, state, g)
    jax.block_until_ready((params, state))
    if i >= warmup:
      times.append(time.perf_counter() - start)
  # The fraction of the last step, from a separate (undonated) update on the final state.
  updates, _ = jax.jit(opt.update)(grads[0], state, params)
  moved, total = selected(mode, state, updates)
  device = jax.devices()[0]
  stats = device.memory_stats() if device.platform == "gpu" else None
  del params, state, updates
  return {
    "mode": mode,
    "ms": 1e3 * statistics.median(times),
    "ms_all": [1e3 * t for t in times],
    "fraction": moved / total,
    "temp_bytes": temp,
    "peak_bytes": int(stats["peak_bytes_in_use"]) if stats else None,
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
  parser.add_argument("--steps", type=int, default=7, help="timed steps per mode (>= 5)")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument(
    "--modes",
    default="adamw,exact,approx,topk",
    help="comma-separated: adamw, topk (lax.top_k baseline), or a "
    f"mofo_jax selection ({', '.join(mofo_jax._transform.SELECTIONS)})",
  )
  parser.add_argument("--out", help="write the results as JSON here")
  args = parser.parse_args(argv)
  modes = args.modes.split(",")
  if "adamw" not in modes:
    modes.insert(0, "adamw")  # ratios are always to adamw measured in the same run

  shapes = llama_shapes(args.preset)
  # Two gradient trees, alternated, so that momenta keep changing from step to step.
  grads = [random_tree(shapes, 1, 1e-3), random_tree(shapes, 2, 1e-3)]
  params = random_tree(shapes, 0, 0.02)
  n = sum(x.size for x in jax.tree.leaves(params))
  largest = max(x.size for x in jax.tree.leaves(params))
  target = target_fraction(params)
  del params

  results = [run_mode(m, shapes, grads, args.steps, args.warmup) for m in modes]
  base = next(r["ms"] for r in results if r["mode"] == "adamw")
  device = jax.devices()[0]
  print(
    f"preset {args.preset}: {n:,} params, {len(jax.tree.leaves(shapes, is_leaf=lambda s: isinstance(s, tuple)))} "
    f"leaves, largest {largest:,}; {device.device_kind} ({device.platform}), jax "
    f"{jax.__version__}; fraction {FRACTION} (target over matrices {target:.4f})"
  )
  print(
    f"{'mode':8s} {'ms':>9s} {'x adamw':>8s} {'min-max ms':>17s} {'fraction':>9s} "
    f"{'temp MiB':>9s} {'peak MiB':>9s}"
  )
  for r in results:
    r["ratio"] = r["ms"] / base
    peak = f"{r['peak_bytes'] / 2**20:9.1f}" if r["peak_bytes"] is not None else f"{'-':>9s}"
    temp = f"{r['temp_bytes'] / 2**20:9.1f}" if r["temp_bytes"] is not None else f"{'-':>9s}"
    print(
      f"{r['mode']:8s} {r['ms']:9.2f} {r['ratio']:8.2f} "
      f"{min(r['ms_all']):8.2f}-{max(r['ms_all']):8.2f} {r['fraction']:9.4f} {temp} {peak}"
    )
  if args.out:
    with open(args.out, "w") as f:
      json.dump(
        {
          "preset": args.preset,
          "params": n,
          "largest_leaf": largest,
          "target_fraction": target,
          "fraction": FRACTION,
          "steps": args.steps,
          "device": device.device_kind,
          "platform": device.platform,
          "jax": jax.__version__,
          "results": results,
        },
        f,
        indent=1,
      )


if __name__ == "__main__":
  main()
