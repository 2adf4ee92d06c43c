"""Per-shard ("local") selection: every device ranks its own shard of each block, no collective.

Not the paper's MoFO; see :func:`local_selection`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mofo_jax import _counts
from mofo_jax import _partition
from mofo_jax import _selection
from mofo_jax import _sharding


class LocalSelection(NamedTuple):
  """``selection=`` value: rank each device's shard of every block on its own.

  Build it with :func:`mofo_jax.local_selection`; ``selection="local"`` is the same with the mesh
  and specs read from the arrays' types (Explicit mesh axes).
  """

  mesh: Any = None  # jax.sharding.Mesh or AbstractMesh; None: read from the arrays' types
  specs: Any = None  # the params' pytree with a PartitionSpec or NamedSharding per leaf

  def initial_thresholds(self, leaves, filtered, specs):
    return initial_thresholds(leaves, filtered, specs, self)

  def select(self, scores, filtered, specs, is_global, fraction, previous=None):
    del previous  # each shard searches its own entries in full
    return select_local(scores, filtered, specs, is_global, fraction, self)


def local_selection(mesh: jax.sharding.Mesh, specs: Any) -> LocalSelection:
  """Per-shard selection for ``selection=``: each device ranks its own shard of each block.

  This is **not** the paper's MoFO: with a leaf split over s devices every shard keeps its own
  top ``fraction``, so a block keeps about the same number of entries but not the globally
  largest ones. It is what the authors' PyTorch optimizer effectively did under DeepSpeed ZeRO
  (each rank ranked its flattened partition). In exchange it needs no communication at all for
  the selection (the telemetry's kept-entry count is one int32 all-reduce per leaf). The exact
  default costs ``(2**radix_bits - 1) * 4`` bytes of all-reduce per block per pass, which is
  rarely worth avoiding; use this to reproduce ZeRO runs.

  Blocks are cut as usual by ``BlockSpec.split_axes`` within each shard; ``BlockSpec.reshape`` and
  ``partition="global"`` are not supported. The telemetry threshold of a leaf holds one
  threshold per shard: along a ranked axis split over n devices it has n entries.

  Args:
    mesh: the device mesh the params live on.
    specs: a pytree with the params' structure holding each leaf's ``PartitionSpec`` (or its
      ``NamedSharding``): how the params, gradients and moments are sharded.

  Returns:
    A :class:`LocalSelection` to pass as ``selection=`` to :func:`mofo_jax.mofo`,
    :func:`mofo_jax.scale_by_mofo` or :func:`mofo_jax.keep_top_fraction`.
  """
  return LocalSelection(mesh, specs)


def _layout(selection: Any, leaves: Sequence[Any]) -> tuple[Any, list[PartitionSpec]]:
  """The mesh and one PartitionSpec per leaf, from a LocalSelection or the leaves' types."""
  if selection.mesh is not None:
    flat = jax.tree.leaves(
      selection.specs, is_leaf=lambda s: isinstance(s, (PartitionSpec, NamedSharding))
    )
    if len(flat) != len(leaves):
      raise ValueError(
        f"local_selection got {len(flat)} specs for {len(leaves)} leaves: give one "
        "PartitionSpec or NamedSharding per leaf, in a pytree shaped like the params."
      )
    return selection.mesh, [s.spec if isinstance(s, NamedSharding) else s for s in flat]
  shardings = [jax.typeof(x).sharding for x in leaves]
  meshes = [s.mesh for s in shardings if _sharding.is_explicit(getattr(s, "mesh", None))]
  if len(meshes) != len(leaves):
    raise ValueError(
      "selection='local' reads each leaf's sharding from its type, which needs arrays on a "
      "mesh with Explicit axes (jax.make_mesh(..., axis_types=(AxisType.Explicit, ...)) and "
      "jax.set_mesh). Under Auto axes pass selection=mofo_jax.local_selection(mesh, specs)."
    )
  return meshes[0], [s.spec for s in shardings]


def _shards_per_axis(pspec: PartitionSpec, mesh: Any, ndim: int) -> list[int]:
  entries = tuple(pspec) + (None,) * (ndim - len(pspec))
  names = [() if e is None else (e,) if isinstance(e, str) else tuple(e) for e in entries]
  return [math.prod(mesh.shape[n] for n in ns) for ns in names]


def _local_block_shape(
  shape: Sequence[int], spec: _partition.BlockSpec, pspec: PartitionSpec, mesh: Any
) -> tuple[int, ...]:
  """Shape of a leaf's per-shard thresholds: a block axis keeps its size, a ranked axis gets
  one entry per shard along it."""
  if spec.reshape is not None:
    raise ValueError(
      "Per-shard selection ranks each device's shard as it lies: "
      "BlockSpec.reshape is not supported with it."
    )
  keep = spec.block_axes(shape)
  shards = _shards_per_axis(pspec, mesh, len(shape))
  return tuple(d if i in keep else n for i, (d, n) in enumerate(zip(shape, shards)))


def initial_thresholds(
  leaves: Sequence[Any],
  filtered: Sequence[bool],
  specs: Sequence[_partition.BlockSpec],
  selection: Any,
) -> list[jax.Array]:
  """Zero telemetry thresholds (``[]`` for dense leaves), shaped, and under Explicit axes
  sharded, as :func:`select_local` returns them, so the state's type does not change."""
  if not leaves:
    return []
  mesh, pspecs = _layout(selection, leaves)
  sharded = _sharding.is_explicit(mesh)
  return [
    jnp.zeros(
      _local_block_shape(np.shape(x), sp, pspec, mesh) if f else (),
      jnp.float32,
      out_sharding=NamedSharding(mesh, pspec if f else PartitionSpec()) if sharded else None,
    )
    for x, f, sp, pspec in zip(leaves, filtered, specs, pspecs)
  ]


def select_local(
  scores: list[jax.Array],
  filtered: list[bool],
  specs: list[_partition.BlockSpec],
  is_global: bool,
  fraction: Any,
  selection: Any,
):
  """Per-shard selection: masks (None for dense leaves), entries kept and per-shard thresholds.

  One ``shard_map`` over every filtered leaf, so all leaves still share one search loop; inside
  it the exact search runs on each device's shards with no collective.
  """
  if is_global:
    raise ValueError(
      "Per-shard selection cannot rank one global block: every device would "
      "rank a different set of leaves. Use partition='leaf' or BlockSpecs."
    )
  idx = [i for i, f in enumerate(filtered) if f]
  masks: list[jax.Array | None] = [None] * len(scores)
  kept = [_counts.to_array(_counts.constant(math.prod(s.shape))) for s in scores]
  thresholds = [jnp.zeros((), jnp.float32) for _ in scores]
  if not idx:
    return masks, kept, thresholds
  mesh, all_pspecs = _layout(selection, scores)
  pspecs = [all_pspecs[i] for i in idx]
  for i, pspec in zip(idx, pspecs):
    _local_block_shape(scores[i].shape, specs[i], pspec, mesh)  # rejects reshape
  leaf_specs = [specs[i] for i in idx]

  def per_shard(frac, *shards):
    sels = _selection.select_blocks(list(shards), leaf_specs, frac)
    shard_masks = [
      _selection.block_mask(s, sp, sel.threshold) for s, sp, sel in zip(shards, leaf_specs, sels)
    ]
    return shard_masks, [sel.threshold for sel in sels]

  # A Python fraction stays static so k = floor(fraction * n) is exact, as in the exact path.
  if isinstance(fraction, (int, float)):
    fn = lambda *shards: per_shard(fraction, *shards)  # noqa: E731
    args, in_specs = [scores[i] for i in idx], tuple(pspecs)
  else:
    fn = per_shard
    args = [jnp.asarray(fraction, jnp.float32)] + [scores[i] for i in idx]
    in_specs = (PartitionSpec(),) + tuple(pspecs)
  shard_masks, shard_thresholds = jax.shard_map(
    fn,
    mesh=mesh,
    in_specs=in_specs,
    out_specs=(list(pspecs), list(pspecs)),
    # The search loop starts from constants that do not vary over the mesh, while its counts
    # do; the outputs vary exactly as out_specs say, so the type check is skipped.
    check_vma=False,
  )(*args)
  for i, m, t in zip(idx, shard_masks, shard_thresholds):
    masks[i] = m
    thresholds[i] = t
    # one all-reduce of two scalars: telemetry only
    kept[i] = _counts.to_array(_counts.count_true(m, tuple(range(m.ndim)), keepdims=False))
  return masks, kept, thresholds
