"""mofo-finetune --distributed on two local processes of 2 CPU devices each, against one process."""

import json
import os
import socket
import subprocess
import sys

import pytest


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


ARGS = [
  "--steps",
  "2",
  "--train-examples",
  "64",
  "--eval-examples",
  "8",
  "--seq-len",
  "128",
  "--old-text-batches",
  "1",
  "--lr",
  "1e-2",
  "--difficulty",
  "1",
  "--no-progress",
  "--mesh",
  "data=-1",
  "--batch-size",
  "8",
]


def _run(cmd, devices, timeout=240):
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("distance_metrics", ["device", "host"])
def test_two_processes_train_like_one(tiny_checkpoint, tmp_path, distance_metrics):
  """Two processes end where one does; with the pretrained copy in each process's host memory
  too (its own slices), against one process's device copy."""
  base = [sys.executable, "-m", "mofo_jax.finetune", "--model", str(tiny_checkpoint), *ARGS]
  port = _free_port()
  procs = [
    _run(
      base
      + [
        "--output-dir",
        str(tmp_path / "multi"),
        "--distributed",
        "--coordinator-address",
        f"127.0.0.1:{port}",
        "--num-processes",
        "2",
        "--process-id",
        str(i),
        "--distance-metrics",
        distance_metrics,
      ],
      devices=2,
    )
    for i in range(2)
  ]
  single = _run(base + ["--output-dir", str(tmp_path / "single")], devices=4)
  outputs = []
  for p in [*procs, single]:
    try:
      out, _ = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
      for q in [*procs, single]:
        q.kill()
      raise
    outputs.append(out)
    assert p.returncode == 0, out[-3000:]
  multi = json.loads((tmp_path / "multi" / "summary.json").read_text())["after"]
  one = json.loads((tmp_path / "single" / "summary.json").read_text())["after"]
  for k in ("task_answer_loss", "pydoc_loss", "l2_from_pretrained", "fraction_changed"):
    assert abs(multi[k] - one[k]) <= 1e-4 * max(1.0, abs(one[k])), (k, multi[k], one[k])
  assert (tmp_path / "multi" / "model" / "model.safetensors").is_file()
  assert "steps 2" in outputs[0] and "steps 2" not in outputs[1]  # only process 0 prints
