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


def on_one_device(leaves: Sequence[Any]) -> bool:
  """Whether ``leaves`` (arrays or tracers) lie on one device. ``jax.device_count()`` alone is
  the host's: an ahead-of-time compile for a pod slice on a CPU host sees 1, while the leaves'
  abstract mesh (under Auto axes its size, not the split) says more."""
  sizes = [getattr(getattr(jax.typeof(x).sharding, "mesh", None), "size", 1) for x in leaves]
  return jax.device_count() == 1 and max(sizes, default=1) <= 1  # no mesh: size 0


def block_sharding(leaf: Any, spec: _partition.BlockSpec) -> NamedSharding | None:
  """``reduced_sharding`` of the leaf viewed through the BlockSpec, over its ranked axes."""
  view = spec.view_shape(np.shape(leaf))
  keep = spec.block_axes(np.shape(leaf))
  ranked = tuple(i for i in range(len(view)) if i not in keep)
  return jax.eval_shape(
    lambda x: jnp.sum(jnp.reshape(x, view), axis=ranked, keepdims=True), leaf
  ).sharding


def _placement(params: Any) -> tuple[Any, Any]:
  """The mesh of the params' NamedShardings, or the one sharding every param has without a mesh.

  Returns ``(mesh, None)``, ``(None, sharding)``, or ``(None, None)`` when no param has a
  sharding (NumPy arrays, Python scalars, ``ShapeDtypeStruct`` s without one).
  """
  with_paths = jax.tree_util.tree_flatten_with_path(params)[0]
  shardings = [(path, x, getattr(x, "sharding", None)) for path, x in with_paths]
  named = [s for _, _, s in shardings if isinstance(s, NamedSharding)]
  others = {s for _, _, s in shardings if s is not None and not isinstance(s, NamedSharding)}
  if named:
    meshes = {s.mesh for s in named}
    if len(meshes) > 1:
      raise ValueError(f"state_shardings: the params are sharded over {len(meshes)} meshes.")
    missing = next(((p, x) for p, x, s in shardings if not isinstance(s, NamedSharding)), None)
    if missing is not None:
      path, x = missing
      raise TypeError(
        f"state_shardings: params{jax.tree_util.keystr(path)} ({type(x).__name__}) has no "
        "NamedSharding while other params are sharded over a mesh; give every param one "
        "(jax.device_put or jax.ShapeDtypeStruct(..., sharding=...))."
      )
    return named[0].mesh, None
  if len(others) > 1:
    raise TypeError(
      "state_shardings: the params have different shardings without a mesh "
      f"({', '.join(sorted(type(s).__name__ for s in others))}); shard them with NamedShardings."
    )
  return None, next(iter(others), None)


def state_shardings(opt: optax.GradientTransformation, params: Any) -> Any:
  """The shardings a (MoFO or any optax) optimizer state should have, given sharded params.

  Every array in the state shaped like its parameter (moments, accumulated gradients, anything
  else optax keeps per parameter) gets that parameter's sharding, however the optimizer is
  wrapped: ``optax.chain``, ``optax.masked`` and ``optax.partition`` (masked-out entries stay
  ``optax.MaskedNode``), ``optax.MultiSteps``, ``optax.inject_hyperparams``. A state array
  belongs to the parameter whose key path ends its own key path (the longest such), e.g.
  ``inner_state[0].mu['layers']['q']`` to ``params['layers']['q']``; this needs no call of
  ``init`` on placeholders, which ``optax.tree_utils.tree_map_params`` makes and which MoFO's
  pytree-valued ``filter_mask`` and ``partition`` cannot resolve.

  MoFO's per-block telemetry thresholds get the parameter's sharding along block axes (so
  per-layer thresholds of a layer-sharded stack stay where their layers are; per-shard
  thresholds stay on their shards) when the block is cut without ``reshape``; thresholds of
  reshaped blocks (per head) are replicated, which costs one tiny all-gather of one float per
  block per step. Every other small value (counts, per-leaf telemetry, hyperparameters) is
  replicated. Under Explicit mesh axes a value's sharding is part of its type, and the result is
  read from ``jax.eval_shape(opt.init, params)`` instead, which is exactly what ``init`` and
  ``update`` produce.

  Use it for ``jax.jit(opt.init, out_shardings=...)``, for the ``out_shardings`` of a train step,
  and as the target of an orbax restore.

  Args:
    opt: the optimizer (anything with ``init``).
    params: the params as ``jax.Array`` s or ``jax.ShapeDtypeStruct`` s, each with a
      ``NamedSharding`` over one mesh. Params without any sharding (NumPy arrays, Python
      scalars, ``ShapeDtypeStruct`` s without one) give ``None`` everywhere (let ``jit`` place
      the state); params all on one device (``SingleDeviceSharding``) give that sharding
      everywhere.

  Returns:
    A pytree of shardings (or ``None`` s) with the structure of ``opt.init(params)``.

  Raises:
    TypeError: some params are sharded over a mesh and others have no ``NamedSharding``.

  Example:
    >>> import jax, jax.numpy as jnp, mofo_jax, optax
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.make_mesh((jax.device_count(),), ("fsdp",),
    ...                      axis_types=(jax.sharding.AxisType.Auto,))
    >>> params = {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32,
    ...                                     sharding=NamedSharding(mesh, P("fsdp", None)))}
    >>> shardings = mofo_jax.state_shardings(mofo_jax.mofo(1e-3), params)
    >>> shardings[0].mu["w"].spec == P("fsdp", None), shardings[0].count.spec == P()
    (True, True)
    >>> masked = optax.masked(mofo_jax.mofo(1e-3), {"w": True})
    >>> mofo_jax.state_shardings(masked, params).inner_state[0].nu["w"].spec == P("fsdp", None)
    True
  """
  abstract = jax.eval_shape(opt.init, params)
  mesh, single = _placement(params)
  if mesh is None:
    return jax.tree.map(lambda _: single, abstract)
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
    if (
      jnp.issubdtype(leaf.dtype, jnp.floating)
      and len(leaf.shape) == len(param.shape)
      and all(a in (1, b, n) for a, b, n in zip(leaf.shape, param.shape, shards))
    ):
      # A per-block threshold over the leaf's own axes (one per index of a block axis, or one
      # per shard with per-shard selection): sharded like the leaf along the axes it keeps
      # whole. Integer values (counts, kept as limbs) are replicated whatever their shape.
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

  by_path = {tuple(path): p for path, p in jax.tree_util.tree_flatten_with_path(params)[0]}
  longest = max(map(len, by_path), default=0)

  def assign(path, leaf):
    for n in range(min(len(path), longest), -1, -1):
      param = by_path.get(tuple(path[len(path) - n :]))
      if param is not None:
        return for_param(leaf, param, param.sharding)
    return replicated

  return jax.tree_util.tree_map_with_path(assign, abstract)
