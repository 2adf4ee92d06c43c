"""SIGTERM (a preempted VM): mofo-finetune saves one agreed step, exits 75, and resumes exactly.

Runs go through tests/finetune/fault_worker.py, which sends SIGTERM to its own process after a
chosen step. A single process stops at that very step. Of two processes only one gets the
signal; JAX's preemption sync (polled once a second) picks the step both stop at, so the
workers sleep after each step from then on to let the notice arrive before the run ends.
"""

import re

import pytest

from mofo_jax.finetune.preemption import EXIT_PREEMPTED
from tests.finetune.test_cli_faults import _args, _run, _run_processes, assert_same_run


def _saved_steps(ckpt):
  return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())


def _stopped_at(stderr):
  found = re.findall(r"preempted: SIGTERM: stopped at step (\d+); checkpoint saved", stderr)
  assert len(found) == 1, stderr[-2000:]
  return int(found[0])


@pytest.mark.slow
def test_sigterm_saves_the_step_and_the_resumed_run_ends_equal(tiny_checkpoint, tmp_path):
  cache = tmp_path / "jax_cache"
  ref = _run("none", 0, _args(tiny_checkpoint) + ["--output-dir", str(tmp_path / "ref")], cache)
  assert ref.returncode == 0, ref.stderr[-2000:]
  out, ckpt = tmp_path / "out", tmp_path / "ckpt"
  run = _args(tiny_checkpoint) + ["--output-dir", str(out), "--checkpoint-dir", str(ckpt)]
  # Step 3 is no periodic checkpoint (--checkpoint-every 2): only the preemption saves it.
  stopped = _run("sigterm", 3, run, cache)
  assert stopped.returncode == EXIT_PREEMPTED, stopped.stderr[-2000:]
  assert _stopped_at(stopped.stderr) == 3
  assert _saved_steps(ckpt) == [2, 3]
  assert not (out / "summary.json").exists()
  done = _run("none", 0, run + ["--resume"], cache)
  assert done.returncode == 0, done.stderr[-2000:]
  assert_same_run(out, tmp_path / "ref", evals=[0, 3, 6])


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(tiny_checkpoint, tmp_path, gcs_dir):
  """Process 1 gets SIGTERM; both save the same step; the resumed pair ends as an unstopped one.

  The stopped and resumed runs keep their checkpoints and outputs on the GCS emulator, as a pod
  slice does (a per-host local directory is refused for several processes).
  """
  cache = tmp_path / "jax_cache"
  steps = ["--mesh", "data=-1", "--steps", "10"]
  ref_dir = tmp_path / "ref"
  ref = _run_processes(
    ["none", "none"],
    0,
    _args(tiny_checkpoint) + steps + ["--output-dir", str(ref_dir)],
    cache,
    tmp_path / "logs-ref",
  )
  assert [p.returncode for p in ref] == [0, 0], ref[0].stderr[-2000:] + ref[1].stderr[-2000:]
  out, ckpt = gcs_dir / "out", gcs_dir / "ckpt"
  run = _args(tiny_checkpoint) + steps + ["--output-dir", str(out), "--checkpoint-dir", str(ckpt)]
  stopped = _run_processes(["slow", "sigterm"], 3, run, cache, tmp_path / "logs-stopped")
  logs = stopped[0].stderr[-2000:] + stopped[1].stderr[-2000:]
  assert [p.returncode for p in stopped] == [EXIT_PREEMPTED] * 2, logs
  at = {_stopped_at(p.stderr) for p in stopped}
  assert len(at) == 1, logs
  [at] = at
  assert 3 <= at < 10 and _saved_steps(ckpt)[-1] == at, (at, _saved_steps(ckpt))
  done = _run_processes(["none", "none"], 0, run + ["--resume"], cache, tmp_path / "logs-done")
  assert [p.returncode for p in done] == [0, 0], done[0].stderr[-2000:] + done[1].stderr[-2000:]
  assert_same_run(out, ref_dir, evals=[0, 3, 6, 9, 10])
