"""The Pallas kernel selection against the XLA exact path, bit for bit, in interpret mode."""

import functools
import os
import subprocess
import sys

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mofo_jax
from mofo_jax import _pallas_selection as ps
from mofo_jax import _selection

# Tiles of 1024 entries: several tiles per block, and blocks of several tiles, at test sizes.
KERNEL = ps.PallasSelection(kernel="always", interpret=True, tile_entries=1024)
XLA = mofo_jax.ExactSelection(method="count")
LAYERS = mofo_jax.BlockSpec(split_axes=(0,))


def _arrays(shape, dtype, seed, scale=1.0):
  rng = np.random.default_rng(seed)
  g, mu, nu = (rng.normal(size=shape) for _ in range(3))
  return jnp.asarray(scale * g, dtype), jnp.asarray(mu, dtype), jnp.asarray(np.abs(nu), dtype)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _select(selection, spec, fraction, g, mu, nu, previous):
  """New moments, masks, counts and thresholds, as ``selection`` computes them for one leaf."""
  adam = mofo_jax._transform._Adam.at(jnp.int32(2), 0.9, 0.999, 1e-8, mu.dtype, nu.dtype)
  moments = _selection.MomentUpdate(
    [g], [mu], [nu], adam.first_moment, adam.second_moment, jnp.int32(1)
  )
  return _selection.select_momentum(
    selection, moments, [True], [spec], False, fraction, previous=previous
  )


def assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _both(arrays, spec, fraction, previous):
  kernel = _select(KERNEL, spec, fraction, *arrays, previous)
  xla = _select(XLA, spec, fraction, *arrays, previous)
  assert_same(kernel, xla)
  return kernel


def test_kernel_takes_these_leaves():
  f32 = (jnp.float32,) * 3
  assert ps.tiling((64, 256), mofo_jax.BlockSpec(), f32, 1024).grid == (8, 2)
  assert ps.tiling((4, 16, 128), LAYERS, f32, 1024).grid == (8, 1)
  # Single rows as blocks, a split of the last axis, vectors, float64: the fallback.
  assert ps.tiling((64, 256), LAYERS, f32) is None
  assert ps.tiling((64, 256), mofo_jax.BlockSpec(split_axes=(1,)), f32) is None
  assert ps.tiling((64,), mofo_jax.BlockSpec(), f32) is None
  assert ps.tiling((64, 256), mofo_jax.BlockSpec(), (jnp.float64,)) is None


@pytest.mark.slow  # ~26 s: every example compiles the interpreted kernels afresh
@hypothesis.settings(max_examples=10, deadline=None, derandomize=True)
@hypothesis.given(
  layers=st.sampled_from([0, 2, 3]),
  rows=st.sampled_from([16, 32, 48]),
  cols=st.sampled_from([128, 256, 384, 40]),
  dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
  fraction=st.sampled_from([0.1, 0.37, 1.0, 1e-6]),
  seed=st.integers(0, 2**16),
)
def test_equals_xla_exact(layers, rows, cols, dtype, fraction, seed):
  """Masks, thresholds, counts and new moments equal the XLA path's, bracket hit and missed."""
  shape = (layers, rows, cols) if layers else (rows, cols)
  spec = LAYERS if layers else mofo_jax.BlockSpec()
  arrays = _arrays(shape, dtype, seed)
  assert ps.tiling(shape, spec, (dtype,) * 3, KERNEL.tile_entries) is not None
  zeros = [jnp.zeros(spec.block_shape(shape), jnp.float32)]
  first = _both(arrays, spec, fraction, zeros)
  # The next step's gradient barely moves the momentum: every threshold stays in its bracket.
  nearby = _arrays(shape, dtype, seed, scale=1.0 + 1e-4)
  _both(nearby, spec, fraction, first[4])


def test_ties_and_nan_are_kept():
  _, _, nu = _arrays((16, 128), jnp.float32, 0)
  g = jnp.zeros((16, 128)).at[0, :5].set(jnp.nan)
  out = _both((g, jnp.ones((16, 128)), nu), mofo_jax.BlockSpec(), 0.01, [jnp.zeros((1, 1))])
  assert int(out[2][0].sum()) == 16 * 128  # NaNs first, then every tied 0.9


def optimizer_steps(selection, params, partition, steps=2):
  """The updates and states of ``steps`` jitted MoFO steps on random gradients."""
  opt = mofo_jax.scale_by_mofo(0.1, partition=partition, selection=selection)
  state = opt.init(params)
  update = jax.jit(opt.update)
  rng = np.random.default_rng(0)
  out = []
  for _ in range(steps):
    g = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    u, state = update(g, state)
    out.append((u, state))
  return out


def test_same_views_share_kernels():
  f32 = (jnp.float32,) * 3
  bf16 = (jnp.bfloat16,) * 3
  shapes = [(64, 256), (4, 16, 256), (64, 256), (64, 256), (8,), (64, 256)]
  specs = [mofo_jax.BlockSpec(), LAYERS] + [mofo_jax.BlockSpec()] * 4
  dtypes = [f32, f32, f32, bf16, f32, f32]
  tilings = [ps.tiling(s, sp, d, 1 << 14) for s, sp, d in zip(shapes, specs, dtypes)]
  groups = ps.groups(shapes, specs, dtypes, tilings, 1 << 14)
  got = [(idx, t.tile_rows * t.tile_cols) for t, idx in groups]
  # Three float32 (64, 256) leaves share a call, their tiles a third of one leaf's at most.
  assert got == [([0, 2, 5], 4096), ([1], 4096), ([3], 16384)]


def test_optimizer_steps_equal_exact():
  """Whole MoFO steps: the kernel leaves (pairs sharing kernels, of one block each and of one
  per layer), the fallback leaves and the state all equal."""
  params = {
    "w": jnp.zeros((32, 128)),
    "w2": jnp.zeros((32, 128)),
    "s": jnp.zeros((2, 8, 128)),
    "s2": jnp.zeros((2, 8, 128)),
    "b": jnp.zeros(8),
  }
  part = {
    "w": mofo_jax.BlockSpec(),
    "w2": mofo_jax.BlockSpec(),
    "s": LAYERS,
    "s2": LAYERS,
    "b": mofo_jax.BlockSpec(),
  }
  runs = [optimizer_steps(sel, params, part) for sel in (KERNEL, XLA)]
  assert_same(*runs)


def assert_auto_is_xla_on_cpu(monkeypatch, auto, xla, shape):
  """On one device "auto" leaves the choice to the platform lowered for: on CPU no kernel is
  lowered, and the results are the XLA selection's."""
  monkeypatch.setattr(jax, "device_count", lambda *a: 1)
  arrays = _arrays(shape, jnp.float32, 0)
  spec = mofo_jax.BlockSpec()
  text = _select.lower(auto, spec, 0.1, *arrays, None).as_text()
  assert "mofo_adam_moments_count" not in text and "tpu_custom_call" not in text
  assert_same(_select(auto, spec, 0.1, *arrays, None), _select(xla, spec, 0.1, *arrays, None))


# Lowered in a process of one CPU device, the arrays without a mesh, as on one TPU chip.
_LOWER = """
import jax, jax.numpy as jnp, mofo_jax
params = {"w": jax.ShapeDtypeStruct((64, 256), jnp.float32), "b": jax.ShapeDtypeStruct((8,), jnp.float32)}
for sel in (mofo_jax.PallasSelection(tile_entries=1024), mofo_jax.PallasApproxSelection(tile_entries=1024)):
  opt = mofo_jax.mofo(1e-2, 0.1, selection=sel)
  state = jax.eval_shape(opt.init, params)
  traced = jax.jit(opt.update).trace(params, state, params)
  for platform in ("tpu", "cpu"):
    print(platform, traced.lower(lowering_platforms=(platform,)).as_text().count("tpu_custom_call"))
"""


def test_auto_lowers_the_kernels_for_tpu_on_one_device():
  """ "auto" lowers the kernels for TPU (exact: the fused and counting passes; approx: its one
  pass) and none for CPU (before: a leaf without a mesh counted as sharded, so none for TPU)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PYTHONPATH": root}
  r = subprocess.run(
    [sys.executable, "-c", _LOWER], env=env, capture_output=True, text=True, timeout=300
  )
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.split() == ["tpu", "3", "cpu", "0", "tpu", "1", "cpu", "0"]


def test_auto_never_takes_the_kernel_on_cpu(monkeypatch):
  assert_auto_is_xla_on_cpu(monkeypatch, ps.PallasSelection(tile_entries=1024), XLA, (16, 128))


@pytest.mark.parametrize("bad", [{"kernel": "gpu"}, {"tile_entries": 8}])
def test_bad_arguments(bad):
  with pytest.raises(ValueError):
    ps.PallasSelection(**bad)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_histogram_counts_equal_numpy(dtype):
  """The counting kernel's packed histograms: keys at each candidate of a run of digits and of
  a bracket's run (both ends and the 15 between), NaN, inf, zeros and bases near 2**31 too."""
  rng = np.random.default_rng(0)
  m = rng.normal(size=(64, 256)).astype(np.float32)
  m.flat[:6] = [np.nan, np.inf, -np.inf, 0.0, -0.0, 3.4e38]
  m = np.asarray(jnp.asarray(m, dtype).astype(jnp.float32))
  # Two blocks (layers) of several tiles each.
  t = ps.tiling((2, 32, 256), LAYERS, (dtype,) * 3, 1024)
  assert t.num_blocks == 2 and t.grid[0] * t.grid[1] > 2
  keys = m.view(np.uint32).astype(np.int64) & (2**31 - 1)
  bases = np.array([0x3F000000, 2**31 - (1 << 20)], np.int64)
  runs = ((ps._DIGIT, 19, bases), (ps._BRACKET, 16, bases[::-1]))
  digits = ps.digits_operand([(s, jnp.asarray(b, jnp.uint32)) for _, s, b in runs])
  tiles = ps.count_keys(
    [jnp.asarray(m, dtype)], digits, t, tuple(r for r, _, _ in runs), interpret=True
  )
  got = ps.block_counts(tiles, t, sum(r.num for r, _, _ in runs))
  got = np.asarray(got.hi, np.int64) * 2**16 + np.asarray(got.lo, np.int64)
  per_block = keys.reshape(t.num_blocks, -1)
  want = [
    [
      (per_block[b] >= base[b] + ((run.first + i) << s)).sum()
      for run, s, base in runs
      for i in range(run.num)
    ]
    for b in range(t.num_blocks)
  ]
  np.testing.assert_array_equal(got, np.array(want))
