"""Counts exact past 2**31 entries without 64-bit integers (``jax_enable_x64`` on or off).

A model above ~2.1B parameters has more entries than int32 holds: the total of a global block,
its k, and the entries kept by one huge stacked leaf. A count here is two int32 arrays, ``hi``
and ``lo``, with value ``hi * 2**16 + lo`` and ``0 <= lo < 2**16``: exact up to 2**47 (1.4e14)
entries. Sums of counts add each limb in int32 and carry, which is exact for fewer than 2**15
terms. Boolean reductions over more than 2**31 entries run in two stages: first over all the
reduced axes but the first one, in int32 (fewer than 2**31 entries each), then over the first
one by limbs (fewer than 2**15 indices): a block of 80 layers of 8192 x 28672 entries, or a
global block of any realistic model, meets both limits; other shapes raise a ValueError.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

BITS = 16
_LOW = (1 << BITS) - 1
INT32_LIMIT = 2**31
MAX_TERMS = 2**15  # limb sums of fewer terms cannot overflow int32
MAX_COUNT = 2**47


class Count(NamedTuple):
  """A non-negative count ``hi * 2**16 + lo``."""

  hi: jax.Array  # int32, any shape: the count's high part
  lo: jax.Array  # int32, same shape: the count's low 16 bits, in [0, 2**16)


def normalise(hi: jax.Array, lo: jax.Array) -> Count:
  return Count(hi + (lo >> BITS), lo & _LOW)


def split(c: jax.Array) -> Count:
  """An int32 count (0 <= c < 2**31) as a Count."""
  c = c.astype(jnp.int32)
  return Count(c >> BITS, c & _LOW)


def constant(n: int, shape: Sequence[int] = (), sharding: Any = None) -> Count:
  """The count ``n`` (a Python int below 2**47) filled into ``shape``."""
  if not 0 <= n < MAX_COUNT:
    raise ValueError(f"A count of {n} entries exceeds the supported 2**47.")
  return Count(
    jnp.full(shape, n >> BITS, jnp.int32, out_sharding=sharding),
    jnp.full(shape, n & _LOW, jnp.int32, out_sharding=sharding),
  )


def add(a: Count, b: Count) -> Count:
  return normalise(a.hi + b.hi, a.lo + b.lo)


def sum_counts(c: Count, axis: int | tuple[int, ...] | None = None, keepdims=False) -> Count:
  """The sum of counts along ``axis``; exact for fewer than 2**15 terms."""
  terms = math.prod(np.shape(c.hi)) if axis is None else _size(np.shape(c.hi), axis)
  if terms >= MAX_TERMS:
    raise ValueError(f"Summing {terms} counts at once exceeds the supported 2**15.")
  return normalise(
    jnp.sum(c.hi, axis=axis, dtype=jnp.int32, keepdims=keepdims),
    jnp.sum(c.lo, axis=axis, dtype=jnp.int32, keepdims=keepdims),
  )


def psum(c: Count, axes: tuple[str, ...], max_value: int) -> Count:
  """The sum of a count over the mesh ``axes`` (inside ``shard_map``) in one all-reduce, given a
  bound on that sum.

  Below 2**31 the count travels as one int32 (``hi * 2**16 + lo``: each device's term is at
  most the sum, so neither it nor the sum overflows), 4 bytes an entry; else its two limbs
  stacked into one operand, each summed exactly in int32 (``lo`` under 2**16 from fewer than
  2**15 devices, ``hi`` under ``max_value / 2**16 < 2**31``), 8 bytes an entry.
  """
  if max_value >= MAX_COUNT:
    raise ValueError(f"A count of {max_value} entries exceeds the supported 2**47.")
  if max_value < INT32_LIMIT:
    return split(lax.psum(c.hi * (1 << BITS) + c.lo, axes))
  devices = math.prod(lax.axis_size(a) for a in axes)
  if devices >= MAX_TERMS:
    raise ValueError(f"Summing counts over {devices} devices exceeds the supported 2**15.")
  both = lax.psum(jnp.stack([c.hi, c.lo]), axes)
  return normalise(both[0], both[1])


def _size(shape: Sequence[int], axis: int | tuple[int, ...]) -> int:
  axes = (axis,) if isinstance(axis, int) else axis
  return math.prod(shape[a] for a in axes)


def count_true(x: jax.Array, axes: tuple[int, ...], keepdims: bool = True) -> Count:
  """How many entries of the boolean ``x`` are True along ``axes``, exactly (see module)."""
  axes = tuple(sorted(axes))
  n = _size(x.shape, axes) if axes else 1
  if n < INT32_LIMIT:
    return split(jnp.sum(x, axis=axes, dtype=jnp.int32, keepdims=keepdims))
  first, rest = axes[0], axes[1:]
  if _size(x.shape, rest) >= INT32_LIMIT or x.shape[first] >= MAX_TERMS:
    raise ValueError(
      f"Counting over axes {axes} of shape {x.shape} ({n} entries) needs its first axis under "
      f"2**15 entries and the others under 2**31 together."
    )
  partial = split(jnp.sum(x, axis=rest, dtype=jnp.int32, keepdims=True))
  out = sum_counts(partial, axis=first, keepdims=True)
  if not keepdims:
    out = Count(*(jnp.squeeze(a, axis=axes) for a in out))
  return out


def greater_equal(a: Count, b: Count) -> jax.Array:
  """``a >= b`` for normalised counts."""
  return (a.hi > b.hi) | ((a.hi == b.hi) & (a.lo >= b.lo))


def total(c: Count, max_value: int) -> Count:
  """The sum of all the counts of ``c`` (a per-block count), given a bound on that sum."""
  if max_value < INT32_LIMIT:
    return split(jnp.sum(c.hi * (1 << BITS) + c.lo, dtype=jnp.int32))
  return sum_counts(c)


def to_array(c: Count) -> jax.Array:
  """``int32[..., 2]``: the limbs stacked, as the telemetry stores a count."""
  return jnp.stack([c.hi, c.lo], axis=-1)


def value(x: Any) -> Any:
  """The Python int (or int64 NumPy array) of a count stored as ``int32[..., 2]`` limbs.

  The telemetry's ``num_updated`` and ``num_entries`` are stored so, to stay exact past 2**31
  entries without ``jax_enable_x64``.

  Example:
    >>> import jax.numpy as jnp, mofo_jax
    >>> mofo_jax.count_value(jnp.array([65536, 5], jnp.int32))
    4294967301
  """
  a = np.asarray(x).astype(np.int64)
  v = (a[..., 0] << BITS) + a[..., 1]
  return int(v) if v.ndim == 0 else v


def num_to_select(fraction: jax.typing.ArrayLike, n: int) -> Count:
  """k = max(1, floor(fraction * n)) as a Count: exact for a Python fraction; for a traced one
  ``fraction * n`` is rounded to float32 first (relative error 2**-24)."""
  if isinstance(fraction, (int, float)):
    return constant(max(1, math.floor(fraction * n)))
  fn = jnp.floor(jnp.asarray(fraction, jnp.float32) * jnp.float32(n))
  # fn is a float32 integer below 2**47: its two limbs are exact float32 values.
  hi = jnp.floor(fn / (1 << BITS))
  lo = fn - hi * (1 << BITS)
  k = Count(hi.astype(jnp.int32), lo.astype(jnp.int32))
  at_least_one = (k.hi > 0) | (k.lo > 0)
  return Count(k.hi, jnp.where(at_least_one, k.lo, 1))
