"""The optimizers a fine-tuning run can use: MoFO and its ablations, AdamW, and the paper's baselines."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mofo_jax

OPTIMIZERS = ("mofo", "adamw", "mofo-gradient", "mofo-update", "mofo-random", "adamw-l2", "hft")


class L2ToReferenceState(NamedTuple):
  """State of :func:`add_l2_to_reference`."""

  reference: optax.Params  # like params: the weights the penalty pulls toward


def add_l2_to_reference(strength: float) -> optax.GradientTransformation:
  r"""Adds the gradient of :math:`\frac{\lambda}{2}\|p - p_0\|^2`, with :math:`p_0` the params at init.

  The paper's L2-regularisation baseline: fine-tune while pulling every weight toward the
  pretrained one. Chain it before the optimizer so Adam sees the regularised gradient.

  Args:
    strength: :math:`\lambda`.

  Returns:
    An ``optax.GradientTransformation`` that keeps a copy of the initial params.

  Example:
    >>> import jax.numpy as jnp
    >>> t = add_l2_to_reference(0.5)
    >>> state = t.init({"w": jnp.ones(2)})
    >>> t.update({"w": jnp.zeros(2)}, state, {"w": jnp.array([3.0, 1.0])})[0]["w"]
    Array([1., 0.], dtype=float32)
  """

  def init_fn(params):
    return L2ToReferenceState(reference=jax.tree.map(jnp.array, params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("add_l2_to_reference needs params: call update(grads, state, params).")
    updates = jax.tree.map(
      lambda g, p, r: g + strength * (p - r).astype(g.dtype), updates, params, state.reference
    )
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def half_fine_tuning_mask(params: Any, seed: int = 0) -> Any:
  """Half Fine-Tuning's static choice: in each layer, a random half of the matrices train.

  Matrices (``ndim >= 2``) are grouped by the layer index in their path (a path element that is
  an integer, e.g. ``layers[3]``); in each group a random half (rounded up) is trainable, the
  rest frozen for the whole run. Vectors always train; matrices outside any layer (embeddings,
  head) form one more group.

  Args:
    params: the parameter pytree.
    seed: seed of the choice.

  Returns:
    A pytree of bools like ``params``: True where the leaf trains.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  groups: dict[Any, list[int]] = {}
  for i, (path, leaf) in enumerate(flat):
    if np.ndim(leaf) >= 2:
      layer = next(
        (
          getattr(k, "idx", getattr(k, "key", None))
          for k in path
          if isinstance(getattr(k, "idx", getattr(k, "key", None)), int)
        ),
        None,
      )
      groups.setdefault(layer, []).append(i)
  trainable = [np.ndim(leaf) < 2 for _, leaf in flat]
  rng = np.random.default_rng(seed)
  for members in groups.values():
    chosen = rng.permutation(len(members))[: (len(members) + 1) // 2]
    for j in chosen:
      trainable[members[j]] = True
  return treedef.unflatten(trainable)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """What to fine-tune with.

  Attributes:
    name: one of ``OPTIMIZERS``: ``mofo`` (the paper), ``mofo-gradient``/``mofo-update``/
      ``mofo-random`` (its ablations of the score), ``adamw``, ``adamw-l2`` (AdamW with an L2 pull
      toward the pretrained weights), ``hft`` (Half Fine-Tuning: AdamW on a static random half
      of each layer's matrices).
    learning_rate: peak learning rate.
    fraction: MoFO's fraction of each block updated per step.
    weight_decay: decoupled weight decay (the paper uses 0).
    warmup_steps: linear warmup from 0.
    total_steps: optimizer steps of the run (for the cosine decay to 10% of the peak).
    clip_norm: global gradient-norm clipping; 0 disables it.
    l2_strength: the pull of ``adamw-l2``.
    seed: seed of ``mofo-random`` and ``hft``.
  """

  name: str = "mofo"
  learning_rate: float = 1e-4
  fraction: float = 0.1
  weight_decay: float = 0.0
  warmup_steps: int = 0
  total_steps: int = 100
  clip_norm: float = 1.0
  l2_strength: float = 1e-2
  seed: int = 0

  def __post_init__(self):
    if self.name not in OPTIMIZERS:
      raise ValueError(f"optimizer {self.name!r} is not one of {OPTIMIZERS}.")
    if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
      # A NaN rate would train to the end on NaN losses and save a NaN model.
      raise ValueError(f"learning_rate={self.learning_rate} must be positive and finite.")
    if self.total_steps < 1:
      raise ValueError(f"total_steps={self.total_steps} must be at least 1.")


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
  """Linear warmup to the peak, then cosine decay to 10% of it at ``total_steps``."""
  warmup = min(cfg.warmup_steps, cfg.total_steps - 1)
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0 if warmup else cfg.learning_rate,
    peak_value=cfg.learning_rate,
    warmup_steps=warmup,
    decay_steps=cfg.total_steps,
    end_value=0.1 * cfg.learning_rate,
  )


def _is_stacked(path) -> bool:
  return any(getattr(k, "key", getattr(k, "name", None)) == "layers" for k in path)


def stacked_layer_blocks(params: Any) -> tuple[Any, Any]:
  """MoFO's ``filter_mask`` and ``partition`` for a model whose layers are stacked (scanned).

  A stacked leaf (one under ``layers``, with a leading layer axis) is ranked per layer, and
  filtered when each layer's slice is a matrix, so the optimizer does exactly what it does on
  the same model with separate layers: one block per weight matrix, dense norm scales.

  Args:
    params: the parameter pytree.

  Returns:
    ``(filter_mask, partition)`` pytrees like ``params``.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  stacked = [_is_stacked(path) for path, _ in flat]
  filtered = [np.ndim(x) - s >= 2 for (_, x), s in zip(flat, stacked)]
  specs = [mofo_jax.BlockSpec(split_axes=(0,)) if s else mofo_jax.BlockSpec() for s in stacked]
  return treedef.unflatten(filtered), treedef.unflatten(specs)


def make_optimizer(
  cfg: OptimizerConfig, params: Any = None, stacked_layers: bool = False, shardings: Any = None
) -> optax.GradientTransformation:
  """Builds the optimizer ``cfg`` names.

  Args:
    cfg: the optimizer configuration.
    params: the parameter pytree (read by ``hft`` and for stacked layers).
    stacked_layers: the model's layers are stacked along a leading axis (``scan_layers``):
      MoFO then ranks each layer's matrices separately (see :func:`stacked_layer_blocks`).
    shardings: the params' ``NamedSharding`` s (a pytree shaped like them): on a mesh of
      several devices MoFO's Pallas kernels then run on each device's shards (see
      :class:`mofo_jax.PallasSelection`); without them only on one device.

  Returns:
    An ``optax.GradientTransformation``.
  """
  lr = learning_rate_schedule(cfg)
  if (stacked_layers or cfg.name == "hft") and params is None:
    raise ValueError(f"the {cfg.name} optimizer needs the params to lay out its blocks.")
  if cfg.name.startswith("mofo"):
    score = {
      "mofo": "momentum",
      "mofo-gradient": "gradient",
      "mofo-update": "update",
      "mofo-random": "random",
    }[cfg.name]
    filter_mask, partition = stacked_layer_blocks(params) if stacked_layers else (None, None)
    selection = "exact"
    meshes = {s.mesh for s in jax.tree.leaves(shardings)} if shardings is not None else set()
    if score == "momentum" and len(meshes) == 1 and next(iter(meshes)).size > 1:
      selection = mofo_jax.PallasSelection(mesh=meshes.pop(), specs=shardings)
    core = mofo_jax.mofo(
      lr,
      selection=selection,
      fraction=cfg.fraction,
      weight_decay=cfg.weight_decay,
      score=score,
      seed=cfg.seed,
      filter_mask=filter_mask,
      partition=partition,
    )
  elif cfg.name == "hft":
    if stacked_layers:
      raise ValueError(
        "hft freezes a random half of each layer's matrices: it needs separate "
        "layers (scan_layers=False)."
      )
    mask = half_fine_tuning_mask(params, cfg.seed)
    core = optax.masked(optax.adamw(lr, weight_decay=cfg.weight_decay), mask)
    core = optax.chain(core, optax.masked(optax.set_to_zero(), jax.tree.map(lambda m: not m, mask)))
  else:
    core = optax.adamw(lr, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw-l2":
      core = optax.chain(add_l2_to_reference(cfg.l2_strength), core)
  if cfg.clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), core)
  return core
