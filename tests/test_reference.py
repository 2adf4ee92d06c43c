"""mofo_jax.mofo against the plain NumPy restatement of the spec, step by step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mofo_jax
from tests import reference

SHAPES = {
  "bias": (7,),  # 1-D: dense Adam
  "kernel": (16, 24),
  "stacked": (3, 5, 8),
  "tiny": (2, 3),  # n < 1 / fraction: k clamps to 1
  "single": (1, 1),
  "scalar": (),
}


def _params(seed):
  rng = np.random.default_rng(seed)
  return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def _grads(rng):
  return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("fraction", [0.1, 0.3])
def test_matches_numpy_reference_for_30_steps(weight_decay, fraction):
  params = _params(0)
  ref = reference.MoFO(params, lr=1e-2, fraction=fraction, wd=weight_decay)
  opt = mofo_jax.mofo(1e-2, fraction=fraction, weight_decay=weight_decay)
  p = jax.tree.map(jnp.asarray, params)
  state = opt.init(p)

  @jax.jit
  def step(p, state, g):
    updates, state = opt.update(g, state, p)
    return optax.apply_updates(p, updates), state

  rng = np.random.default_rng(1)
  for _ in range(30):
    g = _grads(rng)
    ref.step(g)
    p, state = step(p, state, g)
  for k in SHAPES:
    np.testing.assert_allclose(np.asarray(p[k]), ref.p[k], rtol=1e-6, atol=1e-7, err_msg=k)
    np.testing.assert_allclose(np.asarray(state[0].mu[k]), ref.m[k], rtol=1e-6, atol=1e-7)


def test_masks_match_reference_every_step():
  params = _params(2)
  ref = reference.MoFO(params, lr=1e-2, fraction=0.2)
  opt = mofo_jax.mofo(1e-2, fraction=0.2)
  p = jax.tree.map(jnp.asarray, params)
  state = opt.init(p)
  step = jax.jit(lambda g, s, p: opt.update(g, s, p))
  rng = np.random.default_rng(3)
  for _ in range(10):
    g = _grads(rng)
    masks = ref.step(g)
    updates, state = step(g, state, p)
    for k in SHAPES:
      np.testing.assert_array_equal(np.asarray(updates[k]) != 0, masks[k], err_msg=k)
    p = optax.apply_updates(p, updates)


def test_unselected_entries_are_bit_identical_without_weight_decay():
  params = jax.tree.map(jnp.asarray, _params(4))
  opt = mofo_jax.mofo(3e-2, fraction=0.1)
  state = opt.init(params)
  rng = np.random.default_rng(5)
  p = params
  for _ in range(5):
    before = p
    updates, state = opt.update(_grads(rng), state, p)
    p = optax.apply_updates(p, updates)
    for k in ("kernel", "stacked"):
      moved = np.asarray(p[k]) != np.asarray(before[k])
      kept = np.asarray(updates[k]) != 0
      np.testing.assert_array_equal(moved, kept)
      assert moved.sum() == max(1, int(0.1 * np.size(p[k])))
  assert not np.array_equal(np.asarray(p["bias"]), np.asarray(params["bias"]))
