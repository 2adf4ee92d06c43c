"""Exact selection by Pallas TPU (Mosaic) kernels: Adam's moments fused with the first count.

The XLA path computes the new first moment into a buffer and then searches its threshold in
passes that XLA:TPU cannot fuse with the Adam pass. Here one kernel reads g, m, v, writes the
new m and v, and in the same pass counts, per block, the entries whose key (the bits of |m| as
an integer, see :func:`mofo_jax._selection.score_keys`) reach each of a few candidates: the 15
non-zero values of the key's top 4 bits and, around the last step's threshold, both ends of a
bracket of ``2**20`` keys and the 15 candidates that split it in 16. Narrow counting kernels
then re-read only the new m, 4 bits of the threshold per pass: 4 passes when every block's
threshold stayed in its bracket, else 7 (a loop around one counting kernel in each branch).
The threshold is the k-th largest key of each block however it is searched, and the counts
are of the same keys, so thresholds, counts and masks equal the XLA path's bit for bit; the
mask is compared by XLA on the kernel's m buffer and fused into the masked update there (with
the direction and, in a jitted step, ``apply_updates``: one pass reading m, v and p).

The counts of a run of candidates ``base + d << shift`` come from one histogram of the digit
``d`` of each key, summed in bytes packed four to an int32 (:func:`_histogram_into`): about 23
vector ops per vreg of keys for 15 candidates, where a compare, a select and an add per
candidate cost 45. The counting passes are bound by the vector unit, not by HBM, on v6e (the
compiler's static schedule of the kernels), so these ops, not the bytes, set their time.

Leaves of one 2-D view and dtypes (the 32 query/output projections of a 16-layer model, say)
share their kernels: one call takes up to ``MAX_GROUP`` of them as separate operands, each in
tiles ``1 / len(group)`` the size, so VMEM holds what one leaf's tiles would and the program
holds one set of kernels per group, not per leaf (compile time grows with the number of Mosaic
kernels; each leaf is still read and written once, in place).

A leaf takes the kernel when it is filtered, has two or more axes, float32 or bfloat16
gradients and moments, blocks that are whole leaves or slices along leading axes (each layer of
a stacked ``[layers, d_in, d_out]`` weight) that tile into lane-aligned VMEM tiles, and the
partition is not global. On several devices a leaf takes it shard by shard where its layout
is known and its shard tiles so (:mod:`mofo_jax._pallas_sharded`). Every other leaf goes
through the ``fallback`` selection.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mofo_jax import _counts
from mofo_jax import _pallas_sharded
from mofo_jax import _partition
from mofo_jax import _selection

RADIX_BITS = 4  # bits of the threshold fixed per pass: 15 candidates per count
KEY_BITS = 31  # |m| clears the sign bit
BRACKET_BITS = 20  # as ExactSelection's default: +-3% to +-6% of the last threshold
# Entries per VMEM tile. The fused pass double-buffers five tiles (g, m, v in; m, v out) plus
# its key and comparison temporaries; at 2**18 float32 entries it compiles under the 32 MiB of
# scoped VMEM on v5e, v6e and v4 (tests/test_pallas.py compiles it through libtpu).
TILE_ENTRIES = 1 << 18
_LANES = 128
_SUBLANES = 8
# Leaves per kernel call: their tiles share TILE_ENTRIES (16 leaves: 16384 float32 entries, 64
# KiB, a tile each). Compiled for v6e, a group of 16 (2048, 2048) leaves took 2.9 s, of 32 6.6 s
# and of 8 2.5 s: 16 is the cheapest per leaf.
MAX_GROUP = 16
_SIGN = np.uint32(1 << 31)
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


@dataclasses.dataclass(frozen=True)
class Tiling:
  """How a leaf, viewed as ``[rows, cols]``, is cut into VMEM tiles inside its blocks."""

  rows: int  # rows of the 2-D view: every axis of the view but the last
  cols: int  # the view's last axis
  block_rows: int  # rows of one block (the blocks are consecutive runs of rows)
  tile_rows: int  # rows of one tile; divides block_rows
  tile_cols: int  # columns of one tile; divides cols

  @property
  def num_blocks(self) -> int:
    return self.rows // self.block_rows

  @property
  def grid(self) -> tuple[int, int]:
    return self.rows // self.tile_rows, self.cols // self.tile_cols


def _largest_divisor(n: int, step: int, limit: int) -> int | None:
  """The largest multiple of ``step`` that divides ``n`` and is at most ``limit``."""
  for d in range(min(n, limit) // step * step, 0, -step):
    if n % d == 0:
      return d
  return None


def tiling(
  shape: tuple[int, ...],
  spec: _partition.BlockSpec,
  dtypes: tuple[Any, ...],
  tile_entries: int = TILE_ENTRIES,
) -> Tiling | None:
  """The tiles the kernels use for a leaf of ``shape`` cut by ``spec``, or None where they do
  not apply (odd dtypes, a split of the last axis, tiles Mosaic cannot lay out).

  Example:
    >>> tiling((128256, 4096), _partition.PER_LEAF, (jnp.float32,))
    Tiling(rows=128256, cols=4096, block_rows=128256, tile_rows=128, tile_cols=2048)
  """
  if any(jnp.dtype(d) not in _DTYPES for d in dtypes):
    return None
  view = spec.view_shape(shape)
  if len(view) < 2 or math.prod(view) == 0:
    return None
  split = spec.block_axes(shape)
  if split != tuple(range(len(split))) or len(split) >= len(view) - 1:
    # Blocks must be runs of whole rows; blocks of single rows would need a count per row.
    return None
  rows, cols = math.prod(view[:-1]), view[-1]
  block_rows = math.prod(view[len(split) : -1])
  # Packed bfloat16 tiles are 16 rows deep.
  sublanes = _SUBLANES * max(4 // jnp.dtype(d).itemsize for d in dtypes)
  if cols % _LANES == 0:
    tile_cols = _largest_divisor(cols, _LANES, max(_LANES, min(2048, tile_entries // sublanes)))
  else:
    tile_cols = cols  # a full axis needs no alignment
  tile_rows = _largest_divisor(block_rows, sublanes, max(sublanes, tile_entries // tile_cols))
  if tile_rows is None and block_rows == rows and rows * tile_cols <= tile_entries:
    tile_rows = rows
  if tile_cols is None or tile_rows is None:
    return None
  return Tiling(rows, cols, block_rows, tile_rows, tile_cols)


def _signed_keys(m: jax.Array) -> jax.Array:
  """The keys of ``|m|`` shifted by ``-2**31`` into int32, so that a signed comparison orders
  them as unsigned ones (candidates reach ``2**31`` and beyond, where no key is)."""
  # Clearing the sign bit is |m|'s bit pattern (NaN's too), without a float op.
  bits = lax.bitcast_convert_type(m.astype(jnp.float32), jnp.int32)
  return (bits & jnp.int32(2**31 - 1)) + jnp.int32(-(2**31))


def _signed(cands: jax.Array) -> jax.Array:
  """uint32 candidates as the int32 :func:`_signed_keys` compare against."""
  return lax.bitcast_convert_type(cands ^ _SIGN, jnp.int32)


def _count_into(keys, cands_ref, leaf: int, t: Tiling, num_cands: int, out_ref):
  """Writes, for the tile's block of leaf ``leaf`` of the group, how many of ``keys`` reach each
  candidate (lane j holds candidate j) into ``out_ref[leaf]``, an ``[8, 128]`` tile. Sums run in
  float32: exact for tiles under 2**24 entries."""
  # lax.div: jnp's floor division of a signed int lowers through sign, which Mosaic lowers only
  # when it can ask the device for its generation.
  block = lax.div(pl.program_id(0), jnp.int32(t.block_rows // t.tile_rows))
  first = (leaf * t.num_blocks + block) * num_cands
  lane = lax.broadcasted_iota(jnp.int32, (_SUBLANES, _LANES), 1)

  # A loop, not unrolled: the kernel's code (and its trace, lowering and Mosaic compile) stays
  # one candidate's size per leaf.
  def count(j, acc):
    hits = (keys >= cands_ref[first + j]).astype(jnp.float32)
    total = jnp.sum(jnp.sum(hits, axis=0, keepdims=True), axis=1, keepdims=True)
    return jnp.where(lane == j, total, acc)

  acc = lax.fori_loop(0, num_cands, count, jnp.zeros((_SUBLANES, _LANES), jnp.float32))
  out_ref[leaf] = acc.astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Digits:
  """A run of ``num`` candidates, ``base + (first + i) << shift`` for ``i < num``, counted by
  one histogram of the keys' digit ``(key - base) >> shift`` (see :func:`_histogram_into`).
  ``base`` (per block) and ``shift`` are traced, ``first`` (0 or 1) and ``num`` static."""

  first: int
  num: int

  @property
  def words(self) -> int:
    """Packed int32 accumulators: ``num + 1`` bins (one below the first candidate), 4 each."""
    return -(-(self.num + 1) // _FIELDS)


# Bins per packed accumulator word: one byte each, so a word sums at most 255 entries per bin.
_FIELDS = 4
_FIELD_LIMIT = 255
# Strips a loop trip takes: whole rows of the tile (static lane offsets), about 16 strips. For
# one f32[8192, 2048] leaf (v6e, libtpu's static schedule) 16 a trip: fused pass 280k cycles,
# count 121k (64 a trip: 369k, 117k); for a group of 16 f32[2048, 2048] leaves 16 a trip:
# 1.77M and 0.62M (4 a trip: 2.45M, 1.61M; the compare loop before this: 14.2M, 12.0M).
_UNROLL = 16


def _strips(t: Tiling, itemsize: int) -> tuple[int, int, int, int, int]:
  """The tile as strips of one vreg that a loop takes a few at a time (the accumulators stay in
  registers): ``(strip rows, strip cols, strips per tile row, tile rows per chunk, strips per
  trip)``. A chunk's strips fit the byte fields (<= 255 entries per bin and position) before
  they are unpacked. A trip takes whole rows, about ``_UNROLL`` strips: enough to interleave
  their ops, few enough to stay in registers."""
  # A vreg holds 8 rows of float32, 16 of bfloat16.
  rows = _SUBLANES * (4 // itemsize)
  rows = rows if t.tile_rows % rows == 0 else t.tile_rows
  cols = _LANES if t.tile_cols % _LANES == 0 else t.tile_cols
  across = t.tile_cols // cols
  chunk = _largest_divisor(t.tile_rows // rows, 1, _FIELD_LIMIT // across)
  per_trip = across * _largest_divisor(chunk, 1, max(1, _UNROLL // across))
  return rows, cols, across, chunk, per_trip


@functools.partial(jax.jit, static_argnums=0)
def _add_strip(runs, keys, shifts, bases, words):
  """Adds one strip of ``keys`` to the packed bin words of each run (see
  :func:`_histogram_into`). Jitted, so traced once per runs and strip shape (not once per
  strip); written in ``lax`` primitives, so its jaxpr is flat: each strip's copy in a kernel
  lowers without nested calls (``jnp``'s operators each trace and lower as a call)."""
  zero = lax.full(keys.shape, 0, jnp.int32)
  out = []
  for run, shift, base, acc in zip(runs, shifts, bases, words):
    lo = run.first - 1
    # Keys and bases are under 2**31: the difference does not overflow. Keys below the first
    # candidate land in bin 0 or below (e < 0: in no word), which no count adds.
    e = lax.sub(lax.min(lax.shift_right_arithmetic(lax.sub(keys, base), shift), lo + run.num), lo)
    one = lax.shift_left(1, lax.shift_left(lax.bitwise_and(e, _FIELDS - 1), 3))
    word = lax.shift_right_arithmetic(e, 2)
    out.append(tuple(lax.add(a, lax.select(lax.eq(word, w), one, zero)) for w, a in enumerate(acc)))
  return tuple(out)


def _histogram_into(m_ref, digits_ref, leaf: int, group: int, t: Tiling, runs, out_ref):
  """Writes, for the tile's block of leaf ``leaf`` of the group, how many keys of the tile in
  ``m_ref`` reach each candidate of the ``runs`` of :class:`Digits` (their candidates one
  after another in the lanes) into ``out_ref[leaf]``, an ``[8, 128]`` tile.

  Each key falls in one bin of each run (below the first candidate, between two, at or above
  the last); a bin's entries are summed as one byte of a packed int32 word, four bins a word,
  so a run of 15 candidates costs about 23 vector ops per vreg of keys where comparing with
  each costs 45 (a compare, a select and an add per candidate). ``digits_ref`` holds per run
  its shift and then the base of each block, leaf-major (``1 + group * num_blocks`` values).
  Bin sums run in float32: exact for tiles under 2**24 entries."""
  block = lax.div(pl.program_id(0), jnp.int32(t.block_rows // t.tile_rows))
  where = leaf * t.num_blocks + block
  stride = 1 + group * t.num_blocks
  shifts = [digits_ref[r * stride] for r in range(len(runs))]
  bases = [digits_ref[r * stride + 1 + where] for r in range(len(runs))]
  rows, cols, across, chunk, per_trip = _strips(t, m_ref.dtype.itemsize)
  shape = (rows, cols)

  runs = tuple(runs)

  def add_rows(first, words):
    # Rows first, first + 1, ... of strips: one scalar address per trip, static offsets after.
    r = pl.multiple_of(first * rows, rows)
    for u in range(per_trip):
      du, cu = divmod(u, across)
      at = r if du == 0 else lax.add(r, du * rows)
      keys = _keys(m_ref[pl.ds(at, rows), pl.ds(cu * cols, cols)])
      words = _add_strip(runs, keys, shifts, bases, words)
    return words

  def add_chunk(i, bins):
    zeros = tuple(tuple(lax.full(shape, 0, jnp.int32) for _ in range(r.words)) for r in runs)
    trips = chunk * across // per_trip
    step = per_trip // across
    words = lax.fori_loop(0, trips, lambda j, w: add_rows((i * trips + j) * step, w), zeros)
    out = []
    for run_bins, run_words in zip(bins, words):
      fields = [
        lax.bitwise_and(lax.shift_right_arithmetic(w, 8 * f), _FIELD_LIMIT)
        for w in run_words
        for f in range(_FIELDS)
      ]
      out.append(
        tuple(
          lax.add(b, lax.convert_element_type(f, jnp.float32)) for b, f in zip(run_bins, fields)
        )
      )
    return tuple(out)

  zeros = tuple(tuple(jnp.zeros(shape, jnp.float32) for _ in range(4 * r.words)) for r in runs)
  bins = lax.fori_loop(0, t.tile_rows // rows // chunk, add_chunk, zeros)
  lane = lax.broadcasted_iota(jnp.int32, (_SUBLANES, _LANES), 1)
  acc = jnp.zeros((_SUBLANES, _LANES), jnp.float32)
  first_lane = 0
  for run, run_bins in zip(runs, bins):
    # The count at candidate i is the sum of the bins above it (bin 0 is below them all).
    above = jnp.zeros((1, 1), jnp.float32)
    for i in range(run.num, 0, -1):
      above = lax.add(above, _tile_sum(run_bins[i]))
      wide = lax.broadcast_in_dim(above, acc.shape, (0, 1))
      acc = lax.select(lax.eq(lane, first_lane + i - 1), wide, acc)
    first_lane += run.num
  out_ref[leaf] = acc.astype(jnp.int32)


def _tile_sum(x: jax.Array) -> jax.Array:
  """``[1, 1]``: the sum of ``x`` (rows, then lanes; ``lax``, see :func:`_add_strip`)."""
  rows = lax.broadcast_in_dim(lax.reduce_sum(x, (0,)), (1, x.shape[1]), (1,))
  return lax.broadcast_in_dim(lax.reduce_sum(rows, (1,)), (1, 1), (0,))


def _keys(m: jax.Array) -> jax.Array:
  """The keys of ``|m|`` (31 bits) as non-negative int32 (``lax`` primitives: no nested calls
  in a strip's jaxpr, see :func:`_add_strip`)."""
  m = m if m.dtype == jnp.float32 else lax.convert_element_type(m, jnp.float32)
  return lax.bitwise_and(lax.bitcast_convert_type(m, jnp.int32), 2**31 - 1)


def digits_operand(runs_values) -> jax.Array:
  """The scalar operand of :func:`_histogram_into`: per run ``(shift, bases)``, ``bases`` the
  uint32 ``[group * num_blocks]`` (below ``2**31``) leaf-major."""
  parts = []
  for shift, bases in runs_values:
    parts += [jnp.asarray(shift, jnp.int32).reshape(1), bases.astype(jnp.int32).reshape(-1)]
  return jnp.concatenate(parts)


def _grid_spec(t: Tiling, group: int, num_inputs: int, num_outputs: int):
  """``num_inputs`` then ``num_outputs`` tiled operands per leaf of the group, and the counts:
  every grid step takes the same tile of every leaf."""
  tile = pl.BlockSpec((t.tile_rows, t.tile_cols), lambda i, j, c: (i, j))
  counts = pl.BlockSpec((group, _SUBLANES, _LANES), lambda i, j, c: (0, i, j))
  return pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=1,
    grid=t.grid,
    in_specs=[tile] * (num_inputs * group),
    out_specs=[tile] * (num_outputs * group) + [counts],
  )


def _counts_shape(t: Tiling, group: int) -> jax.ShapeDtypeStruct:
  rows, cols = t.grid
  return jax.ShapeDtypeStruct((group, rows * _SUBLANES, cols * _LANES), jnp.int32)


def _params() -> pltpu.CompilerParams:
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))


def fused_moments(
  gs,
  mus,
  nus,
  cands,
  t: Tiling,
  first_moment,
  second_moment,
  *,
  interpret: bool = False,
  runs: tuple[Digits, ...] | None = None,
):
  """One pass over the 2-D ``gs, mus, nus`` of a group of leaves (lists, one tiling ``t``): the
  new moments and, per tile, the count of the new ``|m|``'s keys at each of the ``cands``
  (``int32[len(gs) * num_blocks * num_cands]``, leaf-major, signed as :func:`_signed`), or,
  with ``runs``, at the candidates of these runs of digits (``cands`` then their
  :func:`digits_operand`).

  Returns:
    The new m per leaf (mu's dtype), the new v per leaf (nu's dtype) and the counts,
    ``int32[len(gs), grid_rows * 8, grid_cols * 128]`` (leaf l, row 8i, lane 128j + c: tile
    (i, j), candidate c).
  """
  n = len(gs)
  num_cands = cands.size // (n * t.num_blocks)

  def kernel(cands_ref, *refs):
    g_refs, mu_refs, nu_refs = refs[:n], refs[n : 2 * n], refs[2 * n : 3 * n]
    m_refs, v_refs, out_ref = refs[3 * n : 4 * n], refs[4 * n : 5 * n], refs[5 * n]
    for leaf in range(n):
      g = g_refs[leaf][...]
      m = first_moment(g, mu_refs[leaf][...])
      m_refs[leaf][...] = m
      v_refs[leaf][...] = second_moment(g, nu_refs[leaf][...])
      if runs is None:
        _count_into(_signed_keys(m), cands_ref, leaf, t, num_cands, out_ref)
      else:
        # Read back from the output tile, a strip at a time (see _histogram_into).
        _histogram_into(m_refs[leaf], cands_ref, leaf, n, t, runs, out_ref)

  outs = pl.pallas_call(
    kernel,
    out_shape=(
      *(jax.ShapeDtypeStruct(mu.shape, mu.dtype) for mu in mus),
      *(jax.ShapeDtypeStruct(nu.shape, nu.dtype) for nu in nus),
      _counts_shape(t, n),
    ),
    grid_spec=_grid_spec(t, n, 3, 2),
    # The new moments overwrite the old ones (operands count the prefetched candidates): with
    # the state donated, no copy of them is allocated.
    input_output_aliases={1 + n + i: i for i in range(2 * n)},
    compiler_params=_params(),
    interpret=interpret,
    name="mofo_adam_moments_count",
  )(cands, *gs, *mus, *nus)
  return list(outs[:n]), list(outs[n : 2 * n]), outs[2 * n]


def count_keys(ms, digits, t: Tiling, runs: tuple[Digits, ...], *, interpret: bool = False):
  """One read of the 2-D ``ms`` of a group: per tile, the count of its keys at each candidate
  of the ``runs`` (``digits``: their :func:`digits_operand`; counts as :func:`fused_moments`
  returns them)."""
  n = len(ms)

  def kernel(digits_ref, *refs):
    for leaf in range(n):
      _histogram_into(refs[leaf], digits_ref, leaf, n, t, runs, refs[n])

  (out,) = pl.pallas_call(
    kernel,
    out_shape=(_counts_shape(t, n),),
    grid_spec=_grid_spec(t, n, 1, 0),
    compiler_params=_params(),
    interpret=interpret,
    name="mofo_count_keys",
  )(digits, *ms)
  return out


def block_counts(
  tiles: jax.Array, t: Tiling, num_cands: int, psum_axes: tuple[str, ...] = ()
) -> _counts.Count:
  """``[group * num_blocks, num_cands]`` Counts (leaf-major) from the per-tile counts of a
  kernel: exact past 2**31 (tiles hold under 2**24 entries; 2**7 of them sum in int32, then by
  limbs); summed over the mesh axes ``psum_axes`` (inside ``shard_map``: the axes that split a
  block, see :mod:`mofo_jax._pallas_sharded`) in one all-reduce (:func:`_counts.psum`)."""
  count = _tile_sums(tiles, t, num_cands)
  if not psum_axes:
    return count
  # A block is the shards' blocks together: its entries bound the sum.
  whole = t.block_rows * t.cols * math.prod(lax.axis_size(a) for a in psum_axes)
  return _counts.psum(count, psum_axes, whole)


def _tile_sums(tiles: jax.Array, t: Tiling, num_cands: int) -> _counts.Count:
  group = tiles.shape[0]
  rows, cols = t.grid
  per_tile = tiles.reshape(group, rows, _SUBLANES, cols, _LANES)[:, :, 0, :, :num_cands]
  per_block = per_tile.reshape(group * t.num_blocks, -1, num_cands)
  n = per_block.shape[1]
  limb = 1 << 7
  if n <= limb:
    return _counts.split(jnp.sum(per_block, axis=1, dtype=jnp.int32))
  pad = -n % limb
  per_block = jnp.pad(per_block, ((0, 0), (0, pad), (0, 0)))
  partial = jnp.sum(per_block.reshape(per_block.shape[0], -1, limb, num_cands), axis=2)
  return _counts.sum_counts(_counts.split(partial), axis=1)


def _digit(counts: _counts.Count, k: _counts.Count) -> tuple[jax.Array, _counts.Count]:
  """Per block, how many of the ascending candidates keep at least k entries, and the count at
  the last of them (the count at the base where none does; the caller keeps that)."""
  ok = _counts.greater_equal(counts, _counts.Count(k.hi[..., None], k.lo[..., None]))
  digit = jnp.sum(ok, axis=-1, dtype=jnp.uint32)
  pick = jnp.maximum(digit.astype(jnp.int32) - 1, 0)[..., None]
  at = _counts.Count(*(jnp.take_along_axis(a, pick, axis=-1)[..., 0] for a in counts))
  return digit, at


def _resolve(prefix, count, cands_counts, k, shift):
  digit, at = _digit(cands_counts, k)
  found = digit > 0
  count = _counts.Count(*(jnp.where(found, a, c) for a, c in zip(at, count)))
  return prefix + (digit << shift), count


def _search(ms, t: Tiling, k, base, count, top_shift: int, interpret, psum_axes=()):
  """Fixes the bits below ``top_shift + RADIX_BITS`` of the k-th largest key at or above
  ``base`` (whose count is ``count``) of every block of the group ``ms``: a loop of counting
  kernels, ``RADIX_BITS`` bits a trip from ``top_shift`` down, the last trip at shift 0 (where
  fewer bits remain, the candidates above the known prefix keep fewer than k, so the digit is
  the same). One kernel in the program, however many trips."""
  trips = -(-top_shift // RADIX_BITS) + 1

  def trip(i, carry):
    prefix, count = carry
    shift = jnp.uint32(top_shift) - jnp.minimum(
      jnp.uint32(RADIX_BITS) * i.astype(jnp.uint32), jnp.uint32(top_shift)
    )
    digits = digits_operand([(shift, prefix)])
    tiles = count_keys(ms, digits, t, (_DIGIT,), interpret=interpret)
    counts = block_counts(tiles, t, _DIGIT.num, psum_axes)
    return _resolve(prefix, count, counts, k, shift)

  return lax.fori_loop(0, trips, trip, (base, count))


# A digit of RADIX_BITS: its non-zero values above a prefix.
_DIGIT = Digits(first=1, num=(1 << RADIX_BITS) - 1)
# The fused pass counts the top digit (bits 30-27 of the key) and, with a bracket of
# 2**BRACKET_BITS keys from its lower end, both its ends and the 15 candidates between them
# that fix the bracket's top digit (bits 19-16 above the end): 32 candidates, in two runs.
_TOP_SHIFT = KEY_BITS - RADIX_BITS
_SUB_SHIFT = BRACKET_BITS - RADIX_BITS
_BRACKET = Digits(first=0, num=(1 << RADIX_BITS) + 1)
# The digits after the fused pass: the loop fixes the other 27 bits of the key from shift 23
# (7 trips); in a bracket, the 16 bits below its top digit from shift 12 (4 trips).
_FULL_SHIFT = _TOP_SHIFT - RADIX_BITS
_BRACKET_SHIFT = _SUB_SHIFT - RADIX_BITS


def select_group(
  gs,
  mus,
  nus,
  t: Tiling,
  fraction,
  first_moment,
  second_moment,
  previous=None,
  *,
  interpret=False,
  block_entries: int | None = None,
  psum_axes: tuple[str, ...] = (),
):
  """The new moments and, per block, the k-th largest key of the new ``|m|`` and its count, for
  a group of leaves that share one tiling (their kernels are shared too; see module).

  Args:
    gs, mus, nus: per leaf, the gradient and old moments, viewed ``[rows, cols]``.
    t: their :func:`tiling` (for tiles of ``TILE_ENTRIES / len(gs)`` entries, say).
    fraction: the fraction kept per block.
    first_moment, second_moment: ``(g, old) -> new``, elementwise (traced into the kernel).
    previous: per leaf, ``[num_blocks]`` float32, the last step's thresholds: with them the
      search is bracketed (see module; one bracket check for the group); None searches every
      bit.
    interpret: run the kernels in Pallas's interpreter (any backend; for tests).
    block_entries: entries of a whole block when ``gs`` are shards of it (default: the
      tiling's block); then the per-block counts are summed over the mesh axes ``psum_axes``.

  Returns:
    Per leaf the new m and the new v, and per block (``[len(gs) * num_blocks]``, leaf-major) the
    thresholds (float32) and the counts at them.
  """
  nb = len(gs) * t.num_blocks
  n = t.block_rows * t.cols if block_entries is None else block_entries
  k = _counts.num_to_select(fraction, n)
  k = _counts.Count(*(jnp.broadcast_to(a, (nb,)) for a in k))
  zeros = jnp.zeros((nb,), jnp.uint32)
  all_count = _counts.constant(n, (nb,))
  runs = [(_DIGIT, _TOP_SHIFT, zeros)]
  if previous is not None:
    half = jnp.uint32(1 << (BRACKET_BITS - 1))
    prev = jnp.concatenate([p.reshape(-1) for p in previous])
    pk = lax.bitcast_convert_type(prev.astype(jnp.float32), jnp.uint32)
    # The bracket stays below 2**31 (the digits' bases must), where every key is.
    lows = jnp.minimum(jnp.where(pk > half, pk - half, 0), jnp.uint32(2**31 - (1 << BRACKET_BITS)))
    runs.append((_BRACKET, _SUB_SHIFT, lows))
  ms, vs, tiles = fused_moments(
    gs,
    mus,
    nus,
    digits_operand([(shift, base) for _, shift, base in runs]),
    t,
    first_moment,
    second_moment,
    interpret=interpret,
    runs=tuple(r for r, _, _ in runs),
  )
  counts = block_counts(tiles, t, sum(r.num for r, _, _ in runs), psum_axes)
  top_counts = _counts.Count(*(a[:, : _DIGIT.num] for a in counts))
  prefix, count = _resolve(zeros, all_count, top_counts, k, _TOP_SHIFT)

  def full():
    return _search(ms, t, k, prefix, count, _FULL_SHIFT, interpret, psum_axes)

  if previous is None:
    prefix, count = full()
  else:
    at_low = _counts.Count(*(a[:, _DIGIT.num] for a in counts))
    at_high = _counts.Count(*(a[:, -1] for a in counts))
    inside = _counts.greater_equal(at_low, k) & ~_counts.greater_equal(at_high, k)

    def held():
      sub = _counts.Count(*(a[:, _DIGIT.num + 1 : -1] for a in counts))
      base, at = _resolve(lows, at_low, sub, k, _SUB_SHIFT)
      return _search(ms, t, k, base, at, _BRACKET_SHIFT, interpret, psum_axes)

    prefix, count = lax.cond(jnp.all(inside), held, full)
  return ms, vs, _selection.keys_to_threshold(prefix), count


def select_leaf(
  g, mu, nu, t: Tiling, fraction, first_moment, second_moment, previous=None, *, interpret=False
):
  """:func:`select_group` of one leaf: its new m and v, and per block (``[num_blocks]``) the
  thresholds and the counts at them."""
  ms, vs, tau, count = select_group(
    [g],
    [mu],
    [nu],
    t,
    fraction,
    first_moment,
    second_moment,
    None if previous is None else [previous],
    interpret=interpret,
  )
  return ms[0], vs[0], tau, count


def groups(shapes, specs, dtypes, tilings, tile_entries: int = TILE_ENTRIES, shards=None):
  """The leaves that share kernels: ``[(tiling, [leaf indices])]`` for the leaves with a tiling,
  grouped by their 2-D view, blocks, dtypes and (``shards``, per leaf) how they lie on the mesh,
  at most ``MAX_GROUP`` a group, each group tiled for ``tile_entries / len(group)`` entries a leaf
  (a leaf alone where that tiling fails). ``shapes``: the shapes the kernels see (shards')."""
  by_key: dict[Any, list[int]] = {}
  for i, t in enumerate(tilings):
    if t is not None:
      where = None if shards is None else shards[i]
      by_key.setdefault((t.rows, t.cols, t.block_rows, dtypes[i], where), []).append(i)
  out = []
  for idx in by_key.values():
    for start in range(0, len(idx), MAX_GROUP):
      chunk = idx[start : start + MAX_GROUP]
      i = chunk[0]
      t = tiling(shapes[i], specs[i], dtypes[i], tile_entries // len(chunk))
      if t is None:
        out.extend((tilings[j], [j]) for j in chunk)
      else:
        out.append((t, chunk))
  return out


def _traceable(fn, *dtypes) -> bool:
  """Whether ``fn`` traces into a kernel: it must close over no arrays (a traced b1 would)."""
  args = [jax.ShapeDtypeStruct((8, _LANES), d) for d in dtypes]
  return not jax.make_jaxpr(fn)(*args).consts


def kernel_tilings(
  moments,
  filtered,
  specs,
  is_global,
  kernel: str,
  tile_entries: int = TILE_ENTRIES,
  mesh: Any = None,
  pspecs: Any = None,
) -> tuple[list[Tiling | None], list[_pallas_sharded.Shard | None]]:
  """Per leaf of a :class:`mofo_jax.MomentUpdate`, the kernels' :func:`tiling` (of the leaf,
  or of its shard when it is split over a mesh) and its :class:`mofo_jax._pallas_sharded.Shard`
  (None where the kernels see the whole leaf). The tiling is None where the leaf is not
  filtered, its moments do not trace into a kernel, the block is global, or the leaf lies on
  several devices in a way the sharded kernels do not take (see
  :mod:`mofo_jax._pallas_sharded`; ``mesh`` and ``pspecs`` as the selection was given them)."""
  n = len(filtered)
  if is_global:
    return [None] * n, [None] * n
  shards = _pallas_sharded.shards(moments, specs, kernel, mesh, pspecs)
  if shards is None:
    shards = [None] * n
    shapes = [g.shape for g in moments.grads]
  else:
    shapes = [None if s is None else s.local_shape for s in shards]
  out = []
  for g, mu, nu, f, spec, shape in zip(
    moments.grads, moments.mus, moments.nus, filtered, specs, shapes
  ):
    dtypes = (g.dtype, mu.dtype, nu.dtype)
    ok = f and shape is not None and _traceable(moments.first_moment, g.dtype, mu.dtype)
    ok = ok and _traceable(moments.second_moment, g.dtype, nu.dtype)
    out.append(tiling(shape, spec, dtypes, tile_entries) if ok else None)
  return out, shards


def local_shapes(moments, shards) -> list[tuple[int, ...]]:
  """The shapes the kernels see: each leaf's shard, or the whole leaf."""
  return [g.shape if s is None else s.local_shape for g, s in zip(moments.grads, shards)]


def unstack(ms, vs, per_block, t: Tiling, spec, shape):
  """A group's kernel outputs per leaf: ``(ms, vs)`` in the leaves' (or shards') ``shape``, and
  each of ``per_block`` (leaf-major ``[len(ms) * num_blocks]``) in the leaves' block shape."""
  block = spec.block_shape(shape)
  n = t.num_blocks
  per_leaf = [[a[j * n : (j + 1) * n].reshape(block) for j in range(len(ms))] for a in per_block]
  return ([x.reshape(shape) for x in ms], [x.reshape(shape) for x in vs]), tuple(per_leaf)


def check_fields(kernel: str, tile_entries: Any) -> None:
  """The Pallas selections' ``kernel`` and ``tile_entries`` checks (one vreg is the least tile)."""
  if kernel not in ("auto", "always"):
    raise ValueError(f"kernel={kernel!r} must be 'auto' or 'always'.")
  if not isinstance(tile_entries, int) or tile_entries < _SUBLANES * _LANES:
    raise ValueError(f"tile_entries={tile_entries!r} must be an int >= {_SUBLANES * _LANES}.")


@dataclasses.dataclass(frozen=True)
class PallasSelection:
  """``selection=``: exact selection with the momentum's search fused into Adam's pass by Pallas
  TPU kernels where a leaf allows it (see module), the ``fallback`` selection elsewhere.

  Thresholds, counts, masks and new moments equal :class:`mofo_jax.ExactSelection`'s bit for
  bit (tested in interpret mode). Only ``score="momentum"`` uses the kernels; other scores are
  ranked by the fallback.

  On several devices each device runs the kernels on its shard of a leaf and the per-block
  counts are summed over the mesh axes that split a block (:mod:`mofo_jax._pallas_sharded`): the
  same results as one device. That needs the leaves' layout: ``mesh`` and ``specs``, or arrays
  typed with Explicit mesh axes; without it, and for leaves whose shards do not tile (uneven
  splits, ``BlockSpec.reshape``, shards the tiling refuses), the fallback runs.

  Attributes:
    kernel: ``"auto"``: the kernels when the program is lowered for TPU
      (:mod:`mofo_jax._platform`), the fallback on every other platform; ``"always"``: the
      kernels wherever they apply (on CPU only with ``interpret``).
    interpret: run the kernels in Pallas's interpreter (tests on CPU).
    bracket: start each block's search from the last step's threshold (4 counting passes
      after the fused one when every block's threshold is within ``2**19`` keys of its last
      one, else 7); False: always 7.
    tile_entries: entries per VMEM tile (see :func:`tiling`).
    fallback: the selection of the leaves the kernels do not take.
    mesh: the mesh the params are sharded over (with ``specs``); None: read from the arrays'
      types under Explicit mesh axes, else the kernels run on one device only.
    specs: the params' pytree of ``PartitionSpec`` or ``NamedSharding`` (kept as a tuple).

  Example:
    >>> import mofo_jax
    >>> opt = mofo_jax.mofo(1e-3, selection=mofo_jax.PallasSelection())
  """

  kernel: Literal["auto", "always"] = "auto"
  interpret: bool = False
  bracket: bool = True
  tile_entries: int = TILE_ENTRIES
  fallback: Any = dataclasses.field(default_factory=_selection.ExactSelection)
  mesh: Any = None
  specs: Any = None

  def __post_init__(self):
    object.__setattr__(self, "specs", _pallas_sharded.flat_specs(self.specs))
    check_fields(self.kernel, self.tile_entries)

  def initial_thresholds(self, leaves, filtered, specs):
    return self.fallback.initial_thresholds(leaves, filtered, specs)

  def select(self, scores, filtered, specs, is_global, fraction, previous=None):
    return self.fallback.select(scores, filtered, specs, is_global, fraction, previous=previous)

  def tilings(self, moments, filtered, specs, is_global):
    """Per leaf, the kernels' tiling (None where the leaf goes to the fallback) and its shard
    (see :func:`kernel_tilings`)."""
    return kernel_tilings(
      moments, filtered, specs, is_global, self.kernel, self.tile_entries, self.mesh, self.specs
    )

  def select_momentum(self, moments, filtered, specs, is_global, fraction, previous=None):
    """The new moments and the exact selection of the new first moment (see
    :func:`mofo_jax.select_momentum`), by the kernels for the leaves they take."""
    tilings, shards = self.tilings(moments, filtered, specs, is_global)

    def fallback(moments, fraction, previous):
      return _selection.select_momentum(
        self.fallback, moments, filtered, specs, is_global, fraction, previous=previous
      )

    def kernels(moments, fraction, previous):
      return self._with_kernels(
        moments, filtered, specs, is_global, fraction, previous, tilings, shards
      )

    args = (moments, fraction, previous)
    return _selection.kernels_or_fallback(self.kernel, any(tilings), kernels, fallback, "tpu", args)

  def _with_kernels(self, moments, filtered, specs, is_global, fraction, previous, tilings, shards):
    results = _selection.select_momentum_rest(
      self.fallback,
      moments,
      filtered,
      specs,
      is_global,
      fraction,
      previous,
      [t is not None for t in tilings],
    )
    dtypes = [(g.dtype, mu.dtype, nu.dtype) for g, mu, nu in zip(*moments[:3])]
    shapes = local_shapes(moments, shards)
    for t, idx in groups(shapes, specs, dtypes, tilings, self.tile_entries, shards):
      where = shards[idx[0]]
      bracketed = previous is not None and self.bracket

      def body(frac, leaves, blocks, t=t, idx=idx, where=where, bracketed=bracketed):
        g, mu, nu = ([x.reshape(t.rows, t.cols) for x in xs] for xs in leaves)
        prev = [p.reshape(t.num_blocks) for p in blocks[0]] if bracketed else None
        ms, vs, taus, counts = select_group(
          g,
          mu,
          nu,
          t,
          fraction if frac is None else frac,
          moments.first_moment,
          moments.second_moment,
          prev,
          interpret=self.interpret,
          block_entries=None if where is None else where.block_entries,
          psum_axes=() if where is None else where.reduce_axes,
        )
        return unstack(ms, vs, (taus, counts.hi, counts.lo), t, specs[idx[0]], leaves[0][0].shape)

      (ms, vs), (taus, his, los) = _pallas_sharded.run(
        body,
        where,
        [[x[i] for i in idx] for x in (moments.grads, moments.mus, moments.nus)],
        [[previous[i] for i in idx]] if bracketed else [],
        _pallas_sharded.traced(fraction),
      )
      for j, i in enumerate(idx):
        count = _counts.Count(his[j], los[j])
        _selection.put_leaf(results, i, specs[i], ms[j], vs[j], taus[j], count)
    return tuple(results)
