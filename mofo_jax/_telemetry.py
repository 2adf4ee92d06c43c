"""What MoFO did this step, kept in the optimizer state at O(1) cost per block."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mofo_jax import _counts


class MoFOTelemetry(NamedTuple):
  """Per-leaf record of the last step's selection (all fields are pytrees like the params).

  In the optimizer state the counts are device arrays of two int32 limbs, exact past 2**31
  entries without ``jax_enable_x64``; :func:`read_telemetry` returns the same record with plain
  Python ints on the host.
  """

  # In the state: int32[2], limbs (hi, lo) of hi * 2**16 + lo; from read_telemetry: int.
  num_updated: Any  # per leaf: entries that moved this step
  num_entries: Any  # per leaf: entries in the leaf
  threshold: Any  # per leaf: float32 of the leaf's BlockSpec.block_shape, the k-th largest
  #                 |score| per block (0 for dense leaves); from read_telemetry: numpy


def init_telemetry(params: Any, thresholds: Any) -> MoFOTelemetry:
  """Telemetry before the first step: nothing updated yet; ``thresholds`` are the zeros."""
  return MoFOTelemetry(
    num_updated=jax.tree.map(lambda _: jnp.zeros([2], jnp.int32), params),
    num_entries=jax.tree.map(lambda p: _counts.to_array(_counts.constant(np.size(p))), params),
    threshold=thresholds,
  )


def _find_telemetry(opt_state: Any) -> list[MoFOTelemetry]:
  return [
    x
    for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, MoFOTelemetry))
    if isinstance(x, MoFOTelemetry)
  ]


def _found(opt_state: Any, who: str) -> list[MoFOTelemetry]:
  found = _find_telemetry(opt_state)
  if not found:
    raise ValueError(
      f"{who} found no MoFO telemetry in this optimizer state: pass the state of an "
      "optimizer built from mofo_jax.mofo, scale_by_mofo or keep_top_fraction."
    )
  return found


def read_telemetry(opt_state: Any, index: int | None = None) -> MoFOTelemetry:
  """The last step's telemetry on the host, with plain counts: Python ints per leaf.

  The state keeps each count as two int32 limbs (exact past 2**31 entries without
  ``jax_enable_x64``); this reads them as ints, and the thresholds as NumPy arrays.

  Args:
    opt_state: an optimizer state containing a MoFO state (bare, in a chain or any wrapper).
    index: which MoFO state, when the optimizer holds several (in ``jax.tree.leaves`` order).

  Returns:
    A :class:`MoFOTelemetry` whose ``num_updated`` and ``num_entries`` are pytrees of ints and
    ``threshold`` a pytree of float32 NumPy arrays.

  Example:
    >>> import jax.numpy as jnp, mofo_jax
    >>> params = {"w": jnp.ones((4, 5))}
    >>> opt = mofo_jax.mofo(1e-2, fraction=0.1)
    >>> _, state = opt.update({"w": jnp.arange(20.0).reshape(4, 5)}, opt.init(params), params)
    >>> tel = mofo_jax.read_telemetry(state)
    >>> tel.num_updated["w"], tel.num_entries["w"], round(tel.threshold["w"].item(), 4)
    (2, 20, 1.8)
  """
  found = _found(opt_state, "read_telemetry")
  if index is None:
    if len(found) > 1:
      raise ValueError(
        f"read_telemetry: this optimizer state holds {len(found)} MoFO states; choose one "
        "with index=0..{}.".format(len(found) - 1)
      )
    index = 0
  if not 0 <= index < len(found):
    raise ValueError(f"read_telemetry: index={index} but the state holds {len(found)}.")
  tel = jax.device_get(found[index])
  is_count = lambda x: isinstance(x, np.ndarray) and x.shape[-1:] == (2,)
  return MoFOTelemetry(
    num_updated=jax.tree.map(_counts.value, tel.num_updated, is_leaf=is_count),
    num_entries=jax.tree.map(_counts.value, tel.num_entries, is_leaf=is_count),
    threshold=jax.tree.map(np.asarray, tel.threshold),
  )


def telemetry_summary(opt_state: Any) -> dict[str, float]:
  """Fraction of entries updated by the last step, overall and per leaf, ready to log.

  Finds every ``MoFOTelemetry`` inside an optimizer state (a bare state, a chain, a
  ``masked``/``partition``/``inject_hyperparams`` wrapper or an ``nnx.Optimizer``'s
  ``opt_state``) and reads it on the host.

  Args:
    opt_state: any optimizer state containing MoFO states.

  Returns:
    A flat dict: ``"fraction_updated"`` over every leaf MoFO saw, ``"num_updated"`` and
    ``"num_entries"`` (Python ints: the entries updated, and all entries, over those leaves), and
    ``"fraction_updated/<path>"`` for each leaf (several MoFO states are numbered
    ``"<i>/<path>"``). :func:`read_telemetry` gives each leaf's counts.

  Example:
    >>> import jax.numpy as jnp, optax, mofo_jax
    >>> params = {"w": jnp.ones((4, 5)), "b": jnp.zeros(5)}
    >>> opt = mofo_jax.mofo(1e-2, fraction=0.1)
    >>> state = opt.init(params)
    >>> grads = {"w": jnp.arange(20.0).reshape(4, 5), "b": jnp.ones(5)}
    >>> _, state = opt.update(grads, state, params)
    >>> summary = mofo_jax.telemetry_summary(state)
    >>> summary["fraction_updated/['w']"], summary["fraction_updated/['b']"]
    (0.1, 1.0)
  """
  found = _found(opt_state, "telemetry_summary")
  out: dict[str, float] = {}
  total_updated = 0
  total_entries = 0
  for i, tel in enumerate(found):
    prefix = f"{i}/" if len(found) > 1 else ""
    updated = jax.tree_util.tree_flatten_with_path(tel.num_updated)[0]
    entries = jax.tree.leaves(tel.num_entries)
    for (path, u), n in zip(updated, entries):
      u, n = _counts.value(u), _counts.value(n)
      total_updated += u
      total_entries += n
      out[f"fraction_updated/{prefix}{jax.tree_util.keystr(path)}"] = u / max(n, 1)
  out["fraction_updated"] = total_updated / max(total_entries, 1)
  out["num_updated"] = total_updated
  out["num_entries"] = total_entries
  return out
