"""The accelerator benchmark in one command: step time, compile time and memory per mode.

Runs ``benchmarks/step_time.py`` once per mode, each in its own process (so that a mode that
fails, runs out of memory or hangs loses only itself, and the process's peak device memory is
that mode's), each process timing its mode and then optax.adamw, so that every ratio is
measured within one process. Results go to ``$OUT`` (``./out`` when ``OUT`` is unset):
``step_<mode>.json`` and ``step_<mode>.log`` per mode, and ``device_suite.json`` with every
mode's result or error, rewritten after each mode so that a run cut short keeps what it
measured. Needs only jax and optax (no installation):

  PYTHONPATH=. python benchmarks/device_suite.py            # 1b preset, at most 280 s
  PYTHONPATH=. python benchmarks/device_suite.py --preset micro --steps 2   # a CPU smoke run

The default modes are the XLA paths (``exact-xla``, ``approx-xla``) and the platform's kernel
paths (on TPU ``kernel``, ``kernel-full``, ``approx-kernel``: the Pallas TPU kernels; on GPU ``kernel-gpu``: the
Pallas Triton kernel; on CPU none: there they run the XLA paths' programs again), each beside
optax.adamw. Each mode gets at most ``--timeout`` seconds and at most an equal share of what is
left of ``--budget``, so that one slow mode cannot leave the next ones nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# The XLA paths and the kernel paths of the platform: off TPU the Pallas TPU modes compile to
# the XLA paths' programs, and off CUDA kernel-gpu does, so only the platform's own kernels are
# timed (on CPU none: timing the same program again measures nothing new).
MODES = {
  "gpu": "exact-xla,approx-xla,kernel-gpu",
  "tpu": "exact-xla,approx-xla,kernel,kernel-full,approx-kernel",
  "cpu": "exact-xla,approx-xla",
}


def default_modes() -> str:
  """The modes for the platform JAX finds, asked in a subprocess: JAX in this process would
  take the accelerator's memory from the modes' processes."""
  probe = [sys.executable, "-c", "import jax; print(jax.default_backend())"]
  r = subprocess.run(probe, capture_output=True, text=True, check=False, timeout=120)
  return MODES.get(r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "", MODES["cpu"])


def run(args) -> dict:
  out = os.environ.get("OUT") or "out"
  os.makedirs(out, exist_ok=True)
  summary_path = os.path.join(out, "device_suite.json")
  modes = [m for m in (args.modes or default_modes()).split(",") if m]
  ours = [summary_path] + [
    os.path.join(out, f"step_{m}.{ext}") for m in modes for ext in ("json", "log")
  ]
  existing = [p for p in ours if os.path.exists(p)]
  if existing and not args.overwrite:
    print(f"error: {existing[0]} exists; pass --overwrite to replace it", file=sys.stderr)
    sys.exit(2)
  for p in existing:
    os.remove(p)
  summary = {"preset": args.preset, "steps": args.steps, "out": out, "modes": {}}
  start = time.monotonic()

  def save():
    summary["wall_s"] = time.monotonic() - start
    with open(summary_path, "w") as f:
      json.dump(summary, f, indent=1)

  for n, mode in enumerate(modes):
    left = args.budget - (time.monotonic() - start)
    if left < min(10, args.timeout):
      summary["modes"][mode] = {
        "error": f"skipped: the suite's {args.budget:.0f} s budget is spent"
      }
      save()
      continue
    timeout = min(args.timeout, left / (len(modes) - n))
    result_path = os.path.join(out, f"step_{mode}.json")
    cmd = [
      sys.executable,
      os.path.join(HERE, "step_time.py"),
      f"--preset={args.preset}",
      f"--modes={mode}",
      f"--steps={args.steps}",
      f"--warmup={args.warmup}",
      f"--out={result_path}",
    ]
    began = time.monotonic()
    with open(os.path.join(out, f"step_{mode}.log"), "w") as log:
      try:
        rc = subprocess.run(
          cmd, check=False, stdout=log, stderr=subprocess.STDOUT, timeout=timeout
        ).returncode
      except subprocess.TimeoutExpired:
        rc = None
    entry = {"wall_s": time.monotonic() - began}
    if rc is None:
      entry["error"] = f"timed out after {timeout:.3g} s"
    elif rc != 0 or not os.path.exists(result_path):
      with open(os.path.join(out, f"step_{mode}.log")) as f:
        tail = [line.strip() for line in f if line.strip()][-1:] or [""]
      entry["error"] = f"exit status {rc}: {tail[0]}"
    else:
      with open(result_path) as f:
        result = json.load(f)
      by_mode = {r["mode"]: r for r in result["results"]}
      entry.update(by_mode[mode])
      entry["adamw_ms_same_process"] = by_mode["adamw"]["ms"]
      summary.update({k: v for k, v in result.items() if k != "results"})
    summary["modes"][mode] = entry
    save()
    print_row(mode, entry)
  return summary


def _mib(b) -> str:
  return f"{b / 2**20:9.0f}" if b is not None else f"{'-':>9s}"


def print_row(mode: str, r: dict) -> None:
  if "error" in r:
    print(f"{mode:11s} {r['error']}", flush=True)
    return
  print(
    f"{mode:11s} {r['ms']:9.2f} ms {r['ratio']:6.2f}x adamw ({r['adamw_ms_same_process']:.2f} ms) "
    f"fraction {r['fraction']:.4f} compile {r['lower_s'] + r['compile_s']:6.1f} s "
    f"temp {_mib(r['temp_bytes'])} MiB peak {_mib(r['peak_bytes'])} MiB",
    flush=True,
  )


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="1b", help="a benchmarks/step_time.py preset")
  parser.add_argument(
    "--modes",
    help=f"comma-separated (default by platform: {', '.join(f'{k}: {v}' for k, v in MODES.items())})",
  )
  parser.add_argument("--steps", type=int, default=7)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--timeout", type=float, default=120, help="seconds per mode, at most")
  parser.add_argument("--budget", type=float, default=280, help="seconds for the whole suite")
  parser.add_argument("--overwrite", action="store_true", help="replace an earlier run's files")
  args = parser.parse_args(argv)
  summary = run(args)
  print(f"wrote {os.path.join(summary['out'], 'device_suite.json')} in {summary['wall_s']:.0f} s")


if __name__ == "__main__":
  main()
