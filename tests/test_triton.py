"""The Pallas Triton (GPU) selection against the XLA exact path, bit for bit, in interpret mode,
and its lowering for CUDA (no GPU needed: the Triton IR is built at lowering)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mofo_jax
from mofo_jax import _partition
from mofo_jax import _selection
from mofo_jax import _triton_selection as ts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

KERNEL = mofo_jax.TritonSelection(kernel="always", interpret=True, tile_entries=256)
LAYERS = mofo_jax.BlockSpec(split_axes=(0,))
# A whole-leaf block and stacked layers take the kernel; a vector and a leaf of 150 entries
# (not a multiple of the tile) take the fallback.
SHAPES = {"a": (64, 128), "b": (4, 32, 64), "c": (32,), "d": (3, 50)}
PARTITION = {
  "a": _partition.PER_LEAF,
  "b": LAYERS,
  "c": _partition.PER_LEAF,
  "d": _partition.PER_LEAF,
}


def test_kernel_takes_these_leaves():
  f32 = (jnp.float32,) * 3
  assert ts.tile_for((64, 128), _partition.PER_LEAF, f32, 256) == 256
  assert ts.tile_for((4, 32, 64), LAYERS, f32, 256) == 256
  assert ts.tile_for((3, 50), _partition.PER_LEAF, f32, 256) is None
  assert ts.tile_for((64, 128), mofo_jax.BlockSpec(split_axes=(1,)), f32, 256) is None
  assert ts.tile_for((64, 128), _partition.PER_LEAF, (jnp.float64,) * 3, 256) is None
  with pytest.raises(ValueError, match="power of two"):
    mofo_jax.TritonSelection(tile_entries=1000)


def _run(selection, mu_dtype, steps=4):
  params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
  opt = mofo_jax.mofo(1e-2, 0.1, selection=selection, partition=PARTITION, mu_dtype=mu_dtype)
  state = opt.init(params)

  @jax.jit
  def step(p, s, g):
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  out = []
  for i in range(steps):
    keys = jax.random.split(jax.random.key(i), len(SHAPES))
    g = {k: jax.random.normal(key, s) for key, (k, s) in zip(keys, SHAPES.items())}
    params, state = step(params, state, g)
    out.append((params, state))
  return out


@pytest.mark.parametrize("mu_dtype", [jnp.float32, jnp.bfloat16])
def test_optimizer_steps_equal_exact_selection(mu_dtype):
  """Params, moments, thresholds and counts after every step equal ExactSelection's (counting on
  one device, as on a GPU), bit for bit; more than the target fraction would move if a tie or a
  threshold differed."""
  kernel = _run(KERNEL, mu_dtype)
  xla = _run(mofo_jax.ExactSelection(method="count"), mu_dtype)
  for a, b in zip(kernel, xla):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      assert x.dtype == y.dtype
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  telemetry = kernel[-1][1][0].telemetry
  # At least k (ties kept: bfloat16 moments tie often).
  assert mofo_jax.count_value(telemetry.num_updated["a"]) >= 64 * 128 // 10


def test_ties_are_kept():
  """A block of equal magnitudes: every entry reaches the threshold, as in the XLA path."""
  g = jnp.ones((16, 16))
  adam = mofo_jax._transform._Adam.at(jnp.int32(1), 0.9, 0.999, 1e-8, jnp.float32, jnp.float32)
  moments = _selection.MomentUpdate(
    [g], [jnp.zeros_like(g)], [jnp.zeros_like(g)], adam.first_moment, adam.second_moment, 0
  )
  m, _, masks, kept, taus = _selection.select_momentum(
    KERNEL, moments, [True], [_partition.PER_LEAF], False, 0.1
  )
  assert bool(jnp.all(masks[0])) and mofo_jax.count_value(kept[0]) == 256
  assert taus[0].shape == (1, 1) and float(taus[0][0, 0]) == float(m[0][0, 0])


# Lowered in a process of one CPU device: "auto" keeps the XLA path on several devices (the
# tests run on 8).
_LOWER = """
import jax, jax.numpy as jnp, mofo_jax
from tests.test_triton import PARTITION, SHAPES
params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in SHAPES.items()}
opt = mofo_jax.mofo(1e-2, 0.1, selection=mofo_jax.TritonSelection(tile_entries=256),
                    partition=PARTITION)
state = jax.eval_shape(opt.init, params)
traced = jax.jit(opt.update).trace(params, state, params)
for platform in ("cuda", "cpu"):
  print(platform, traced.lower(lowering_platforms=(platform,)).as_text().count("xla.gpu.triton"))
"""


def test_lowers_for_cuda_and_only_there():
  """ "auto" lowers the Triton kernel for CUDA (one per leaf it takes: the Triton IR is built
  here, without a GPU) and none for CPU."""
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  r = subprocess.run(
    [sys.executable, "-c", _LOWER], env=env, capture_output=True, text=True, timeout=300
  )
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.split() == ["cuda", "2", "cpu", "0"]


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
def test_auto_never_gives_the_kernel_a_sharded_leaf(monkeypatch):
  """Lowering for a GPU cluster on a one-device host: jax.device_count() is 1, but the arrays lie
  on a mesh of 8, so no leaf runs whole in the kernel (one device's kernel on a split leaf)."""
  monkeypatch.setattr(jax, "device_count", lambda *a: 1)
  adam = mofo_jax._transform._Adam.at(jnp.int32(1), 0.9, 0.999, 1e-8, jnp.float32, jnp.float32)
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  seen = []

  def fn(g):
    moments = _selection.MomentUpdate([g], [g], [g], adam.first_moment, adam.second_moment, 0)
    seen.append(ts.TritonSelection().tiles(moments, [True], [_partition.PER_LEAF], False))
    return g

  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
  jax.jit(fn).lower(jax.ShapeDtypeStruct((64, 128), jnp.float32, sharding=sharding))
  assert seen == [[None]]
  # One device, no mesh: the kernel takes the leaf.
  jax.jit(fn).lower(jax.ShapeDtypeStruct((64, 128), jnp.float32))
  assert seen[1] == [ts.TILE_ENTRIES]
