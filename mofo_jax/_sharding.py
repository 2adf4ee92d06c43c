"""MoFO on a device mesh: the shardings of the optimizer state and of per-block values.

The exact selection needs nothing from this module to be correct when leaves are sharded: it is
elementwise work plus reductions, so XLA partitions it into local counting and an all-reduce of
``2**radix_bits - 1`` int32 counts per block per pass. What lives here is bookkeeping around it:
the shardings the optimizer state should have, and the shardings per-block values must start
with under Explicit mesh axes, where a value's sharding is part of its type.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from mofo_jax import _partition


def reduced_sharding(x: Any, axes: Sequence[int]) -> NamedSharding | None:
  """The sharding ``jnp.sum(x, axes, keepdims=True)`` has when the mesh axes are Explicit.

  Under Explicit axes a ``fori_loop`` carry must keep one type from pass to pass, and the
  optimizer state must keep one type from step to step, so per-block values (counts, thresholds)
  must start out sharded the way the reductions over the blocks produce them. Under Auto axes
  (or without a mesh) this is ``None`` and the compiler chooses.
  """
  return jax.eval_shape(lambda v: jnp.sum(v, axis=tuple(axes), keepdims=True), x).sharding


def is_explicit(mesh: Any) -> bool:
  return any(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ()))


def block_sharding(leaf: Any, spec: _partition.BlockSpec) -> NamedSharding | None:
  """``reduced_sharding`` of the leaf viewed through the BlockSpec, over its ranked axes."""
  view = spec.view_shape(np.shape(leaf))
  keep = spec.block_axes(np.shape(leaf))
  ranked = tuple(i for i in range(len(view)) if i not in keep)
  return jax.eval_shape(
    lambda x: jnp.sum(jnp.reshape(x, view), axis=ranked, keepdims=True), leaf
  ).sharding


def state_shardings(opt: optax.GradientTransformation, params: Any) -> Any:
  """The shardings a (MoFO or any optax) optimizer state should have, given sharded params.

  Every array in the state shaped like its parameter (moments, and anything else optax keeps per
  parameter) gets that parameter's sharding. MoFO's per-block telemetry thresholds get the
  parameter's sharding along block axes (so per-layer thresholds of a layer-sharded stack stay
  where their layers are; per-shard thresholds stay on their shards) when the block is cut
  without ``reshape``; thresholds of reshaped blocks (per head) are replicated, which costs one
  tiny all-gather of one float per block per step. Every other small value (counts, per-leaf
  telemetry) is replicated. Under Explicit
  mesh axes a value's sharding is part of its type, and the result is read from
  ``jax.eval_shape(opt.init, params)`` instead, which is exactly what ``init`` and ``update``
  produce.

  Use it for ``jax.jit(opt.init, out_shardings=...)``, for the ``out_shardings`` of a train step,
  and as the target of an orbax restore.

  Args:
    opt: the optimizer (anything with ``init``).
    params: the params as ``jax.Array`` s or ``jax.ShapeDtypeStruct`` s, each with a
      ``NamedSharding``.

  Returns:
    A pytree of ``NamedSharding`` with the structure of ``opt.init(params)``.

  Example:
    >>> import jax, jax.numpy as jnp, mofo_jax
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.make_mesh((jax.device_count(),), ("fsdp",),
    ...                      axis_types=(jax.sharding.AxisType.Auto,))
    >>> params = {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32,
    ...                                     sharding=NamedSharding(mesh, P("fsdp", None)))}
    >>> shardings = mofo_jax.state_shardings(mofo_jax.mofo(1e-3), params)
    >>> shardings[0].mu["w"].spec == P("fsdp", None), shardings[0].count.spec == P()
    (True, True)
  """
  abstract = jax.eval_shape(opt.init, params)
  param_shardings = jax.tree.map(lambda p: p.sharding, params)
  meshes = [s.mesh for s in jax.tree.leaves(param_shardings)]
  if not meshes:
    return jax.tree.map(lambda _: None, abstract)
  mesh = meshes[0]
  if is_explicit(mesh):
    # Constants made outside any mesh context have no sharding: they are replicated.
    return jax.tree.map(
      lambda x: NamedSharding(mesh, x.sharding.spec if x.sharding is not None else PartitionSpec()),
      abstract,
    )
  replicated = NamedSharding(mesh, PartitionSpec())

  def for_param(leaf, param, sharding):
    if leaf.shape == param.shape:
      return sharding
    entries = tuple(sharding.spec) + (None,) * (len(param.shape) - len(sharding.spec))
    shards = [
      math.prod(mesh.shape[n] for n in (() if e is None else (e,) if isinstance(e, str) else e))
      for e in entries
    ]
    if len(leaf.shape) == len(param.shape) and all(
      a in (1, b, n) for a, b, n in zip(leaf.shape, param.shape, shards)
    ):
      # A per-block value over the leaf's own axes (one per index of a block axis, or one per
      # shard with per-shard selection): sharded like the leaf along the axes it keeps whole.
      return NamedSharding(
        mesh,
        PartitionSpec(
          *[
            e if a > 1 and a in (b, n) else None
            for e, a, b, n in zip(entries, leaf.shape, param.shape, shards)
          ]
        ),
      )
    return replicated

  # Find the subtrees of the state shaped like the params (moments, per-leaf telemetry) by their
  # tree structure; optax.tree.map_params would run init on a placeholder instead, which cannot
  # resolve MoFO's pytree-valued filter_mask and partition arguments.
  treedef = jax.tree.structure(params)
  param_leaves = treedef.flatten_up_to(params)
  sharding_leaves = treedef.flatten_up_to(param_shardings)

  def assign(sub):
    if jax.tree.structure(sub) != treedef:
      return replicated
    return treedef.unflatten(
      [
        for_param(x, p, s)
        for x, p, s in zip(treedef.flatten_up_to(sub), param_leaves, sharding_leaves)
      ]
    )

  return jax.tree.map(assign, abstract, is_leaf=lambda x: jax.tree.structure(x) == treedef)
