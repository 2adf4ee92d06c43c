"""MoFO as optax gradient transformations: ``scale_by_mofo``, ``keep_top_fraction``, ``mofo``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mofo_jax import _approx
from mofo_jax import _counts
from mofo_jax import _local
from mofo_jax import _pallas_selection
from mofo_jax import _partition
from mofo_jax import _selection
from mofo_jax import _telemetry

ScalarOrSchedule = Union[float, jax.Array, Callable[[jax.Array], jax.Array]]
FilterMask = Union[None, Any, Callable[[Any], Any]]

SCORES = ("momentum", "gradient", "update", "random")
SELECTIONS = ("exact", "approx", "local")
SelectionLike = Union[Literal["exact", "approx", "local"], _selection.Selection]


class ScaleByMoFOState(NamedTuple):
  """State of :func:`scale_by_mofo`."""

  count: jax.Array  # [] int32, steps taken so far
  mu: optax.Updates  # like params, mu_dtype (float32 by default): first moment, every entry
  nu: optax.Updates  # like params, nu_dtype (float32 by default): second moment, every entry
  telemetry: _telemetry.MoFOTelemetry  # per leaf, O(1) per block: what the last step did


class KeepTopFractionState(NamedTuple):
  """State of :func:`keep_top_fraction`."""

  count: jax.Array  # [] int32, steps taken so far (drives a fraction schedule)
  telemetry: _telemetry.MoFOTelemetry  # per leaf, O(1) per block: what the last step did


def _fraction_fn(fraction: ScalarOrSchedule) -> Callable[[jax.Array], Any]:
  """Validates ``fraction`` and returns ``count -> fraction``.

  Schedules and traced values are clipped into [0, 1] at run time; a value of 0 (or below)
  updates no entry and NaN makes the filtered updates NaN (see ``_apply_fraction_guard``).
  """
  if isinstance(fraction, bool) or fraction is None or isinstance(fraction, (str, bytes)):
    raise TypeError(f"fraction={fraction!r} must be a number in (0, 1] or a schedule.")
  if isinstance(fraction, (int, float)):
    if not 0.0 < fraction <= 1.0:
      raise ValueError(f"fraction={fraction} must be in (0, 1].")
    return lambda count: float(fraction)
  if callable(fraction):
    return lambda count: jnp.clip(jnp.asarray(fraction(count), jnp.float32), 0.0, 1.0)
  # An array: inject_hyperparams passes its hyperparameters this way. Check it when it is
  # concrete; a traced value is clipped like a schedule's.
  if not isinstance(fraction, jax.core.Tracer):
    value = np.asarray(fraction)
    if not (jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer)):
      raise TypeError(f"fraction={fraction!r} must be a number in (0, 1] or a schedule.")
    if value.shape != () or not 0.0 < float(value) <= 1.0:
      raise ValueError(f"fraction={value} must be a scalar in (0, 1].")
  return lambda count: jnp.clip(jnp.asarray(fraction, jnp.float32), 0.0, 1.0)


def _guard_fraction(
  frac: Any, masks: list[jax.Array | None], kept: list[jax.Array], directions: list[jax.Array]
):
  """A traced fraction of 0 updates nothing, and a NaN one makes the filtered updates NaN (so
  that ``optax.apply_if_finite`` skips the step) instead of keeping one entry per block."""
  if isinstance(frac, float):
    return masks, kept, directions
  positive = frac > 0
  nan = jnp.isnan(frac)
  masks = [None if m is None else (m & positive) | nan for m in masks]
  kept = [
    k if m is None else jnp.where(positive, k, jnp.zeros_like(k)) for m, k in zip(masks, kept)
  ]
  directions = [
    u if m is None else jnp.where(nan, jnp.asarray(jnp.nan, u.dtype), u)
    for m, u in zip(masks, directions)
  ]
  return masks, kept, directions


def _moment_dtype(dtype: Any, name: str) -> jnp.dtype:
  dtype = jnp.dtype(jnp.float32 if dtype is None else dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"{name}={dtype} must be a floating point dtype (e.g. float32 or bfloat16).")
  return dtype


def _leaf_paths(tree: Any) -> list[str]:
  return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _check_float_leaves(params: Any, who: str) -> None:
  for path, leaf in zip(_leaf_paths(params), jax.tree.leaves(params)):
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise TypeError(
        f"{who}: leaf {path} has dtype {jnp.result_type(leaf)}; MoFO needs floating point "
        "leaves. Leave integer and boolean leaves out of the optimizer (optax.masked, "
        "optax.partition, or nnx.Optimizer(..., wrt=nnx.Param))."
      )


def _resolve_filter_mask(filter_mask: FilterMask, tree: Any) -> list[bool]:
  """One Python bool per leaf of ``tree``: True where the leaf is filtered."""
  leaves, treedef = jax.tree.flatten(tree)
  if filter_mask is None:
    return [np.ndim(x) >= 2 for x in leaves]
  mask = filter_mask(tree) if callable(filter_mask) else filter_mask
  try:
    mask_leaves = treedef.flatten_up_to(
      jax.tree.map(lambda m, t: jax.tree.map(lambda _: m, t), mask, tree)
    )
  except (ValueError, TypeError) as e:
    raise ValueError(f"filter_mask must be a prefix of the params pytree of bools: {e}") from e
  out = []
  for path, m in zip(_leaf_paths(tree), mask_leaves):
    if isinstance(m, jax.core.Tracer):
      raise TypeError("filter_mask must hold Python or concrete booleans, not traced values.")
    if not (isinstance(m, (bool, np.bool_)) or (np.ndim(m) == 0 and np.asarray(m).dtype == bool)):
      raise TypeError(f"filter_mask holds {m!r} for leaf {path}; it must hold booleans.")
    out.append(bool(m))
  return out


def _block_specs(
  partition: _partition.Partition, tree: Any, filtered: list[bool]
) -> tuple[bool, list[_partition.BlockSpec]]:
  is_global, specs = _partition.resolve_partition(partition, tree)
  spec_leaves = jax.tree.structure(tree).flatten_up_to(specs)
  for leaf, spec, f in zip(jax.tree.leaves(tree), spec_leaves, filtered):
    if f:
      spec.block_shape(np.shape(leaf))  # raises a clear error now rather than mid-step
  return is_global, spec_leaves


def _init_telemetry(
  tree: Any,
  filtered: list[bool],
  specs: list[_partition.BlockSpec],
  selection: _selection.Selection,
) -> _telemetry.MoFOTelemetry:
  leaves, treedef = jax.tree.flatten(tree)
  return _telemetry.init_telemetry(
    tree, treedef.unflatten(selection.initial_thresholds(leaves, filtered, specs))
  )


def _flatten(tree: Any, filter_mask: FilterMask, partition: _partition.Partition):
  """The leaves of ``tree`` as arrays, its treedef, which leaves are filtered, their BlockSpecs
  and whether the filtered leaves form one global block."""
  leaves, treedef = jax.tree.flatten(tree)
  leaves = [jnp.asarray(x) for x in leaves]  # Python floats, as optax.adamw accepts them
  filtered = _resolve_filter_mask(filter_mask, tree)
  is_global, specs = _block_specs(partition, tree, filtered)
  return leaves, treedef, filtered, specs, is_global


class _Adam(NamedTuple):
  """Adam's moment updates and direction for one step. Build it with :meth:`at`."""

  b1: Any
  b2: Any
  eps: Any
  mu_dtype: jnp.dtype
  nu_dtype: jnp.dtype
  inv_bc1: jax.Array  # [], the direction's dtype: 1 / (1 - b1**t)
  inv_bc2: jax.Array  # [], the direction's dtype: 1 / (1 - b2**t)

  @classmethod
  def at(cls, count: jax.Array, b1, b2, eps, mu_dtype, nu_dtype) -> _Adam:
    """The step numbered ``count`` (1 on the first step)."""
    u_dt = jnp.promote_types(_wide(mu_dtype), _wide(nu_dtype))
    # Bias corrections as reciprocals, computed once and multiplied in: XLA rewrites a division
    # by a broadcast scalar into this only where its fusion allows, so a sharded and an
    # unsharded program would otherwise round differently. Spelled out, every layout computes
    # the same bits.
    inv_bc1 = 1 / (1 - jnp.asarray(b1, u_dt) ** count)
    inv_bc2 = 1 / (1 - jnp.asarray(b2, u_dt) ** count)
    return cls(b1, b2, eps, mu_dtype, nu_dtype, inv_bc1, inv_bc2)

  def first_moment(self, g: jax.Array, mu: jax.Array) -> jax.Array:
    m_dt = _wide(self.mu_dtype)
    return (self.b1 * mu.astype(m_dt) + (1 - self.b1) * g.astype(m_dt)).astype(self.mu_dtype)

  def second_moment(self, g: jax.Array, nu: jax.Array) -> jax.Array:
    v_dt = _wide(self.nu_dtype)
    new = self.b2 * nu.astype(v_dt) + (1 - self.b2) * jnp.square(g.astype(v_dt))
    return new.astype(self.nu_dtype)

  def direction(self, m: jax.Array, v: jax.Array) -> jax.Array:
    u_dt = self.inv_bc1.dtype
    return (m.astype(u_dt) * self.inv_bc1) / (jnp.sqrt(v.astype(u_dt) * self.inv_bc2) + self.eps)


def _wide(dtype: Any) -> jnp.dtype:
  """Moments are computed in their own dtype when wider than float32 (float64 under x64), else
  in float32."""
  return jnp.promote_types(dtype, jnp.float32)


class _Ranking(NamedTuple):
  """What the score stages need besides the moments: how, and which blocks, to rank."""

  selection: _selection.Selection
  filtered: list[bool]  # per leaf: ranked in blocks (True) or dense
  specs: list[_partition.BlockSpec]  # per leaf: its blocks
  is_global: bool  # the filtered leaves are one block
  fraction: Any  # Python float or [] float32: fraction kept per block
  previous: list[jax.Array]  # per leaf: the last step's thresholds
  seed: Any  # int or [] int: seed of score="random"

  def select(self, scores: list[jax.Array]):
    return self.selection.select(
      scores, self.filtered, self.specs, self.is_global, self.fraction, previous=self.previous
    )


class _Step(NamedTuple):
  """One step's new moments, directions and selection, per leaf."""

  mus: list[jax.Array]  # like the params, mu_dtype: the new first moments
  nus: list[jax.Array]  # like the params, nu_dtype: the new second moments
  directions: list[jax.Array]  # like the params, float32 (or wider): Adam's direction
  masks: list[jax.Array | None]  # like the params, bool: entries updated (None: dense leaf)
  kept: list[jax.Array]  # int32[2] count limbs: entries updated
  thresholds: list[jax.Array]  # float32 of the leaf's block shape ([] for dense leaves)


def _by_momentum(moments: _selection.MomentUpdate, adam: _Adam, r: _Ranking) -> _Step:
  """MoFO: rank the new first moment, as the selection computes it (possibly fused)."""
  mus, nus, masks, kept, thresholds, *fused = _selection.select_momentum(
    r.selection, moments, r.filtered, r.specs, r.is_global, r.fraction, previous=r.previous
  )
  # A sixth list: the same first moments as expressions the update's fusion may compute itself.
  directions = [adam.direction(m, v) for m, v in zip(fused[0] if fused else mus, nus)]
  return _Step(mus, nus, directions, masks, kept, thresholds)


def _plain_moments(moments: _selection.MomentUpdate, adam: _Adam):
  mus = [adam.first_moment(g, mu) for g, mu in zip(moments.grads, moments.mus)]
  nus = [adam.second_moment(g, nu) for g, nu in zip(moments.grads, moments.nus)]
  return mus, nus, [adam.direction(m, v) for m, v in zip(mus, nus)]


def _by_gradient(moments: _selection.MomentUpdate, adam: _Adam, r: _Ranking) -> _Step:
  """The paper's ablation: rank the gradient."""
  mus, nus, directions = _plain_moments(moments, adam)
  masks, kept, thresholds = r.select(
    _selection.materialised_leaves(moments.grads, r.filtered, moments.count)
  )
  return _Step(mus, nus, directions, masks, kept, thresholds)


def _by_update(moments: _selection.MomentUpdate, adam: _Adam, r: _Ranking) -> _Step:
  """The paper's ablation: rank Adam's direction (the update applied is the ranked value)."""
  mus, nus, directions = _plain_moments(moments, adam)
  directions = _selection.materialised_leaves(directions, r.filtered, moments.count)
  masks, kept, thresholds = r.select(directions)
  return _Step(mus, nus, directions, masks, kept, thresholds)


def _by_random(moments: _selection.MomentUpdate, adam: _Adam, r: _Ranking) -> _Step:
  """The paper's ablation (randomized block coordinate descent): a fresh Bernoulli(f) mask."""
  mus, nus, directions = _plain_moments(moments, adam)
  base = jax.random.fold_in(jax.random.PRNGKey(r.seed), moments.count)
  masks, kept = [], []
  for i, (u, f) in enumerate(zip(directions, r.filtered)):
    if f:
      mask = jax.random.uniform(jax.random.fold_in(base, i), u.shape) < r.fraction
      masks.append(mask)
      kept.append(_counts.to_array(_counts.count_true(mask, tuple(range(u.ndim)), False)))
    else:
      masks.append(None)
      kept.append(_counts.to_array(_counts.constant(u.size)))
  thresholds = r.selection.initial_thresholds(directions, r.filtered, r.specs)
  return _Step(mus, nus, directions, masks, kept, thresholds)


_SCORE_STAGES = {
  "momentum": _by_momentum,
  "gradient": _by_gradient,
  "update": _by_update,
  "random": _by_random,
}


def _apply_masks(directions, masks, leaves) -> list[jax.Array]:
  """The updates: the direction where the mask holds, exactly zero elsewhere, in the incoming
  gradient's dtype."""
  return [
    (u if m is None else jnp.where(m, u, 0.0)).astype(g.dtype)
    for u, m, g in zip(directions, masks, leaves)
  ]


def resolve_selection(selection: SelectionLike) -> _selection.Selection:
  """The selection object for ``selection=``: ``"exact"``, ``"approx"`` and ``"local"`` are
  shortcuts for ``PallasSelection()`` (``ExactSelection()``'s results, by Pallas kernels where
  the program is lowered for one TPU and a leaf allows them), ``ApproxSelection()`` (on TPU
  its one fused XLA pass moves fewer bytes than ``PallasApproxSelection()``'s kernel, which
  stays available) and ``LocalSelection()``."""
  if isinstance(selection, str):
    shortcuts = {
      "exact": _pallas_selection.PallasSelection,
      "approx": _approx.ApproxSelection,
      "local": _local.LocalSelection,
    }
    if selection in shortcuts:
      return shortcuts[selection]()
  elif callable(getattr(selection, "select", None)) and callable(
    getattr(selection, "initial_thresholds", None)
  ):
    return selection
  raise ValueError(
    f"selection={selection!r} must be one of {SELECTIONS} or a selection object "
    "(mofo_jax.ExactSelection, ApproxSelection or local_selection(mesh, specs))."
  )


def scale_by_mofo(
  fraction: ScalarOrSchedule = 0.1,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  *,
  filter_mask: FilterMask = None,
  partition: _partition.Partition = None,
  score: str = "momentum",
  mu_dtype: Any = None,
  nu_dtype: Any = None,
  seed: int = 0,
  selection: SelectionLike = "exact",
) -> optax.GradientTransformation:
  r"""Rescales updates by Adam and keeps only the entries with the largest momentum per block.

  With gradient :math:`g_t` and step :math:`t`, every entry of every leaf tracks Adam's moments

  .. math::
    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \quad
    u_t = \frac{m_t / (1-\beta_1^t)}{\sqrt{v_t / (1-\beta_2^t)} + \epsilon}.

  In each block of n entries of a filtered leaf, with :math:`k = \max(1, \lfloor f n \rfloor)`
  and :math:`\tau` the k-th largest :math:`|m_t|` of the block, the output is
  :math:`F \odot u_t` with :math:`F = (|m_t| \ge \tau)`: ties at :math:`\tau` are all kept. Other
  entries get exactly zero, so after ``scale_by_learning_rate`` (and no weight decay) they do not
  move at all. Unfiltered leaves get the dense Adam update. The threshold is found by counting
  (no sort, no ``lax.top_k``); see :func:`mofo_jax.top_fraction_mask`.

  NaN or Inf gradients never hang or crash the step (the search makes a fixed number of passes);
  a NaN momentum ranks above every finite one, so it is selected and reaches the params as it
  would with Adam. Wrap the optimizer in ``optax.apply_if_finite`` to skip such steps.

  Args:
    fraction: fraction f of each block to update, in (0, 1]; a float, or a schedule
      ``count -> f`` whose values are clipped into [0, 1] (k is at least 1).
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the denominator, outside the square root.
    filter_mask: which leaves are filtered: a pytree (a prefix of the params) of bools or a
      callable ``params -> pytree``. Default: leaves with ``ndim >= 2`` (matrices, embeddings,
      stacked layers) are filtered; vectors and scalars (biases, norm scales) get dense Adam.
    partition: how a filtered leaf is cut into blocks: ``None``/``"leaf"`` (one block per leaf,
      the paper's choice), ``"global"`` (one block over all filtered leaves), a
      :class:`mofo_jax.BlockSpec`, or a pytree/callable of them.
    score: what to rank by: ``"momentum"`` (MoFO), ``"gradient"``, ``"update"`` (Adam's
      :math:`|u_t|`), or ``"random"`` (a fresh Bernoulli(f) mask per step: randomized block
      coordinate descent). The last three are the paper's ablations.
    mu_dtype: dtype of the first moment; default float32.
    nu_dtype: dtype of the second moment; default float32.
    seed: seed of the random masks of ``score="random"``.
    selection: how thresholds are found, a :class:`mofo_jax.Selection` or a shortcut:
      ``"exact"`` = :class:`mofo_jax.PallasSelection` ``()``, the k-th largest per block by
      counting as :class:`mofo_jax.ExactSelection` ``()`` does it (with the moments and the
      first count fused into one Pallas kernel pass on one TPU; on sharded leaves this costs small all-reduces of counts; its ``method`` and
      ``radix_bits`` are set on the object); ``"approx"`` = :class:`mofo_jax.ApproxSelection`
      ``()`` (off CPU the moments, the mask and the update in one fused pass, and a re-read of
      the stored momentum for the count; :class:`mofo_jax.PallasApproxSelection` is its
      opt-in Pallas kernel): the k-th largest of a fixed random sample of each block (65536 entries per leaf of
      1M entries or more, 1/16 of smaller leaves, at least 4096; at least 1024 per block of a
      split leaf; the whole block if smaller), so no search runs over the parameters, and the
      fraction kept is within 0.01 of the exact selection's (the telemetry reports the entries
      actually updated); or per shard with no communication, which is not the paper's MoFO
      (see :func:`mofo_jax.local_selection`): ``mofo_jax.local_selection(mesh, specs)``, or
      ``"local"`` to read the mesh and specs from the arrays' types under Explicit mesh axes.

  Under ``optax.inject_hyperparams`` every numeric argument (fraction, b1, b2, eps, seed) may be
  injected; name a callable ``filter_mask`` or ``partition`` in ``static_args``, or it would be
  taken for a schedule.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`ScaleByMoFOState`. Updates keep
    the dtype of the incoming gradients.

  Example:
    >>> import jax, jax.numpy as jnp, optax, mofo_jax
    >>> params = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}
    >>> opt = optax.chain(mofo_jax.scale_by_mofo(fraction=0.25), optax.scale(-0.1))
    >>> state = opt.init(params)
    >>> grads = jax.tree.map(lambda p: jnp.arange(p.size, dtype=p.dtype).reshape(p.shape), params)
    >>> updates, state = opt.update(grads, state, params)
    >>> int((updates["w"] != 0).sum()), int((updates["b"] != 0).sum())
    (3, 3)

  References:
    Chen et al., `MoFO: Momentum-Filtered Optimizer for Mitigating Forgetting in LLM
    Fine-Tuning <https://arxiv.org/abs/2407.20999>`_, TMLR 2025.
  """
  if score not in SCORES:
    raise ValueError(f"score={score!r} must be one of {SCORES}.")
  selection = resolve_selection(selection)
  fraction_at = _fraction_fn(fraction)
  mu_dtype = _moment_dtype(mu_dtype, "mu_dtype")
  nu_dtype = _moment_dtype(nu_dtype, "nu_dtype")

  def init_fn(params):
    _check_float_leaves(params, "scale_by_mofo")
    filtered = _resolve_filter_mask(filter_mask, params)
    _, specs = _block_specs(partition, params, filtered)
    return ScaleByMoFOState(
      count=jnp.zeros([], jnp.int32),
      mu=optax.tree.zeros_like(params, dtype=mu_dtype),
      nu=optax.tree.zeros_like(params, dtype=nu_dtype),
      telemetry=_init_telemetry(params, filtered, specs, selection),
    )

  def update_fn(updates, state, params=None):
    del params
    leaves, treedef, filtered, specs, is_global = _flatten(updates, filter_mask, partition)
    count_inc = optax.safe_increment(state.count)
    frac = fraction_at(state.count)
    adam = _Adam.at(count_inc, b1, b2, eps, mu_dtype, nu_dtype)
    moments = _selection.MomentUpdate(
      grads=leaves,
      mus=treedef.flatten_up_to(state.mu),
      nus=treedef.flatten_up_to(state.nu),
      first_moment=adam.first_moment,
      second_moment=adam.second_moment,
      count=state.count,
    )
    ranking = _Ranking(
      selection=selection,
      filtered=filtered,
      specs=specs,
      is_global=is_global,
      fraction=frac,
      previous=treedef.flatten_up_to(state.telemetry.threshold),
      seed=seed,
    )
    step = _SCORE_STAGES[score](moments, adam, ranking)
    masks, kept, directions = _guard_fraction(frac, step.masks, step.kept, step.directions)
    telemetry = state.telemetry._replace(
      num_updated=treedef.unflatten(kept), threshold=treedef.unflatten(step.thresholds)
    )
    new_state = ScaleByMoFOState(
      count=count_inc,
      mu=treedef.unflatten(step.mus),
      nu=treedef.unflatten(step.nus),
      telemetry=telemetry,
    )
    return treedef.unflatten(_apply_masks(directions, masks, leaves)), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def keep_top_fraction(
  fraction: ScalarOrSchedule = 0.1,
  *,
  filter_mask: FilterMask = None,
  partition: _partition.Partition = None,
  selection: SelectionLike = "exact",
) -> optax.GradientTransformation:
  r"""Keeps, in every block, only the incoming updates of largest magnitude; zeroes the rest.

  The selection of :func:`scale_by_mofo` applied to the updates themselves, so that any optimizer
  can be filtered: in a block of n entries with :math:`k = \max(1, \lfloor f n \rfloor)` and
  :math:`\tau` the k-th largest :math:`|u|`, the output is :math:`(|u| \ge \tau) \odot u`.

  Args:
    fraction: fraction of each block to keep, in (0, 1], or a schedule (clipped into [0, 1]).
    filter_mask: which leaves are filtered (default ``ndim >= 2``); others pass unchanged.
    partition: how a leaf is cut into blocks (see :func:`scale_by_mofo`).
    selection: how thresholds are found (see :func:`scale_by_mofo`).

  Returns:
    An ``optax.GradientTransformation`` with a :class:`KeepTopFractionState`.

  Example:
    >>> import jax.numpy as jnp, optax, mofo_jax
    >>> opt = optax.chain(optax.sgd(1.0), mofo_jax.keep_top_fraction(0.5))
    >>> params = {"w": jnp.zeros((2, 2))}
    >>> state = opt.init(params)
    >>> updates, _ = opt.update({"w": jnp.array([[1.0, -4.0], [3.0, 2.0]])}, state, params)
    >>> updates["w"]
    Array([[ 0.,  4.],
           [-3.,  0.]], dtype=float32)

  References:
    Chen et al., `MoFO: Momentum-Filtered Optimizer for Mitigating Forgetting in LLM
    Fine-Tuning <https://arxiv.org/abs/2407.20999>`_, TMLR 2025.
  """
  selection = resolve_selection(selection)
  fraction_at = _fraction_fn(fraction)

  def init_fn(params):
    _check_float_leaves(params, "keep_top_fraction")
    filtered = _resolve_filter_mask(filter_mask, params)
    _, specs = _block_specs(partition, params, filtered)
    return KeepTopFractionState(
      count=jnp.zeros([], jnp.int32), telemetry=_init_telemetry(params, filtered, specs, selection)
    )

  def update_fn(updates, state, params=None):
    del params
    leaves, treedef, filtered, specs, is_global = _flatten(updates, filter_mask, partition)
    leaves = _selection.materialised_leaves(leaves, filtered, state.count)
    frac = fraction_at(state.count)
    previous = treedef.flatten_up_to(state.telemetry.threshold)
    masks, kept, thresholds = selection.select(
      leaves, filtered, specs, is_global, frac, previous=previous
    )
    masks, kept, leaves = _guard_fraction(frac, masks, kept, leaves)
    new = _apply_masks(leaves, masks, leaves)
    telemetry = state.telemetry._replace(
      num_updated=treedef.unflatten(kept), threshold=treedef.unflatten(thresholds)
    )
    return treedef.unflatten(new), KeepTopFractionState(
      count=optax.safe_increment(state.count), telemetry=telemetry
    )

  return optax.GradientTransformation(init_fn, update_fn)


def mofo(
  learning_rate: ScalarOrSchedule,
  fraction: ScalarOrSchedule = 0.1,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: float = 0.0,
  *,
  weight_decay_mask: Any = None,
  filter_mask: FilterMask = None,
  partition: _partition.Partition = None,
  score: str = "momentum",
  mu_dtype: Any = None,
  nu_dtype: Any = None,
  seed: int = 0,
  selection: SelectionLike = "exact",
) -> optax.GradientTransformation:
  r"""The MoFO optimizer: Adam whose step moves only the largest-momentum entries of each block.

  .. math::
    p_{t} = p_{t-1} (1 - \eta_t \lambda) - \eta_t \, F_t \odot u_t

  with :math:`u_t` Adam's direction and :math:`F_t` the top-``fraction`` momentum mask of
  :func:`scale_by_mofo`. Weight decay :math:`\lambda` is decoupled and applies to every entry, as
  in ``optax.adamw`` and the authors' code (the paper's experiments use :math:`\lambda = 0`, and
  then unselected entries stay bit-for-bit where they were).

  Args:
    learning_rate: a float or a schedule ``count -> lr``.
    fraction: fraction of each block updated per step, in (0, 1], or a schedule.
    b1: decay of the first moment.
    b2: decay of the second moment.
    eps: added to the denominator.
    weight_decay: decoupled weight decay.
    weight_decay_mask: pytree or callable choosing the leaves decayed (as in ``optax.adamw``).
    filter_mask: which leaves are filtered (default: ``ndim >= 2``).
    partition: blocks of the top-k (default: one per leaf); see :func:`scale_by_mofo`.
    score: ``"momentum"``, ``"gradient"``, ``"update"`` or ``"random"``.
    mu_dtype: dtype of the first moment (default float32).
    nu_dtype: dtype of the second moment (default float32).
    seed: seed of ``score="random"``.
    selection: how thresholds are found (see :func:`scale_by_mofo`).

  Returns:
    ``optax.chain(scale_by_mofo(...), add_decayed_weights(...), scale_by_learning_rate(...))``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, mofo_jax
    >>> params = {"w": jnp.ones((10, 10))}
    >>> opt = optax.chain(optax.clip_by_global_norm(1.0), mofo_jax.mofo(1e-2, fraction=0.1))
    >>> state = opt.init(params)
    >>> grads = jax.grad(lambda p: jnp.sum(jnp.arange(100.0).reshape(10, 10) * p["w"]))(params)
    >>> updates, state = opt.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> int((params["w"] != 1.0).sum())
    10

  References:
    Chen et al., `MoFO: Momentum-Filtered Optimizer for Mitigating Forgetting in LLM
    Fine-Tuning <https://arxiv.org/abs/2407.20999>`_, TMLR 2025.
  """
  return optax.chain(
    scale_by_mofo(
      fraction,
      b1,
      b2,
      eps,
      filter_mask=filter_mask,
      partition=partition,
      score=score,
      mu_dtype=mu_dtype,
      nu_dtype=nu_dtype,
      seed=seed,
      selection=selection,
    ),
    optax.add_decayed_weights(weight_decay, weight_decay_mask),
    optax.scale_by_learning_rate(learning_rate),
  )
