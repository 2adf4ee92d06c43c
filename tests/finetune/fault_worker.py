"""Runs mofo-finetune and SIGKILLs or SIGTERMs it at a chosen point (tests/finetune/test_cli_*).

Usage: python fault_worker.py MODE N -- CLI ARGS
  MODE none: run to the end; step: die right after step N; save: die while saving step N, its
  files written but not yet committed; save-start: die as soon as step N's save is started;
  sigterm: send itself SIGTERM right after step N, then go on as slow does; slow: sleep
  SLOW_S after each step from step N on (so that a peer's preemption notice, which JAX
  polls for once a second, reaches this process before the run ends).
"""

import os
import signal
import sys
import time

SLOW_S = 0.5


def _die() -> None:
  sys.stdout.flush()
  os.kill(os.getpid(), signal.SIGKILL)


def _die_before_commit(kind, n: int) -> None:
  finalize = kind.finalize

  async def die_or_finalize(self, *args, **kwargs):
    if os.path.basename(str(self.get_final())) == str(n):
      _die()
    return await finalize(self, *args, **kwargs)

  kind.finalize = die_or_finalize


def main() -> int:
  mode, n = sys.argv[1], int(sys.argv[2])
  assert sys.argv[3] == "--"
  import orbax.checkpoint as ocp
  from orbax.checkpoint._src.path import atomicity

  from mofo_jax.finetune import checkpointing, cli, train

  if mode in ("step", "sigterm", "slow"):
    step = train.Trainer.train_step

    def train_step(self, batch):
      out = step(self, batch)
      if self.state.step == n and mode == "step":
        _die()
      if self.state.step == n and mode == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
      if self.state.step >= n and mode != "step":
        time.sleep(SLOW_S)
      return out

    train.Trainer.train_step = train_step
  elif mode == "save-start":
    save = checkpointing.RunCheckpoints.save

    def checkpoint_save(self, step, tree):
      if step != n:
        return save(self, step, tree)
      self._manager.save(step, args=ocp.args.StandardSave(tree), force=True)
      _die()

    checkpointing.RunCheckpoints.save = checkpoint_save
  elif mode == "save":
    # Locally orbax commits a step by a rename, on GCS by writing a commit file.
    _die_before_commit(atomicity.AtomicRenameTemporaryPath, n)
    _die_before_commit(atomicity.CommitFileTemporaryPath, n)
  return cli.main(sys.argv[4:])


if __name__ == "__main__":
  sys.exit(main())
