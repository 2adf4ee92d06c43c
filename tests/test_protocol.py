"""The Selection protocol: user-defined selections, with and without their own momentum stage."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mofo_jax


@dataclasses.dataclass
class Delegating:
  """A user's selection with only the required methods: ranks with ExactSelection."""

  calls: list = dataclasses.field(default_factory=list)

  def initial_thresholds(self, leaves, filtered, specs):
    return mofo_jax.ExactSelection().initial_thresholds(leaves, filtered, specs)

  def select(self, scores, filtered, specs, is_global, fraction, previous=None):
    self.calls.append("select")
    return mofo_jax.ExactSelection().select(
      scores, filtered, specs, is_global, fraction, previous=previous
    )


@dataclasses.dataclass
class OwnMoments(Delegating):
  """A selection that computes the moments itself and updates only the first entry per leaf."""

  def select_momentum(self, moments, filtered, specs, is_global, fraction, previous=None):
    self.calls.append("select_momentum")
    mus = [moments.first_moment(g, m) for g, m in zip(moments.grads, moments.mus)]
    nus = [moments.second_moment(g, v) for g, v in zip(moments.grads, moments.nus)]
    masks = [
      jnp.zeros(m.shape, bool).reshape(-1).at[0].set(True).reshape(m.shape) if f else None
      for m, f in zip(mus, filtered)
    ]
    kept = [jnp.asarray([0, 1 if f else m.size], jnp.int32) for m, f in zip(mus, filtered)]
    return mus, nus, masks, kept, self.initial_thresholds(mus, filtered, specs)


PARAMS = {"w": jnp.zeros((6, 5)), "b": jnp.zeros(5)}


def _grads(i):
  rng = np.random.default_rng(i)
  return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), PARAMS)


def _steps(selection, n=3):
  opt = mofo_jax.mofo(0.1, 0.2, selection=selection)
  params, state = PARAMS, opt.init(PARAMS)
  step = jax.jit(opt.update)
  for i in range(n):
    u, state = step(_grads(i), state, params)
    params = optax.apply_updates(params, u)
  return params, state


def test_a_selection_without_a_momentum_stage_ranks_the_materialised_moments():
  sel = Delegating()
  got = _steps(sel)
  want = _steps("exact")
  assert sel.calls == ["select"]  # traced once, under jit
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_a_selection_with_its_own_momentum_stage_is_used_for_the_momentum_score():
  sel = OwnMoments()
  params, state = _steps(sel, n=1)
  assert sel.calls == ["select_momentum"]
  assert int((params["w"] != 0).sum()) == 1 and params["w"].reshape(-1)[0] != 0
  assert bool((params["b"] != 0).all())  # dense leaf: Adam
  assert mofo_jax.read_telemetry(state).num_updated == {"w": 1, "b": 5}
  # Its moments are the state's: Adam's, whatever the mask.
  adam_mu = optax.adam(0.1).init(PARAMS)[0].mu
  want_mu = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, adam_mu, _grads(0))
  jax.tree.map(np.testing.assert_allclose, state[0].mu, want_mu)


@pytest.mark.parametrize("score", ["gradient", "update", "random"])
def test_other_scores_rank_with_select_and_never_the_momentum_stage(score):
  sel = OwnMoments()
  opt = mofo_jax.mofo(0.1, 0.2, score=score, selection=sel)
  opt.update(_grads(0), opt.init(PARAMS), PARAMS)
  assert "select_momentum" not in sel.calls


def test_read_telemetry_gives_plain_counts_and_the_summary_totals():
  _, state = _steps("exact", n=1)
  tel = mofo_jax.read_telemetry(state)
  assert tel.num_updated == {"w": 6, "b": 5}
  assert tel.num_entries == {"w": 30, "b": 5}
  assert all(type(n) is int for n in jax.tree.leaves(tel.num_updated))
  assert tel.threshold["w"].shape == (1, 1) and tel.threshold["w"].item() > 0
  summary = mofo_jax.telemetry_summary(state)
  assert (summary["num_updated"], summary["num_entries"]) == (11, 35)
  assert summary["fraction_updated"] == 11 / 35


def test_read_telemetry_of_several_mofo_states_needs_an_index():
  opt = optax.chain(mofo_jax.scale_by_mofo(0.5), mofo_jax.keep_top_fraction(0.5))
  _, state = opt.update(_grads(0), opt.init(PARAMS), PARAMS)
  with pytest.raises(ValueError, match="holds 2 MoFO states"):
    mofo_jax.read_telemetry(state)
  assert mofo_jax.read_telemetry(state, index=1).num_updated["w"] == 15
  with pytest.raises(ValueError, match="index=2"):
    mofo_jax.read_telemetry(state, index=2)
