"""Sharded loading and saving of HF checkpoints on 8 simulated CPU devices (and 2 processes)."""

import gc
import json
import math
import tracemalloc

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from mofo_jax.finetune import checkpoints_hf
from mofo_jax.finetune.checkpoints_hf import (
  check_mesh,
  hf_tensors_from_model,
  load_hf_checkpoint,
  save_hf_checkpoint,
)
from mofo_jax.finetune.model import param_shardings
from tests.finetune.conftest import random_model, tiny_config
from tests.processes import run_workers

AXES = ("data", "fsdp", "tensor")


def _mesh(shape):
  # built like train.make_mesh builds the CLI's mesh (the two-process worker uses jax.make_mesh)
  return jax.sharding.Mesh(np.asarray(jax.devices()).reshape(shape), AXES)


def _params(model):
  return {
    ".".join(map(str, path)): var.get_value()
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """A tiny untied checkpoint with attention biases (every kind of parameter)."""
  config = tiny_config(tie_word_embeddings=False, attention_bias=True, attention_out_bias=True)
  path = tmp_path_factory.mktemp("sharded") / "ckpt"
  save_hf_checkpoint(random_model(config), config, path)
  return path


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("shape", [(1, 4, 2), (2, 2, 2)])
def test_sharded_load_equals_unsharded_and_every_shard_has_its_share(ckpt, shape, scan_layers):
  mesh = _mesh(shape)
  _, ref = load_hf_checkpoint(ckpt, scan_layers=scan_layers)
  _, model = load_hf_checkpoint(ckpt, scan_layers=scan_layers, mesh=mesh)
  targets = {
    ".".join(map(str, path)): var.get_value()
    for path, var in nnx.to_flat_state(param_shardings(model, mesh))
  }
  ref_params = _params(ref)
  for name, arr in _params(model).items():
    assert arr.sharding == targets[name], name
    ways = math.prod(mesh.shape[a] for a in arr.sharding.spec if a is not None)
    assert len(arr.addressable_shards) == 8
    for shard in arr.addressable_shards:
      assert shard.data.shape == arr.sharding.shard_shape(arr.shape), name
      assert shard.data.size * ways == arr.size, name
    assert arr.dtype == ref_params[name].dtype
    np.testing.assert_array_equal(np.asarray(arr), np.asarray(ref_params[name]), err_msg=name)


def test_no_device_receives_a_whole_tensor_and_each_element_is_read_once(ckpt, monkeypatch):
  puts, reads = [], []
  real_put, real_read = jax.device_put, checkpoints_hf.SafetensorsSource.read

  def put(x, *args, **kwargs):
    puts.append(np.shape(x))
    return real_put(x, *args, **kwargs)

  def read(self, name, index):
    out = real_read(self, name, index)
    reads.append((name, out.nbytes))
    return out

  monkeypatch.setattr(jax, "device_put", put)
  monkeypatch.setattr(checkpoints_hf.SafetensorsSource, "read", read)
  # data=2 replicates every shard twice: the replicas must share one read
  _, model = load_hf_checkpoint(ckpt, scan_layers=True, mesh=_mesh((2, 2, 2)))
  monkeypatch.undo()

  params = _params(model)
  assert len(puts) == 8 * len(params)  # one put per device per parameter, nothing else
  shard_shapes = {a.sharding.shard_shape(a.shape) for a in params.values()}
  assert set(puts) <= shard_shapes
  for name, arr in params.items():
    if arr.ndim == 3:  # stacked matrices: sharded 4 ways, never put whole
      assert arr.shape not in puts, name
      assert math.prod(arr.sharding.shard_shape(arr.shape)) * 4 == arr.size, name
  tensors = load_file(ckpt / "model.safetensors")
  assert sum(n for _, n in reads) == sum(t.nbytes for t in tensors.values())
  for name, nbytes in reads:
    if tensors[name].ndim == 2:  # each read is one shard's slice of one layer
      assert nbytes * 4 == tensors[name].nbytes, name


def _big_checkpoint(path):
  """21 MB of float32; the embedding and the head are the largest tensors (8 MiB each)."""
  config = tiny_config(
    vocab_size=8192, hidden_size=256, intermediate_size=512, tie_word_embeddings=False
  )
  save_hf_checkpoint(random_model(config), config, path)
  return 8192 * 256 * 4


def _peak_bytes(fn):
  gc.collect()
  tracemalloc.start()
  try:
    fn()
    return tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()


def test_host_peak_memory_is_about_one_slice(tmp_path, monkeypatch):
  largest = _big_checkpoint(tmp_path / "big")
  mesh = _mesh((1, 4, 2))
  # XLA:CPU adopts suitably aligned numpy buffers as device memory (zero copy), so some host
  # slices would live on as the CPU devices' own memory and count here; copying each put
  # into a fresh device buffer measures what the loader itself holds, as on an accelerator.
  real_put = jax.device_put
  monkeypatch.setattr(jax, "device_put", lambda x, d: real_put(real_put(x, d), d, may_alias=False))
  load_hf_checkpoint(tmp_path / "big", mesh=mesh)  # warm up caches outside the measurement
  sharded = _peak_bytes(lambda: load_hf_checkpoint(tmp_path / "big", mesh=mesh))
  one_device = _peak_bytes(lambda: load_hf_checkpoint(tmp_path / "big"))
  # unsharded, the host holds a whole tensor (8 MiB); sharded, one 1/8 slice (1 MiB) as read,
  # its transposed copy, and under 1 MB that does not grow with the model
  assert one_device > largest
  assert sharded < largest / 2, (sharded, one_device)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_saving_a_sharded_model_writes_the_same_files(ckpt, tmp_path, scan_layers):
  config, model = load_hf_checkpoint(ckpt, scan_layers=scan_layers, mesh=_mesh((2, 2, 2)))
  save_hf_checkpoint(model, config, tmp_path / "sharded")
  assert (tmp_path / "sharded" / "model.safetensors").read_bytes() == (
    ckpt / "model.safetensors"
  ).read_bytes()
  # several files and an index, read back exactly
  save_hf_checkpoint(model, config, tmp_path / "split", max_shard_size=20_000)
  index = json.loads((tmp_path / "split" / "model.safetensors.index.json").read_text())
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 2 and not (tmp_path / "split" / "model.safetensors").exists()
  assert sorted(p.name for p in (tmp_path / "split").iterdir()) == sorted(
    [*files, "config.json", "model.safetensors.index.json"]
  )
  assert index["metadata"]["total_size"] == sum(
    (tmp_path / "split" / f).stat().st_size for f in files
  )
  _, again = load_hf_checkpoint(tmp_path / "split", mesh=_mesh((1, 4, 2)))
  expected = load_file(ckpt / "model.safetensors")
  got = hf_tensors_from_model(again)
  assert sorted(got) == sorted(expected)
  for name in expected:
    np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


# --- the mesh does not fit the model -------------------------------------------------------------


@pytest.mark.parametrize(
  "overrides, shape, needles",
  [
    (
      {},
      (1, 1, 8),
      [
        "mesh axis 'tensor' of size 8 does not divide num_attention_heads=4",
        "num_key_value_heads=2",
      ],
    ),
    (
      {"hidden_size": 36, "num_attention_heads": 2, "num_key_value_heads": 2},
      (1, 8, 1),
      ["mesh axis 'fsdp' of size 8 does not divide hidden_size=36 (logical axis 'embed')"],
    ),
    (
      {"vocab_size": 100, "intermediate_size": 100},
      (1, 1, 8),
      ["vocab_size=100", "intermediate_size=100"],
    ),
  ],
)
def test_a_mesh_that_does_not_divide_names_axis_and_sizes(overrides, shape, needles):
  mesh = jax.sharding.AbstractMesh(shape, AXES)
  with pytest.raises(ValueError) as e:
    check_mesh(tiny_config(**overrides), mesh)
  assert "\n" not in str(e.value)
  for needle in needles:
    assert needle in str(e.value)


def test_loading_onto_a_bad_mesh_fails_before_reading(ckpt, monkeypatch):
  monkeypatch.setattr(checkpoints_hf.SafetensorsSource, "read", None)  # any read would fail
  with pytest.raises(ValueError, match="'tensor' of size 8 does not divide num_attention_heads"):
    load_hf_checkpoint(ckpt, mesh=_mesh((1, 1, 8)))
  with pytest.raises(ValueError, match="rules map 'vocab' to mesh axis 'tensor', which the mesh"):
    load_hf_checkpoint(ckpt, mesh=jax.make_mesh((4, 2), ("data", "fsdp")))


def test_a_saved_run_of_rows_costs_the_devices_the_run_not_the_tensor():
  """What a multi-process save gathers onto every device per step: one run of rows."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from mofo_jax.finetune.checkpoints_hf import save as hf_save

  mesh = _mesh((1, 4, 2))
  arr = jax.device_put(
    np.arange(2048 * 512, dtype=np.float32).reshape(2048, 512),
    NamedSharding(mesh, P("fsdp", "tensor")),
  )
  gather = hf_save._run_gatherer(NamedSharding(mesh, P()))
  run = gather(arr, 100, 256)  # across the first two fsdp shards
  np.testing.assert_array_equal(np.asarray(run), np.asarray(arr)[100:356])
  temps = gather.lower(arr, 100, 256).compile().memory_analysis().temp_size_in_bytes
  assert temps <= 2 * run.nbytes < arr.nbytes // 2, temps


# --- two processes --------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_each_read_only_their_part(ckpt, tmp_path):
  run_workers("tests.finetune.sharded_load_worker", ckpt, tmp_path)

  total = sum(t.nbytes for t in load_file(ckpt / "model.safetensors").values())
  reports = [json.loads((tmp_path / f"read-{i}.json").read_text()) for i in range(2)]
  for r in reports:
    # exactly the distinct slices of its own devices: half of every sharded tensor
    assert r["bytes_read"] == r["own_slices_bytes"]
    assert r["bytes_read"] < 0.55 * total
  # every process joins the gathers of the save, but only the writer copies tensors to its host
  assert [r["save_host_bytes"] for r in reports] == [total, 0], reports
  # in runs of rows, none over the worker's GATHER_BYTES of 4096, not whole tensors
  runs = reports[0]["runs"]
  assert runs == reports[1]["runs"] and len(runs) > 1 and 0 < max(runs) <= 4096, runs
  # only process 0 wrote, and what it wrote is the checkpoint
  assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == [
    "config.json",
    "model.safetensors",
  ]
  assert (tmp_path / "saved" / "model.safetensors").read_bytes() == (
    ckpt / "model.safetensors"
  ).read_bytes()


def test_custom_rules_can_shard_the_stacked_layer_axis(ckpt, tmp_path):
  # layers over fsdp: each device reads only its own layers; saving takes layers across devices
  rules = (("layers", "fsdp"), ("vocab", "tensor"), ("mlp", "tensor"), ("heads", "tensor"))
  rules += (("kv_heads", "tensor"), ("embed", None), ("norm", None))
  mesh = _mesh((2, 2, 2))
  config, model = load_hf_checkpoint(ckpt, scan_layers=True, mesh=mesh, rules=rules)
  _, ref = load_hf_checkpoint(ckpt, scan_layers=True)
  ref_params = _params(ref)
  for name, arr in _params(model).items():
    if "layers" in name:
      assert arr.sharding.spec[0] == "fsdp", name
      assert all(s.data.shape[0] == 1 for s in arr.addressable_shards), name
    np.testing.assert_array_equal(np.asarray(arr), np.asarray(ref_params[name]), err_msg=name)
  save_hf_checkpoint(model, config, tmp_path / "saved")
  assert (tmp_path / "saved" / "model.safetensors").read_bytes() == (
    ckpt / "model.safetensors"
  ).read_bytes()


def test_saving_a_model_with_host_parameters(ckpt, tmp_path):
  # the multi-process CLI saves a model rebuilt from a gathered (numpy) parameter tree
  config, model = load_hf_checkpoint(ckpt, scan_layers=True)
  graphdef, state = nnx.split(model)
  host = nnx.merge(graphdef, jax.tree.map(np.asarray, state))
  save_hf_checkpoint(host, config, tmp_path / "host")
  assert (tmp_path / "host" / "model.safetensors").read_bytes() == (
    ckpt / "model.safetensors"
  ).read_bytes()
