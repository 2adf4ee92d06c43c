"""Step time, compile time and memory of MoFO against optax.adamw on Llama-shaped trees.

Every mode runs the full donated step (update + apply_updates) in this one process, one mode
after another, on the same parameters and gradients; the time of a mode is the median of
``--steps`` steps after warm-up, and every ratio is to optax.adamw measured in the same run.
Runs unchanged on CPU, GPU and TPU.

  python benchmarks/step_time.py --preset small --steps 7 --out small.json
  python benchmarks/step_time.py --preset 1b --compile-only          # abstract shapes, no weights
  .venv-tpu/bin/python benchmarks/step_time.py --tpu-topology v6e:1x1   # the tpu-plan extra's venv

``--compile-only`` lowers and compiles the step on ``jax.ShapeDtypeStruct`` s (nothing is
allocated) and reports the compile time and compiled temporary bytes of each mode.
``--tpu-topology`` does the same for one chip of a real TPU topology through libtpu (no TPU
needed) and reports bytes accessed per parameter from ``cost_analysis()``, with the trips of
every while loop counted (see benchmarks/hlo_bytes.py).
"""

from __future__ import annotations

import argparse
import contextlib
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
import mofo_jax
from benchmarks import hlo_bytes

# (vocab, d_model, layers, heads, kv_heads, head_dim, ffn), tied embeddings, as in Llama.
PRESETS = {
  "micro": (256, 32, 2, 2, 1, 16, 64),
  "tiny": (2048, 128, 4, 4, 2, 32, 512),
  "small": (8192, 384, 6, 6, 2, 64, 1024),
  "125m": (49152, 768, 12, 12, 12, 64, 2048),
  "1b": (128256, 2048, 16, 32, 8, 64, 8192),  # Llama-3.2-1B
}
MODES = ("adamw", "exact", "approx", "topk")
# Not run by default: the counting search (what GPUs and TPUs run) started from the last step's
# thresholds, as "exact" does there, and in full every step.
EXTRA_SELECTIONS = {
  "count": mofo_jax.ExactSelection(method="count"),
  "count-full": mofo_jax.ExactSelection(method="count", bracket_bits=0),
  # The Pallas TPU kernels where a leaf allows them ("auto": only when lowered for TPU), the
  # exact XLA path elsewhere; "kernel-full" without the bracket (7 counting passes, not 4).
  # "exact" is mofo_jax.PallasSelection(): on TPU the same program as "kernel"; this is the XLA
  # path it falls back to.
  "exact-xla": mofo_jax.ExactSelection(),
  "kernel": mofo_jax.PallasSelection(),
  "kernel-full": mofo_jax.PallasSelection(bracket=False),
  # "approx" is mofo_jax.ApproxSelection(), the same program as "approx-xla"; "approx-kernel" is
  # its opt-in Pallas TPU kernel (the XLA path off TPU).
  "approx-xla": mofo_jax.ApproxSelection(),
  "approx-kernel": mofo_jax.PallasApproxSelection(),
  # The two samplings of ApproxSelection, whatever the platform ("approx" picks "scores" on CPU).
  "approx-inputs": mofo_jax.ApproxSelection(sample_from="inputs"),
  "approx-scores": mofo_jax.ApproxSelection(sample_from="scores"),
  # The Pallas Triton kernel (opt-in, "auto": only when lowered for CUDA), the exact XLA path
  # elsewhere.
  "kernel-gpu": mofo_jax.TritonSelection(),
}
FRACTION = 0.1
LR = 1e-4
# Targets of issue 11 for the TPU compile: bytes (every pass) as a multiple of adamw's.
TPU_TARGETS = {
  "exact": 1.5,
  "approx": 1.15,
  "kernel": 1.5,
  "kernel-full": 1.5,
  "exact-xla": 1.5,
  "approx-xla": 1.15,
  "approx-kernel": 1.15,
}


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


def _is_shape(s) -> bool:
  return isinstance(s, tuple)


def random_tree(shapes: dict, seed: int, scale: float) -> dict:
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten(
    [scale * jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, leaves)]
  )


def abstract_tree(shapes: dict, sharding=None) -> dict:
  return jax.tree.map(
    lambda s: jax.ShapeDtypeStruct(s, jnp.float32, sharding=sharding), shapes, is_leaf=_is_shape
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
  if mode in EXTRA_SELECTIONS:
    return mofo_jax.mofo(LR, FRACTION, selection=EXTRA_SELECTIONS[mode])
  return mofo_jax.mofo(LR, FRACTION, selection=mode)


def jitted_step(opt: optax.GradientTransformation):
  """A fresh jitted, donated update + apply step (fresh, so that nothing is cached)."""

  def step(params, state, g):
    updates, state = opt.update(g, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1))


def timed_compile(opt, params, state, grads) -> tuple:
  """The compiled step, seconds to trace and lower it, and seconds to compile it."""
  start = time.perf_counter()
  lowered = jitted_step(opt).lower(params, state, grads)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  return compiled, lowered_at - start, time.perf_counter() - lowered_at


def _changed(before: dict, after: dict) -> tuple[int, int]:
  """Entries of the filtered (ndim >= 2) leaves that differ, and how many there are."""
  pairs = [(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)) if a.ndim >= 2]
  count = jax.jit(lambda pairs: sum(jnp.sum(a != b, dtype=jnp.float32) for a, b in pairs))
  return int(count(pairs)), sum(a.size for a, _ in pairs)


def target_fraction(shapes: dict) -> float:
  mats = [math.prod(s) for s in jax.tree.leaves(shapes, is_leaf=_is_shape) if len(s) >= 2]
  return sum(max(1, math.floor(FRACTION * n)) for n in mats) / sum(mats)


def _temp_bytes(compiled) -> int | None:
  mem = compiled.memory_analysis()
  return int(mem.temp_size_in_bytes) if mem is not None else None


def _peak_bytes() -> int | None:
  """The process's peak device memory so far, where the backend reports it (GPU, TPU).

  Taken after a mode's timed steps: its params, state, the two gradient trees and its step's
  temporaries, and whatever modes ran before it in this process (run one mode first, or one
  per process, as benchmarks/device_suite.py does, for a mode's own peak)."""
  stats = jax.devices()[0].memory_stats()
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def run_mode(mode: str, shapes: dict, grads: list, steps: int, warmup: int) -> dict:
  opt = make_optimizer(mode)
  params = random_tree(shapes, 0, 0.02)
  state = opt.init(params)
  compiled, lower_s, compile_s = timed_compile(opt, params, state, grads[0])
  times = []
  for i in range(warmup + steps):
    g = grads[i % len(grads)]
    start = time.perf_counter()
    params, state = compiled(params, state, g)
    jax.block_until_ready((params, state))
    if i >= warmup:
      times.append(time.perf_counter() - start)
  peak = _peak_bytes()
  # The fraction of one more step: without weight decay, the entries that were not selected
  # stay bit-for-bit where they were.
  before = jax.jit(lambda t: jax.tree.map(jnp.copy, t))(params)
  params, state = compiled(params, state, grads[0])
  moved, total = _changed(before, params)
  del params, state, before
  return {
    "mode": mode,
    "ms": 1e3 * statistics.median(times),
    "ms_all": [1e3 * t for t in times],
    "fraction": moved / total,
    "lower_s": lower_s,
    "compile_s": compile_s,
    "temp_bytes": _temp_bytes(compiled),
    "peak_bytes": peak,
  }


def compile_mode(mode: str, shapes: dict, sharding=None) -> tuple[dict, object]:
  """Lower and compile the step on abstract params (no weights allocated)."""
  opt = make_optimizer(mode)
  params = abstract_tree(shapes, sharding)
  state = jax.eval_shape(opt.init, params)
  if sharding is not None:
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)
  compiled, lower_s, compile_s = timed_compile(opt, params, state, params)
  mem = compiled.memory_analysis()
  return {
    "mode": mode,
    "lower_s": lower_s,
    "compile_s": compile_s,
    "temp_bytes": _temp_bytes(compiled),
    "argument_bytes": int(mem.argument_size_in_bytes) if mem is not None else None,
  }, compiled


def tpu_device(topology: str):
  """One chip of a TPU topology, for compiling only (libtpu, no TPU attached)."""
  # Only compiles: libtpu's one-process lock has nothing to protect (sessions share machines).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  from jax.experimental import topologies

  kwargs = {"chip_config_name": "megacore"} if topology.startswith("v4") else {}
  try:
    topo = topologies.get_topology_desc(
      platform="tpu", topology_name=topology, chips_per_host_bounds=(1, 1, 1), **kwargs
    )
  except (RuntimeError, ValueError) as e:  # no libtpu, or a topology libtpu does not know
    print(f"error: --tpu-topology {topology}: {str(e).splitlines()[0]}", file=sys.stderr)
    sys.exit(2)
  return topo.devices[0]


def _mib(b) -> str:
  return f"{b / 2**20:9.1f}" if b is not None else f"{'-':>9s}"


def header(preset: str, shapes: dict, platform: str) -> dict:
  sizes = [math.prod(s) for s in jax.tree.leaves(shapes, is_leaf=_is_shape)]
  info = {
    "preset": preset,
    "params": sum(sizes),
    "leaves": len(sizes),
    "largest_leaf": max(sizes),
    "fraction": FRACTION,
    "target_fraction": target_fraction(shapes),
    "platform": platform,
    "jax": jax.__version__,
  }
  print(
    f"preset {preset}: {info['params']:,} params, {info['leaves']} leaves, largest "
    f"{info['largest_leaf']:,}; {platform}, jax {jax.__version__}; fraction {FRACTION} "
    f"(target over matrices {info['target_fraction']:.4f})"
  )
  return info


def main_steps(args, modes, shapes) -> dict:
  device = jax.devices()[0]
  info = header(args.preset, shapes, f"{device.device_kind} ({device.platform})")
  # Two gradient trees, alternated, so that momenta keep changing from step to step.
  grads = [random_tree(shapes, 1, 1e-3), random_tree(shapes, 2, 1e-3)]
  results = [run_mode(m, shapes, grads, args.steps, args.warmup) for m in modes]
  base = next(r["ms"] for r in results if r["mode"] == "adamw")
  print(
    f"{'mode':8s} {'ms':>9s} {'x adamw':>8s} {'min-max ms':>17s} {'fraction':>9s} "
    f"{'compile s':>9s} {'temp MiB':>9s} {'peak MiB':>9s}"
  )
  for r in results:
    r["ratio"] = r["ms"] / base
    print(
      f"{r['mode']:8s} {r['ms']:9.2f} {r['ratio']:8.2f} "
      f"{min(r['ms_all']):8.2f}-{max(r['ms_all']):8.2f} {r['fraction']:9.4f} "
      f"{r['lower_s'] + r['compile_s']:9.2f} {_mib(r['temp_bytes'])} {_mib(r['peak_bytes'])}"
    )
  return {**info, "steps": args.steps, "results": results}


def main_compile(args, modes, shapes, device=None) -> dict:
  sharding = None
  if device is not None:
    mesh = jax.sharding.Mesh([device], ("chip",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    platform = f"{device.device_kind} (compile only, {args.tpu_topology})"
  else:
    d = jax.devices()[0]
    platform = f"{d.device_kind} ({d.platform}, compile only)"
  info = header(args.preset, shapes, platform)
  n, largest = info["params"], info["largest_leaf"]
  results = []
  for m in modes:
    # On a TPU topology, its chip as the default device, as on a TPU host: "auto" selections
    # then trace only the TPU branch (mofo_jax._platform).
    with jax.default_device(device) if device is not None else contextlib.nullcontext():
      r, compiled = compile_mode(m, shapes, sharding)
    if device is not None:
      r.update(hlo_bytes.every_pass(compiled))
      if args.dump_hlo:
        os.makedirs(args.dump_hlo, exist_ok=True)
        with open(os.path.join(args.dump_hlo, f"{args.preset}_{m}.hlo.txt"), "w") as f:
          f.write(compiled.as_text())
      r["bytes_per_param_once"] = r["cost_analysis_bytes"] / n
      r["bytes_per_param"] = r["every_pass_bytes"] / n
      r["hbm_bytes_per_param"] = r["device_memory_bytes"] / n
      r["bytes_per_param_min"] = r["every_pass_bytes_min"] / n
      r["parsed_bytes_per_param"] = r["parsed_bytes"] / n
      r["parsed_bytes_per_param_min"] = r["parsed_bytes_min"] / n
      r["hbm_bytes_per_param_min"] = r["device_memory_bytes_min"] / n
    del compiled
    results.append(r)
  base = next(r for r in results if r["mode"] == "adamw")
  if device is None:
    print(f"{'mode':8s} {'lower s':>8s} {'compile s':>9s} {'x adamw':>8s} {'temp MiB':>9s}")
    for r in results:
      r["compile_ratio"] = (r["lower_s"] + r["compile_s"]) / (base["lower_s"] + base["compile_s"])
      print(
        f"{r['mode']:8s} {r['lower_s']:8.2f} {r['compile_s']:9.2f} {r['compile_ratio']:8.2f} "
        f"{_mib(r['temp_bytes'])}"
      )
    return {**info, "results": results}
  print(
    f"{'mode':8s} {'B/param':>8s} {'x adamw':>8s} {'target':>7s} {'once':>7s} {'HBM':>6s} "
    f"{'x adamw':>8s} {'parsed':>7s} {'x adamw':>8s} {'loops':>8s} {'temp MiB':>9s} "
    f"{'temp ok':>7s} {'compile s':>9s}"
  )
  for r in results:
    r["ratio"] = r["bytes_per_param"] / base["bytes_per_param"]
    r["hbm_ratio"] = r["hbm_bytes_per_param"] / base["hbm_bytes_per_param"]
    r["parsed_ratio"] = r["parsed_bytes_per_param"] / base["parsed_bytes_per_param"]
    target = TPU_TARGETS.get(r["mode"])
    r["target_met"] = None if target is None else r["ratio"] <= target
    r["temp_target_met"] = r["temp_bytes"] <= 4 * largest
    loops = "+".join("?" if t is None else str(t) for t in (x["trips"] for x in r["loops"]))
    print(
      f"{r['mode']:8s} {r['bytes_per_param']:8.1f} {r['ratio']:8.2f} "
      f"{(f'<={target}' if target else '-'):>7s} {r['bytes_per_param_once']:7.1f} "
      f"{r['hbm_bytes_per_param']:6.1f} {r['hbm_ratio']:8.2f} "
      f"{r['parsed_bytes_per_param']:7.1f} {r['parsed_ratio']:8.2f} {loops or '-':>8s} "
      f"{_mib(r['temp_bytes'])} {r['temp_target_met']!s:>7s} {r['lower_s'] + r['compile_s']:9.1f}"
    )
  for r in results:
    if r["conditionals"]:
      print(
        f"{r['mode']}: a conditional picks its search at run time; billed above at its dearest "
        f"branches; at its cheapest (exact: when every block's threshold stayed in its "
        f"bracket) {r['bytes_per_param_min']:.1f} B/param "
        f"({r['bytes_per_param_min'] / base['bytes_per_param']:.2f}x), HBM "
        f"{r['hbm_bytes_per_param_min']:.1f} "
        f"({r['hbm_bytes_per_param_min'] / base['hbm_bytes_per_param']:.2f}x), parsed "
        f"{r['parsed_bytes_per_param_min']:.1f} "
        f"({r['parsed_bytes_per_param_min'] / base['parsed_bytes_per_param']:.2f}x)"
      )
  print(
    "B/param: cost_analysis() bytes accessed with every while-loop trip counted (the targets' "
    "measure); once: cost_analysis() as reported (each loop body once); HBM: bytes to and from "
    "device memory only, every trip, as parsed from the HLO; parsed: every byte, every trip, "
    "as parsed from the HLO, custom calls (the Pallas kernels) billed by their operands and "
    "outputs, which cost_analysis() leaves out; loops: trip counts found (?: "
    "decided at run time, counted once); temp ok: temp <= one float32 copy of the largest leaf "
    f"({_mib(4 * largest).strip()} MiB)."
  )
  return {**info, "topology": args.tpu_topology, "results": results}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
  parser.add_argument("--steps", type=int, default=7, help="timed steps per mode")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument(
    "--modes",
    default=None,
    help="comma-separated: adamw, topk (lax.top_k baseline), count / count-full (the counting "
    "search with and without the bracket), kernel / kernel-full (mofo_jax.PallasSelection with "
    "and without the bracket), exact-xla (ExactSelection), approx-xla (ApproxSelection), "
    "approx-kernel (mofo_jax.PallasApproxSelection), approx-inputs / approx-scores (ApproxSelection(sample_from=...)), kernel-gpu (mofo_jax.TritonSelection) or a mofo_jax selection (exact, approx, ...); default adamw,exact,approx,topk (adamw,exact,approx for --tpu-topology)",
  )
  parser.add_argument(
    "--compile-only", action="store_true", help="only lower and compile, on abstract shapes"
  )
  parser.add_argument(
    "--tpu-topology",
    help="compile only, for one chip of this TPU topology (e.g. v6e:1x1; needs libtpu)",
  )
  parser.add_argument(
    "--dump-hlo", metavar="DIR", help="with --tpu-topology: write each mode's optimised HLO here"
  )
  parser.add_argument("--out", help="write the results as JSON here (a new file)")
  parser.add_argument("--overwrite", action="store_true", help="let --out replace a file")
  args = parser.parse_args(argv)
  if args.steps < 1 or args.warmup < 0:
    parser.error("--steps must be >= 1 and --warmup >= 0")
  if args.out and os.path.exists(args.out) and not args.overwrite:
    parser.error(f"--out {args.out} exists; pass --overwrite to replace it")
  if args.preset is None:
    args.preset = "1b" if args.tpu_topology else "small"
  default = "adamw,exact,approx" if args.tpu_topology else ",".join(MODES)
  modes = [m for m in (args.modes or default).split(",") if m]
  if "adamw" not in modes:
    modes.append("adamw")  # ratios are always to adamw measured in the same run
  for m in modes:
    try:
      make_optimizer(m)
    except (ValueError, TypeError) as e:
      parser.error(f"--modes: {m!r}: {e}")
  shapes = llama_shapes(args.preset)

  if args.tpu_topology:
    result = main_compile(args, modes, shapes, tpu_device(args.tpu_topology))
  elif args.compile_only:
    result = main_compile(args, modes, shapes)
  else:
    result = main_steps(args, modes, shapes)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
