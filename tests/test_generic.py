"""Generic cases, in the style optax applies to its own optimizers, for every kind of MoFO.

One list of optimizers under test (selections x partition kinds x scores) runs through the same
cases: convergence, inject_hyperparams, dtypes, MultiSteps, state type stability, and sharded
(8 devices, Explicit axes) equal to one device.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import mofo_jax

ROWS = mofo_jax.BlockSpec(split_axes=(0,))
HEADS = mofo_jax.BlockSpec(reshape=(16, 4, 4), split_axes=(1,))

# name -> keyword arguments of mofo_jax.mofo
OPTIMIZERS = {
  "exact-leaf-momentum": {},
  "exact-global-momentum": {"partition": "global"},
  "exact-rows-gradient": {"partition": ROWS, "score": "gradient"},
  "exact-heads-update": {"partition": HEADS, "score": "update"},
  "count8-rows-momentum": {
    "partition": ROWS,
    "selection": mofo_jax.ExactSelection(method="count", radix_bits=8),
  },
  "histogram-leaf-momentum": {"selection": mofo_jax.ExactSelection(method="histogram")},
  "approx-leaf-momentum": {"selection": "approx"},
  "approx-global-momentum": {"selection": "approx", "partition": "global"},
  "approx-rows-momentum": {"selection": "approx", "partition": ROWS},
  # What "auto" picks on GPU and TPU: the sample read from (g, old mu) before the pass.
  "approx-inputs-leaf-momentum": {"selection": mofo_jax.ApproxSelection(sample_from="inputs")},
  "approx-inputs-global-momentum": {
    "selection": mofo_jax.ApproxSelection(sample_from="inputs"),
    "partition": "global",
  },
  "approx-inputs-heads-momentum": {
    "selection": mofo_jax.ApproxSelection(sample_from="inputs"),
    "partition": HEADS,
  },
  "random-leaf": {"score": "random"},
}
# Histograms scatter into a replicated array: not for Explicit-sharded operands.
NOT_EXPLICIT = {"histogram-leaf-momentum"}

_rng = np.random.default_rng(0)
A = jnp.asarray(_rng.normal(size=(32, 16)), jnp.float32)
TARGET = jnp.asarray(_rng.normal(size=(16, 16)), jnp.float32)
B = A @ TARGET


def _params(dtype=jnp.float32):
  return {"w": jnp.zeros((16, 16), dtype), "b": jnp.zeros((16,), dtype)}


def _loss(p):
  return jnp.mean((A @ p["w"].astype(jnp.float32) + p["b"].astype(jnp.float32) - B) ** 2)


def _opt(name, learning_rate=0.05, fraction=0.25):
  return mofo_jax.mofo(learning_rate, fraction, **OPTIMIZERS[name])


def _run(opt, params, steps):
  def step(carry, _):
    p, s = carry
    u, s = opt.update(jax.grad(_loss)(p), s, p)
    return (optax.apply_updates(p, u), s), None

  return jax.jit(lambda p, s: jax.lax.scan(step, (p, s), length=steps)[0])(params, opt.init(params))


names = pytest.mark.parametrize("name", list(OPTIMIZERS))


@names
def test_converges_on_least_squares(name):
  p, _ = _run(_opt(name), _params(), 300)
  assert float(_loss(p)) < 0.2 * float(_loss(_params()))


@names
def test_inject_hyperparams_compiles_once(name):
  opt = optax.inject_hyperparams(mofo_jax.mofo, static_args=("partition", "selection", "score"))(
    learning_rate=0.05, fraction=0.25, **OPTIMIZERS[name]
  )
  params = _params()
  state = opt.init(params)
  traces = []

  @jax.jit
  def step(p, s):
    traces.append(1)
    u, s = opt.update(jax.grad(_loss)(p), s, p)
    return optax.apply_updates(p, u), s

  fractions = []
  for frac in (0.25, 0.5):
    state.hyperparams["fraction"] = jnp.asarray(frac)
    params, state = step(params, state)
    fractions.append(mofo_jax.telemetry_summary(state)["fraction_updated/['w']"])
  assert len(traces) == 1
  assert fractions[1] > fractions[0]


@names
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_dtypes_are_kept(name, dtype):
  opt = _opt(name)
  params = _params(dtype)
  grads = jax.grad(_loss)(params)
  updates, _ = jax.jit(opt.update)(grads, opt.init(params), params)
  assert all(u.dtype == dtype for u in jax.tree.leaves(updates))
  assert bool(jnp.isfinite(updates["w"].astype(jnp.float32)).all())
  assert int((updates["w"] != 0).sum()) > 0


@names
def test_multisteps_takes_one_step_every_k(name):
  opt = optax.MultiSteps(_opt(name), every_k_schedule=2)
  params = _params()
  state = opt.init(params)
  moved = []
  update = jax.jit(opt.update)
  for _ in range(4):
    updates, state = update(jax.grad(_loss)(params), state, params)
    moved.append(int((updates["w"] != 0).sum()))
    params = optax.apply_updates(params, updates)
  assert moved[0] == moved[2] == 0 and moved[1] > 0 and moved[3] > 0


@functools.cache
def _mesh():
  return jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Explicit,))


def _put(tree):
  mesh = _mesh()
  return jax.tree.map(
    lambda x: jax.device_put(x, NamedSharding(mesh, P("fsdp") if np.ndim(x) >= 1 else P())), tree
  )


def _grads(i):
  rng = np.random.default_rng(100 + i)
  return {
    "w": jnp.asarray(rng.normal(size=(16, 16)), jnp.float32),
    "b": jnp.asarray(rng.normal(size=(16,)), jnp.float32),
  }


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if n not in NOT_EXPLICIT])
def test_sharded_equals_one_device_and_state_type_is_stable(name):
  """The same gradients give bit-identical updates, states and params on one device and on
  eight.

  The updates are applied outside the compiled step: inside it, XLA:CPU may contract
  ``p + (-lr) * u`` into a fused multiply-add in one layout's fusion and not in the other's
  (seen on AVX-512 hosts), which is the apply's rounding, not the optimizer's.
  """
  opt = _opt(name)
  update = jax.jit(opt.update)

  params = _params()
  state = opt.init(params)
  updates = []
  for i in range(3):
    u, state = update(_grads(i), state, params)
    params = optax.apply_updates(params, u)
    updates.append(u)
  with jax.set_mesh(_mesh()):
    sharded = _put(_params())
    sharded_state = jax.jit(opt.init)(sharded)
    types = jax.tree.map(jax.typeof, sharded_state)
    for i in range(3):
      u, sharded_state = update(_put(_grads(i)), sharded_state, sharded)
      sharded = optax.apply_updates(sharded, u)
      assert jax.tree.map(jax.typeof, sharded_state) == types
      jax.tree.map(np.testing.assert_array_equal, u, updates[i])
  jax.tree.map(np.testing.assert_array_equal, sharded_state, state)
  jax.tree.map(np.testing.assert_array_equal, sharded, params)
