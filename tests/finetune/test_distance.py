"""The distance metrics with the pretrained copy on the devices or in host memory; fingerprints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mofo_jax.finetune import distance


def _mesh():
  return jax.make_mesh((2, 4), ("data", "fsdp"), devices=jax.devices()[:8])


def _trees(dtype=jnp.float32):
  """Pretrained and trained params, sharded several ways (one leaf replicated), and the NumPy
  reference of the metrics."""
  mesh = _mesh()
  rng = np.random.default_rng(0)
  specs = {"a": P("fsdp", None), "b": P(None, ("data", "fsdp")), "c": P(), "d": P("data")}
  shapes = {"a": (8, 6), "b": (3, 16), "c": (5,), "d": (4, 2, 3)}
  before = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
  after = {
    k: v + (rng.random(v.shape) < 0.3) * rng.standard_normal(v.shape) for k, v in before.items()
  }

  def place(tree):
    # Every process (tests/finetune/distance_worker.py runs two) hands over its devices' slices.
    host = {k: np.asarray(jnp.asarray(v, dtype)) for k, v in tree.items()}
    sharding = {k: NamedSharding(mesh, specs[k]) for k in host}
    return {
      k: jax.make_array_from_callback(v.shape, sharding[k], lambda i, v=v: v[i])
      for k, v in host.items()
    }

  b, a = place(before), place(after)
  cast = lambda v: np.asarray(jnp.asarray(v, dtype), np.float64)
  diffs = [cast(after[k]) - cast(before[k]) for k in sorted(after)]
  want = {
    "l2_from_pretrained": float(np.sqrt(sum((d**2).sum() for d in diffs))),
    "fraction_changed": sum(int((d != 0).sum()) for d in diffs) / sum(d.size for d in diffs),
  }
  return b, a, want


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_host_copy_gives_the_device_copys_values_bit_for_bit(dtype):
  before, after, want = _trees(dtype)
  on_device = distance.distance_from_pretrained(after, distance.pretrained_copy("device", before))
  on_host = distance.distance_from_pretrained(after, distance.pretrained_copy("host", before))
  assert on_device == on_host
  assert on_device["fraction_changed"] == want["fraction_changed"]
  np.testing.assert_allclose(on_device["l2_from_pretrained"], want["l2_from_pretrained"], rtol=1e-5)
  assert distance.distance_from_pretrained(after, distance.pretrained_copy("off", before)) == {}


def test_host_copy_keeps_each_distinct_slice_once_and_nothing_on_the_devices():
  before, _, _ = _trees()
  copy = distance.pretrained_copy("host", before)
  # a: 4 fsdp slices; b: 8 slices; c: replicated, 1; d: 2 data slices.
  assert copy.nbytes == sum(x.nbytes for x in jax.tree.leaves(before))
  assert not any(isinstance(x, jax.Array) for _, _, s in copy._leaves for x in s.values())
  for placed, original in zip(copy.leaves(), jax.tree.leaves(before)):
    assert placed.sharding == original.sharding
    np.testing.assert_array_equal(np.asarray(placed), np.asarray(original))


def test_unknown_mode_is_refused():
  with pytest.raises(ValueError, match="device, host, off"):
    distance.pretrained_copy("disk", {})


def test_fingerprint_ignores_the_mesh_and_sees_one_changed_bit():
  before, _, _ = _trees()
  single = jax.tree.map(lambda x: jax.device_put(np.asarray(x), jax.devices()[0]), before)
  fp = distance.fingerprint(before)
  assert fp == distance.fingerprint(single)
  flipped = dict(before)
  a = np.asarray(before["a"]).copy()
  a.view(np.uint32)[3, 2] ^= 1  # the lowest mantissa bit of one entry
  flipped["a"] = jnp.asarray(a)
  assert distance.fingerprint(flipped) != fp
  swapped = dict(before)
  swapped["a"] = jnp.asarray(np.asarray(before["a"])[::-1])  # same values, other places
  assert distance.fingerprint(swapped) != fp
  assert distance.fingerprint(jax.tree.map(lambda x: x.astype(jnp.bfloat16), before)) != fp


def test_changed_entry_counts_are_exact_past_int32():
  x = jnp.asarray(np.arange(24).reshape(2, 3, 4) % 5 != 0)
  for limit in (1, 4, 11, 12, 24, 2**31 - 1):
    partial = distance.count_nonzero_exact(x, limit=limit)
    assert partial.dtype == jnp.int32 and int(np.asarray(partial).sum()) == int(x.sum())
    assert int(np.asarray(partial).max()) <= limit
  # At the real limit, a stacked leaf past 2**31 entries keeps one partial per layer (no 8 GB
  # array needed: the shapes decide the reduction).
  big = jax.ShapeDtypeStruct((80, 8192, 28672), jnp.float32)
  out = jax.eval_shape(distance.count_nonzero_exact, big)
  assert out.shape == (80,) and out.dtype == jnp.int32
  assert (
    jax.eval_shape(distance.count_nonzero_exact, jax.ShapeDtypeStruct((8192, 4096), bool)).shape
    == ()
  )


@pytest.mark.slow
def test_two_processes_agree_with_one():
  """Two processes (4 devices each, the same 2x4 mesh): the same fingerprint, the same metrics
  with either copy, and each process keeps only its own slices on the host."""
  import json

  from tests.processes import run_workers

  logs = run_workers("tests.finetune.distance_worker", num=2, devices=4, timeout=240)
  results = [
    json.loads(x[len("RESULT ") :])
    for log in logs
    for x in log.splitlines()
    if x.startswith("RESULT ")
  ]
  assert len(results) == 2, logs
  before, after, want = _trees()
  one_copy = distance.pretrained_copy("host", before)
  for r in results:
    assert r["fingerprint"] == distance.fingerprint(before)
    assert r["device"] == r["host"]
    assert r["device"]["fraction_changed"] == want["fraction_changed"]
    np.testing.assert_allclose(
      r["device"]["l2_from_pretrained"], want["l2_from_pretrained"], rtol=1e-5
    )
    assert r["host_bytes"] < one_copy.nbytes
