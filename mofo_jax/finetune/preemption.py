"""Preemption: on SIGTERM, every process of a run stops after one step they all agree on.

A preempted Cloud VM (a Spot TPU slice, a maintenance event) gets a shutdown notice as SIGTERM
and some seconds before it goes away. The training loop asks :meth:`PreemptionWatch.reached`
after each step; it answers True at the same step on every process, so all of them save that
step and exit with :data:`EXIT_PREEMPTED`, which a relaunch loop (``tpu_scripts/launch.sh
--until-done``) answers by starting the run again with ``--resume``.

* Multi-process (``jax.distributed`` initialized): JAX's preemption sync manager catches SIGTERM
  on any process, tells the others through the coordination service, and picks one step past
  the newest step any process has reached (``multihost_utils.reached_preemption_sync_point``).
* One process: a Python SIGTERM handler notes the signal; the next step is the one.
"""

from __future__ import annotations

import signal
import threading

# What a run stopped by SIGTERM exits with, after saving: EX_TEMPFAIL of sysexits.h, "try again".
EXIT_PREEMPTED = 75


class Preempted(Exception):
  """The run stopped at a step agreed after a SIGTERM; that step was saved (if checkpointing)."""


class PreemptionWatch:
  """Tells the training loop, step by step, whether to save and stop for a preemption.

  Use as a context manager around the loop (or :meth:`start` and :meth:`stop`): a
  single-process run installs its SIGTERM handler on entry (on the main thread only; Python
  delivers signals there) and puts the previous one back on exit. A multi-process run leaves signals to JAX, whose handler is installed by
  ``jax.distributed.initialize`` and must not be replaced.

  Every process must call :meth:`reached` after every step, with the same step numbers.

  Example:
    >>> import os, signal
    >>> with PreemptionWatch() as watch:
    ...   before = watch.reached(1)
    ...   os.kill(os.getpid(), signal.SIGTERM)
    ...   after = watch.reached(2)
    >>> before, after
    (False, True)
  """

  def __init__(self):
    self._signalled = threading.Event()
    self._previous = None
    self._installed = False

  def __enter__(self) -> PreemptionWatch:
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()

  def start(self) -> PreemptionWatch:
    """Starts listening for SIGTERM (a single process only; JAX listens in a multi-process run)."""
    import jax

    if not jax.distributed.is_initialized() and (
      threading.current_thread() is threading.main_thread()
    ):
      self._previous = signal.signal(signal.SIGTERM, self._note)
      self._installed = True
    return self

  def stop(self) -> None:
    """Puts the SIGTERM handler found by :meth:`start` back."""
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)
      self._installed = False

  def _note(self, signum, frame) -> None:
    self._signalled.set()

  def reached(self, step: int) -> bool:
    """Whether ``step`` (just finished) is the step to save and stop at.

    Args:
      step: the step the run has just finished; increasing from call to call.

    Returns:
      True on every process at the same step once any process got SIGTERM.
    """
    import jax

    if jax.distributed.is_initialized():
      from jax.experimental import multihost_utils

      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:
        # The preemption service is turned off (jax_enable_preemption_service): so is JAX's
        # SIGTERM handler, and a SIGTERM ends the process as usual.
        return False
    return self._signalled.is_set()
