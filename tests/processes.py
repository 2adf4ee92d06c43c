"""Runs a worker module as several local JAX processes (multi-host tests on one machine)."""

import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_workers(module: str, *args: str, num: int = 2, devices: int = 4, timeout: float = 300):
  """Runs ``python -m module PROCESS_ID PORT *args`` as ``num`` processes of ``devices`` CPUs.

  Returns:
    Each process's output. Raises AssertionError (with the logs' tails) when one fails or
    they do not finish within ``timeout`` seconds.
  """
  port = free_port()
  env = {
    **os.environ,
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": ROOT,
  }
  procs = [
    subprocess.Popen(
      [sys.executable, "-m", module, str(i), str(port), *map(str, args)],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(num)
  ]
  try:
    logs = [proc.communicate(timeout=timeout)[0] for proc in procs]
  except subprocess.TimeoutExpired:
    for proc in procs:
      proc.kill()
    logs = [proc.communicate()[0] for proc in procs]
    raise AssertionError(f"workers timed out after {timeout} s:\n" + _tails(logs)) from None
  assert all(proc.returncode == 0 for proc in procs), _tails(logs)
  return logs


def _tails(logs):
  return "\n".join(
    f"--- process {i} (last 3000 chars) ---\n{log[-3000:]}" for i, log in enumerate(logs)
  )


def initialize(process_id: int, port: int, num: int = 2) -> None:
  """``jax.distributed.initialize`` for a worker that ``run_workers`` started."""
  import jax

  # Cross-process collectives on CPU need an implementation; gloo ships with jaxlib.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}",
    num_processes=num,
    process_id=process_id,
    initialization_timeout=30,
  )
