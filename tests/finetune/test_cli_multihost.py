"""mofo-finetune --distributed on two local processes of 2 CPU devices each, against one process."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load

from mofo_jax.finetune import storage
from tests.finetune.test_cli_faults import _args, _run_processes
from tests.finetune.test_cli_faults import _run as _run_worker


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


def _summary(out):
  return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_two_process_checkpoint_on_gcs_resumes_on_one_process_and_another_mesh(
  tiny_checkpoint, tmp_path, gcs_dir
):
  """2 processes x 4 devices save to gs://; 1 process on another mesh reads the step exactly."""
  cache = tmp_path / "jax_cache"
  ckpt = str(gcs_dir / "ckpt")
  common = _args(tiny_checkpoint) + ["--decay-steps", "4", "--eval-every", "0"]
  first = common + ["--steps", "2", "--mesh", "fsdp=-1", "--checkpoint-dir", ckpt]
  procs = _run_processes(
    ["none", "none"], 0, first + ["--output-dir", str(gcs_dir / "out")], cache, tmp_path / "logs"
  )
  assert [p.returncode for p in procs] == [0, 0], procs[0].stderr[-2000:] + procs[1].stderr[-2000:]
  assert sorted(p.name for p in (gcs_dir / "ckpt").iterdir() if p.name.isdigit()) == ["2"]
  # One process, 4 devices, another mesh: the step it restores is bit for bit the one saved
  # (the model it writes without training further equals the model the 2 processes wrote).
  other = ["--mesh", "data=2,fsdp=2", "--checkpoint-dir", ckpt, "--resume"]
  read = _run_worker(
    "none",
    0,
    common + ["--steps", "2", *other, "--output-dir", str(gcs_dir / "read")],
    cache,
    devices=4,
  )
  assert read.returncode == 0, read.stderr[-2000:]
  want = load((gcs_dir / "out" / "model" / "model.safetensors").read_bytes())
  got = load((gcs_dir / "read" / "model" / "model.safetensors").read_bytes())
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  # ... and it continues the run to the end like a run made on that mesh from the start.
  more = _run_worker(
    "none",
    0,
    common + ["--steps", "4", *other, "--output-dir", str(gcs_dir / "out")],
    cache,
    devices=4,
  )
  assert more.returncode == 0, more.stderr[-2000:]
  ref = _run_worker(
    "none",
    0,
    common + ["--steps", "4", "--mesh", "data=2,fsdp=2", "--output-dir", str(tmp_path / "ref")],
    cache,
    devices=4,
  )
  assert ref.returncode == 0, ref.stderr[-2000:]
  trained = [
    r["step"]
    for r in map(json.loads, storage.read_lines(gcs_dir / "out" / "metrics.jsonl"))
    if r["kind"] == "train"
  ]
  assert trained == [1, 2, 3, 4]
  got, want = _summary(gcs_dir / "out")["after"], _summary(tmp_path / "ref")["after"]
  assert got["step"] == want["step"] == 4
  for k in ("task_answer_loss", "l2_from_pretrained", "fraction_changed"):
    assert abs(got[k] - want[k]) <= 1e-4 * max(1.0, abs(want[k])), (k, got[k], want[k])


@pytest.mark.slow
def test_a_checkpoint_dir_the_processes_do_not_share_is_refused(tiny_checkpoint, tmp_path):
  """Per-host disks, simulated: the same relative --checkpoint-dir from two working directories."""
  hosts = [tmp_path / "host0", tmp_path / "host1"]
  for h in hosts:
    h.mkdir()
  procs = _run_processes(
    ["none", "none"],
    0,
    _args(tiny_checkpoint) + ["--mesh", "data=-1", "--checkpoint-dir", "ckpt"],
    tmp_path / "jax_cache",
    tmp_path / "logs",
    cwds=hosts,
  )
  for p in procs:
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    [line] = [x for x in p.stderr.splitlines() if x.startswith("mofo-finetune: error:")]
    assert "--checkpoint-dir" in line and "process(es) 1 of 2 cannot see" in line
    assert "gs://" in line
  # Nothing is left behind: the probe removed its marker and the directory it made.
  assert [list(h.iterdir()) for h in hosts] == [[], []]
