"""Approximate selection: each block's threshold estimated from a fixed sample of the block.

The exact search needs passes over the scores before the update can be applied. Here the k-th
largest is taken (exactly, by the counting search) over a small fixed sample of every block
instead, so the parameter-sized work is the single fused pass that computes the moments, masks
and applies the update. The fraction actually kept deviates from the target by sampling noise:
about ``sqrt(f (1 - f) / s)`` for a sample of ``s`` entries (+-0.0012 at f = 0.1, s = 65536, the
sample of a leaf of 1M entries or more; +-0.005 at s = 4096, the least a leaf gets).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mofo_jax import _partition
from mofo_jax import _selection

SAMPLE_SIZE = 65536  # entries sampled per leaf (per tree for a global block), at most
# Smaller leaves are sampled at 1/16 (at least MIN_SAMPLE entries): on CPU the search over the
# samples costs more per entry than the Adam pass, so sampling every leaf fully would dominate.
MIN_SAMPLE = 4096


def _sample_positions(block_size: int, size: int) -> np.ndarray:
  # A fixed random subset, not a stride: a stride that divides the row length would sample a
  # few columns only, and columns of a weight matrix differ in scale.
  rng = np.random.default_rng(block_size)
  return np.sort(rng.choice(block_size, size=size, replace=False))


def _sample(view: jax.Array, axes: tuple[int, ...], size: int) -> jax.Array:
  """``[num_blocks, size]``: the same ``size`` positions of every block of ``view``."""
  rest = [i for i in range(view.ndim) if i not in axes]
  blocks = jnp.transpose(view, tuple(axes) + tuple(rest))
  nblocks = math.prod(view.shape[i] for i in axes)
  block_size = math.prod(view.shape[i] for i in rest)
  flat = blocks.reshape(nblocks, block_size)
  if size >= block_size:
    return flat
  return jnp.take(flat, jnp.asarray(_sample_positions(block_size, size)), axis=1)


def sampled_thresholds(
  scores: Sequence[jax.Array],
  specs: Sequence[_partition.BlockSpec],
  fraction: jax.typing.ArrayLike,
  *,
  global_block: bool = False,
  sample_size: int = SAMPLE_SIZE,
) -> list[jax.Array]:
  """Per leaf, the block-shaped threshold: the top-``fraction`` threshold of a sample of each
  block (the whole block when it is smaller than the sample)."""
  views = [jnp.reshape(s, spec.view_shape(s.shape)) for s, spec in zip(scores, specs)]
  axes = [spec.block_axes(v.shape) for v, spec in zip(views, specs)]
  block_shapes = [spec.block_shape(v.shape) for v, spec in zip(views, specs)]
  if global_block:
    total = max(1, sum(v.size for v in views))
    sizes = [max(1, -(-sample_size * v.size // total)) for v in views]
  else:
    sizes = [
      max(1, min(sample_size, max(MIN_SAMPLE, v.size // 16)) // max(1, math.prod(bs)))
      for v, bs in zip(views, block_shapes)
    ]
  samples = [_sample(v, ax, n) for v, ax, n in zip(views, axes, sizes)]
  if global_block:
    sels = _selection.select_blocks(
      [s.reshape(-1) for s in samples],
      [_partition.PER_LEAF] * len(samples),
      fraction,
      global_block=True,
    )
  else:
    sels = _selection.select_blocks(
      samples, [_partition.BlockSpec(axes=(0,))] * len(samples), fraction
    )
  return [sel.threshold.reshape(bs) for sel, bs in zip(sels, block_shapes)]
