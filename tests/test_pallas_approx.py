"""The Pallas approx selection against the XLA approx path, bit for bit, in interpret mode."""

import hypothesis
import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest

import mofo_jax
from mofo_jax import _pallas_approx as pa
from mofo_jax import _pallas_selection as ps
from tests.test_pallas import (
  LAYERS,
  _arrays,
  _select,
  assert_auto_is_xla_on_cpu,
  assert_same,
  optimizer_steps,
)

# Tiles of 1024 entries: several tiles per block, and blocks of several tiles, at test sizes.
KERNEL = pa.PallasApproxSelection(kernel="always", interpret=True, tile_entries=1024)
XLA = mofo_jax.ApproxSelection(sample_from="inputs")


def _both(arrays, spec, fraction):
  kernel = _select(KERNEL, spec, fraction, *arrays, None)
  xla = _select(XLA, spec, fraction, *arrays, None)
  assert_same(kernel, xla)
  return kernel


@pytest.mark.parametrize(
  "shape, spec, dtype",
  [
    ((64, 256), mofo_jax.BlockSpec(), jnp.float32),  # sampled: 4096 of 16384 entries
    ((4, 32, 256), LAYERS, jnp.bfloat16),  # a sample of every layer
  ],
)
def test_equals_xla_approx(shape, spec, dtype):
  """Moments, masks, sampled thresholds and the counts of kept entries equal the XLA path's."""
  out = _both(_arrays(shape, dtype, 0), spec, 0.1)
  kept = int(mofo_jax.count_value(out[3][0]))
  assert kept == int(out[2][0].sum()) and 0.08 * np.prod(shape) < kept < 0.12 * np.prod(shape)


@pytest.mark.slow  # ~3 s an example: every example compiles the interpreted kernel afresh
@hypothesis.settings(max_examples=8, deadline=None, derandomize=True)
@hypothesis.given(
  layers=st.sampled_from([0, 2, 3]),
  rows=st.sampled_from([16, 48, 96]),
  cols=st.sampled_from([128, 384, 40]),
  dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
  fraction=st.sampled_from([0.1, 0.37, 1.0, 1e-6]),
  seed=st.integers(0, 2**16),
)
def test_equals_xla_approx_drawn(layers, rows, cols, dtype, fraction, seed):
  shape = (layers, rows, cols) if layers else (rows, cols)
  spec = LAYERS if layers else mofo_jax.BlockSpec()
  assert ps.tiling(shape, spec, (dtype,) * 3, KERNEL.tile_entries) is not None
  _both(_arrays(shape, dtype, seed), spec, fraction)


def test_optimizer_steps_equal_approx():
  """Whole MoFO steps: the kernel leaves (pairs sharing one call, of one block each and of one
  per layer), the fallback leaves (a vector, a split last axis) and the state all equal the XLA
  approx path's."""
  params = {
    "w": jnp.zeros((64, 256)),
    "w2": jnp.zeros((64, 256)),
    "s": jnp.zeros((2, 32, 256)),
    "s2": jnp.zeros((2, 32, 256)),
    "c": jnp.zeros((64, 256)),
    "b": jnp.zeros(8),
  }
  leaf = mofo_jax.BlockSpec()
  part = {
    "w": leaf,
    "w2": leaf,
    "s": LAYERS,
    "s2": LAYERS,
    "c": mofo_jax.BlockSpec(split_axes=(1,)),
    "b": leaf,
  }
  runs = [optimizer_steps(sel, params, part) for sel in (KERNEL, XLA)]
  assert_same(*runs)


def test_auto_never_takes_the_kernel_on_cpu(monkeypatch):
  auto = pa.PallasApproxSelection(tile_entries=1024)
  assert_auto_is_xla_on_cpu(monkeypatch, auto, mofo_jax.ApproxSelection(), (64, 256))


@pytest.mark.parametrize(
  "bad", [{"kernel": "gpu"}, {"tile_entries": 8}, {"fallback": mofo_jax.ExactSelection()}]
)
def test_bad_arguments(bad):
  with pytest.raises(ValueError):
    pa.PallasApproxSelection(**bad)
