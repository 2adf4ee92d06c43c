"""The Pallas selections' kernels on sharded leaves: each device runs them on its own shard.

A leaf split over a mesh (FSDP rows, tensor-parallel columns, layers) is ranked in blocks that
may span several devices. Inside ``jax.shard_map`` every device runs the fused and counting
kernels of :mod:`mofo_jax._pallas_selection` on its local shard; the per-block counts of each
pass are summed (``psum``) over the mesh axes that split a block, so every device picks the
same digit of the same global threshold. Thresholds, counts, masks and new moments are then
those of one device bit for bit: the threshold is the k-th largest key of the whole block, and
the counts are exact integer sums. A pass all-reduces its counts in one collective, 4 bytes per
candidate of each block (15 a pass, 17 in the fused pass with a bracket): one int32, or 8 bytes
(both limbs) where a block reaches 2**31 entries (see :func:`mofo_jax._counts.psum`).

A leaf takes this path when its mesh and ``PartitionSpec`` are known (given to the selection,
or read from the arrays' types under Explicit mesh axes), its blocks are cut without
``reshape``, every sharded axis divides evenly, and its local shard tiles as a whole leaf of
that shape would (see :func:`mofo_jax._pallas_selection.tiling`); other leaves on several
devices go through the selection's XLA fallback.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from mofo_jax import _partition
from mofo_jax import _sharding


@dataclasses.dataclass(frozen=True)
class Shard:
  """How one leaf lies on the mesh, as the kernels see it."""

  mesh: Any  # jax.sharding.Mesh or AbstractMesh
  pspec: PartitionSpec  # the leaf's, one entry per axis
  block_pspec: PartitionSpec  # its per-block values': the leaf's on block axes, None elsewhere
  reduce_axes: tuple[str, ...]  # mesh axes that split a block: its counts are summed over them
  local_shape: tuple[int, ...]  # one device's shard of the leaf
  block_entries: int  # entries of one whole block


def flat_specs(specs: Any) -> tuple[PartitionSpec, ...] | None:
  """A pytree of ``PartitionSpec`` or ``NamedSharding`` as a tuple of PartitionSpecs (leaf
  order), so a frozen selection holding it stays hashable."""
  if specs is None:
    return None
  flat = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, (PartitionSpec, NamedSharding)))
  return tuple(s.spec if isinstance(s, NamedSharding) else s for s in flat)


def layout(mesh: Any, pspecs: Sequence[PartitionSpec] | None, leaves: Sequence[Any]):
  """The mesh and one PartitionSpec per leaf: as given, else from the leaves' types under
  Explicit mesh axes; None where neither says (Auto axes without a given layout)."""
  if mesh is not None:
    if pspecs is None or len(pspecs) != len(leaves):
      n = 0 if pspecs is None else len(pspecs)
      raise ValueError(
        f"the selection got {n} PartitionSpecs for {len(leaves)} leaves: give one "
        "PartitionSpec or NamedSharding per param, in a pytree shaped like the params."
      )
    return mesh, list(pspecs)
  shardings = [getattr(jax.typeof(x), "sharding", None) for x in leaves]
  meshes = {getattr(s, "mesh", None) for s in shardings}
  if len(meshes) != 1 or not _sharding.is_explicit(next(iter(meshes))):
    return None
  return meshes.pop(), [s.spec for s in shardings]


def shard(
  shape: tuple[int, ...], spec: _partition.BlockSpec, pspec: PartitionSpec, mesh: Any
) -> Shard | None:
  """The :class:`Shard` of a leaf of ``shape`` cut by ``spec`` and split by ``pspec``, or None
  where the kernels cannot take its shards (a reshaped view, an uneven split)."""
  if spec.reshape is not None and tuple(spec.reshape) != tuple(shape):
    return None
  entries = tuple(pspec) + (None,) * (len(shape) - len(pspec))
  names = [() if e is None else (e,) if isinstance(e, str) else tuple(e) for e in entries]
  sizes = [math.prod(mesh.shape[n] for n in ns) for ns in names]
  if any(d % s for d, s in zip(shape, sizes)):
    return None
  keep = spec.block_axes(shape)
  reduce_axes = tuple(n for i, ns in enumerate(names) if i not in keep for n in ns)
  return Shard(
    mesh=mesh,
    pspec=PartitionSpec(*entries),
    block_pspec=PartitionSpec(*(e if i in keep else None for i, e in enumerate(entries))),
    reduce_axes=reduce_axes,
    local_shape=tuple(d // s for d, s in zip(shape, sizes)),
    block_entries=spec.block_size(shape),
  )


def shards(moments, specs, kernel: str, mesh: Any, pspecs) -> list[Shard | None] | None:
  """Per leaf of a :class:`mofo_jax.MomentUpdate`, its :class:`Shard` (None: the leaf's
  shards do not suit the kernels, or its layout is unknown), or None when the leaves run
  whole: on one device, or ``kernel="always"`` without a known layout."""
  found = layout(mesh, pspecs, moments.grads)
  if found is not None:
    m, ps = found
    return [shard(g.shape, sp, p, m) for g, sp, p in zip(moments.grads, specs, ps)]
  if kernel == "always" or _sharding.on_one_device(moments.grads):
    return None
  return [None] * len(specs)


def traced(fraction: Any) -> jax.Array | None:
  """A traced ``fraction`` as the float32 scalar the kernels take it as (an argument of the
  ``shard_map``), or None for a Python number, which stays static so that k is exact."""
  if isinstance(fraction, (int, float)):
    return None
  return jnp.asarray(fraction, jnp.float32)


def run(fn, where: Shard | None, leaves: list[list[Any]], blocks: list[list[Any]], fraction):
  """``fn(fraction, leaves, blocks) -> (leaf outputs, block outputs)`` on each device's shards
  (``jax.shard_map``), or on the whole arrays where ``where`` is None. ``leaves``: lists of
  arrays split like the leaf; ``blocks``: lists of per-block arrays; ``fraction``: None or a
  replicated float32 scalar (:func:`traced`)."""
  if where is None:
    return fn(fraction, leaves, blocks)
  scalars = () if fraction is None else (fraction,)
  return jax.shard_map(
    lambda s, x, b: fn(s[0] if s else None, x, b),
    mesh=where.mesh,
    in_specs=(
      PartitionSpec(),
      [[where.pspec] * len(x) for x in leaves],
      [[where.block_pspec] * len(x) for x in blocks],
    ),
    out_specs=(where.pspec, where.block_pspec),
    # The search loop starts from constants that do not vary over the mesh, while the counts it
    # reads are summed over it; the outputs vary as out_specs say.
    check_vma=False,
  )(scalars, leaves, blocks)
