"""Approximate selection: each block's threshold estimated from a fixed sample of the block.

The exact search needs passes over the scores before the update can be applied. Here the k-th
largest is taken (exactly, by the counting search) over a small fixed sample of every block
instead, so no search runs over the parameters. For the momentum the sample can be read before
the pass, from the sampled entries of the gradient and the old momentum: then the moments, the
mask and the update can be one fused pass (``ApproxSelection.sample_from``). The fraction actually kept deviates from the target by sampling noise:
about ``sqrt(f (1 - f) / s)`` for a sample of ``s`` entries (+-0.0012 at f = 0.1, s = 65536, the
sample of a leaf of 1M entries or more; +-0.005 at s = 4096, the least a leaf gets).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from mofo_jax import _partition
from mofo_jax import _platform
from mofo_jax import _selection
from mofo_jax import _sharding

SAMPLE_SIZE = 65536  # entries sampled per leaf (per tree for a global block), at most
# Smaller leaves are sampled at 1/16 (at least MIN_SAMPLE entries): on CPU the search over the
# samples costs more per entry than the Adam pass, so sampling every leaf fully would dominate.
MIN_SAMPLE = 4096
# Every block of a leaf cut into many blocks gets at least this many samples, and a block no
# larger is ranked whole (exactly): on a sample of s entries the kept fraction deviates by about
# sqrt(f (1 - f) / s) per block (0.009 at f = 0.1), and floor(f * s) stays close to f * s.
MIN_BLOCK_SAMPLE = 1024


def _sample_positions(block_size: int, size: int) -> np.ndarray:
  # A fixed random subset, not a stride: a stride that divides the row length would sample a
  # few columns only, and columns of a weight matrix differ in scale.
  rng = np.random.default_rng(block_size)
  return np.sort(rng.choice(block_size, size=size, replace=False))


def _spec_entries(x: jax.Array) -> tuple[Any, ...] | None:
  """The PartitionSpec entries of ``x`` per axis under Explicit mesh axes, else None."""
  sharding = jax.typeof(x).sharding
  if not _sharding.is_explicit(getattr(sharding, "mesh", None)):
    return None
  spec = tuple(sharding.spec)
  return spec + (None,) * (x.ndim - len(spec))


def _sample(view: jax.Array, keep: tuple[int, ...], size: int) -> jax.Array:
  """``[*block_dims, size]``: the same ``size`` positions of every block of ``view``, gathered
  without reshaping the view (a reshape of an Explicit-sharded operand is not supported)."""
  rest = [i for i in range(view.ndim) if i not in keep]
  blocks = jnp.transpose(view, tuple(keep) + tuple(rest))
  rest_shape = tuple(view.shape[i] for i in rest)
  flat = _sample_positions(math.prod(rest_shape), size)
  index = tuple(jnp.asarray(i, jnp.int32) for i in np.unravel_index(flat, rest_shape))
  entries = _spec_entries(view)
  out_sharding = None if entries is None else P(*[entries[i] for i in keep], None)
  return blocks.at[(slice(None),) * len(keep) + index].get(out_sharding=out_sharding)


def sampled_thresholds(
  sources: Sequence[tuple[jax.Array, ...]],
  specs: Sequence[_partition.BlockSpec],
  fraction: jax.typing.ArrayLike,
  combine: Callable[..., jax.Array],
  *,
  global_block: bool = False,
  sample_size: int = SAMPLE_SIZE,
) -> list[jax.Array]:
  """Per leaf, the block-shaped threshold: the top-``fraction`` threshold of a sample of each
  block, or of the whole block where the sample would not be smaller.

  A leaf's scores are ``combine(*sources)``, elementwise; only the sampled entries of the
  sources are read and combined, so nothing of parameter size is computed here.
  """
  views = [
    tuple(jnp.reshape(x, spec.view_shape(x.shape)) for x in srcs)
    for srcs, spec in zip(sources, specs)
  ]

  def whole(srcs):
    return combine(*srcs)

  def sample(srcs, keep, size):
    return combine(*(_sample(x, keep, size) for x in srcs))

  firsts = [srcs[0] for srcs in views]
  keeps = [spec.block_axes(v.shape) for v, spec in zip(firsts, specs)]
  block_shapes = [spec.block_shape(v.shape) for v, spec in zip(firsts, specs)]
  if global_block:
    total = max(1, sum(v.size for v in firsts))
    if total <= sample_size:
      sels = _selection.select_blocks(
        [whole(srcs) for srcs in views],
        [_partition.PER_LEAF] * len(views),
        fraction,
        global_block=True,
      )
      return [sel.threshold for sel in sels]
    sizes = [min(v.size, max(1, -(-sample_size * v.size // total))) for v in firsts]
    samples = [sample(srcs, (), n) for srcs, n in zip(views, sizes)]
    sels = _selection.select_blocks(
      samples, [_partition.PER_LEAF] * len(samples), fraction, global_block=True
    )
    return [sel.threshold.reshape(bs) for sel, bs in zip(sels, block_shapes)]
  arrays, arr_specs, sampled = [], [], []
  for srcs, keep, bs in zip(views, keeps, block_shapes):
    v = srcs[0]
    nblocks = math.prod(bs)
    block_size = v.size // max(1, nblocks)
    budget = min(sample_size, max(MIN_SAMPLE, v.size // 16))
    size = max(MIN_BLOCK_SAMPLE, budget // max(1, nblocks))
    if size >= block_size:
      # The sample would be the whole block: rank it exactly.
      arrays.append(whole(srcs))
      arr_specs.append(_partition.BlockSpec(split_axes=keep))
      sampled.append(False)
    else:
      arrays.append(sample(srcs, keep, size))
      arr_specs.append(_partition.BlockSpec(split_axes=tuple(range(len(keep)))))
      sampled.append(True)
  taus = _grouped_thresholds(
    arrays, arr_specs, [s and not k for s, k in zip(sampled, keeps)], fraction
  )
  out = []
  for tau, bs, v, spec, was_sampled in zip(taus, block_shapes, firsts, specs, sampled):
    if not was_sampled:
      out.append(tau)
    else:
      out.append(
        jax.lax.reshape(
          tau,
          bs,
          out_sharding=_sharding.block_sharding(
            v, _partition.BlockSpec(split_axes=spec.block_axes(v.shape))
          ),
        )
      )
  return out


def _grouped_thresholds(arrays, specs, stackable, fraction) -> list[jax.Array]:
  """Per array, its blocks' thresholds (``select_blocks``), with the ``stackable`` arrays (1-D
  samples of whole leaves, small) of one size and dtype stacked into one array of blocks, so that one
  search ranks all of them: the program has a search per sample size, not per leaf, which
  compiles faster and, on CPU, runs fewer small kernels. Each block's threshold is the same."""
  groups: dict[tuple[int, Any], list[int]] = {}
  for i, (a, s) in enumerate(zip(arrays, stackable)):
    if s:
      groups.setdefault((a.shape[-1], a.dtype), []).append(i)
  rest = [i for i in range(len(arrays)) if not stackable[i]]
  inputs = [arrays[i] for i in rest] + [jnp.stack([arrays[i] for i in g]) for g in groups.values()]
  in_specs = [specs[i] for i in rest] + [_partition.BlockSpec(split_axes=(0,))] * len(groups)
  sels = _selection.select_blocks(inputs, in_specs, fraction)
  out: list[Any] = [None] * len(arrays)
  for i, sel in zip(rest, sels):
    out[i] = sel.threshold
  for g, sel in zip(groups.values(), sels[len(rest) :]):
    for j, i in enumerate(g):
      out[i] = sel.threshold[j]
  return out


@dataclasses.dataclass(frozen=True)
class ApproxSelection:
  """``selection=``: thresholds from a fixed random sample of every block (see module).

  No search runs over the parameters, so the step is about one pass; the fraction kept deviates
  from the target by sampling noise, within 0.01 of the exact selection's for every partition
  kind (tested), and the telemetry reports the entries actually updated.

  Where the momentum is sampled (``score="momentum"``) is a choice of compiler:

  - ``"inputs"``: the sampled entries of the gradient and the old momentum, read before the pass,
    give the thresholds, so the moments, the mask and the update can be one fused pass (what
    XLA:GPU and XLA:TPU make of Adam); the count of kept entries re-reads the stored momentum
    (4 bytes per entry): 32 bytes per entry and the sample's reads, where Adam moves 28.
  - ``"scores"``: the new momentum is computed into a buffer first and sampled there. XLA:CPU
    computes each moment in a loop of its own even for Adam, so this costs no extra pass there,
    and it measured ~1.6x faster than ``"inputs"`` on CPU.
  - ``"auto"``: ``"scores"`` when lowered for CPU, ``"inputs"`` elsewhere.

  Attributes:
    sample_size: entries sampled per leaf (per tree for a global block), at most.
    sample_from: ``"auto"``, ``"inputs"`` or ``"scores"`` (above).

  Example:
    >>> import mofo_jax
    >>> opt = mofo_jax.mofo(1e-3, selection=mofo_jax.ApproxSelection(sample_size=16384))
  """

  sample_size: int = SAMPLE_SIZE
  sample_from: Literal["auto", "inputs", "scores"] = "auto"

  def __post_init__(self):
    if not isinstance(self.sample_size, int) or self.sample_size < 1:
      raise ValueError(f"sample_size={self.sample_size!r} must be a positive int.")
    if self.sample_from not in ("auto", "inputs", "scores"):
      raise ValueError(
        f"sample_from={self.sample_from!r} must be one of 'auto', 'inputs', 'scores'."
      )

  def by_platform(
    self, from_inputs: Callable[..., Any], from_scores: Callable[..., Any], args: tuple = ()
  ) -> Any:
    """``from_inputs(*args)`` or ``from_scores(*args)``, as ``sample_from`` chooses; for
    ``"auto"`` only the branch of the platform lowered for is compiled, and only it is traced
    when that platform is known while tracing (see :mod:`mofo_jax._platform`: both branches
    must then read traced values only from ``args``)."""
    if self.sample_from == "inputs":
      return from_inputs(*args)
    if self.sample_from == "scores":
      return from_scores(*args)
    return _platform.platform_dependent(
      args, cpu=lambda a: from_scores(*a), default=lambda a: from_inputs(*a)
    )

  def initial_thresholds(self, leaves, filtered, specs):
    return _selection.zero_thresholds(leaves, filtered, specs)

  def thresholds(self, sources, combine, filtered, specs, is_global, fraction):
    """Per filtered leaf, the block-shaped threshold, from samples of ``combine(*sources[i])``
    that read only the sampled entries of the sources: the thresholds of a score that is not
    computed yet (:func:`mofo_jax.scale_by_mofo` passes ``(g, old mu)`` and the first moment,
    so the moments, the mask and the update stay one pass)."""
    idx = [i for i, f in enumerate(filtered) if f]
    return sampled_thresholds(
      [sources[i] for i in idx],
      [specs[i] for i in idx],
      fraction,
      combine,
      global_block=is_global,
      sample_size=self.sample_size,
    )

  def select_momentum(self, moments, filtered, specs, is_global, fraction, previous=None):
    """The new moments and the masks of the sampled thresholds of the new first moment, sampled
    where ``sample_from`` says (see :func:`mofo_jax.select_momentum`), and a sixth list: the new
    first moments the update is computed from (``"inputs"``: the expression, fused into the
    update, whose value the first list stores in buffers)."""
    del previous  # every step samples afresh
    if not any(filtered):
      return self._from_scores(moments, filtered, specs, is_global, fraction)
    return self.by_platform(
      lambda m, f: self._from_inputs(m, filtered, specs, is_global, f),
      lambda m, f: self._from_scores(m, filtered, specs, is_global, f),
      (moments, fraction),
    )

  def _from_inputs(self, moments, filtered, specs, is_global, fraction):
    taus = self.thresholds(
      list(zip(moments.grads, moments.mus)),
      moments.first_moment,
      filtered,
      specs,
      is_global,
      fraction,
    )
    # +0.0 or -0.0, added to the old moment: the sample's reads of a donated moment buffer
    # come first by data flow, so XLA need not copy the buffer before updating it in place.
    after = jnp.where(jnp.min(taus[0]) >= 0, 0.0, -0.0)
    mus = [
      moments.first_moment(g, mu + after.astype(mu.dtype) if f else mu)
      for g, mu, f in zip(moments.grads, moments.mus, filtered)
    ]
    nus = [moments.second_moment(g, nu) for g, nu in zip(moments.grads, moments.nus)]
    # The new momentum is an expression: the mask the update applies is computed from it where
    # the update is (one fused pass, as for Adam); the stored momentum is the same expression
    # passed through a loop, a buffer, which the count re-reads (4 bytes per entry), so the
    # count is of the stored values. That the update's fusion computes the value it stores is
    # the compiler's choice, checked on the compiled program (tests/test_mask_consistency.py).
    stored = _selection.materialised_leaves(mus, filtered, moments.count)
    _, kept, thresholds = _selection.masks_from_thresholds(
      stored, filtered, specs, taus, None, is_global
    )
    masks = [
      _selection.block_mask(m, sp, tau) if f else None
      for m, sp, tau, f in zip(mus, specs, thresholds, filtered)
    ]
    return stored, nus, masks, kept, thresholds, mus

  def _from_scores(self, moments, filtered, specs, is_global, fraction):
    mus, nus = _selection.materialised_moments(moments, filtered)
    return (mus, nus, *self.select(mus, filtered, specs, is_global, fraction), mus)

  def select(self, scores, filtered, specs, is_global, fraction, previous=None):
    del previous  # every step samples afresh
    taus = self.thresholds(
      [(s,) for s in scores], lambda x: x, filtered, specs, is_global, fraction
    )
    return _selection.masks_from_thresholds(scores, filtered, specs, taus, None, is_global)
