"""Approximate selection with Adam's moments and the count of kept entries in one Pallas pass.

Opt-in: ``selection="approx"`` is :class:`mofo_jax.ApproxSelection`, whose XLA path moves fewer
bytes on TPU. That path takes each block's threshold from a sample of the gradient and the old
momentum, read before the pass, and XLA fuses the moments, the mask and the update into one
pass, as it does Adam's whole step (with ``apply_updates``); the count re-reads the stored
momentum. A kernel cannot see the rest of the step: here the fused kernel of
:mod:`mofo_jax._pallas_selection` reads g, m and v once, writes the new m and v over the old
ones and counts, per block, the new ``|m|``'s keys at or above the sampled threshold, and XLA
then re-reads m and v for the masked update. Measured on the Llama-3.2-1B-shaped tree compiled
for one TPU v6e chip (``benchmarks/step_time.py --tpu-topology v6e:1x1 --modes
adamw,approx-xla,approx-kernel``, device-memory bytes per parameter): 39.9 here, 35.7 for the
XLA path, 28.0 for ``optax.adamw``.

The leaves the kernels take are those of :class:`mofo_jax.PallasSelection` (grouped the same
way, on sharded leaves shard by shard with the counts summed over the mesh, see
:mod:`mofo_jax._pallas_sharded`); the others, a global block, several devices without a known
layout and every platform but TPU (``"auto"``) go through the ``fallback``
:class:`mofo_jax.ApproxSelection`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax.numpy as jnp
from jax import lax

from mofo_jax import _approx
from mofo_jax import _counts
from mofo_jax import _pallas_selection as _ps
from mofo_jax import _pallas_sharded
from mofo_jax import _selection


def kept_group(
  gs, mus, nus, taus, t: _ps.Tiling, first_moment, second_moment, *, interpret=False, psum_axes=()
):
  """One fused pass over a group of leaves sharing the tiling ``t`` (see
  :func:`mofo_jax._pallas_selection.fused_moments`): per leaf the new m and v, and per block
  (``[len(gs) * num_blocks]``, leaf-major) the count of entries whose new ``|m|`` reaches the
  block's threshold in ``taus`` (float32, the same order), summed over the mesh axes
  ``psum_axes`` (shards of blocks, inside ``shard_map``)."""
  keys = lax.bitcast_convert_type(taus.astype(jnp.float32), jnp.uint32)
  ms, vs, tiles = _ps.fused_moments(
    gs, mus, nus, _ps._signed(keys), t, first_moment, second_moment, interpret=interpret
  )
  counts = _ps.block_counts(tiles, t, 1, psum_axes)
  return ms, vs, _counts.Count(*(a[:, 0] for a in counts))


@dataclasses.dataclass(frozen=True)
class PallasApproxSelection:
  """``selection=``: :class:`mofo_jax.ApproxSelection`'s sampled thresholds, with the moments and
  the count of kept entries fused into one Pallas TPU kernel pass where a leaf allows it (see
  module), the ``fallback`` selection elsewhere. Opt-in: ``"approx"`` is the XLA path, which
  moves fewer bytes on TPU (see module).

  The thresholds are the fallback's (sampled from the gradient and the old momentum before the
  pass); masks, counts, thresholds and new moments equal ``ApproxSelection(sample_from="inputs")``'s
  bit for bit in interpret mode (tested), except the sign of a zero new momentum where the old
  one and the gradient are both ``-0.0`` (the XLA path adds ``+0.0`` to the old momentum, to
  order its reads before the in-place update).

  Sharded leaves take the kernels shard by shard as in :class:`mofo_jax.PallasSelection`
  (``mesh`` and ``specs``, or Explicit mesh axes), with the same results as one device.

  Attributes:
    kernel: ``"auto"``: the kernels when the program is lowered for TPU
      (:mod:`mofo_jax._platform`), the fallback on every other platform; ``"always"``: the
      kernels wherever they apply (on CPU only with ``interpret``).
    interpret: run the kernels in Pallas's interpreter (tests on CPU).
    tile_entries: entries per VMEM tile (see :func:`mofo_jax._pallas_selection.tiling`).
    fallback: the :class:`mofo_jax.ApproxSelection` whose thresholds (``sample_size``) are used,
      and which selects the leaves the kernels do not take.
    mesh: the mesh the params are sharded over (with ``specs``); None: read from the arrays'
      types under Explicit mesh axes, else the kernels run on one device only.
    specs: the params' pytree of ``PartitionSpec`` or ``NamedSharding`` (kept as a tuple).

  Example:
    >>> import mofo_jax
    >>> opt = mofo_jax.mofo(1e-3, selection=mofo_jax.PallasApproxSelection())
  """

  kernel: Literal["auto", "always"] = "auto"
  interpret: bool = False
  tile_entries: int = _ps.TILE_ENTRIES
  fallback: _approx.ApproxSelection = dataclasses.field(default_factory=_approx.ApproxSelection)
  mesh: Any = None
  specs: Any = None

  def __post_init__(self):
    object.__setattr__(self, "specs", _pallas_sharded.flat_specs(self.specs))
    _ps.check_fields(self.kernel, self.tile_entries)
    if not isinstance(self.fallback, _approx.ApproxSelection):
      raise ValueError(f"fallback={self.fallback!r} must be an ApproxSelection.")

  def initial_thresholds(self, leaves, filtered, specs):
    return self.fallback.initial_thresholds(leaves, filtered, specs)

  def select(self, scores, filtered, specs, is_global, fraction, previous=None):
    return self.fallback.select(scores, filtered, specs, is_global, fraction, previous=previous)

  def select_momentum(self, moments, filtered, specs, is_global, fraction, previous=None):
    """The new moments and the masks of the sampled thresholds of the new first moment (see
    :func:`mofo_jax.select_momentum`), by the kernels for the leaves they take."""
    tilings, shards = _ps.kernel_tilings(
      moments, filtered, specs, is_global, self.kernel, self.tile_entries, self.mesh, self.specs
    )

    def fallback(moments, fraction, previous):
      return self.fallback.select_momentum(
        moments, filtered, specs, is_global, fraction, previous=previous
      )

    def kernels(moments, fraction, previous):
      return self._with_kernels(moments, filtered, specs, is_global, fraction, tilings, shards)

    args = (moments, fraction, previous)
    return _selection.kernels_or_fallback(self.kernel, any(tilings), kernels, fallback, "tpu", args)

  def _with_kernels(self, moments, filtered, specs, is_global, fraction, tilings, shards):
    # The XLA path's samples from its inputs (the thresholds are the same either way).
    inputs = dataclasses.replace(self.fallback, sample_from="inputs")
    results = _selection.select_momentum_rest(
      inputs, moments, filtered, specs, is_global, fraction, None, [t is not None for t in tilings]
    )
    taken = [i for i, t in enumerate(tilings) if t is not None]
    taus = inputs.thresholds(
      [(moments.grads[i], moments.mus[i]) for i in taken],
      moments.first_moment,
      [True] * len(taken),
      [specs[i] for i in taken],
      is_global,
      fraction,
    )
    tau_of = dict(zip(taken, taus))
    dtypes = [(g.dtype, mu.dtype, nu.dtype) for g, mu, nu in zip(*moments[:3])]
    shapes = _ps.local_shapes(moments, shards)
    for t, idx in _ps.groups(shapes, specs, dtypes, tilings, self.tile_entries, shards):
      where = shards[idx[0]]

      def body(frac, leaves, blocks, t=t, idx=idx, where=where):
        del frac  # the thresholds are sampled before the pass
        g, mu, nu = ([x.reshape(t.rows, t.cols) for x in xs] for xs in leaves)
        ms, vs, counts = kept_group(
          g,
          mu,
          nu,
          jnp.concatenate([tau.reshape(-1) for tau in blocks[0]]),
          t,
          moments.first_moment,
          moments.second_moment,
          interpret=self.interpret,
          psum_axes=() if where is None else where.reduce_axes,
        )
        return _ps.unstack(ms, vs, counts, t, specs[idx[0]], leaves[0][0].shape)

      (ms, vs), (his, los) = _pallas_sharded.run(
        body,
        where,
        [[x[i] for i in idx] for x in (moments.grads, moments.mus, moments.nus)],
        [[tau_of[i] for i in idx]],
        None,
      )
      for j, i in enumerate(idx):
        count = _counts.Count(his[j], los[j])
        _selection.put_leaf(results, i, specs[i], ms[j], vs[j], tau_of[i], count)
    # The sixth list (see ApproxSelection.select_momentum), here the stored moments: the
    # kernels' are buffers already.
    return (*results, results[0])
