"""The Pallas kernels compile ahead of time for TPU v5e, v6e and v4 through libtpu (no TPU
needed), for the largest leaves of the 8B and 70B presets, within the 32 MiB of scoped VMEM.

Runs where libtpu is installed (the ``tpu-plan`` extra), skips elsewhere.
"""

import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import mofo_jax
from mofo_jax import _pallas_approx as pa
from mofo_jax import _pallas_selection as ps
from mofo_jax import _selection

pytestmark = pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed (extra tpu-plan)"
)

LAYERS = mofo_jax.BlockSpec(split_axes=(0,))
# The 128256 x 4096 embedding of the 8B preset, the 70B's 128256 x 8192 one as a two-way row
# shard, and stacked MLP weights with per-layer blocks. The tiles, and so VMEM, depend on
# neither the row nor the layer count; whole, the 70B leaves' five arrays of the fused pass
# exceed one chip's HBM (v5e: 16 GiB; the compiler refuses them for that).
LEAVES = {
  "embed-8b": ((128256, 4096), mofo_jax.BlockSpec()),
  "embed-70b-shard": ((64128, 8192), mofo_jax.BlockSpec()),
  "up-8b": ((4, 4096, 14336), LAYERS),
  "down-70b": ((2, 28672, 8192), LAYERS),
}
# Leaves that share one call: tiles of 1/len(group) of TILE_ENTRIES each, one leaf's VMEM in all.
GROUPS = {
  "q-8b-x16": ((4096, 4096), mofo_jax.BlockSpec(), ps.MAX_GROUP),
  "k-8b-x3": ((4096, 1024), mofo_jax.BlockSpec(), 3),
}


def _device(topology):
  # Only compiles: libtpu's one-process lock has nothing to protect (sessions share machines).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  from jax.experimental import topologies

  kwargs = {"chip_config_name": "megacore"} if topology.startswith("v4") else {}
  topo = topologies.get_topology_desc(
    platform="tpu", topology_name=topology, chips_per_host_bounds=(1, 1, 1), **kwargs
  )
  return topo.devices[0]


def _compile(topology, shape, spec, tile_entries=ps.TILE_ENTRIES, group=1, approx=False):
  """Compiles the exact selection's kernels (or, ``approx``, the approx selection's pass) for
  ``group`` leaves of ``shape`` sharing one call."""
  mesh = jax.sharding.Mesh([_device(topology)], ("chip",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  t = ps.tiling(shape, spec, (jnp.float32,) * 3, tile_entries // group)
  x = [jax.ShapeDtypeStruct((t.rows, t.cols), jnp.float32, sharding=sharding)] * group
  prev = [jax.ShapeDtypeStruct((t.num_blocks,), jnp.float32, sharding=sharding)] * group
  adam = mofo_jax._transform._Adam.at(jnp.int32(1), 0.9, 0.999, 1e-8, jnp.float32, jnp.float32)
  fm, sm = adam.first_moment, adam.second_moment

  def step(g, mu, nu, previous):
    if approx:
      return pa.kept_group(g, mu, nu, jnp.concatenate(previous), t, fm, sm)
    return ps.select_group(g, mu, nu, t, 0.1, fm, sm, previous)

  return jax.jit(step).lower(x, x, x, prev).compile()


@pytest.mark.slow  # ~3 s per compile
@pytest.mark.parametrize("topology", ["v5e:1x1", "v6e:1x1", "v4:1x1x1"])
@pytest.mark.parametrize("leaf", sorted(LEAVES))
def test_compiles_within_scoped_vmem(topology, leaf):
  shape, spec = LEAVES[leaf]
  compiled = _compile(topology, shape, spec)
  text = compiled.as_text()
  assert text.count("mofo_adam_moments_count") >= 1 and "mofo_count_keys" in text


@pytest.mark.slow  # ~3 s per compile
@pytest.mark.parametrize("topology", ["v5e:1x1", "v6e:1x1", "v4:1x1x1"])
@pytest.mark.parametrize("name", sorted(GROUPS))
def test_groups_compile_within_scoped_vmem(topology, name):
  """One call per group: the fused pass once, each counting digit once, for all its leaves."""
  shape, spec, group = GROUPS[name]
  text = _compile(topology, shape, spec, group=group).as_text()
  calls = [line for line in text.splitlines() if "custom_call_target=\"tpu_custom_call\"" in line]
  # The fused pass and the counting kernel of each branch of the bracket's cond (in loops).
  assert len(calls) == 3, len(calls)


@pytest.mark.slow  # ~2 s per compile
@pytest.mark.parametrize("topology", ["v5e:1x1", "v6e:1x1", "v4:1x1x1"])
@pytest.mark.parametrize("leaf", ["embed-8b", "up-8b"])
def test_approx_pass_compiles_within_scoped_vmem(topology, leaf):
  shape, spec = LEAVES[leaf]
  text = _compile(topology, shape, spec, approx=True).as_text()
  assert "mofo_adam_moments_count" in text and "mofo_count_keys" not in text


def test_vmem_limit_is_what_refuses_larger_tiles():
  """Tiles of 2**21 entries overflow the scoped VMEM: the check above can fail. (2**20 compile
  since the counts stream the tile a few vregs at a time; the compare loop before them held
  tile-sized key and comparison temporaries, and 2**20 overflowed.)"""
  with pytest.raises(Exception, match="(?i)vmem"):
    _compile("v6e:1x1", (8192, 2048), mofo_jax.BlockSpec(), tile_entries=1 << 21)


@pytest.mark.parametrize("approx", [False, True])
@pytest.mark.parametrize("on_tpu", [True, False])
def test_auto_traces_only_the_kernel_branch_for_tpu(monkeypatch, approx, on_tpu):
  """The optimizer step under "auto", compiled for one v6e chip: with the chip as the default
  device (as on a TPU host) only the kernel branch is traced; traced on the CPU host, the XLA
  fallback is traced and the kernel branch is traced while lowering. Both compile the kernels."""
  traced = []
  real = _selection.kernels_or_fallback

  def spy(kernel, any_taken, kernels, fallback, platform, args):
    def count(name, branch):
      return lambda *a: traced.append(name) or branch(*a)

    return real(
      kernel, any_taken, count("kernels", kernels), count("fallback", fallback), platform, args
    )

  monkeypatch.setattr(_selection, "kernels_or_fallback", spy)
  # One device, as on one chip (the tests' 8 CPU devices would make an unsharded leaf ambiguous).
  monkeypatch.setattr(jax, "device_count", lambda *a: 1)
  chip = _device("v6e:1x1")
  sharding = jax.sharding.SingleDeviceSharding(chip)
  params = {
    "w": jax.ShapeDtypeStruct((1024, 512), jnp.float32, sharding=sharding),
    "b": jax.ShapeDtypeStruct((512,), jnp.float32, sharding=sharding),
  }
  selection = mofo_jax.PallasApproxSelection() if approx else mofo_jax.PallasSelection()
  opt = mofo_jax.mofo(1e-3, 0.1, selection=selection)
  state = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
    jax.eval_shape(opt.init, params),
  )
  step = jax.jit(opt.update)
  if on_tpu:
    with jax.default_device(chip):
      lowered = step.trace(params, state, params).lower()
    assert traced == ["kernels"]
  else:
    lowered = step.trace(params, state, params).lower()
    assert traced == ["fallback", "kernels"]
  text = lowered.compile().as_text()
  assert 'custom_call_target="tpu_custom_call"' in text


def _mesh(topology, bounds):
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  from jax.experimental import topologies

  topo = topologies.get_topology_desc(
    platform="tpu", topology_name=topology, chips_per_host_bounds=bounds
  )
  return jax.sharding.Mesh(np.array(topo.devices).reshape(2, 2), ("fsdp", "tensor"))


@pytest.mark.slow  # ~10 s per compile
@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2"])
@pytest.mark.parametrize("approx", [False, True])
def test_sharded_kernels_compile_for_four_chips(topology, approx):
  """Leaves split over a 2x2 slice (8B q projection by rows and columns, stacked 8B up
  projections by layer and column): the kernels run in shard_map on each chip's shard and the
  per-block counts are all-reduced."""
  mesh = _mesh(topology, (2, 2, 1))
  leaves = [
    ((4096, 4096), mofo_jax.BlockSpec(), P("fsdp", "tensor")),
    ((4, 4096, 14336), LAYERS, P("fsdp", None, "tensor")),
  ]
  pspecs = [p for _, _, p in leaves]
  kind = mofo_jax.PallasApproxSelection if approx else mofo_jax.PallasSelection
  selection = kind(mesh=mesh, specs=pspecs)
  adam = mofo_jax._transform._Adam.at(jnp.int32(1), 0.9, 0.999, 1e-8, jnp.float32, jnp.float32)

  def step(g, mu, nu, previous):
    moments = _selection.MomentUpdate(
      g, mu, nu, adam.first_moment, adam.second_moment, jnp.int32(1)
    )
    specs = [s for _, s, _ in leaves]
    return _selection.select_momentum(
      selection, moments, [True] * 2, specs, False, 0.1, previous=previous
    )

  x = [jax.ShapeDtypeStruct(s, jnp.float32, sharding=NamedSharding(mesh, p)) for s, _, p in leaves]
  prev = [
    jax.ShapeDtypeStruct(sp.block_shape(s), jnp.float32, sharding=NamedSharding(mesh, P()))
    for s, sp, _ in leaves
  ]
  text = jax.jit(step).lower(x, x, x, prev).compile().as_text()
  calls = [line for line in text.splitlines() if 'custom_call_target="tpu_custom_call"' in line]
  # Per leaf (their shards differ, so no shared group): the fused pass, and for exact a
  # counting kernel per branch of the bracket.
  assert len(calls) == (2 if approx else 6), len(calls)
  # One all-reduce per pass, its counts one int32 each (blocks under 2**31 entries), not the
  # two limbs: 7 (exact) collectives of 4 bytes per candidate.
  reduces = [line for line in text.splitlines() if re.search(r" all-reduce(-start)?\(", line)]
  counts = [line.split(" all-reduce")[0] for line in reduces if "s32[" in line]
  assert counts and all(c.count("s32[") == 1 for c in counts), counts
