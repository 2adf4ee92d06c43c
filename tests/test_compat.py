"""mofo_jax inside the optax and flax tooling users already have."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mofo_jax


def _tree(seed=0):
  rng = np.random.default_rng(seed)
  return {
    "w": jnp.asarray(rng.normal(size=(8, 12)), jnp.float32),
    "b": jnp.asarray(rng.normal(size=(12,)), jnp.float32),
  }


def _grads(step):
  return _tree(100 + step)


def _run(opt, steps=4, params=None):
  params = _tree() if params is None else params
  state = opt.init(params)
  for t in range(steps):
    updates, state = opt.update(_grads(t), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_chain_with_clip_by_global_norm_clips_before_the_moments():
  chained, _ = _run(optax.chain(optax.clip_by_global_norm(0.5), mofo_jax.mofo(1e-2, 0.2)))
  params, state = _tree(), None
  opt = mofo_jax.mofo(1e-2, 0.2)
  state = opt.init(params)
  for t in range(4):
    g = _grads(t)
    scale = jnp.minimum(1.0, 0.5 / optax.tree.norm(g))
    updates, state = opt.update(jax.tree.map(lambda x: x * scale, g), state, params)
    params = optax.apply_updates(params, updates)
  chex.assert_trees_all_close(chained, params, rtol=1e-6)


def test_inject_hyperparams_over_learning_rate_and_fraction_without_recompiling():
  opt = optax.inject_hyperparams(mofo_jax.mofo)(learning_rate=1e-2, fraction=0.1)
  params = _tree()
  state = opt.init(params)
  traces = []

  @jax.jit
  def step(params, state, g):
    traces.append(1)
    updates, state = opt.update(g, state, params)
    return optax.apply_updates(params, updates), state, updates

  for t, frac in enumerate([0.1, 0.25, 0.5]):
    state.hyperparams["fraction"] = jnp.asarray(frac)
    params, state, updates = step(params, state, _grads(t))
    assert int((updates["w"] != 0).sum()) == int(frac * 96)
  assert len(traces) == 1
  # Same trajectory as the plain optimizer at the first setting.
  plain, _ = _run(mofo_jax.mofo(1e-2, 0.1), steps=3)
  injected, _ = _run(
    optax.inject_hyperparams(mofo_jax.mofo)(learning_rate=1e-2, fraction=0.1), steps=3
  )
  chex.assert_trees_all_close(plain, injected, rtol=1e-6)


def test_schedules_for_learning_rate_and_fraction():
  frac = optax.linear_schedule(0.5, 0.1, transition_steps=2)
  opt = mofo_jax.mofo(optax.constant_schedule(1e-2), fraction=frac)
  params = _tree()
  state = opt.init(params)
  kept = []
  for t in range(3):
    updates, state = opt.update(_grads(t), state, params)
    kept.append(int((updates["w"] != 0).sum()))
  assert kept == [48, 28, 9]


def test_multisteps_accumulates_then_takes_one_mofo_step():
  multi = optax.MultiSteps(mofo_jax.mofo(1e-2, 0.2), every_k_schedule=2)
  params = _tree()
  state = multi.init(params)
  for t in range(2):
    updates, state = multi.update(_grads(t), state, params)
    if t == 0:
      assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))
    params = optax.apply_updates(params, updates)
  single, _ = _run(mofo_jax.mofo(1e-2, 0.2), steps=1, params=_tree())
  mean_grads = jax.tree.map(lambda a, b: (a + b) / 2, _grads(0), _grads(1))
  opt = mofo_jax.mofo(1e-2, 0.2)
  updates, _ = opt.update(mean_grads, opt.init(_tree()), _tree())
  chex.assert_trees_all_close(params, optax.apply_updates(_tree(), updates), rtol=1e-6)
  del single


def test_apply_if_finite_protects_params_from_nan_gradients():
  opt = optax.apply_if_finite(mofo_jax.mofo(1e-2, 0.2), max_consecutive_errors=5)
  params = _tree()
  state = opt.init(params)
  bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), _grads(0))
  updates, state = opt.update(bad, state, params)
  after = optax.apply_updates(params, updates)
  chex.assert_trees_all_equal(after, params)
  assert int(state.notfinite_count) == 1
  updates, state = opt.update(_grads(1), state, after)
  assert all(bool(jnp.isfinite(u).all()) for u in jax.tree.leaves(updates))


def test_nan_gradients_without_protection_reach_only_selected_entries():
  opt = mofo_jax.mofo(1e-2, 0.1)
  params = _tree()
  g = _grads(0)
  g["w"] = g["w"].at[0, 0].set(jnp.nan)
  updates, state = jax.jit(opt.update)(g, opt.init(params), params)
  new = optax.apply_updates(params, updates)
  assert bool(jnp.isnan(new["w"][0, 0]))
  assert int(jnp.isnan(new["w"]).sum()) == 1
  assert int((new["w"] != params["w"]).sum()) == int(0.1 * 96)


def test_masked_and_partition_keep_no_state_for_frozen_leaves():
  frozen = {"w": False, "b": True}
  masked = optax.masked(mofo_jax.mofo(1e-2, 0.2), {"w": True, "b": False})
  _, state = _run(masked, steps=2)
  mofo_state = state.inner_state[0]
  assert isinstance(mofo_state.mu["b"], optax.MaskedNode)
  assert mofo_state.mu["w"].shape == (8, 12)

  part = optax.partition(
    {"train": mofo_jax.mofo(1e-2, 0.2), "frozen": optax.set_to_zero()},
    {"w": "train", "b": "frozen"},
  )
  params, state = _run(part, steps=2)
  chex.assert_trees_all_equal(params["b"], _tree()["b"])
  assert isinstance(state.inner_states["train"].inner_state[0].mu["b"], optax.MaskedNode)
  del frozen


def test_flax_nnx_optimizer():
  model = nnx.Linear(6, 5, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, mofo_jax.mofo(1e-2, fraction=0.2), wrt=nnx.Param)
  x = jnp.ones((3, 6))
  kernel, bias = jnp.array(model.kernel[...]), jnp.array(model.bias[...])

  @nnx.jit
  def train_step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    optimizer.update(model, grads)

  train_step(model, optimizer)
  assert int((model.kernel[...] != kernel).sum()) == 6  # floor(0.2 * 30)
  assert int((model.bias[...] != bias).sum()) == 5  # 1-D: dense Adam
  summary = mofo_jax.telemetry_summary(optimizer.opt_state)
  assert summary["fraction_updated"] == pytest.approx(11 / 35)


def test_jit_compiles_once_across_steps():
  opt = mofo_jax.mofo(optax.cosine_decay_schedule(1e-2, 10), fraction=0.1)
  traces = []

  @jax.jit
  def step(params, state, g):
    traces.append(1)
    updates, state = opt.update(g, state, params)
    return optax.apply_updates(params, updates), state

  params = _tree()
  state = opt.init(params)
  for t in range(5):
    params, state = step(params, state, _grads(t))
  assert len(traces) == 1


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("mu_dtype", [None, jnp.bfloat16])
def test_dtypes(dtype, mu_dtype):
  params = jax.tree.map(lambda x: x.astype(dtype), _tree())
  opt = mofo_jax.mofo(1e-2, 0.2, mu_dtype=mu_dtype, nu_dtype=jnp.float32)
  state = opt.init(params)
  updates, state = jax.jit(opt.update)(
    jax.tree.map(lambda x: x.astype(dtype), _grads(0)), state, params
  )
  assert all(u.dtype == dtype for u in jax.tree.leaves(updates))
  assert state[0].mu["w"].dtype == (mu_dtype or jnp.float32)
  assert state[0].nu["w"].dtype == jnp.float32
  assert int((updates["w"] != 0).sum()) >= int(0.2 * 96)


def test_integer_leaves_are_a_clear_error():
  with pytest.raises(TypeError, match=r"\['step'\].*int32"):
    mofo_jax.mofo(1e-2).init({"w": jnp.ones((2, 2)), "step": jnp.zeros((), jnp.int32)})


def test_zero_size_and_scalar_leaves_work():
  params = {"empty": jnp.zeros((0, 4)), "s": jnp.ones(()), "w": jnp.ones((3, 3))}
  opt = mofo_jax.mofo(1e-2, 0.5, filter_mask=lambda p: {"empty": True, "s": True, "w": True})
  state = opt.init(params)
  grads = {"empty": jnp.zeros((0, 4)), "s": jnp.ones(()), "w": jnp.arange(9.0).reshape(3, 3)}
  updates, state = jax.jit(opt.update)(grads, state, params)
  assert updates["empty"].shape == (0, 4)
  assert float(updates["s"]) != 0.0
  assert int((updates["w"] != 0).sum()) == 4
  assert mofo_jax.telemetry_summary(state)["fraction_updated/['empty']"] == 0.0


@pytest.mark.parametrize("bad", [0, 1.01, -0.5])
def test_bad_fraction_is_a_value_error_at_construction(bad):
  with pytest.raises(ValueError, match=f"fraction={bad}"):
    mofo_jax.mofo(1e-2, fraction=bad)


def test_bad_score_is_a_value_error():
  with pytest.raises(ValueError, match="score='adam'"):
    mofo_jax.scale_by_mofo(score="adam")


def test_filter_mask_pytree_and_callable():
  params = _tree()
  for mask in ({"w": False, "b": True}, lambda p: {"w": False, "b": True}):
    updates, _ = mofo_jax.mofo(1e-2, 0.25, filter_mask=mask).update(
      _grads(0), mofo_jax.mofo(1e-2, 0.25, filter_mask=mask).init(params), params
    )
    assert int((updates["w"] != 0).sum()) == 96
    assert int((updates["b"] != 0).sum()) == 3


def _mask_of(score, fraction=0.25, steps=1):
  opt = mofo_jax.scale_by_mofo(fraction, score=score)
  params = _tree()
  state = opt.init(params)
  for t in range(steps):
    updates, state = opt.update(_grads(t), state, params)
  return np.asarray(updates["w"]) != 0, state


def test_score_variants_rank_by_what_they_say():
  from tests import reference

  g0 = np.asarray(_grads(0)["w"])
  got, _ = _mask_of("gradient", steps=1)
  np.testing.assert_array_equal(got, reference.top_fraction_mask(g0, 0.25))
  got, state = _mask_of("momentum", steps=2)
  np.testing.assert_array_equal(got, reference.top_fraction_mask(np.asarray(state.mu["w"]), 0.25))
  got_update, _ = _mask_of("update", steps=2)
  assert got_update.sum() == 24 and not np.array_equal(got_update, got)


def test_random_score_is_a_fresh_bernoulli_mask_each_step():
  opt = mofo_jax.scale_by_mofo(0.3, score="random", seed=1)
  params = {"w": jnp.ones((200, 100))}
  state = opt.init(params)
  masks = []
  for _ in range(2):
    updates, state = opt.update({"w": jnp.ones((200, 100))}, state, params)
    masks.append(np.asarray(updates["w"]) != 0)
  assert abs(masks[0].mean() - 0.3) < 0.02
  assert not np.array_equal(masks[0], masks[1])
  again = opt.update({"w": jnp.ones((200, 100))}, opt.init(params), params)[0]
  np.testing.assert_array_equal(np.asarray(again["w"]) != 0, masks[0])


def test_keep_top_fraction_filters_any_optimizer():
  opt = optax.chain(optax.adam(1e-2), mofo_jax.keep_top_fraction(0.25))
  params = _tree()
  state = opt.init(params)
  updates, state = opt.update(_grads(0), state, params)
  dense = optax.adam(1e-2).update(_grads(0), optax.adam(1e-2).init(params), params)[0]
  from tests import reference

  np.testing.assert_array_equal(
    np.asarray(updates["w"]) != 0, reference.top_fraction_mask(np.asarray(dense["w"]), 0.25)
  )
  chex.assert_trees_all_equal(updates["b"], dense["b"])


def test_telemetry_reports_fraction_and_thresholds():
  _, state = _run(mofo_jax.mofo(1e-2, 0.25), steps=2)
  summary = mofo_jax.telemetry_summary(state)
  assert summary["fraction_updated/['w']"] == 0.25
  assert summary["fraction_updated/['b']"] == 1.0
  assert summary["fraction_updated"] == pytest.approx((24 + 12) / 108)
  thr = float(state[0].telemetry.threshold["w"].reshape(()))
  mu = np.abs(np.asarray(state[0].mu["w"]))
  assert thr == np.sort(mu.ravel())[::-1][23]
