"""Exact top-fraction selection by counting: the k-th largest |score| of every block at once.

Sorting or ``lax.top_k`` with k = 10% of n sorts the whole block, and under sharding gathers it
onto every device. Instead we search the threshold on the float32 bit pattern: for non-negative
floats the pattern, read as an unsigned integer, orders exactly like the value. A radix search
fixes ``radix_bits`` bits of the threshold per pass by counting, in each block, the entries at or
above ``2**radix_bits - 1`` candidates. Every pass is one fused read of the scores plus small
reductions, so it is linear in the parameters, shards into tiny all-reduces, and the fraction may
be a traced value. All leaves share one loop, so the number of passes does not grow with the
number of leaves.

XLA:CPU does not fuse a comparison into the reduction that consumes it: each candidate costs a
materialised int32 copy of the scores, which makes counting slow there. On CPU we therefore build
per-block histograms of 16-bit digits with one scatter-add per leaf and pass: two passes resolve
all 31 bits of the key. Scatter-adds with many collisions are slow on XLA:GPU, so other backends
count. ``method="auto"`` picks by platform (:mod:`mofo_jax._platform`), and
histograms only where the computation can't be sharded (a single device): a sharded histogram
would all-reduce 256 KiB per block and pass, where counting all-reduces 60 bytes.

Where the time goes on XLA:CPU (``benchmarks/step_time.py --preset small``, 2 cores): with the
search replaced by a constant threshold the exact step costs 1.06-1.11x adamw's CPU time; the
rest is the search, two histogram passes of about 0.64 ns per entry each (bin indices 0.15,
the scatter-add most of the rest), plus a few microseconds per leaf to resolve each histogram.
The comparison is fused into a reduction only when the reduction has several operands (XLA:CPU
rewrites a large single-operand sum into a windowed pre-reduction it does not fuse): a
variadic reduce counts one candidate per entry in about 0.03 ns, so a counting pass of 15
candidates (4 bits) costs about as much as a histogram pass (15-16 bits). XLA:CPU allocates
its temporaries afresh for every call, so every temporary page is faulted in again on every
step: the histograms' temporaries are kept a few chunks' size (see ``_CHUNK_ENTRIES``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
import dataclasses
from typing import Any, Literal, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mofo_jax import _counts
from mofo_jax import _partition
from mofo_jax import _platform
from mofo_jax import _sharding

_KEY_BITS = 32
_HIST_BITS = 16  # 65536 bins per block: two passes cover the 31 bits of a magnitude's key
# Leaves above 8 times this many entries are histogrammed in chunks of this many (see
# _scatter_counts): 512 KiB of int32 indices (and as many of ones) per chunk. XLA:CPU
# allocates its temporaries afresh for every call, and glibc serves blocks above 32 MiB from
# new pages each time: at the `small` preset 4 Mi-entry chunks (42.5 MiB of temporaries) cost
# 10,900 page faults per step, more than the search's arithmetic. A loop trip costs
# microseconds.
_CHUNK_ENTRIES = 1 << 17
METHODS = ("auto", "count", "histogram")
Method = Literal["auto", "count", "histogram"]


def resolve_method(
  method: Method, num_devices: int | None = None
) -> Literal["count", "histogram", "by_platform"]:
  """The search :func:`select_blocks` runs for ``method``: the one place the choice is made.

  ``"auto"`` counts when several devices are present (operands may be sharded, and counting
  all-reduces 60 bytes per block and pass where a sharded histogram would all-reduce 256 KiB),
  and otherwise returns ``"by_platform"``: histograms when the program is lowered for CPU, where
  XLA does not fuse a comparison into the reduction that consumes it, counting elsewhere
  (scatter-adds with many collisions are slow on XLA:GPU).

  Args:
    method: ``"auto"``, ``"count"`` or ``"histogram"``.
    num_devices: devices the computation may span; ``jax.device_count()`` when None.

  Returns:
    ``"count"``, ``"histogram"``, or ``"by_platform"`` (decided by
    :func:`mofo_jax._platform.platform_dependent`).

  Example:
    >>> resolve_method("auto", num_devices=1), resolve_method("auto", num_devices=8)
    ('by_platform', 'count')
  """
  if method not in METHODS:
    raise ValueError(f"method={method!r} must be one of {METHODS}.")
  if method != "auto":
    return method
  n = jax.device_count() if num_devices is None else num_devices
  return "count" if n > 1 else "by_platform"


class BlockSelection(NamedTuple):
  """The result of a selection for one leaf."""

  threshold: jax.Array  # float32, the leaf's BlockSpec.block_shape: k-th largest |score|
  num_selected: _counts.Count  # two int32 limbs, same shape: entries >= threshold, per block


def score_keys(scores: jax.Array) -> jax.Array:
  """Maps ``|scores|`` to uint32 keys that sort exactly like the magnitudes.

  NaN magnitudes get the largest keys, so they rank above every finite value and above +inf.
  """
  mag = jnp.abs(scores.astype(jnp.float32))
  return lax.bitcast_convert_type(mag, jnp.uint32)


def keys_to_threshold(keys: jax.Array) -> jax.Array:
  return lax.bitcast_convert_type(keys, jnp.float32)


def after(keys: jax.Array, token: jax.Array) -> jax.Array:
  """``keys`` unchanged, but computed only once ``token`` exists.

  ``token`` is a non-negative int32 or a key (below ``2**31``) at run time, which the compiler
  cannot know, so ``token >> 31`` is a zero it cannot fold away. Tying the keys of one leaf
  to the result of the previous leaf's pass makes the leaves' passes run one after another,
  so that the temporaries of only one leaf (an int32 index per entry for a histogram) are
  alive at a time.
  """
  return keys | (token >> 31).astype(jnp.uint32)


def num_to_select(fraction: jax.typing.ArrayLike, n: int) -> jax.Array | int:
  """k = max(1, floor(fraction * n)), exactly for a Python float, in float32 when traced."""
  if isinstance(fraction, (int, float)):
    return max(1, math.floor(fraction * n))
  k = jnp.floor(jnp.asarray(fraction, jnp.float32) * jnp.float32(n)).astype(jnp.int32)
  return jnp.maximum(k, 1)


def select_blocks(
  scores: Sequence[jax.Array],
  specs: Sequence[_partition.BlockSpec],
  fraction: jax.typing.ArrayLike,
  *,
  global_block: bool = False,
  radix_bits: int = 4,
  method: Method = "auto",
  previous: Sequence[jax.Array] | None = None,
  bracket_bits: int = 0,
) -> list[BlockSelection]:
  """Finds, in every block of every leaf, the k-th largest ``|score|`` and how many reach it.

  Args:
    scores: the leaves to rank (any float dtype; NaN ranks highest).
    specs: one ``BlockSpec`` per leaf.
    fraction: the fraction to keep in each block, in (0, 1]; a float or a traced scalar.
    global_block: treat all the leaves together as a single block (specs must be per-leaf).
    radix_bits: bits of the threshold fixed per pass (1, 2, 4 or 8); passes = 32 / radix_bits,
      each counting ``2**radix_bits - 1`` candidates (``method="count"`` only).
    method: ``"count"`` (comparisons and sums), ``"histogram"`` (scatter-add histograms of
      digits, at most 16 bits per pass; under sharding its histograms are all-reduced, and
      explicitly sharded operands are not supported), or ``"auto"``: histograms on CPU with a
      single device, counting elsewhere (see :func:`resolve_method`). All give the same
      results.
    previous: per leaf, the blocks' thresholds of the last step (block-shaped float32), where
      the counting search may start (``bracket_bits``).
    bracket_bits: with ``previous``, the counting search first checks in one pass whether every
      block's threshold lies within ``2**(bracket_bits - 1)`` float32 keys of its previous one
      (about +-3% to +-6% of the value at 20 bits) and then fixes only ``bracket_bits`` bits:
      ``1 + bracket_bits / radix_bits`` passes instead of ``32 / radix_bits``, else the full
      search; the result is the same. Rounded up to a multiple of ``radix_bits``; 0: off.

  Returns:
    One ``BlockSelection`` per leaf. The mask of a leaf is ``|score| >= threshold`` (broadcast
    over the block's axes): it holds at least k entries, exactly those at or above the k-th
    largest, ties included.
  """
  if radix_bits not in (1, 2, 4, 8):
    raise ValueError(f"radix_bits={radix_bits} must be 1, 2, 4 or 8.")
  resolve_method(method)
  views = [jnp.reshape(s, spec.view_shape(s.shape)) for s, spec in zip(scores, specs)]
  reduce_axes = []
  for v, spec in zip(views, specs):
    keep = spec.block_axes(v.shape)
    reduce_axes.append(tuple(i for i in range(v.ndim) if i not in keep))
  block_shapes = [spec.block_shape(v.shape) for v, spec in zip(views, specs)]
  if global_block:
    if any(spec != _partition.PER_LEAF for spec in specs):
      raise ValueError("partition='global' ranks whole leaves: BlockSpecs cannot also apply.")
    sizes = [sum(v.size for v in views)] * len(views)
  else:
    sizes = [spec.block_size(v.shape) for v, spec in zip(views, specs)]
  if not views:
    return []
  # Under Explicit sharding the search's carry must start sharded like the per-block counts
  # come back.
  carry_shardings = [_sharding.reduced_sharding(v, ax) for v, ax in zip(views, reduce_axes)]
  search = resolve_method(method)
  if max(sizes) >= _counts.INT32_LIMIT:
    search = "count"  # histograms count in int32
  # Each search reads the traced values only from its argument (views, fraction, previous):
  # _platform.platform_dependent traces the other one only if lowered for its platform.

  def histogram(ops):
    # Blocks under 2**31 entries: int32 counts, made Counts at the end.
    v, frac, _ = ops
    init = [
      jnp.full(bs, n, jnp.int32, out_sharding=sh)
      for bs, n, sh in zip(block_shapes, sizes, carry_shardings)
    ]
    ks = [num_to_select(frac, n) for n in sizes]
    prefixes, counts = _histogram_search(v, reduce_axes, ks, init, global_block)
    return prefixes, [_counts.split(c) for c in counts]

  bits = -(-bracket_bits // radix_bits) * radix_bits

  def count(ops):
    v, frac, prev_thresholds = ops
    wide_init = [
      _counts.constant(n, bs, sh) for bs, n, sh in zip(block_shapes, sizes, carry_shardings)
    ]
    wide_ks = [_counts.num_to_select(frac, n) for n in sizes]
    if prev_thresholds is None or not 0 < bits < _KEY_BITS:
      return _count_search(v, reduce_axes, wide_ks, wide_init, global_block, radix_bits=radix_bits)
    prev = [jnp.reshape(p, c.hi.shape) for p, c in zip(prev_thresholds, wide_init)]
    return _bracketed_count_search(
      v,
      reduce_axes,
      wide_ks,
      wide_init,
      global_block,
      prev,
      radix_bits=radix_bits,
      bracket_bits=bits,
    )

  ops = (views, fraction, None if previous is None else list(previous))
  if search == "count":
    prefixes, counts = count(ops)
  elif search == "histogram":
    prefixes, counts = histogram(ops)
  else:
    prefixes, counts = _platform.platform_dependent(ops, cpu=histogram, default=count)
  return [BlockSelection(keys_to_threshold(p), c) for p, c in zip(prefixes, counts)]


def _block_totals(per_leaf: list[_counts.Count], global_block: bool, width: int):
  """Per-block counts at ``width`` candidates; for a global block, summed over every leaf."""
  if not global_block:
    return per_leaf
  flat = [
    _counts.sum_counts(_counts.Count(*(a.reshape(-1, width) for a in c)), 0) for c in per_leaf
  ]
  total = flat[0]
  for c in flat[1:]:
    total = _counts.add(total, c)
  return [_counts.Count(*(jnp.broadcast_to(a, c.hi.shape) for a in total)) for c in per_leaf]


def _count_search(
  views, reduce_axes, ks, init_counts, global_block, *, radix_bits, lows=None, bits=_KEY_BITS
):
  """Fixes ``radix_bits`` bits per pass by counting entries at or above each candidate.

  Searches the threshold key ``lows + t`` for t in [0, 2**bits) (``lows`` zero: every key);
  ``init_counts`` are the counts at ``lows``. Counts are :class:`mofo_jax._counts.Count` s, exact
  past 2**31 entries.
  """
  num_digits = 1 << radix_bits
  digits = jnp.arange(1, num_digits, dtype=jnp.uint32)
  if lows is None:
    lows = [jnp.zeros_like(c.hi, jnp.uint32) for c in init_counts]

  def counts_at(view, base, shift, axes):
    # Candidates extend the known prefix by every non-zero digit; the count at each candidate
    # is a plain reduction, so XLA fuses key computation, comparison and sum into one pass.
    cands = base[..., None] + (digits << shift)
    keys = score_keys(view)[..., None]
    return _counts.count_true(keys >= cands, axes)

  def body(i, carry):
    prefixes, counts = carry
    shift = jnp.uint32(bits) - jnp.uint32(radix_bits) * (i + 1).astype(jnp.uint32)
    per_leaf = [
      counts_at(v, lo + p, shift, ax) for v, lo, p, ax in zip(views, lows, prefixes, reduce_axes)
    ]
    per_leaf = _block_totals(per_leaf, global_block, num_digits - 1)
    new_prefixes, new_counts = [], []
    for p, c, cnt, k in zip(prefixes, counts, per_leaf, ks):
      # Counts fall as the candidate grows, so the digit is how many candidates keep >= k.
      ok = _counts.greater_equal(cnt, k)
      digit = jnp.sum(ok, axis=-1, dtype=jnp.uint32)
      new_prefixes.append(p | (digit << shift))
      pick = jnp.maximum(digit.astype(jnp.int32) - 1, 0)[..., None]
      reached = [jnp.take_along_axis(a, pick, axis=-1)[..., 0] for a in cnt]
      new_counts.append(
        _counts.Count(*(jnp.where(digit > 0, r, old) for r, old in zip(reached, c)))
      )
    return new_prefixes, new_counts

  # zeros_like keeps the counts' sharding, which an Explicit-sharded carry must match.
  init_prefixes = [jnp.zeros_like(c.hi, jnp.uint32) for c in init_counts]
  prefixes, counts = lax.fori_loop(0, bits // radix_bits, body, (init_prefixes, init_counts))
  return [lo + p for lo, p in zip(lows, prefixes)], counts


def count_search_from(views, reduce_axes, ks, init_counts, lows, bits, *, radix_bits=4):
  """The counting search of per-leaf blocks over keys ``lows + t``, t in ``[0, 2**bits)``, for
  a search whose higher bits are fixed already (``lows``, block-shaped uint32, with
  ``init_counts`` entries at or above them): per leaf, the threshold key and its count."""
  return _count_search(
    views, reduce_axes, ks, init_counts, False, radix_bits=radix_bits, lows=lows, bits=bits
  )


def bracket_previous(views, reduce_axes, ks, previous, global_block, bracket_bits):
  """One counting pass: per block, the lower end of the bracket of ``2**bracket_bits`` keys
  centred on the ``previous`` threshold's key, the count at it, and whether the k-th largest
  key lies inside (the lower end keeps k or more entries, the upper end fewer)."""
  half = jnp.uint32(1 << (bracket_bits - 1))
  width = jnp.uint32(1 << bracket_bits)
  # Keys of |scores| are below 2**31, so neither end overflows.
  lows = [
    jnp.where(pk > half, pk - half, jnp.zeros_like(pk))
    for pk in (lax.bitcast_convert_type(p, jnp.uint32) for p in previous)
  ]
  ends = [
    _counts.count_true(score_keys(v)[..., None] >= jnp.stack([lo, lo + width], axis=-1), ax)
    for v, lo, ax in zip(views, lows, reduce_axes)
  ]
  ends = _block_totals(ends, global_block, 2)
  at_lows = [_counts.Count(e.hi[..., 0], e.lo[..., 0]) for e in ends]
  inside = [
    _counts.greater_equal(lo, k)
    & ~_counts.greater_equal(_counts.Count(e.hi[..., 1], e.lo[..., 1]), k)
    for lo, e, k in zip(at_lows, ends, ks)
  ]
  return lows, at_lows, inside


def _bracketed_count_search(
  views, reduce_axes, ks, init_counts, global_block, previous, *, radix_bits, bracket_bits
):
  """The counting search, in ``bracket_bits / radix_bits`` passes plus one when every block's
  threshold key lies within ``2**(bracket_bits - 1)`` keys of its ``previous`` one
  (:func:`bracket_previous`); otherwise the full search. Both give the same threshold and count:
  the search finds the largest key that keeps k, wherever it starts.
  """
  lows, at_lows, inside = bracket_previous(
    views, reduce_axes, ks, previous, global_block, bracket_bits
  )
  every = jnp.all(jnp.stack([jnp.all(x) for x in inside]))

  def bracketed():
    return _count_search(
      views,
      reduce_axes,
      ks,
      at_lows,
      global_block,
      radix_bits=radix_bits,
      lows=lows,
      bits=bracket_bits,
    )

  def full():
    return _count_search(views, reduce_axes, ks, init_counts, global_block, radix_bits=radix_bits)

  return lax.cond(every, bracketed, full)


def _block_ids(shape, reduce_axes):
  """Row-major index of each entry's block, from iotas (XLA fuses them; no input array).

  With the bin widths of ``_histogram_search``, ``num_blocks * bins`` is at most 65536 or twice
  the leaf's size (16 times for blocks under 8 entries), so int32 holds it for any leaf under
  2**27 entries and for larger ones up to 2**30 unless their blocks are that small.
  """
  ids = jnp.zeros(shape, jnp.int32)
  for axis in range(len(shape)):
    if axis not in reduce_axes:
      ids = ids * shape[axis] + lax.broadcasted_iota(jnp.int32, shape, axis)
  return ids


def _chunk_rows(shape: tuple[int, ...], axes: tuple[int, ...]) -> int:
  """Rows of the first axis per histogram chunk: the most that divide the axis and keep a chunk
  within ``_CHUNK_ENTRIES``, or all of them where the leaf is small (up to 8 chunks: a loop per
  leaf and pass costs compile time, and a few MiB of temporaries do not) or its first axis
  indexes blocks (block ids must not depend on the chunk)."""
  size = math.prod(shape)
  # On several devices a chunk of a sharded axis would be gathered: never chunk there.
  if size <= 8 * _CHUNK_ENTRIES or 0 not in axes or jax.device_count() > 1:
    return shape[0]
  row = size // shape[0]
  for rows in range(max(1, _CHUNK_ENTRIES // row), 0, -1):
    if shape[0] % rows == 0:
      return rows
  return shape[0]


def _scatter_counts(view, axes, bins, bin_of, token=None):
  """Per-block histogram ``[*block_shape, bins]`` of ``bin_of(keys)``; entries whose bin is
  ``bins`` or more are dropped. With ``token`` (a non-negative int32 the last leaf's pass
  produced), the histogram's zeros are written only once it exists: XLA:CPU otherwise
  schedules every leaf's zeroed histogram at the start, all alive at once (10 MiB at
  ``small``, zeroed into fresh pages every step).

  XLA:CPU writes the scatter's int32 indices and its ones into buffers of the operand's size:
  a leaf above ``8 * _CHUNK_ENTRIES`` entries is histogrammed in chunks of rows by a loop, so that
  these temporaries stay a chunk's size whatever the leaf's (two float32 copies of the 1B
  model's embedding otherwise)."""
  nblocks = math.prod(d for i, d in enumerate(view.shape) if i not in axes)
  dims = lax.ScatterDimensionNumbers(
    update_window_dims=(), inserted_window_dims=(0,), scatter_dims_to_operand_dims=(0,)
  )

  def add(hist, part):
    b = bin_of(score_keys(part))
    idx = jnp.where(b < bins, _block_ids(part.shape, axes) * bins + b, nblocks * bins)
    # lax.scatter_add on the unflattened index: jnp's .at[] and a flattening reshape are both
    # rejected for explicitly sharded operands.
    return lax.scatter_add(
      hist,
      idx[..., None],
      jnp.ones(idx.shape, jnp.int32),
      dims,
      mode=lax.GatherScatterMode.FILL_OR_DROP,
    )

  zeros = jnp.zeros(nblocks * bins, jnp.int32)
  if token is not None:
    zeros = zeros + (token >> 31)
  rows = _chunk_rows(view.shape, axes)
  if rows == view.shape[0]:
    hist = add(zeros, view)
  else:
    hist = lax.fori_loop(
      0,
      view.shape[0] // rows,
      lambda c, h: add(h, lax.dynamic_slice_in_dim(view, c * rows, rows, axis=0)),
      zeros,
    )
  shape = tuple(1 if i in axes else d for i, d in enumerate(view.shape))
  return hist.reshape(shape + (bins,))


def _resolve_digit(hist, above, k):
  """The bin of a block's histogram (bins in key order, a power of two) holding the k-th
  largest, given ``above`` entries above every bin: returns the bin, the entries at or above
  it, and the entries above it."""
  bins = hist.shape[-1]
  if bins > 256:
    # Two levels (row sums, then one row) instead of a scan over every bin.
    rows = 1 << (bins.bit_length() - 1) // 2
    grid = hist.reshape(hist.shape[:-1] + (rows, bins // rows))
    row, _, row_above = _resolve_digit(jnp.sum(grid, axis=-1), above, k)
    col, count, new_above = _resolve_digit(
      jnp.take_along_axis(grid, row[..., None, None], axis=-2)[..., 0, :], row_above, k
    )
    return row * (bins // rows) + col, count, new_above
  at_or_above = above[..., None] + jnp.cumsum(hist[..., ::-1], axis=-1, dtype=jnp.int32)[..., ::-1]
  digit = jnp.sum(at_or_above[..., 1:] >= k, axis=-1, dtype=jnp.int32)
  count = _pick(at_or_above, digit)
  return digit, count, count - _pick(hist, digit)


def _pick(x, index):
  """``x[..., index]`` by a masked sum, not a gather: XLA fuses a gather into every consumer,
  so a later leaf's pass would read this leaf's histogram and keep it alive; a reduction's
  result is a buffer of its own."""
  hit = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1) == index[..., None]
  return jnp.sum(jnp.where(hit, x, 0), axis=-1, dtype=jnp.int32)


def _histogram_search(views, reduce_axes, ks, init_counts, global_block):
  """Fixes up to 16 bits per pass from per-block histograms of the next digit.

  Invariant per block: the k-th largest key starts with ``prefix`` and ``above`` entries lie
  above every key with that prefix. Each pass histograms the next digit of the entries that
  share the prefix; the digit is the largest one whose entries and those above reach k.
  """
  # Digits no wider than a block's size keep the histograms of many small blocks (rows, heads)
  # about as large as the leaf; a global block is one block per leaf.
  widths = [
    _HIST_BITS if global_block else max(4, min(_HIST_BITS, (v.size // max(1, c.size)).bit_length()))
    for v, c in zip(views, init_counts)
  ]
  prefixes = [jnp.zeros_like(c, jnp.uint32) for c in init_counts]
  above = [jnp.zeros_like(c) for c in init_counts]
  counts = list(init_counts)
  tops = [_KEY_BITS - 1] * len(views)  # |score| clears the sign bit

  def resolve(i, hist):
    digit, counts[i], above[i] = _resolve_digit(hist, above[i], ks[i])
    prefixes[i] = prefixes[i] | (digit.astype(jnp.uint32) << lows[i])
    tops[i] = lows[i]

  # The last histogram made: the next leaf's pass waits for it (see :func:`after`), so only one
  # leaf's int32 bin indices are alive at a time.
  token = None
  while any(tops):
    todo = [i for i, t in enumerate(tops) if t > 0]
    lows = {i: max(0, tops[i] - widths[i]) for i in todo}
    hists = []
    for i in todo:
      n = 1 << (tops[i] - lows[i])

      # Entries outside the prefix fixed so far go to the dropped bin.
      def bin_of(keys, p=prefixes[i], top=tops[i], low=lows[i], n=n, token=token):
        if token is not None:
          keys = after(keys, token)
        return jnp.where((keys >> top) == (p >> top), (keys >> low) & (n - 1), n).astype(jnp.int32)

      hist = _scatter_counts(views[i], reduce_axes[i], n, bin_of, token)
      if global_block:
        hists.append(hist)
        token = jnp.max(hist)
      else:
        # Resolved at once, so that the next leaf also waits for this histogram to be freed:
        # the token reads both results taken from it (else XLA:CPU takes ``above`` from every
        # leaf's first histogram only in the second pass, keeping them all alive).
        resolve(i, hist)
        token = jnp.maximum(jnp.max(counts[i]), jnp.max(above[i]))
    if global_block:
      total = sum(h.reshape(-1) for h in hists)
      for i, h in zip(todo, hists):
        resolve(i, total.reshape(h.shape))
  return prefixes, counts


def block_mask(score: jax.Array, spec: _partition.BlockSpec, threshold: jax.Array) -> jax.Array:
  """The boolean mask ``|score| >= threshold`` of one leaf, in the leaf's own shape."""
  view = jnp.reshape(score, spec.view_shape(score.shape))
  key = score_keys(view) >= lax.bitcast_convert_type(threshold, jnp.uint32)
  return jnp.reshape(key, score.shape)


def top_fraction_mask(
  scores: Any,
  fraction: jax.typing.ArrayLike,
  *,
  partition: _partition.Partition = None,
  radix_bits: int = 4,
  method: Method = "auto",
) -> Any:
  r"""Marks, in every block, the entries whose magnitude is among the top ``fraction``.

  For a block of n entries, with :math:`k = \max(1, \lfloor \text{fraction} \cdot n \rfloor)` and
  :math:`\tau` the k-th largest :math:`|s|` of the block,

  .. math:: F = \{ i : |s_i| \ge \tau \}

  so ties at :math:`\tau` are all kept and :math:`|F| \ge k`. The threshold is found by counting
  on the float bit pattern (no sort, no ``lax.top_k``).

  Args:
    scores: a pytree of float arrays.
    fraction: fraction to keep per block, in (0, 1]; a Python float, or a traced scalar
      (then k is computed in float32).
    partition: ``None``/``"leaf"`` (each leaf is a block), ``"global"`` (the whole tree is one
      block), a ``BlockSpec``, or a pytree/callable of ``BlockSpec`` (see :class:`BlockSpec`).
    radix_bits: bits fixed per counting pass (1, 2, 4 or 8).
    method: ``"auto"``, ``"count"`` or ``"histogram"`` (see :func:`select_blocks`).

  Returns:
    A pytree of boolean arrays shaped like ``scores``.

  Example:
    >>> import jax.numpy as jnp
    >>> import mofo_jax
    >>> mofo_jax.top_fraction_mask(jnp.array([0.1, -3.0, 2.0, 0.5]), 0.5)
    Array([False,  True,  True, False], dtype=bool)

  References:
    Chen et al., `MoFO: Momentum-Filtered Optimizer for Mitigating Forgetting in LLM
    Fine-Tuning <https://arxiv.org/abs/2407.20999>`_, 2024.
  """
  if isinstance(fraction, (int, float)) and not 0.0 < fraction <= 1.0:
    raise ValueError(f"fraction={fraction} must be in (0, 1].")
  is_global, specs = _partition.resolve_partition(partition, scores)
  leaves, treedef = jax.tree.flatten(scores)
  spec_leaves = treedef.flatten_up_to(specs)
  sels = select_blocks(
    leaves, spec_leaves, fraction, global_block=is_global, radix_bits=radix_bits, method=method
  )
  masks = [block_mask(s, sp, sel.threshold) for s, sp, sel in zip(leaves, spec_leaves, sels)]
  return treedef.unflatten(masks)


class MomentUpdate(NamedTuple):
  """What a selection needs to compute the new moments itself (see :func:`select_momentum`)."""

  grads: list[jax.Array]  # per leaf, the incoming gradients (any float dtype)
  mus: list[jax.Array]  # per leaf, like the gradient, mu_dtype: the old first moments
  nus: list[jax.Array]  # per leaf, like the gradient, nu_dtype: the old second moments
  first_moment: Callable[[jax.Array, jax.Array], jax.Array]  # (g, mu) -> new mu, elementwise
  second_moment: Callable[[jax.Array, jax.Array], jax.Array]  # (g, nu) -> new nu, elementwise
  count: jax.Array  # [] int32, steps taken before this one (never negative)


class Selection(Protocol):
  """How thresholds are found: the interface behind ``selection=`` of every MoFO transform.

  :class:`ExactSelection`, :class:`mofo_jax.ApproxSelection` and :class:`mofo_jax.LocalSelection`
  implement it; the strings ``"exact"``, ``"approx"`` and ``"local"`` are shortcuts for their
  defaults. A selection may also define ``select_momentum(moments, filtered, specs, is_global,
  fraction, previous=None)``, with the arguments and results of :func:`select_momentum`, to
  compute the new moments itself when they are the score (fused with its own passes, or with
  thresholds taken before the moments exist); without it, the moments are computed into buffers
  and ranked by ``select``.
  """

  def initial_thresholds(
    self, leaves: list[Any], filtered: list[bool], specs: list[_partition.BlockSpec]
  ) -> list[jax.Array]:
    """Telemetry thresholds before the first step, typed (shape, sharding) as ``select``'s."""
    ...

  def select(
    self,
    scores: list[jax.Array],
    filtered: list[bool],
    specs: list[_partition.BlockSpec],
    is_global: bool,
    fraction: Any,
    previous: list[jax.Array] | None = None,
  ) -> tuple[list[jax.Array | None], list[jax.Array], list[jax.Array]]:
    """Per leaf: the mask (None for dense leaves), the entries kept (``int32[2]`` count limbs)
    and the thresholds. ``previous``: per leaf, the thresholds the last step returned (a
    search may start from them)."""
    ...


def zero_thresholds(
  leaves: list[Any], filtered: list[bool], specs: list[_partition.BlockSpec]
) -> list[jax.Array]:
  """Zero thresholds shaped, and under Explicit mesh axes sharded, as the blocks' thresholds
  (``[]`` for dense leaves), so the state's type never changes."""
  return [
    jnp.zeros(
      sp.block_shape(np.shape(x)), jnp.float32, out_sharding=_sharding.block_sharding(x, sp)
    )
    if f
    else jnp.zeros((), jnp.float32)
    for x, f, sp in zip(leaves, filtered, specs)
  ]


def materialised(fn: Callable[[], list[jax.Array]], never_negative: jax.Array) -> list[jax.Array]:
  """``fn()``, computed once into buffers that every later consumer reads.

  The search for a threshold and the mask compared with it both read the scores. Were the scores
  an expression (``b1 * mu + (1 - b1) * g``), XLA could recompute it inside each consumer's
  fusion, with different rounding (FMA contraction, constants folded into the producer chain
  in one fusion and not in another), and the mask would then
  disagree with the threshold and with the count reported (measured on XLA:CPU: the k-th entry
  dropped on ~10% of steps of a program that does not output the new state).
  ``lax.optimization_barrier`` does not prevent this: XLA:CPU removes barriers before fusion.
  The operands and results of a ``while`` loop are buffers on every backend, and no fusion
  reaches through a loop, so ``fn()`` is passed through one whose trip count is 0 at run time
  but unknown to the compiler, which therefore keeps it. The body, never run, changes its carry:
  a body recomputing ``fn()`` is loop-invariant, and XLA hoists it and then drops the loop (seen
  on XLA:CPU with boolean masks).

  ``never_negative`` is a traced scalar that is never negative at run time (a step count, which
  saturates, or a threshold): it makes the trip count. The body changes one entry of each
  buffer only (every entry under Explicit mesh axes): a compiler that bills a loop whose trip count it cannot read once (the bytes
  counts of benchmarks/hlo_bytes.py do) then bills a few bytes, not a pass over every buffer.
  """
  trips = (never_negative < 0).astype(jnp.int32)

  def touch(x):
    if _sharding.is_explicit(getattr(jax.typeof(x).sharding, "mesh", None)):
      # Explicit mesh axes do not slice one entry of a sharded axis: change every entry.
      return ~x if x.dtype == jnp.bool_ else x + 1
    if not x.size:
      return x
    # A constant, not a function of the entry: reading one entry of a sharded buffer would
    # take a collective, and a program of LocalSelection has none.
    return x.at[(0,) * x.ndim].set(True if x.dtype == jnp.bool_ else 1)

  def body(i, carry):
    return [touch(x) for x in carry]

  return lax.fori_loop(0, trips, body, fn())


def materialised_moments(
  moments: MomentUpdate, filtered: list[bool]
) -> tuple[list[jax.Array], list[jax.Array]]:
  """The new first and second moments; the filtered leaves' first moments in buffers (see
  :func:`materialised`), so that a search, the mask, the update and the new state all read the
  same values."""
  nus = [moments.second_moment(g, nu) for g, nu in zip(moments.grads, moments.nus)]
  mus = [moments.first_moment(g, mu) for g, mu in zip(moments.grads, moments.mus)]
  return materialised_leaves(mus, filtered, moments.count), nus


def materialised_leaves(
  leaves: list[jax.Array], filtered: list[bool], never_negative: jax.Array
) -> list[jax.Array]:
  """``leaves`` with the filtered ones computed into buffers (:func:`materialised`), so that a
  search and the mask compared with its threshold read one value."""
  idx = [i for i, f in enumerate(filtered) if f]
  if not idx:
    return list(leaves)
  out = list(leaves)
  for j, x in zip(idx, materialised(lambda: [leaves[i] for i in idx], never_negative)):
    out[j] = x
  return out


def select_momentum(
  selection: Selection,
  moments: MomentUpdate,
  filtered: list[bool],
  specs: list[_partition.BlockSpec],
  is_global: bool,
  fraction: Any,
  previous: list[jax.Array] | None = None,
) -> tuple[
  list[jax.Array], list[jax.Array], list[jax.Array | None], list[jax.Array], list[jax.Array]
]:
  """The new moments and the selection that ranks the new first moment, as ``selection`` does it.

  Calls ``selection.select_momentum`` where the selection defines it (it may fuse the moments
  with its search, or sample before they exist); otherwise computes the moments with
  :func:`materialised_moments` and ranks them with ``selection.select``.

  Returns:
    Per leaf: the new first moments, the new second moments, the masks (None for dense leaves),
    the entries kept (``int32[2]`` count limbs) and the thresholds. A selection's own
    ``select_momentum`` may return a sixth list, passed on: the same first moments as
    expressions the compiler may fuse into the update (the first list then holds buffers that
    the count read, see :class:`mofo_jax.ApproxSelection`); :func:`mofo_jax.scale_by_mofo`
    computes the direction from it.
  """
  own = getattr(selection, "select_momentum", None)
  if own is not None:
    return own(moments, filtered, specs, is_global, fraction, previous=previous)
  mus, nus = materialised_moments(moments, filtered)
  masks, kept, thresholds = selection.select(
    mus, filtered, specs, is_global, fraction, previous=previous
  )
  return mus, nus, masks, kept, thresholds


def select_momentum_rest(
  fallback: Selection,
  moments: MomentUpdate,
  filtered: list[bool],
  specs: list[_partition.BlockSpec],
  is_global: bool,
  fraction: Any,
  previous: list[jax.Array] | None,
  take: list[bool],
) -> list[list]:
  """:func:`select_momentum`'s five result lists, filled by ``fallback`` for the leaves ``take``
  leaves out and None at the leaves it marks (the ones a kernel selects)."""
  rest = [i for i, t in enumerate(take) if not t]
  results = [[None] * len(take) for _ in range(5)]
  if not rest:
    return results
  pick = lambda xs: [xs[i] for i in rest]
  sub = moments._replace(grads=pick(moments.grads), mus=pick(moments.mus), nus=pick(moments.nus))
  outs = select_momentum(
    fallback,
    sub,
    pick(filtered),
    pick(specs),
    is_global,
    fraction,
    previous=None if previous is None else pick(previous),
  )
  for j, i in enumerate(rest):
    for r, o in zip(results, outs):
      r[i] = o[j]
  return results


def kernels_or_fallback(
  kernel: str,
  any_taken: bool,
  kernels: Callable[..., Any],
  fallback: Callable[..., Any],
  platform: str,
  args: tuple,
) -> Any:
  """A kernel selection's dispatch: ``fallback(*args)`` when no leaf is taken, ``kernels(*args)``
  under ``kernel="always"``, else the one for the platform lowered for, only that one traced
  when the platform is known while tracing (:func:`mofo_jax._platform.platform_dependent`):
  both must read traced values only from ``args``, e.g. ``(moments, fraction, previous)``."""
  if not any_taken:
    return fallback(*args)
  if kernel == "always":
    return kernels(*args)
  return _platform.platform_dependent(
    args, **{platform: lambda a: kernels(*a)}, default=lambda a: fallback(*a)
  )


def put_leaf(
  results: list[list],
  i: int,
  spec: _partition.BlockSpec,
  m: jax.Array,
  v: jax.Array,
  tau: jax.Array,
  count: _counts.Count,
) -> None:
  """Fills leaf ``i`` of :func:`select_momentum_rest`'s lists from a kernel's new moments,
  block-shaped threshold and per-block count (the mask from ``m`` and ``tau``, the count summed)."""
  results[0][i], results[1][i], results[4][i] = m, v, tau
  results[2][i] = block_mask(m, spec, tau)
  results[3][i] = _counts.to_array(_counts.total(count, np.size(m)))


def _count_mask(mask: jax.Array) -> _counts.Count:
  """The True entries of ``mask``. On one CPU device a leaf above ``8 * _CHUNK_ENTRIES`` (and
  under 2**31) is counted in chunks of rows by a loop, so that XLA:CPU's int32 copy of the mask is a
  chunk's size; XLA:GPU and XLA:TPU fuse the comparison into the sum and need no chunks."""
  rows = _chunk_rows(mask.shape, tuple(range(mask.ndim))) if mask.ndim else 0

  def whole(mask):
    return _counts.count_true(mask, tuple(range(mask.ndim)), keepdims=False)

  if not mask.ndim or rows == mask.shape[0] or mask.size >= _counts.INT32_LIMIT:
    return whole(mask)

  def chunks(mask):
    def add(c, total):
      part = lax.dynamic_slice_in_dim(mask, c * rows, rows, axis=0)
      return total + jnp.sum(part, dtype=jnp.int32)

    return _counts.split(lax.fori_loop(0, mask.shape[0] // rows, add, jnp.int32(0)))

  return _platform.platform_dependent(mask, cpu=chunks, default=whole)


def masks_from_thresholds(
  scores: list[jax.Array],
  filtered: list[bool],
  specs: list[_partition.BlockSpec],
  taus: list[jax.Array],
  counts: list[_counts.Count] | None,
  is_global: bool,
  materialise: bool = False,
) -> tuple[list[jax.Array | None], list[jax.Array], list[jax.Array]]:
  """Masks, entries kept and thresholds per leaf, from the filtered leaves' thresholds (and
  per-block counts, when the search gives them). With ``materialise``, the masks are computed
  once into buffers (see :func:`materialised`), which the update and the count both read: for
  scores that are an expression XLA may recompute, with other rounding, in each fusion."""
  idx = [i for i, f in enumerate(filtered) if f]
  masks: list[jax.Array | None] = [None] * len(scores)
  kept = [_counts.to_array(_counts.constant(np.size(s))) for s in scores]
  thresholds = [jnp.zeros((), jnp.float32) for _ in scores]
  block_masks = [block_mask(scores[i], specs[i], tau) for i, tau in zip(idx, taus)]
  if materialise and idx:
    block_masks = materialised(lambda: block_masks, jnp.min(taus[0]))
  token = None
  for j, (i, tau) in enumerate(zip(idx, taus)):
    masks[i] = block_masks[j]
    thresholds[i] = tau
    if counts is None or is_global:
      # Global blocks carry the tree-wide count in every leaf, and a sampled threshold has no
      # count: count this leaf's own entries. Each count waits for the previous leaf's (a
      # count is never negative), so that XLA:CPU, which writes an int32 copy of a mask before
      # summing it, holds one leaf's copy at a time, not every leaf's.
      mask = masks[i] if token is None else masks[i] | (token < 0)
      count = _count_mask(mask)
      token = count.lo
    else:
      count = _counts.total(counts[j], np.size(scores[i]))
    kept[i] = _counts.to_array(count)
  return masks, kept, thresholds


@dataclasses.dataclass(frozen=True)
class ExactSelection:
  """``selection=``: the exact k-th largest ``|score|`` of every block, by counting.

  Attributes:
    method: ``"auto"``, ``"count"`` or ``"histogram"`` (see :func:`select_blocks` and
      :func:`resolve_method`).
    radix_bits: bits of the threshold fixed per counting pass (1, 2, 4 or 8).
    bracket_bits: the counting search starts from the last step's thresholds: one pass checks
      that every block's threshold is within ``2**(bracket_bits - 1)`` float32 keys of the last
      one, then ``bracket_bits / radix_bits`` passes fix the rest (6 passes instead of 8 at the
      defaults); where any block's moved further, the full search runs (9 passes). Same
      results either way; 0 turns it off (see :func:`select_blocks`).

  Example:
    >>> import mofo_jax
    >>> opt = mofo_jax.mofo(1e-3, selection=mofo_jax.ExactSelection(method="count", radix_bits=8))
  """

  method: Method = "auto"
  radix_bits: int = 4
  bracket_bits: int = 20

  def __post_init__(self):
    resolve_method(self.method, num_devices=1)
    if self.radix_bits not in (1, 2, 4, 8):
      raise ValueError(f"radix_bits={self.radix_bits} must be 1, 2, 4 or 8.")
    if not isinstance(self.bracket_bits, int) or not 0 <= self.bracket_bits < _KEY_BITS:
      raise ValueError(f"bracket_bits={self.bracket_bits!r} must be an int in [0, 32).")

  def initial_thresholds(self, leaves, filtered, specs):
    return zero_thresholds(leaves, filtered, specs)

  def select(self, scores, filtered, specs, is_global, fraction, previous=None):
    idx = [i for i, f in enumerate(filtered) if f]
    sels = select_blocks(
      [scores[i] for i in idx],
      [specs[i] for i in idx],
      fraction,
      global_block=is_global,
      radix_bits=self.radix_bits,
      method=self.method,
      previous=None if previous is None else [previous[i] for i in idx],
      bracket_bits=self.bracket_bits,
    )
    return masks_from_thresholds(
      scores,
      filtered,
      specs,
      [s.threshold for s in sels],
      [s.num_selected for s in sels],
      is_global,
    )
