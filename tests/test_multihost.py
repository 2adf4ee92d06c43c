"""Two processes, 4 CPU devices each, one 2x4 mesh: MoFO equals the single-process result."""

import os
import socket
import subprocess
import sys

import numpy as np

from tests import sharded_model as sm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 90


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  out = tmp_path / "result.npz"
  port = _free_port()
  env = {
    **os.environ,
    "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": ROOT,
  }
  procs = [
    subprocess.Popen(
      [sys.executable, "-m", "tests.multihost_worker", str(i), str(port), str(out)],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  logs = []
  try:
    for proc in procs:
      logs.append(proc.communicate(timeout=TIMEOUT_S)[0])
  except subprocess.TimeoutExpired:
    for proc in procs:
      proc.kill()
    logs = [proc.communicate()[0] for proc in procs]
    raise AssertionError(f"workers timed out after {TIMEOUT_S} s:\n" + _tails(logs)) from None
  assert all(proc.returncode == 0 for proc in procs), _tails(logs)

  p_ref, state_ref = sm.run_unsharded(sm.opt())
  got = np.load(out)
  for group, tree in (("p", p_ref), ("mu", state_ref[0].mu), ("nu", state_ref[0].nu)):
    for k, v in tree.items():
      np.testing.assert_array_equal(got[f"{group}/{k}"], np.asarray(v), err_msg=f"{group}/{k}")


def _tails(logs):
  return "\n".join(
    f"--- process {i} (last 3000 chars) ---\n{log[-3000:]}" for i, log in enumerate(logs)
  )
