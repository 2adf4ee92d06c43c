"""Distance from the pretrained weights, with the pretrained copy where the user wants it.

The forgetting metrics compare the trained params with the pretrained ones:

.. math::
  \\text{l2\\_from\\_pretrained} = \\lVert \\theta - \\theta_0 \\rVert_2, \\qquad
  \\text{fraction\\_changed} = \\#\\{i : \\theta_i \\ne \\theta_{0,i}\\} / N

Keeping :math:`\\theta_0` costs a model's worth of memory. Where it lives is the user's choice
(``--distance-metrics``):

- ``device``: a second copy of the params on the devices, in their shardings (fast; one
  parameter shard more per device for the whole run);
- ``host``: each process keeps the slices its devices hold in host memory, and an evaluation
  puts them back on the devices one parameter at a time (at most one parameter's shard more per
  device, during the evaluation only);
- ``off``: no copy, no metrics.

Both copies feed the same jitted per-parameter reduction with the same shardings, so ``device``
and ``host`` give bit-identical values. The copy is never checkpointed: a resumed run re-reads
it from the input model, whose weights :func:`fingerprint` identifies.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("device", "host", "off")


def count_nonzero_exact(x: jax.Array, limit: int = 2**31 - 1) -> jax.Array:
  """Partial int32 counts of the nonzero entries of ``x``, each exact; their sum is the count.

  An int32 count of more than ``2**31 - 1`` entries would wrap, and int64 needs
  ``jax_enable_x64``. So only the trailing axes whose sizes multiply to at most ``limit`` are
  reduced; the leading axes stay, and the caller sums the (few) partial counts on the host in
  Python integers. Exact for any size as long as one entry of the last axis fits (the last axis
  has at most ``limit`` entries).

  Args:
    x: any array.
    limit: the largest count one int32 partial may hold.

  Returns:
    int32 array of shape ``x.shape[:k]`` for the smallest ``k`` whose trailing block fits.

  Example:
    >>> import jax.numpy as jnp
    >>> count_nonzero_exact(jnp.array([[0.0, 1.0], [2.0, 3.0]]), limit=2)
    Array([1, 2], dtype=int32)
  """
  k = 0
  while math.prod(x.shape[k:]) > limit:
    k += 1
  return jnp.sum(x != 0, axis=tuple(range(k, x.ndim)), dtype=jnp.int32)


@jax.jit
def _leaf_stats(param: jax.Array, pretrained: jax.Array) -> tuple[jax.Array, jax.Array]:
  # float32 squared distance of one parameter and its exact changed-entry partial counts.
  diff = param.astype(jnp.float32) - pretrained.astype(jnp.float32)
  return jnp.sum(jnp.square(diff)), count_nonzero_exact(diff)


class OnDevices:
  """The pretrained params kept on the devices, in the params' shardings.

  Args:
    params: the pretrained params (global arrays); kept as they are, not copied.
  """

  def __init__(self, params: Any):
    self._params = params

  def leaves(self) -> Iterator[jax.Array]:
    """The pretrained leaves, in ``jax.tree.leaves`` order of the params."""
    return iter(jax.tree.leaves(self._params))


def _key(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


class InHostMemory:
  """The pretrained params kept in host memory: each process holds only its devices' slices.

  Every distinct slice this process's devices hold (replicas once) is copied to a NumPy array;
  :meth:`leaves` puts one leaf at a time back on the devices in its original sharding, so a
  device holds at most one leaf's shard of the copy, and only while that leaf is compared.

  Args:
    params: the pretrained params (global arrays with shardings).
  """

  def __init__(self, params: Any):
    self._leaves = []
    for x in jax.tree.leaves(params):
      slices = {}
      for shard in x.addressable_shards:
        key = _key(shard.index, x.shape)
        if key not in slices:
          # A copy: on CPU np.asarray would be a view that keeps the device buffer alive.
          slices[key] = np.array(shard.data, copy=True)
      self._leaves.append((x.shape, x.sharding, slices))

  @property
  def nbytes(self) -> int:
    """Host bytes this process holds."""
    return sum(a.nbytes for _, _, slices in self._leaves for a in slices.values())

  def leaves(self) -> Iterator[jax.Array]:
    """The pretrained leaves, placed on the devices one at a time as they are consumed."""
    for shape, sharding, slices in self._leaves:
      yield jax.make_array_from_callback(shape, sharding, lambda i: slices[_key(i, shape)])


def pretrained_copy(mode: str, params: Any) -> OnDevices | InHostMemory | None:
  """The pretrained copy for ``--distance-metrics mode`` (None for ``off``).

  Example:
    >>> import jax.numpy as jnp
    >>> copy = pretrained_copy("host", {"w": jnp.zeros(3)})
    >>> distance_from_pretrained({"w": jnp.asarray([0.0, 3.0, 4.0])}, copy)
    {'l2_from_pretrained': 5.0, 'fraction_changed': 0.6666666666666666}
  """
  if mode not in MODES:
    raise ValueError(f"distance metrics {mode!r}: expected one of {', '.join(MODES)}")
  if mode == "off":
    return None
  return OnDevices(params) if mode == "device" else InHostMemory(params)


def distance_from_pretrained(params: Any, pretrained: OnDevices | InHostMemory | None):
  """L2 distance from the pretrained params and the fraction of entries that differ.

  Each leaf is reduced on the devices by one jitted function (float32 sum of squares, exact
  int32 partial counts); the leaves' sums are added on the host in double precision and the
  counts in Python integers, so the count is exact for any model size.

  Args:
    params: the current params.
    pretrained: the copy from :func:`pretrained_copy`; None measures nothing.

  Returns:
    ``{"l2_from_pretrained": float, "fraction_changed": float}``, or ``{}`` without a copy.
  """
  if pretrained is None:
    return {}
  squares, changed, total = 0.0, 0, 0
  for p, r in zip(jax.tree.leaves(params), pretrained.leaves(), strict=True):
    s, counts = _leaf_stats(p, r)
    squares += float(s)
    changed += int(np.asarray(counts, np.int64).sum())
    total += p.size
  return {"l2_from_pretrained": math.sqrt(squares), "fraction_changed": changed / total}


_M1, _M2 = 0x85EBCA6B, 0xC2B2AE35


def _mix(h: jax.Array) -> jax.Array:
  # MurmurHash3's 32-bit finalizer: every input bit flips about half the output bits.
  h = h ^ (h >> 16)
  h = h * jnp.uint32(_M1)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(_M2)
  return h ^ (h >> 16)


def _leaf_hash(x: jax.Array) -> jax.Array:
  """Two independent 32-bit sums of hashed (position, bit pattern) pairs of one array."""
  width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)
  if x.dtype.itemsize == 8:  # two uint32 words per entry, on a new last axis
    bits = bits[..., 0] ^ _mix(bits[..., 1])
  h = bits
  for axis in range(x.ndim):
    position = jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis)
    h = _mix(h ^ _mix(position + jnp.uint32(0x9E3779B9 * (axis + 1) & 0xFFFFFFFF)))
  # uint32 sums wrap: exact modular arithmetic, so the result does not depend on the mesh.
  return jnp.stack(
    [jnp.sum(_mix(h ^ jnp.uint32(s)), dtype=jnp.uint32) for s in (0x1B873593, 0xCC9E2D51)]
  )


@jax.jit
def _tree_hash(leaves: list[jax.Array]) -> list[jax.Array]:
  return [_leaf_hash(x) for x in leaves]


def fingerprint(params: Any) -> str:
  """A hash of the values of the params, the same on any mesh and any number of processes.

  Every entry's bit pattern is hashed with its position and the hashes are summed modulo
  ``2**32`` (twice, with different seeds) on the devices, where the params already are: no file
  is read again and nothing is gathered. The leaves' shapes, dtypes and sums are then hashed
  with SHA-256. Two models that differ in any entry get different fingerprints except with
  probability about ``2**-64``.

  Args:
    params: a pytree of arrays (the pretrained params as loaded).

  Returns:
    A hexadecimal SHA-256 digest.

  Example:
    >>> import jax.numpy as jnp
    >>> a = fingerprint({"w": jnp.arange(4.0)})
    >>> a == fingerprint({"w": jnp.arange(4.0)}), a == fingerprint({"w": jnp.arange(4.0)[::-1]})
    (True, False)
  """
  leaves = jax.tree.leaves(params)
  sums = _tree_hash(leaves)
  text = "\n".join(
    f"{tuple(x.shape)} {x.dtype} {np.asarray(s).tolist()}" for x, s in zip(leaves, sums)
  )
  return hashlib.sha256(text.encode()).hexdigest()
