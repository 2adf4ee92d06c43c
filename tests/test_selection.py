"""The counting selection against sorting, over shapes, fractions, ties and block layouts."""

import math
import os
import subprocess
import sys

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import mofo_jax
from tests import reference

shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=9)
fractions = st.one_of(
  st.sampled_from([0.01, 0.05, 0.1, 0.15, 0.5, 1.0]), st.floats(1e-3, 1.0, exclude_min=True)
)


@st.composite
def tie_heavy(draw):
  shape = draw(shapes)
  kind = draw(st.sampled_from(["normal", "few_values", "zeros", "all_equal", "wide_range"]))
  rng = np.random.default_rng(draw(st.integers(0, 2**31)))
  if kind == "normal":
    x = rng.normal(size=shape)
  elif kind == "few_values":
    x = rng.integers(-2, 3, size=shape) * 0.5
  elif kind == "zeros":
    x = rng.normal(size=shape) * (rng.random(shape) < 0.2)
  elif kind == "all_equal":
    x = np.full(shape, draw(st.sampled_from([0.0, -1.5, 3e-30])))
  else:
    x = rng.normal(size=shape) * 10.0 ** rng.integers(-30, 30, size=shape)
  return x.astype(np.float32)


@given(
  x=tie_heavy(),
  fraction=fractions,
  radix_bits=st.sampled_from([1, 2, 4, 8]),
  method=st.sampled_from(["count", "histogram"]),
)
def test_mask_is_exactly_the_entries_at_or_above_the_kth_largest(x, fraction, radix_bits, method):
  mask = np.asarray(
    mofo_jax.top_fraction_mask(jnp.asarray(x), fraction, radix_bits=radix_bits, method=method)
  )
  k = max(1, math.floor(fraction * x.size))
  kth = np.sort(np.abs(x).ravel())[::-1][k - 1]
  np.testing.assert_array_equal(mask, np.abs(x) >= kth)
  assert mask.sum() >= k


@given(x=tie_heavy(), fraction=fractions)
def test_traced_fraction_gives_the_same_mask(x, fraction):
  traced = jax.jit(mofo_jax.top_fraction_mask)(jnp.asarray(x), jnp.float32(fraction))
  static = mofo_jax.top_fraction_mask(jnp.asarray(x), float(np.float32(fraction)))
  np.testing.assert_array_equal(np.asarray(traced), np.asarray(static))


@given(
  x=tie_heavy(), fraction=fractions, data=st.data(), method=st.sampled_from(["count", "histogram"])
)
def test_block_axes_rank_each_slice_separately(x, fraction, data, method):
  axes = tuple(sorted(data.draw(st.sets(st.integers(0, x.ndim - 1), max_size=x.ndim))))
  spec = mofo_jax.BlockSpec(split_axes=axes)
  got = np.asarray(
    mofo_jax.top_fraction_mask(jnp.asarray(x), fraction, partition=spec, method=method)
  )
  np.testing.assert_array_equal(got, reference.block_mask(x, fraction, axes))


def test_per_head_blocks_through_reshape():
  x = np.random.default_rng(0).normal(size=(6, 4 * 8)).astype(np.float32)
  spec = mofo_jax.BlockSpec(reshape=(6, 4, 8), split_axes=(1,))
  got = np.asarray(mofo_jax.top_fraction_mask(jnp.asarray(x), 0.1, partition=spec))
  np.testing.assert_array_equal(got, reference.block_mask(x, 0.1, (1,), reshape=(6, 4, 8)))
  assert got.reshape(6, 4, 8).sum(axis=(0, 2)).tolist() == [4, 4, 4, 4]


@pytest.mark.parametrize("method", ["count", "histogram"])
def test_global_block_ranks_the_whole_tree_together(method):
  rng = np.random.default_rng(1)
  tree = {
    "a": rng.normal(size=(10, 10)),
    "b": 5 * rng.normal(size=(3, 4)),
    "c": rng.normal(size=(7,)),
  }
  tree = {k: v.astype(np.float32) for k, v in tree.items()}
  got = mofo_jax.top_fraction_mask(
    jax.tree.map(jnp.asarray, tree), 0.1, partition="global", method=method
  )
  flat = np.concatenate([v.ravel() for v in tree.values()])
  want = reference.top_fraction_mask(flat, 0.1)
  np.testing.assert_array_equal(np.concatenate([np.asarray(got[k]).ravel() for k in tree]), want)


@pytest.mark.parametrize("method", ["count", "histogram"])
def test_nan_and_inf_rank_first_and_never_hang(method):
  x = jnp.array([1.0, jnp.nan, -jnp.inf, 2.0, 0.0, 3.0, 4.0, 5.0, 6.0, 7.0])
  mask = np.asarray(mofo_jax.top_fraction_mask(x, 0.2, method=method))
  assert mask.tolist() == [False, True, True] + [False] * 7


@pytest.mark.parametrize("method", ["count", "histogram"])
def test_selection_reports_threshold_and_count(method):
  x = jnp.array([[1.0, 2.0, 2.0, 3.0], [4.0, 4.0, 0.5, 0.1]])
  (sel,) = mofo_jax.select_blocks([x], [mofo_jax.BlockSpec(split_axes=(0,))], 0.25, method=method)
  np.testing.assert_array_equal(sel.threshold, [[3.0], [4.0]])
  np.testing.assert_array_equal(mofo_jax.count_value(np.stack(sel.num_selected, -1)), [[1], [2]])


def test_histogram_and_count_agree_on_large_blocks_of_many_magnitudes():
  # Wide dynamic range and many blocks: every digit of both passes is exercised.
  rng = np.random.default_rng(2)
  x = rng.normal(size=(6, 50_000)) * 10.0 ** rng.integers(-20, 20, size=(6, 50_000))
  x = jnp.asarray(x.astype(np.float32))
  spec = [mofo_jax.BlockSpec(split_axes=(0,))]
  want = mofo_jax.select_blocks([x], spec, 0.05, method="count")[0]
  got = mofo_jax.select_blocks([x], spec, 0.05, method="histogram")[0]
  np.testing.assert_array_equal(got.threshold, want.threshold)
  np.testing.assert_array_equal(got.num_selected, want.num_selected)


def test_auto_method_under_jit_matches_counting():
  x = jnp.asarray(np.random.default_rng(3).normal(size=(64, 64)).astype(np.float32))
  got = jax.jit(lambda s: mofo_jax.top_fraction_mask(s, 0.1))(x)
  np.testing.assert_array_equal(got, mofo_jax.top_fraction_mask(x, 0.1, method="count"))
  with pytest.raises(ValueError, match="method="):
    mofo_jax.top_fraction_mask(x, 0.1, method="sort")


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_fraction_out_of_range_is_a_value_error_naming_it(bad):
  with pytest.raises(ValueError, match=str(bad)):
    mofo_jax.top_fraction_mask(jnp.ones(3), bad)


def test_bad_block_specs_are_clear_errors():
  with pytest.raises(ValueError, match="axis 2"):
    mofo_jax.top_fraction_mask(jnp.ones((3, 4)), 0.5, partition=mofo_jax.BlockSpec(split_axes=(2,)))
  with pytest.raises(ValueError, match="reshape"):
    mofo_jax.top_fraction_mask(
      jnp.ones((3, 4)), 0.5, partition=mofo_jax.BlockSpec(reshape=(5,), split_axes=())
    )
  with pytest.raises(ValueError, match="partition="):
    mofo_jax.top_fraction_mask(jnp.ones((3, 4)), 0.5, partition="rows")


def _views(x, axes):
  spec = mofo_jax.BlockSpec(split_axes=axes)
  keep = spec.block_axes(x.shape)
  return [jnp.asarray(x)], [tuple(i for i in range(x.ndim) if i not in keep)], spec


@given(
  x=tie_heavy(),
  fraction=fractions,
  data=st.data(),
  radix_bits=st.sampled_from([1, 2, 4, 8]),
  bracket_bits=st.sampled_from([1, 4, 8, 20, 24]),
  moved=st.sampled_from([1.0, 1.0001, 0.97, 1.3, 0.0, 1e30, np.inf]),
)
def test_search_started_from_previous_thresholds_gives_the_full_searchs_result(
  x, fraction, data, radix_bits, bracket_bits, moved
):
  """Previous thresholds near the new ones (the bracket holds them), or far (the full search
  runs): the same thresholds and counts as without a start, and the reference mask."""
  axes = tuple(sorted(data.draw(st.sets(st.integers(0, x.ndim - 1), max_size=x.ndim))))
  spec = mofo_jax.BlockSpec(split_axes=axes)
  full = mofo_jax.select_blocks([jnp.asarray(x)], [spec], fraction, method="count")[0]
  with np.errstate(invalid="ignore", over="ignore"):  # inf * 0 is NaN: a miss too
    previous = jnp.asarray(np.float32(moved) * np.asarray(full.threshold))
  started = mofo_jax.select_blocks(
    [jnp.asarray(x)],
    [spec],
    fraction,
    method="count",
    radix_bits=radix_bits,
    previous=[previous],
    bracket_bits=bracket_bits,
  )[0]
  np.testing.assert_array_equal(np.asarray(started.threshold), np.asarray(full.threshold))
  for a, b in zip(started.num_selected, full.num_selected):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  mask = np.abs(x) >= np.asarray(started.threshold).reshape(spec.block_shape(x.shape))
  np.testing.assert_array_equal(mask, reference.block_mask(x, fraction, axes))


def test_bracket_holds_a_nearby_threshold_and_not_a_far_one():
  from mofo_jax import _counts, _selection

  x = np.random.default_rng(0).normal(size=(64, 512)).astype(np.float32)
  views, reduce_axes, spec = _views(x, (0,))
  k = 51  # floor(0.1 * 512)
  kth = np.sort(np.abs(x), axis=1)[:, ::-1][:, k - 1 : k]
  ks = [_counts.num_to_select(0.1, 512)]

  def inside(previous, bits=20):
    return np.asarray(
      _selection.bracket_previous(views, reduce_axes, ks, [jnp.asarray(previous)], False, bits)[2][
        0
      ]
    )

  assert inside(kth).all()
  assert inside(kth * np.float32(1.01)).all()  # 1% is well within 2**19 keys
  assert not inside(kth * np.float32(1.5)).any()
  assert not inside(np.zeros_like(kth)).any()
  assert not inside(kth * np.float32(1.01), bits=4).any()  # 8 keys: 1% is outside


_TEMPORARIES = """
import jax, jax.numpy as jnp, mofo_jax
params = {f"w{i}": jax.ShapeDtypeStruct((256, 1024), jnp.float32) for i in range(8)}
for sel in (mofo_jax.ExactSelection(), mofo_jax.ApproxSelection()):
  opt = mofo_jax.mofo(1e-3, 0.1, selection=sel)
  state = jax.eval_shape(opt.init, params)
  step = jax.jit(lambda g, s, p: opt.update(g, s, p)).lower(params, state, params).compile()
  print(step.memory_analysis().temp_size_in_bytes)
"""


def test_temporaries_are_one_leaf_deep_not_every_leaf():
  """On one CPU device (a subprocess: the tests run on 8, where "auto" counts), leaves are
  searched (histograms, XLA:CPU's int32 copies of masks) one after another: the compiled step's
  temporaries stay near one leaf's int32 copies, not eight leaves' (before: the bin indices or
  mask copies of several leaves alive at once, 4.0 MiB for exact and 8.3 MiB for approx here,
  against 2.4 and 1.0 MiB now)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PYTHONPATH": root}
  r = subprocess.run(
    [sys.executable, "-c", _TEMPORARIES], env=env, capture_output=True, text=True, timeout=300
  )
  assert r.returncode == 0, r.stderr[-2000:]
  leaf_bytes = 256 * 1024 * 4
  exact, approx = (int(b) for b in r.stdout.split())
  assert exact < 3 * leaf_bytes and approx < 3 * leaf_bytes


@pytest.mark.parametrize("axes", [(), (1,), (0,)])
def test_large_leaves_histogrammed_in_chunks_give_the_same_mask(monkeypatch, axes):
  """On one device a leaf above the chunk size is histogrammed a few rows at a time (rows
  chunked only when the first axis is ranked, not when it indexes blocks; never on several
  devices, where a chunk of a sharded axis would be gathered): same mask as the reference."""
  from mofo_jax import _selection

  monkeypatch.setattr(_selection, "_CHUNK_ENTRIES", 512)
  monkeypatch.setattr(jax, "device_count", lambda: 1)  # one device: the tests run on 8
  assert _selection._chunk_rows((60, 100), (0, 1)) == 5
  assert _selection._chunk_rows((60, 100), (1,)) == 60
  monkeypatch.setattr(jax, "device_count", lambda: 8)
  assert _selection._chunk_rows((60, 100), (0, 1)) == 60
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  x = np.random.default_rng(0).standard_t(2, size=(60, 100)).astype(np.float32)
  x[3, :40] = x[50, 60:] = 7.0  # ties across chunks
  spec = mofo_jax.BlockSpec(split_axes=axes)
  got = mofo_jax.top_fraction_mask(jnp.asarray(x), 0.1, partition=spec, method="histogram")
  np.testing.assert_array_equal(np.asarray(got), reference.block_mask(x, 0.1, axes))


def test_counts_of_large_masks_in_chunks_are_exact(monkeypatch):
  """The entries kept of a leaf above the chunk size are counted a few rows at a time: the same
  count (approx's telemetry, which counts its masks)."""
  from mofo_jax import _selection

  monkeypatch.setattr(_selection, "_CHUNK_ENTRIES", 512)
  monkeypatch.setattr(jax, "device_count", lambda: 1)  # one device: the tests run on 8
  mask = jnp.asarray(np.random.default_rng(1).random((60, 100)) < 0.3)
  got = mofo_jax.count_value(mofo_jax._counts.to_array(_selection._count_mask(mask)))
  assert got == int(np.asarray(mask).sum())
