"""Orbax checkpoints of a fine-tuning run: atomic saves, and restores that survive a bad step."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mofo_jax.finetune import storage

# Files of a run kept beside its orbax steps.
RUN_CONFIG = "run_config.json"
BASELINE = "baseline.json"


class NoIntactCheckpoint(Exception):
  """Every step in a checkpoint directory failed to restore."""


class RunCheckpoints:
  """The orbax checkpoints of one run, and the small JSON files kept beside them.

  Each save is atomic (orbax writes a temporary directory, then renames it), so a run killed
  during a save leaves the previous step intact. A restore tries the newest step first and falls
  back to older ones when a step is unreadable (truncated, bit-flipped or partly deleted); the
  unreadable step is renamed ``<step>.corrupt`` so that later saves of that step number succeed
  and nothing is deleted.

  The directory may be local or a ``gs://`` URL (through ``etils.epath``); on GCS orbax marks a
  finished step with a commit file instead of a rename, and a step without it is not listed.

  Args:
    directory: where the steps go (created if missing): a local path or a ``gs://`` URL.
    keep: how many steps orbax keeps (older ones are deleted as new ones are saved).

  Example:
    >>> import tempfile, jax.numpy as jnp
    >>> ckpt = RunCheckpoints(tempfile.mkdtemp())
    >>> ckpt.save(3, {"w": jnp.ones(2)})
    >>> ckpt.restore_latest({"w": jnp.zeros(2)})[0]
    3
    >>> ckpt.close()
  """

  def __init__(self, directory: str | os.PathLike, keep: int = 2):
    import orbax.checkpoint as ocp

    self.directory = storage.as_path(directory)
    self._keep = keep
    self._manager = ocp.CheckpointManager(
      self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    )

  def latest_step(self) -> int | None:
    """The newest saved step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Every saved step, oldest first."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, tree: Any) -> None:
    """Saves a pytree of arrays as ``step`` and waits until it is on disk."""
    import orbax.checkpoint as ocp

    self._manager.save(step, args=ocp.args.StandardSave(tree), force=True)
    self._manager.wait_until_finished()

  def restore_latest(self, target: Any, warn: Callable[[str], None] = print) -> tuple[int, Any]:
    """Restores the newest readable step onto the shardings and dtypes of ``target``.

    Args:
      target: a pytree of arrays (or ``jax.ShapeDtypeStruct`` with shardings) like the saved one.
      warn: receives one line per unreadable step that was skipped.

    Returns:
      ``(step, tree)``.

    Raises:
      FileNotFoundError: the directory holds no step.
      NoIntactCheckpoint: no step could be read.
    """
    import orbax.checkpoint as ocp

    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    failures = []
    for step in reversed(steps):
      # A fresh checkpointer per attempt: a failed restore leaves a manager in a bad state.
      try:
        tree = _restore(self.directory / str(step) / "default", abstract)
      except (OSError, ValueError) as e:
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        failures.append((step, reason))
        continue
      # Only once an older step restores is a newer one known to be damaged (rather than all of
      # them mismatching this run): move those aside, deleting nothing.
      for bad, reason in failures:
        aside = self.directory / f"{bad}.corrupt"
        (self.directory / str(bad)).rename(aside)
        warn(
          f"warning: checkpoint step {bad} in {self.directory} is unreadable ({reason}); "
          f"moved it to {aside.name} and resumed from step {step}"
        )
      if failures:
        self._reopen()
      return step, tree
    raise NoIntactCheckpoint(
      f"no readable checkpoint in {self.directory}: "
      + "; ".join(f"step {s}: {r}" for s, r in failures)
    )

  def _reopen(self) -> None:
    # The manager caches the step list: re-read it after steps were moved aside.
    import orbax.checkpoint as ocp

    self._manager.close()
    self._manager = ocp.CheckpointManager(
      self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=True)
    )

  def write_json(self, name: str, obj: Any) -> None:
    """Writes a small JSON file beside the steps (atomically: temp file, then rename)."""
    write_json_atomic(self.directory / name, obj)

  def read_json(self, name: str) -> Any | None:
    """Reads a JSON file written by :meth:`write_json`, or None if there is none."""
    path = self.directory / name
    return json.loads(path.read_text()) if path.is_file() else None

  def close(self) -> None:
    """Waits for pending writes and releases the manager."""
    self._manager.close()


write_json_atomic = storage.write_json_atomic


def common_token() -> str:
  """A random hex token, the same on every process (process 0's); every process must call it."""
  from jax.experimental import multihost_utils

  words = multihost_utils.broadcast_one_to_all(np.frombuffer(os.urandom(8), np.uint32))
  return "".join(f"{int(w):08x}" for w in words)


def processes_not_sharing(directory: str | os.PathLike) -> list[int]:
  """The processes that cannot see a file process 0 writes into ``directory``.

  Every process of a multi-host run writes its own shards of each checkpoint, and process 0
  commits the step: on per-host local disks no host would hold a whole checkpoint. Process 0
  writes a marker file with a fresh name, every process looks for it, and process 0 removes it
  (and the directory, if it made it for the probe). A ``gs://`` URL is shared by construction
  and not probed; a single process shares with itself. Every process must call this (it holds
  collectives).

  Args:
    directory: the checkpoint directory.

  Returns:
    The indices of the processes that did not see the marker (empty: the directory is shared;
    0 among them: process 0 could not write it).
  """
  if jax.process_count() == 1 or storage.is_remote(directory):
    return []
  from jax.experimental import multihost_utils

  # A fresh name: a marker left by an earlier probe cannot answer.
  directory = Path(storage.resolve(directory))
  marker = directory / f".mofo-shared-{common_token()}"
  lead = jax.process_index() == 0
  # The directories the probe makes (the missing ancestors too), deepest first, to remove.
  made = [d for d in (directory, *directory.parents) if not d.exists()] if lead else []
  try:
    if lead:
      # Not written (a file by that name, no permission): process 0 is then among those that
      # do not see it, and every process still reaches the collectives below (none hangs).
      with contextlib.suppress(OSError):
        directory.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"written by process 0 of {jax.process_count()}\n")
    multihost_utils.sync_global_devices("mofo_jax shared directory: marker written")
    seen = multihost_utils.process_allgather(np.array(marker.exists()))
    multihost_utils.sync_global_devices("mofo_jax shared directory: marker read")
  finally:
    # Also when a collective fails: a left marker would make the directory "not empty" and a
    # rerun would refuse it.
    if lead:
      with contextlib.suppress(FileNotFoundError, NotADirectoryError):  # never written
        marker.unlink()
      for d in made:
        try:
          d.rmdir()
        except OSError:  # something else wrote there meanwhile: not ours to remove
          break
  # Nobody looks at the directory again (is it empty?) before the marker is gone.
  multihost_utils.sync_global_devices("mofo_jax shared directory: marker removed")
  return [int(i) for i in np.flatnonzero(~np.asarray(seen))]


def _restore(path, abstract: Any) -> Any:
  """Restores ``abstract`` from one step; top-level entries the step has beyond it are skipped.

  Runs saved before the pretrained copy left the checkpoints hold a ``reference`` entry: it is
  not read (orbax's partial restore), so such a step resumes without a device copy of it. Only
  extra saved entries are skipped; a missing one fails as any mismatch does.
  """
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as checkpointer:
    saved = checkpointer.metadata(path).item_metadata
    saved = getattr(saved, "tree", None)
    extra = isinstance(abstract, dict) and isinstance(saved, Mapping) and set(saved) > set(abstract)
    if not extra:
      return checkpointer.restore(path, abstract)
  restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
    return checkpointer.restore(
      path, args=ocp.args.PyTreeRestore(abstract, restore_args=restore_args, partial_restore=True)
    )


def is_step_dir(name: str) -> bool:
  """Whether a directory entry is (or was) an orbax step of a run."""
  return name.split(".")[0].isdigit()
