"""Ranged safetensors reads equal safetensors' own slices, locally and on the GCS emulator."""

import ml_dtypes
import numpy as np
import pytest
from etils import epath
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import save_file

from mofo_jax.finetune import safetensors_ranges
from tests.finetune.gcs import count_fetches

DTYPES = [np.float32, ml_dtypes.bfloat16, np.float16, np.int64, np.bool_]


def _tensors(seed=0):
  rng = np.random.default_rng(seed)
  shapes = {"a": (7, 5), "b": (3, 4, 6), "c": (9,), "d": (2, 3), "e": (4, 1), "s": ()}
  return {
    k: np.asarray((rng.standard_normal(shape) * 10).astype(DTYPES[i % len(DTYPES)]))
    for i, (k, shape) in enumerate(shapes.items())
  }


@pytest.fixture(scope="module")
def local_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("st") / "m.safetensors"
  save_file(_tensors(), str(path), metadata={"format": "np"})
  return path


@st.composite
def indexes(draw, shape):
  out = []
  for n in shape:  # non-empty: safe_open refuses empty slices at the end of an axis
    lo = draw(st.integers(0, n - 1))
    out.append(slice(lo, draw(st.integers(lo + 1, n))))
  return tuple(out)


@settings(deadline=None)
@given(data=st.data(), block=st.sampled_from([1, 8, 40, 1 << 20]))
def test_slices_equal_safe_opens(local_file, data, block):
  safetensors_ranges.BLOCK_BYTES = block
  try:
    with (
      safe_open(str(local_file), "numpy") as want,
      safetensors_ranges.SafetensorsFile(local_file) as got,
    ):
      assert sorted(got.keys()) == sorted(want.keys())
      for name in sorted(want.keys()):
        if name == "s":  # a scalar, which safe_open cannot index
          assert got.get_slice(name)[()] == _tensors()["s"]
          continue
        shape = want.get_slice(name).get_shape()
        assert got.get_slice(name).get_shape() == shape
        index = data.draw(indexes(shape))
        a, b = got.get_slice(name)[index], want.get_slice(name)[index]
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
  finally:
    safetensors_ranges.BLOCK_BYTES = 64 << 20


def test_reads_from_the_gcs_emulator(local_file, gcs_dir):
  target = epath.Path(gcs_dir) / "m.safetensors"
  target.write_bytes(local_file.read_bytes())
  with (
    safe_open(str(local_file), "numpy") as want,
    safetensors_ranges.SafetensorsFile(target) as got,
  ):
    for name in sorted(set(want.keys()) - {"s"}):
      np.testing.assert_array_equal(got.get_slice(name)[:], want.get_slice(name)[:])
    np.testing.assert_array_equal(got.get_slice("b")[1:3, :, 2:5], want.get_slice("b")[1:3, :, 2:5])


@pytest.mark.parametrize("cut", [0, 5, 12, -1])
def test_truncated_or_foreign_files_name_the_file(local_file, tmp_path, cut):
  bad = tmp_path / "bad.safetensors"
  data = local_file.read_bytes()
  bad.write_bytes(data[:cut] if cut >= 0 else data[:-1])
  with pytest.raises(ValueError, match="bad.safetensors"):
    safetensors_ranges.SafetensorsFile(bad)


def test_a_gcs_slice_fetches_only_its_rows(tmp_path, gcs_dir, monkeypatch):
  local = tmp_path / "big.safetensors"
  save_file({"w": np.zeros((512, 1024), np.float32)}, str(local))  # 2 MiB
  target = epath.Path(gcs_dir) / "big.safetensors"
  target.write_bytes(local.read_bytes())
  fetched = count_fetches(monkeypatch)
  with safetensors_ranges.SafetensorsFile(target) as f:
    assert f.get_slice("w")[8:16].shape == (8, 1024)
  # the header and 8 rows of 4 KiB; no read-ahead of the rest of the file
  assert fetched and sum(fetched) < 8 * 4096 + 1024, fetched
