"""Fault injection: mofo-finetune SIGKILLed during steps and during saves resumes to the same run.

Each run is a fresh process (tests/finetune/fault_worker.py) sharing a JAX compilation cache, so
only the first one compiles. The interrupted chain must end bit for bit where one uninterrupted
run ends, with the same metrics lines, none repeated, and the pretrained baseline kept.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from etils import epath
from safetensors.numpy import load

# Imported before any gs:// path is used: it turns off gcsfs's listing cache.
from mofo_jax.finetune import storage
from tests.processes import free_port

WORKER = Path(__file__).with_name("fault_worker.py")


def _args(model, steps=6):
  return [
    "--model",
    str(model),
    "--train-examples",
    "64",
    "--eval-examples",
    "8",
    "--old-text-batches",
    "0",
    "--difficulty",
    "1",
    "--seq-len",
    "128",
    "--no-progress",
    "--mesh",
    "data=1",
    "--steps",
    str(steps),
    "--eval-every",
    "3",
    "--checkpoint-every",
    "2",
    "--lr",
    "1e-2",
  ]


def _command(mode, n, args, cache, devices=None):
  """argv and environment of a fault_worker run (``devices``: simulated CPU devices)."""
  env = {
    **os.environ,
    "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
    "JAX_COMPILATION_CACHE_DIR": str(cache),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
  }
  if devices is not None:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return [sys.executable, str(WORKER), mode, str(n), "--", *args], env


def _run(mode, n, args, cache, devices=None):
  argv, env = _command(mode, n, args, cache, devices)
  return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


def _run_processes(modes, n, args, cache, logs, devices=4, cwds=None, timeout=300):
  """Runs one fault_worker per mode as the processes of one --distributed run.

  Args:
    modes: each process's fault_worker mode (process i gets ``modes[i]``).
    logs: a directory for each process's output (files: a full pipe would stall a process
      while its peer waits for it in a collective).
    cwds: each process's working directory (default: this one).

  Returns:
    ``subprocess.CompletedProcess`` per process, output in ``stderr``.
  """
  port = free_port()
  Path(logs).mkdir(parents=True, exist_ok=True)
  procs = []
  for i, mode in enumerate(modes):
    flags = ["--distributed", "--coordinator-address", f"127.0.0.1:{port}"]
    flags += ["--num-processes", str(len(modes)), "--process-id", str(i)]
    argv, env = _command(mode, n, [*args, *flags], cache, devices)
    with open(Path(logs) / f"process{i}.log", "w") as log:
      cwd = cwds[i] if cwds else None
      procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=log, cwd=cwd))
  try:
    for proc in procs:
      proc.wait(timeout=timeout)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return [
    subprocess.CompletedProcess(
      p.args, p.returncode, "", (Path(logs) / f"process{i}.log").read_text()
    )
    for i, p in enumerate(procs)
  ]


def _metrics(out):
  lines = [json.loads(x) for x in storage.read_lines(out / "metrics.jsonl")]
  return [{k: v for k, v in r.items() if k != "step_time_s"} for r in lines]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "gcs"])
def test_killed_runs_resume_to_the_uninterrupted_run(tiny_checkpoint, tmp_path, where, request):
  """Killed runs resume bit for bit, with local or ``gs://`` (GCS emulator) directories."""
  cache = tmp_path / "jax_cache"
  ref = _run("none", 0, _args(tiny_checkpoint) + ["--output-dir", str(tmp_path / "ref")], cache)
  assert ref.returncode == 0, ref.stderr[-2000:]
  base = request.getfixturevalue("gcs_dir") if where == "gcs" else epath.Path(tmp_path)
  out, ckpt = base / "out", base / "ckpt"
  run = _args(tiny_checkpoint) + ["--output-dir", str(out), "--checkpoint-dir", str(ckpt)]
  # Killed: after step 3 (checkpoint 2 on disk); while committing step 4's save; right after
  # step 4's save started; after step 5 (checkpoint 4 on disk). Each one resumes the last.
  for i, (mode, n) in enumerate([("step", 3), ("save", 4), ("save-start", 4), ("step", 5)]):
    proc = _run(mode, n, run + (["--resume"] if i else []), cache)
    assert proc.returncode == -9, (mode, n, proc.stderr[-2000:])
    steps = sorted(p.name for p in ckpt.iterdir() if p.name.isdigit())
    assert steps, (mode, n)
  done = _run("none", 0, run + ["--resume"], cache)
  assert done.returncode == 0, done.stderr[-2000:]
  assert_same_run(out, tmp_path / "ref", evals=[0, 3, 6])


def assert_same_run(out, ref, evals):
  """The run in ``out`` ended bit for bit as the one in ``ref``: model, metrics, baseline."""
  want = load((ref / "model" / "model.safetensors").read_bytes())
  got = load((out / "model" / "model.safetensors").read_bytes())
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  metrics = _metrics(out)
  assert metrics == _metrics(ref)
  assert [r["step"] for r in metrics if r["kind"] == "eval"] == evals
  summary = json.loads((out / "summary.json").read_text())
  assert summary["before"]["step"] == 0 and summary["after"]["step"] == evals[-1]
  assert summary["before"] == json.loads((ref / "summary.json").read_text())["before"]
