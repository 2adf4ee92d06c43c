"""The Pallas kernels on sharded leaves (shard_map, per-block counts summed over the mesh), on 8
simulated CPU devices in interpret mode: bit for bit the XLA selections' results on one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import mofo_jax
from mofo_jax import _pallas_approx as pa
from mofo_jax import _pallas_selection as ps
from mofo_jax import _pallas_sharded
from mofo_jax import _selection
from tests import sharded_model as sm
from tests.test_pallas import LAYERS, _arrays, assert_same
from tests.test_sharding import _run_sharded

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

LEAF = mofo_jax.BlockSpec()
# (shape, block spec, PartitionSpec over the ("fsdp", "tensor") = (2, 4) mesh): rows split over
# all 8 devices, columns, both, stacked layers split by layer and column, and by row and column
# inside each layer (both kinds of axis that split a block).
LEAVES = {
  "rows": ((64, 256), LEAF, P(("fsdp", "tensor"), None)),
  "cols": ((64, 512), LEAF, P(None, "tensor")),
  "both": ((64, 512), LEAF, P("fsdp", "tensor")),
  "layers-cols": ((4, 32, 512), LAYERS, P("fsdp", None, "tensor")),
  "layers-rows": ((2, 64, 256), LAYERS, P(None, ("fsdp", "tensor"), None)),
}


def _mesh(axis_type=AxisType.Auto):
  return jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(axis_type,) * 2)


def _select(selection, names, fraction, arrays, previous):
  """Per leaf of ``names``: new moments, masks, counts, thresholds, as ``selection`` computes
  them in one jitted call over the (possibly sharded) ``arrays``."""
  specs = [LEAVES[n][1] for n in names]

  def fn(arrays, previous):
    adam = mofo_jax._transform._Adam.at(jnp.int32(2), 0.9, 0.999, 1e-8, jnp.float32, jnp.float32)
    g, mu, nu = (list(x) for x in zip(*arrays))
    moments = _selection.MomentUpdate(
      g, mu, nu, adam.first_moment, adam.second_moment, jnp.int32(1)
    )
    return _selection.select_momentum(
      selection, moments, [True] * len(names), specs, False, fraction, previous=previous
    )

  jitted = jax.jit(fn)
  return jitted(arrays, previous), jitted.lower(arrays, previous).as_text()


def _inputs(names, mesh, seed, scale=1.0):
  """Per leaf (g, mu, nu) on one device and split over ``mesh``."""
  one = [_arrays(LEAVES[n][0], jnp.float32, seed + i, scale) for i, n in enumerate(names)]
  put = lambda x, n: jax.device_put(x, NamedSharding(mesh, LEAVES[n][2]))  # noqa: E731
  return one, [tuple(put(x, n) for x in xs) for xs, n in zip(one, names)]


def _kernels_in_shard_map(text):
  """The lowered program runs a shard_map whose counts are all-reduced (the XLA fallback runs
  none)."""
  return "manual_computation" in text and "all_reduce" in text


def _on_one_device(tree):
  return jax.device_put(tree, jax.devices()[0])


@pytest.mark.parametrize("names", [["rows", "both", "cols"], ["layers-cols", "layers-rows"]])
def test_exact_sharded_equals_one_device(names):
  """Two steps (the bracket missed, then held): masks, thresholds, counts and new moments of
  the sharded kernels equal ExactSelection's on one device, and the kernels ran in shard_map
  with the counts summed over the mesh."""
  mesh = _mesh()
  pspecs = [LEAVES[n][2] for n in names]
  kernel = ps.PallasSelection(
    kernel="always", interpret=True, tile_entries=1024, mesh=mesh, specs=pspecs
  )
  xla = mofo_jax.ExactSelection(method="count")
  previous = [jnp.zeros(LEAVES[n][1].block_shape(LEAVES[n][0]), jnp.float32) for n in names]
  for step in range(2):
    one, sharded = _inputs(names, mesh, 0, scale=1.0 + 1e-4 * step)
    want, _ = _select(xla, names, 0.1, _on_one_device(one), _on_one_device(previous))
    got, text = _select(kernel, names, 0.1, sharded, previous)
    assert _kernels_in_shard_map(text)
    assert_same(jax.device_get(got), jax.device_get(want))
    previous = jax.device_get(want[4])


def test_exact_sharded_traced_fraction_explicit_axes():
  """Under Explicit mesh axes the layout comes from the arrays' types; a traced fraction."""
  names = ["both", "layers-cols"]
  mesh = _mesh(AxisType.Explicit)
  kernel = ps.PallasSelection(kernel="always", interpret=True, tile_entries=1024)
  xla = mofo_jax.ExactSelection(method="count")
  one, sharded = _inputs(names, mesh, 3)
  want, _ = _select(xla, names, jnp.float32(0.37), _on_one_device(one), None)
  with jax.set_mesh(mesh):
    got, text = _select(kernel, names, jnp.float32(0.37), sharded, None)
  assert _kernels_in_shard_map(text)
  assert_same(jax.device_get(got), jax.device_get(want))


def test_approx_sharded_equals_one_device():
  names = ["rows", "both", "layers-cols"]
  mesh = _mesh()
  pspecs = [LEAVES[n][2] for n in names]
  kernel = pa.PallasApproxSelection(
    kernel="always", interpret=True, tile_entries=1024, mesh=mesh, specs=pspecs
  )
  xla = mofo_jax.ApproxSelection(sample_from="inputs")
  one, sharded = _inputs(names, mesh, 5)
  want, _ = _select(xla, names, 0.1, _on_one_device(one), None)
  got, text = _select(kernel, names, 0.1, sharded, None)
  assert _kernels_in_shard_map(text)
  assert_same(jax.device_get(got), jax.device_get(want))


def test_which_shards_take_the_kernels():
  mesh = _mesh()
  f32 = (jnp.float32,) * 3
  rows = _pallas_sharded.shard((64, 256), LEAF, P("fsdp", "tensor"), mesh)
  assert rows.local_shape == (32, 64) and rows.reduce_axes == ("fsdp", "tensor")
  assert rows.block_entries == 64 * 256 and ps.tiling(rows.local_shape, LEAF, f32, 1024)
  layers = _pallas_sharded.shard((4, 32, 512), LAYERS, P("fsdp", None, "tensor"), mesh)
  assert layers.reduce_axes == ("tensor",) and layers.block_pspec == P("fsdp", None, None)
  # A reshaped view and an uneven split go to the fallback.
  heads = mofo_jax.BlockSpec(reshape=(64, 4, 64), split_axes=(1,))
  assert _pallas_sharded.shard((64, 256), heads, P("fsdp"), mesh) is None
  assert _pallas_sharded.shard((6, 256), LEAF, P(None, "tensor"), mesh) is not None
  assert _pallas_sharded.shard((6, 256), LEAF, P("tensor"), mesh) is None


def test_auto_never_gives_a_kernel_a_sharded_leaf_it_cannot_see(monkeypatch):
  """Lowering for a TPU slice on a one-device host: jax.device_count() is 1, but the arrays lie
  on a mesh of 8 under Auto axes (their split unknown), so no leaf runs whole in a kernel."""
  monkeypatch.setattr(jax, "device_count", lambda *a: 1)
  mesh = _mesh()
  seen = []

  def fn(g):
    moments = _selection.MomentUpdate([g], [g], [g], None, None, jnp.int32(1))
    seen.append(_pallas_sharded.shards(moments, [LEAF], "auto", None, None))
    return g

  x = jax.ShapeDtypeStruct((64, 256), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))
  jax.jit(fn).lower(x)
  assert seen == [[None]]
  # Without a mesh (its abstract mesh is empty, of size 0) the leaf runs whole in the kernels.
  jax.jit(fn).lower(jax.ShapeDtypeStruct((64, 256), jnp.float32))
  assert seen[1] is None


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
def test_whole_sharded_steps_equal_one_device(axis_type):
  """Three jitted MoFO steps of the sharded test model (2-D mesh; per-layer blocks of a stack
  split by row and column, whole leaves split both ways, vectors on the fallback): params and
  state equal ExactSelection's on one device, with the state's shardings kept."""
  partition = sm.PARTITIONS["callable"][0]
  kw = {"kernel": "always", "interpret": True, "tile_entries": 1024}
  if axis_type == AxisType.Auto:
    mesh = sm.mesh("2d", axis_type)
    kw.update(mesh=mesh, specs=sm.shardings("2d", mesh))
  opt = lambda sel: mofo_jax.mofo(1e-2, 0.1, weight_decay=0.01, partition=partition, selection=sel)  # noqa: E731
  p, state, _, _ = _run_sharded("2d", axis_type, opt(ps.PallasSelection(**kw)))
  p_ref, state_ref = sm.run_unsharded(opt(mofo_jax.ExactSelection()))
  jax.tree.map(np.testing.assert_array_equal, p, p_ref)
  jax.tree.map(np.testing.assert_array_equal, state, state_ref)


def test_specs_must_match_the_leaves():
  mesh = _mesh()
  x = jnp.zeros((8, 128))
  with pytest.raises(ValueError, match="1 PartitionSpecs for 2 leaves"):
    _pallas_sharded.layout(mesh, (P("fsdp"),), [x, x])
  # A pytree of NamedShardings is kept as a hashable tuple of PartitionSpecs.
  sel = ps.PallasSelection(mesh=mesh, specs={"a": NamedSharding(mesh, P("fsdp")), "b": P()})
  assert sel.specs == (P("fsdp"), P()) and hash(sel)
