"""Issue 11's defects 2, 3, 5 and 7: x64, Explicit meshes, float64 moments, API edge cases."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import mofo_jax
from tests import reference


def _tree():
  rng = np.random.default_rng(0)
  return {"w": jnp.asarray(rng.normal(size=(8, 12)), jnp.float32), "b": jnp.zeros(3)}


def _grads(seed=1):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.normal(size=(8, 12)), jnp.float32), "b": jnp.ones(3)}


@pytest.mark.parametrize("partition", ["global", "leaf", mofo_jax.BlockSpec(split_axes=(0,))])
@pytest.mark.parametrize("method", ["count", "histogram"])
def test_x64_traces_and_matches_the_reference(partition, method):
  """Defect 2: under x64 the search's carry must keep its dtype."""
  with jax.enable_x64(True):
    x = {"a": jnp.asarray(np.random.default_rng(0).normal(size=(6, 10)), jnp.float32)}
    got = jax.jit(lambda s: mofo_jax.top_fraction_mask(s, 0.2, partition=partition, method=method))(
      x
    )
    opt = mofo_jax.mofo(1e-2, 0.2, partition=partition)
    params = _tree()
    updates, _ = jax.jit(opt.update)(_grads(), opt.init(params), params)
  axes = (0,) if isinstance(partition, mofo_jax.BlockSpec) else ()
  np.testing.assert_array_equal(got["a"], reference.block_mask(np.asarray(x["a"]), 0.2, axes))
  assert int((updates["w"] != 0).sum()) == (16 if axes else 19)  # 8 rows x 2, or 0.2 * 96


def test_float64_moments_are_computed_in_float64():
  """Defect 5: mu_dtype=nu_dtype=float64 must not round the moments through float32."""
  with jax.enable_x64(True):
    params = {"w": jnp.ones((4, 4), jnp.float64)}
    g = {"w": jnp.full((4, 4), 1 / 3, jnp.float64).at[0, 0].set(1.0)}
    opt = mofo_jax.scale_by_mofo(0.25, mu_dtype=jnp.float64, nu_dtype=jnp.float64)
    updates, state = opt.update(g, opt.init(params))
    assert state.mu["w"].dtype == jnp.float64
    # float32 rounding would be off by ~1e-9 relative
    np.testing.assert_allclose(state.mu["w"], (1 - 0.9) * np.asarray(g["w"]), rtol=1e-15)
    np.testing.assert_allclose(state.nu["w"], (1 - 0.999) * np.asarray(g["w"]) ** 2, rtol=1e-15)
    assert updates["w"].dtype == jnp.float64


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
@pytest.mark.parametrize("partition", ["leaf", "global", mofo_jax.BlockSpec(split_axes=(0,))])
def test_approx_on_an_explicit_mesh_equals_unsharded(partition):
  """Defect 3: approx must trace under Explicit axes, and shard nothing differently."""
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Explicit,))
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(256, 384)), jnp.float32)}
  grads = {"w": jnp.asarray(rng.normal(size=(256, 384)), jnp.float32)}
  opt = mofo_jax.mofo(1e-2, 0.1, partition=partition, selection="approx")
  want, _ = jax.jit(opt.update)(grads, opt.init(params), params)
  with jax.set_mesh(mesh):
    put = lambda t: jax.tree.map(
      lambda x: jax.device_put(x, NamedSharding(mesh, P("fsdp", None))), t
    )
    p = put(params)
    state = jax.jit(opt.init)(p)
    got, state2 = jax.jit(opt.update)(put(grads), state, p)
    assert jax.tree.map(jax.typeof, state2) == jax.tree.map(jax.typeof, state)
  np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(want["w"]))


@pytest.mark.parametrize("bad", ["0.1", b"0.1", None, [0.1], np.array([0.1, 0.2])])
def test_fraction_that_is_not_a_number_is_a_type_error(bad):
  with pytest.raises((TypeError, ValueError), match="fraction"):
    mofo_jax.mofo(1e-2, fraction=bad)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("value", [float("nan"), 0.0, -1.0])
def test_schedule_giving_nan_or_nonpositive_does_not_keep_one_entry(value, jit):
  """A schedule's 0 (or less) updates no filtered entry; NaN makes the filtered updates NaN so
  that optax.apply_if_finite skips the step. Neither silently keeps one entry per block."""
  for opt in (
    mofo_jax.mofo(1e-2, fraction=lambda count: jnp.asarray(value)),
    optax.chain(optax.sgd(1.0), mofo_jax.keep_top_fraction(lambda count: jnp.asarray(value))),
  ):
    params = _tree()
    update = jax.jit(opt.update) if jit else opt.update
    updates, state = update(_grads(), opt.init(params), params)
    w = np.asarray(updates["w"])
    if np.isnan(value):
      assert np.isnan(w).all()
    else:
      assert (w == 0).all()
      assert mofo_jax.telemetry_summary(state)["fraction_updated/['w']"] == 0.0
    assert np.isfinite(np.asarray(updates["b"])).all() and (np.asarray(updates["b"]) != 0).all()


@pytest.mark.parametrize("bad", ["yes", "False", 1.5, None])
def test_filter_mask_values_must_be_booleans(bad):
  with pytest.raises((TypeError, ValueError), match="filter_mask"):
    mofo_jax.mofo(1e-2, filter_mask={"w": bad, "b": False}).init(_tree())


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, "int8"])
def test_integer_moment_dtypes_are_rejected(dtype):
  with pytest.raises(TypeError, match="mu_dtype"):
    mofo_jax.mofo(1e-2, mu_dtype=dtype)
  with pytest.raises(TypeError, match="nu_dtype"):
    mofo_jax.scale_by_mofo(nu_dtype=dtype)


@pytest.mark.parametrize("reshape", [(-8, -12), (-2, -48), (0, 96), (2.5, 4)])
def test_reshape_with_bad_sizes_is_a_value_error(reshape):
  with pytest.raises((ValueError, TypeError), match=r"reshape=\("):
    mofo_jax.mofo(1e-2, partition=mofo_jax.BlockSpec(reshape=reshape)).init(_tree())


def test_python_float_params_work_like_optax_adamw():
  params = {"w": 1.0, "v": [2.0, 3.0]}
  grads = {"w": 0.5, "v": [1.0, -1.0]}
  want, _ = optax.adamw(1e-2, weight_decay=0.0).update(
    grads, optax.adamw(1e-2, weight_decay=0.0).init(params), params
  )
  opt = mofo_jax.mofo(1e-2)
  got, _ = opt.update(grads, opt.init(params), params)
  jax.tree.map(np.testing.assert_allclose, got, want)


def test_telemetry_summary_of_a_state_without_mofo_is_an_error():
  state = optax.adamw(1e-3).init({"w": jnp.ones(3)})
  with pytest.raises(ValueError, match="MoFO"):
    mofo_jax.telemetry_summary(state)
