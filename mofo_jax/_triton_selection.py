"""Exact selection with Adam's moments fused with the first count, by a Pallas Triton kernel (GPU).

XLA computes the new first moment into a buffer and then runs the counting search over it:
8 passes of 4 bits, each reading the momentum's keys. Here one Triton kernel reads g, m, v,
writes the new m and v over the old ones and, in the same pass, counts per tile how many keys
(the bits of |m| as an integer, as :func:`mofo_jax._selection.score_keys`) reach each value of
the key's top 4 bits. The 7 passes left (the other 28 bits) are XLA's counting search started
from that digit, over the kernel's m buffer. The threshold is the k-th largest key of each block
however it is searched and the counts are of the same keys, so thresholds, counts and masks
equal :class:`mofo_jax.ExactSelection`'s bit for bit, and the mask, the threshold and the count
all read the one m the kernel wrote.

Not measured on a GPU: it is tested in Pallas's interpreter (values) and lowered for CUDA on
CPU (the Triton IR is built), never compiled to PTX or timed. It is therefore opt-in
(``selection=mofo_jax.TritonSelection()``); ``"exact"`` does not choose it.

A leaf takes the kernel when it is filtered, has float32 or bfloat16 gradients and moments,
blocks that are whole leaves or slices along leading axes, a block size that is a multiple of
the tile and under ``2**31`` entries, and the partition is not global. Every other leaf (and
every leaf on more than one device) goes through the ``fallback`` selection.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mofo_jax import _counts
from mofo_jax import _pallas_selection
from mofo_jax import _partition
from mofo_jax import _selection
from mofo_jax import _sharding

RADIX_BITS = 4  # the digit the fused pass counts: the key's top 4 bits
_DIGITS = 1 << RADIX_BITS
_SHIFT = 32 - RADIX_BITS  # as ExactSelection's first counting pass
TILE_ENTRIES = 1 << 12  # entries per program: a power of two, as Triton's blocks must be
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def tile_for(shape: tuple[int, ...], spec: _partition.BlockSpec, dtypes, tile: int) -> int | None:
  """The tile the kernel uses for a leaf of ``shape`` cut by ``spec``, or None where it does not
  apply (odd dtypes, blocks that are not runs of whole trailing axes, sizes the tile does not
  divide, blocks of 2**31 entries or more)."""
  if any(jnp.dtype(d) not in _DTYPES for d in dtypes):
    return None
  view = spec.view_shape(shape)
  split = spec.block_axes(shape)
  if split != tuple(range(len(split))):
    return None
  block = spec.block_size(shape)
  if block % tile or block >= _counts.INT32_LIMIT:
    return None
  return tile if math.prod(view) else None


def fused_moments(g, mu, nu, tile: int, first_moment, second_moment, *, interpret=False):
  """One pass over the flat ``g, mu, nu``: the new moments (written over ``mu`` and ``nu``) and,
  per tile, ``int32[16]`` how many keys of the new m reach ``d << 28`` (lane d)."""
  n = g.shape[0]

  def kernel(g_ref, mu_ref, nu_ref, m_ref, v_ref, out_ref):
    g = g_ref[...]
    m = first_moment(g, mu_ref[...])
    m_ref[...] = m
    v_ref[...] = second_moment(g, nu_ref[...])
    # Keys are below 2**31 (the sign is cleared), so int32 compares them as uint32 would;
    # candidates from 2**31 up are reached by no key.
    keys = lax.bitcast_convert_type(m.astype(jnp.float32), jnp.int32) & jnp.int32(2**31 - 1)
    d = lax.broadcasted_iota(jnp.int32, (1, _DIGITS), 1)
    hits = (keys[:, None] >= (d << _SHIFT)) & (d < _DIGITS // 2)
    out_ref[...] = jnp.sum(hits.astype(jnp.int32), axis=0, keepdims=True)

  flat = pl.BlockSpec((tile,), lambda i: (i,))
  return pl.pallas_call(
    kernel,
    out_shape=(
      jax.ShapeDtypeStruct(mu.shape, mu.dtype),
      jax.ShapeDtypeStruct(nu.shape, nu.dtype),
      jax.ShapeDtypeStruct((n // tile, _DIGITS), jnp.int32),
    ),
    grid=(n // tile,),
    in_specs=[flat, flat, flat],
    out_specs=(flat, flat, pl.BlockSpec((1, _DIGITS), lambda i: (i, 0))),
    input_output_aliases={1: 0, 2: 1},
    interpret=interpret,
    compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
  )(g, mu, nu)


def select_leaf(g, mu, nu, spec, tile, fraction, first_moment, second_moment, *, interpret=False):
  """The new m and v of one leaf, its blocks' thresholds (block-shaped float32) and counts."""
  shape = g.shape
  m, v, tiles = fused_moments(
    *(x.reshape(-1) for x in (g, mu, nu)), tile, first_moment, second_moment, interpret=interpret
  )
  m, v = m.reshape(shape), v.reshape(shape)
  block_shape = spec.block_shape(shape)
  size = spec.block_size(shape)
  # Tiles run along the flat leaf, so each block is a run of whole tiles; int32 holds a block's
  # count (under 2**31 entries, see tile_for).
  per_block = jnp.sum(tiles.reshape(-1, size // tile, _DIGITS), axis=1, dtype=jnp.int32)
  k = _counts.num_to_select(fraction, size)
  counts = _counts.split(per_block[:, 1:])
  digit = jnp.sum(_counts.greater_equal(counts, k), axis=-1, dtype=jnp.int32)
  at_digit = jnp.take_along_axis(per_block, digit[:, None], axis=-1)[:, 0]
  view = m.reshape(spec.view_shape(shape))
  axes = tuple(i for i in range(view.ndim) if i not in spec.block_axes(shape))
  prefix = (digit.astype(jnp.uint32) << _SHIFT).reshape(block_shape)
  [key], [count] = _selection.count_search_from(
    [view],
    [axes],
    [k],
    [_counts.split(at_digit.reshape(block_shape))],
    [prefix],
    _SHIFT,
    radix_bits=RADIX_BITS,
  )
  return m, v, _selection.keys_to_threshold(key), count


@dataclasses.dataclass(frozen=True)
class TritonSelection:
  """``selection=``: exact selection with the first counting pass fused into Adam's pass by a
  Pallas Triton kernel on GPU where a leaf allows it (see module), the ``fallback`` elsewhere.

  Thresholds, counts, masks and new moments equal :class:`mofo_jax.ExactSelection`'s bit for
  bit (tested in interpret mode). Unmeasured on a GPU: opt-in only. Only ``score="momentum"``
  uses the kernel; other scores are ranked by the fallback.

  Attributes:
    kernel: ``"auto"``: the kernel when the program is lowered for CUDA on one device
      (:mod:`mofo_jax._platform`), the fallback on every other platform; ``"always"``: the
      kernel wherever it applies (on CPU only with ``interpret``).
    interpret: run the kernel in Pallas's interpreter (tests on CPU).
    tile_entries: entries per Triton program, a power of two.
    fallback: the selection of the leaves the kernel does not take.

  Example:
    >>> import mofo_jax
    >>> opt = mofo_jax.mofo(1e-3, selection=mofo_jax.TritonSelection())
  """

  kernel: Literal["auto", "always"] = "auto"
  interpret: bool = False
  tile_entries: int = TILE_ENTRIES
  fallback: Any = dataclasses.field(default_factory=_selection.ExactSelection)

  def __post_init__(self):
    if self.kernel not in ("auto", "always"):
      raise ValueError(f"kernel={self.kernel!r} must be 'auto' or 'always'.")
    t = self.tile_entries
    if not isinstance(t, int) or t < 16 or t & (t - 1):
      raise ValueError(f"tile_entries={t!r} must be a power of two, at least 16.")

  def initial_thresholds(self, leaves, filtered, specs):
    return self.fallback.initial_thresholds(leaves, filtered, specs)

  def select(self, scores, filtered, specs, is_global, fraction, previous=None):
    return self.fallback.select(scores, filtered, specs, is_global, fraction, previous=previous)

  def tiles(self, moments, filtered, specs, is_global) -> list[int | None]:
    """Per leaf, the kernel's tile, or None where the leaf goes to the fallback."""
    if is_global or (self.kernel == "auto" and not _sharding.on_one_device(moments.grads)):
      return [None] * len(filtered)
    out = []
    for g, mu, nu, f, spec in zip(moments.grads, moments.mus, moments.nus, filtered, specs):
      ok = f and _pallas_selection._traceable(moments.first_moment, g.dtype, mu.dtype)
      ok = ok and _pallas_selection._traceable(moments.second_moment, g.dtype, nu.dtype)
      dtypes = (g.dtype, mu.dtype, nu.dtype)
      out.append(tile_for(g.shape, spec, dtypes, self.tile_entries) if ok else None)
    return out

  def select_momentum(self, moments, filtered, specs, is_global, fraction, previous=None):
    """The new moments and the exact selection of the new first moment (see
    :func:`mofo_jax.select_momentum`), by the kernel for the leaves it takes."""
    tiles = self.tiles(moments, filtered, specs, is_global)

    def fallback(moments, fraction, previous):
      return _selection.select_momentum(
        self.fallback, moments, filtered, specs, is_global, fraction, previous=previous
      )

    take = [t is not None for t in tiles]

    def kernels(moments, fraction, previous):
      results = _selection.select_momentum_rest(
        self.fallback, moments, filtered, specs, is_global, fraction, previous, take
      )
      for i in (i for i, t in enumerate(take) if t):
        m, v, tau, count = select_leaf(
          moments.grads[i],
          moments.mus[i],
          moments.nus[i],
          specs[i],
          tiles[i],
          fraction,
          moments.first_moment,
          moments.second_moment,
          interpret=self.interpret,
        )
        _selection.put_leaf(results, i, specs[i], m, v, tau, count)
      return tuple(results)

    args = (moments, fraction, previous)
    return _selection.kernels_or_fallback(self.kernel, any(take), kernels, fallback, "cuda", args)
