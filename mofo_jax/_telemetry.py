"""What MoFO did this step, kept in the optimizer state at O(1) cost per block."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mofo_jax import _counts


class MoFOTelemetry(NamedTuple):
  """Per-leaf record of the last step's selection (all fields are pytrees like the params)."""

  # Counts are exact past 2**31 entries: int32[2], limbs (hi, lo) of hi * 2**16 + lo (read them
  # with mofo_jax.count_value).
  num_updated: Any  # per leaf: int32[2], entries that moved this step
  num_entries: Any  # per leaf: int32[2], entries in the leaf
  threshold: Any  # per leaf: float32 of the leaf's BlockSpec.block_shape, the k-th largest
  #                 |score| per block (0 for dense leaves)


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


def telemetry_summary(opt_state: Any) -> dict[str, float]:
  """Fraction of entries updated by the last step, overall and per leaf, ready to log.

  Finds every ``MoFOTelemetry`` inside an optimizer state (a bare state, a chain, a
  ``masked``/``partition``/``inject_hyperparams`` wrapper or an ``nnx.Optimizer``'s
  ``opt_state``) and reads it on the host.

  Args:
    opt_state: any optimizer state containing MoFO states.

  Returns:
    A flat dict: ``"fraction_updated"`` over every leaf MoFO saw, and
    ``"fraction_updated/<path>"`` for each leaf (several MoFO states are numbered
    ``"<i>/<path>"``).

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
  found = _find_telemetry(opt_state)
  if not found:
    raise ValueError(
      "telemetry_summary found no MoFO telemetry in this optimizer state: pass the state of an "
      "optimizer built from mofo_jax.mofo, scale_by_mofo or keep_top_fraction."
    )
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
  return out
