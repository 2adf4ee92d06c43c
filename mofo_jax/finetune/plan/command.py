"""``mofo-finetune plan``'s command line: its flags, checking them, and the run."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mofo_jax.finetune.plan.aot import PlanResult, compile_step
from mofo_jax.finetune.plan.collective_bytes import global_batch_gathers
from mofo_jax.finetune.plan.presets import PRESETS, model_config
from mofo_jax.finetune.plan.report import figures_json, format_report
from mofo_jax.finetune.plan.targets import (
  HBM_GIB,
  PlanError,
  Target,
  check_mesh,
  cpu_devices,
  make_mesh,
  mesh_str,
  parse_target,
  resolve_mesh,
  tpu_devices,
)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="mofo-finetune plan",
    description="AOT-compile the fine-tuning step for a TPU slice (or N devices) and report "
    "its memory and collectives per device, without allocating weights.",
  )
  p.add_argument(
    "--model",
    required=True,
    help=f"a preset ({', '.join(PRESETS)}) or a Hugging Face config.json (or its directory)",
  )
  p.add_argument(
    "--topology",
    help="TPU slice: GEN:SHAPE (v5e:4x4, v4:2x2x4, v5p:2x4x4, v6e:4x4) or an accelerator "
    "type (v4-32, v5litepod-16, v5p-64, v6e-16)",
  )
  p.add_argument("--devices", type=int, help="a device count instead of --topology")
  p.add_argument("--chip", help=f"with --devices: the chip, for its HBM ({', '.join(HBM_GIB)})")
  p.add_argument(
    "--mesh", default="fsdp=-1", help="data=..,fsdp=..,tensor=.. (one may be -1; default fsdp=-1)"
  )
  p.add_argument(
    "--batch-size",
    type=int,
    default=None,
    help="rows per optimizer step, all devices and accumulation included (default: data x fsdp)",
  )
  p.add_argument("--seq-len", type=int, default=2048, help="tokens per row (default: 2048)")
  p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default: 1)")
  dtypes = ("float32", "bfloat16")
  p.add_argument("--dtype", choices=dtypes, help="parameter and compute dtype at once")
  p.add_argument(
    "--param-dtype", choices=dtypes, help="weights, the master copy (default: float32)"
  )
  p.add_argument("--compute-dtype", choices=dtypes, help="matmuls (default: bfloat16)")
  p.add_argument(
    "--remat", choices=("full", "none"), default="full", help="recompute layers (default: full)"
  )
  p.add_argument(
    "--no-scan-layers", action="store_true", help="separate layers (slow to compile at 8B+)"
  )
  p.add_argument(
    "--optimizer",
    default="mofo,adamw",
    help="comma-separated optimizers to compile side by side (default: mofo,adamw)",
  )
  p.add_argument("--fraction", type=float, default=0.1, help="MoFO's fraction (default: 0.1)")
  p.add_argument(
    "--loss-chunk", type=int, default=None, help="positions per loss chunk (default: 512)"
  )
  p.add_argument(
    "--platform",
    choices=("auto", "tpu", "cpu"),
    default="auto",
    help="auto: the TPU compiler when libtpu is installed and --topology names a TPU, "
    "else simulated CPU devices",
  )
  p.add_argument(
    "--layers", type=int, default=None, help="override num_hidden_layers (quick looks, tests)"
  )
  p.add_argument("--json", metavar="FILE", help="also write the figures to FILE (a new file)")
  p.add_argument(
    "--save-hlo", metavar="DIR", help="write each optimizer's optimized HLO into DIR (new files)"
  )
  return p


def run_plan(args: argparse.Namespace) -> tuple[str, list[PlanResult]]:
  """Compiles what ``args`` describe; returns the printed report and the results."""
  target = parse_target(args.topology, args.devices, args.chip)
  sizes = resolve_mesh(args.mesh, target.devices)
  batch = args.batch_size if args.batch_size is not None else sizes["data"] * sizes["fsdp"]
  names = _optimizer_names(args)
  _check_sizes(args, sizes, batch)
  param_dtype = args.param_dtype or args.dtype or "float32"
  compute_dtype = args.compute_dtype or args.dtype or "bfloat16"
  overrides = {} if args.layers is None else {"num_hidden_layers": args.layers}
  config = model_config(
    args.model,
    **overrides,
    dtype=compute_dtype,
    param_dtype=param_dtype,
    remat=args.remat == "full",
    scan_layers=not args.no_scan_layers,
  )
  check_mesh(config, sizes, target.devices)
  devices, on_tpu = _devices(args.platform, target)
  mesh = make_mesh(devices, sizes)
  hbm = HBM_GIB.get(target.generation) if target.generation else None
  if on_tpu:
    import jax

    how = f"TPU compiler (libtpu, jax {jax.__version__}), {devices[0].device_kind}"
  else:
    how = "simulated CPU devices (XLA:CPU's figures: an estimate; TPU compilers differ)"
  header = [
    f"plan: {args.model} on {target.topology or f'{target.devices} devices'}: {how}",
    f"mesh {mesh_str(sizes)}; batch {batch} x {args.seq_len} tokens"
    + (f" in {args.grad_accum} micro-batches" if args.grad_accum > 1 else "")
    + f"; params {param_dtype}, compute {compute_dtype}, moments float32; remat {args.remat}; "
    + ("separate layers" if args.no_scan_layers else "scanned layers"),
  ]
  results = _compile_all(args, config, mesh, names, batch)
  seqs = [args.seq_len, min(args.seq_len, args.loss_chunk or 512)]
  for r in results:
    bad = global_batch_gathers(r.collectives, batch // args.grad_accum, seqs)
    if bad and batch // args.grad_accum > 1 and sizes["data"] * sizes["fsdp"] > 1:
      header.append(
        f"warning: {r.optimizer}: {len(bad)} all-gathers assemble the global batch, e.g. "
        f"{bad[0].shapes}"
      )
  if hbm is not None and not on_tpu:
    header.append(f"HBM per device assumed: {hbm} GiB ({target.generation})")
  report = format_report(header, results, hbm)
  if args.json:
    Path(args.json).write_text(figures_json(header, results, hbm))
  return report, results


def _optimizer_names(args: argparse.Namespace) -> list[str]:
  """The ``--optimizer`` list, each a known optimizer this layout can compile."""
  from mofo_jax.finetune.optimizers import OPTIMIZERS

  names = [n.strip() for n in args.optimizer.split(",") if n.strip()]
  for n in names:
    if n not in OPTIMIZERS:
      raise PlanError(f"--optimizer {n!r}: known optimizers are {', '.join(OPTIMIZERS)}")
  if "hft" in names and not args.no_scan_layers:
    raise PlanError("--optimizer hft needs --no-scan-layers")
  return names


def _check_sizes(args: argparse.Namespace, sizes: dict[str, int], batch: int) -> None:
  """The batch, sequence, accumulation and layer counts, and a new ``--json`` file."""
  if args.seq_len < 1 or batch < 1 or args.grad_accum < 1:
    raise PlanError("--batch-size, --seq-len and --grad-accum must be positive")
  if batch % (args.grad_accum * sizes["data"] * sizes["fsdp"]):
    raise PlanError(
      f"--batch-size {batch} is not a multiple of grad_accum x data x fsdp = "
      f"{args.grad_accum * sizes['data'] * sizes['fsdp']}"
    )
  if args.json and Path(args.json).exists():
    raise PlanError(f"--json {args.json}: the file exists; give a new name")
  # Checked before compiling: a write that fails after minutes of compile loses the plan.
  if args.json and not Path(args.json).parent.is_dir():
    raise PlanError(f"--json {args.json}: the directory {Path(args.json).parent} does not exist")
  if args.save_hlo and Path(args.save_hlo).exists() and not Path(args.save_hlo).is_dir():
    raise PlanError(f"--save-hlo {args.save_hlo}: a file, not a directory")
  if args.layers is not None and args.layers < 1:
    raise PlanError("--layers must be positive")


def _devices(platform: str, target: Target) -> tuple[list, bool]:
  """The devices to compile for, and whether they are libtpu's (else simulated CPUs)."""
  devices = None
  if platform != "cpu" and target.topology is not None:
    devices = tpu_devices(target.topology)
    if devices is None and platform == "tpu":
      raise PlanError("--platform tpu needs libtpu: pip install 'mofo-jax[tpu-plan]'")
  if platform == "tpu" and target.topology is None:
    raise PlanError("--platform tpu needs --topology")
  if devices is not None:
    return devices, True
  return cpu_devices(target.devices), False


def _compile_all(args, config, mesh, names: list[str], batch: int) -> list[PlanResult]:
  """Compiles the step for each optimizer; with ``--save-hlo``, writes each one's HLO."""
  hlo_dir = Path(args.save_hlo) if args.save_hlo else None
  if hlo_dir is not None:
    clash = [hlo_dir / f"{n}.hlo.txt" for n in names if (hlo_dir / f"{n}.hlo.txt").exists()]
    if clash:
      raise PlanError(f"--save-hlo: {clash[0]} exists; give a new directory")
  results = []
  for n in names:
    result, compiled = compile_step(
      config,
      mesh,
      n,
      batch,
      args.seq_len,
      fraction=args.fraction,
      grad_accum=args.grad_accum,
      loss_chunk=args.loss_chunk,
    )
    results.append(result)
    if hlo_dir is not None and compiled is not None:
      hlo_dir.mkdir(parents=True, exist_ok=True)
      (hlo_dir / f"{n}.hlo.txt").write_text(compiled.as_text())
  return results


def main(argv: Sequence[str] | None = None) -> int:
  """``mofo-finetune plan``: prints the plan; user errors are one line with exit status 2."""
  args = build_parser().parse_args(argv)
  try:
    report, _ = run_plan(args)
  except PlanError as e:
    print(f"mofo-finetune plan: error: {e}", file=sys.stderr)
    return 2
  print(report)
  return 0
