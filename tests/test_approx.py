"""selection="approx": thresholds from a fixed sample of each block, one pass over the params."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mofo_jax


def _big_tree(seed=0):
  rng = np.random.default_rng(seed)
  return {
    "w": jnp.asarray(rng.normal(size=(1024, 1024)), jnp.float32),
    "e": jnp.asarray(rng.standard_t(3, size=(2048, 640)), jnp.float32),
    "b": jnp.asarray(rng.normal(size=(1024,)), jnp.float32),
  }


@pytest.mark.parametrize("fraction", [0.05, 0.1])
def test_fraction_on_large_blocks_is_close_and_telemetry_counts_what_moved(fraction):
  params = _big_tree()
  opt = mofo_jax.scale_by_mofo(fraction, selection="approx")
  state = opt.init(params)
  updates, state = jax.jit(opt.update)(_big_tree(1), state)
  for name in ("w", "e"):
    moved = int(jnp.sum(updates[name] != 0))
    assert mofo_jax.count_value(state.telemetry.num_updated[name]) == moved
    # 65536 samples: the standard deviation of the kept fraction is ~0.001 at these fractions.
    assert abs(moved / updates[name].size - fraction) < 0.005
  assert int(jnp.sum(updates["b"] != 0)) == 1024  # vectors stay dense


def test_blocks_smaller_than_the_sample_are_exact():
  rng = np.random.default_rng(2)
  params = {"w": jnp.asarray(rng.normal(size=(8, 96)), jnp.float32)}
  grads = {"w": jnp.asarray(rng.normal(size=(8, 96)), jnp.float32)}
  spec = mofo_jax.BlockSpec(split_axes=(0,))
  outs = []
  for selection in ("exact", "approx"):
    opt = mofo_jax.scale_by_mofo(0.1, partition=spec, selection=selection)
    updates, state = opt.update(grads, opt.init(params))
    outs.append((np.asarray(updates["w"]), np.asarray(state.telemetry.threshold["w"])))
  np.testing.assert_array_equal(outs[0][0], outs[1][0])
  np.testing.assert_array_equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("partition", ["global", mofo_jax.BlockSpec(split_axes=(0,))])
def test_global_and_per_row_blocks(partition):
  params = _big_tree()
  opt = mofo_jax.mofo(1e-3, 0.1, partition=partition, selection="approx")
  state = opt.init(params)
  _, state = jax.jit(opt.update)(_big_tree(3), state, params)
  summary = mofo_jax.telemetry_summary(state)
  mats = params["w"].size + params["e"].size
  moved = summary["fraction_updated"] * (mats + 1024) - 1024
  assert abs(moved / mats - 0.1) < 0.01


def test_inject_hyperparams_and_jit_compile_once():
  opt = optax.inject_hyperparams(mofo_jax.mofo, static_args=("selection",))(
    learning_rate=1e-2, fraction=0.1, selection="approx"
  )
  params = _big_tree()
  state = opt.init(params)
  traces = []

  @jax.jit
  def step(params, state, g):
    traces.append(1)
    updates, state = opt.update(g, state, params)
    return optax.apply_updates(params, updates), state

  for t, frac in enumerate([0.1, 0.2]):
    state.hyperparams["fraction"] = jnp.asarray(frac)
    params, state = step(params, state, _big_tree(10 + t))
    got = mofo_jax.telemetry_summary(state)["fraction_updated/['w']"]
    assert abs(got - frac) < 0.01
  assert len(traces) == 1


def test_unknown_selection_is_a_value_error():
  with pytest.raises(ValueError, match="approx"):
    mofo_jax.mofo(1e-3, selection="sampled")


# Tolerance on the fraction kept, per partition kind, against the exact selection: a sample of
# s entries per block deviates by about sqrt(f (1 - f) / s); blocks get s >= 1024 (0.009 each, far
# less on average over many blocks) or are ranked whole, and a leaf gets s >= 4096 (0.005).
TOLERANCE = 0.01


@pytest.mark.parametrize(
  "shape,partition",
  [
    ((8192, 64), mofo_jax.BlockSpec(split_axes=(0,))),  # tiny rows: ranked whole
    ((256, 8192), mofo_jax.BlockSpec(split_axes=(0,))),  # long rows: 1024 samples each
    ((4, 512, 512), mofo_jax.BlockSpec(split_axes=(0,))),  # layers of a stack
    ((512, 1024), mofo_jax.BlockSpec(reshape=(512, 16, 64), split_axes=(1,))),  # heads
    ((1024, 1024), "leaf"),
    ((1024, 1024), "global"),
  ],
  ids=["rows64", "rows8192", "layers", "heads", "leaf", "global"],
)
def test_fraction_kept_matches_exact_for_every_partition_kind(shape, partition):
  rng = np.random.default_rng(0)
  x = {"w": jnp.asarray(rng.standard_t(3, size=shape), jnp.float32)}
  kept = {}
  for selection in ("exact", "approx"):
    opt = mofo_jax.keep_top_fraction(0.1, partition=partition, selection=selection)
    updates, _ = jax.jit(opt.update)(x, opt.init(x))
    kept[selection] = float(jnp.mean(updates["w"] != 0))
  assert abs(kept["approx"] - kept["exact"]) < TOLERANCE, kept


def test_sample_from_auto_lowers_the_scores_branch_for_cpu_and_inputs_elsewhere():
  sel = mofo_jax.ApproxSelection()
  pick = jax.jit(lambda: sel.by_platform(lambda: jnp.int32(1101), lambda: jnp.int32(2202)))
  assert int(pick()) == 2202
  for platform, device in (("tpu", "tpu"), ("cuda", "gpu")):
    # Traced for CPU (the default backend), lowered elsewhere: that platform's branch is
    # traced while lowering and its result returned.
    text = pick.trace().lower(lowering_platforms=(platform,)).as_text()
    assert "1101" in text, platform
    # Traced where the default device is that platform: only its branch is traced.
    with jax.default_device(device):
      traced = pick.trace()
    text = traced.lower(lowering_platforms=(platform,)).as_text()
    assert "1101" in text and "2202" not in text, platform


def test_both_samplings_keep_the_fraction_and_find_the_same_thresholds():
  """The momentum sampled from (g, old mu) before the pass or from the new momentum after it:
  the same entries, the same expression, so the same thresholds (to rounding)."""
  rng = np.random.default_rng(3)
  params = {"w": jnp.zeros((512, 384)), "e": jnp.zeros((2048, 64))}
  grads = [
    jax.tree.map(lambda p: jnp.asarray(rng.standard_t(3, p.shape), jnp.float32), params)
    for _ in range(3)
  ]
  states = {}
  for name in ("inputs", "scores"):
    opt = mofo_jax.scale_by_mofo(0.1, selection=mofo_jax.ApproxSelection(sample_from=name))
    state = opt.init(params)
    step = jax.jit(opt.update)
    for g in grads:
      updates, state = step(g, state)
    for key, leaf in updates.items():
      assert abs(float(jnp.mean(leaf != 0)) - 0.1) < TOLERANCE, (name, key)
    states[name] = state
  for key in params:
    np.testing.assert_allclose(
      states["inputs"].telemetry.threshold[key],
      states["scores"].telemetry.threshold[key],
      rtol=1e-6,
    )
