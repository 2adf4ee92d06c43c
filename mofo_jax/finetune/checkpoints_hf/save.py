"""Writing a (sharded) model as Hugging Face safetensors files of bounded size.

Tensors go to the host one Hugging Face tensor at a time (one layer of a stacked parameter) --
assembled from the local shards when the process holds them all, else all-gathered one tensor
at a time, in runs of rows -- and are written into safetensors files of bounded size. In a multi-process run
every process joins the gathers and process 0 alone writes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors.numpy import save_file

from mofo_jax import _sharding
from mofo_jax.finetune.checkpoints_hf.naming import INDEX, SINGLE, config_to_hf, hf_names, index_key
from mofo_jax.finetune.model import LlamaConfig, LlamaForCausalLM

GATHER_BYTES = 1 << 28  # per device, beyond its shards, while a multi-process save gathers


def _export_entries(model: LlamaForCausalLM) -> list[tuple[str, Any, int | None, bool]]:
  """(HF name, parameter array, layer or None, kernel) for every tensor the model saves."""
  entries = []
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    names, stacked = hf_names(path, model.config)
    arr = var.get_value()
    for i, name in enumerate(names):
      entries.append((name, arr, i if stacked else None, path[-1] == "kernel"))
  return entries


def _take(arr: jax.Array, layer: jax.Array | None) -> jax.Array:
  return arr if layer is None else jax.lax.dynamic_index_in_dim(arr, layer, 0, keepdims=False)


def _rows(arr: jax.Array, start: int, size: int) -> jax.Array:
  return arr[start : start + size]


def _run_gatherer(replicated: NamedSharding):
  """``(arr, start, size) -> arr[start:start + size]`` on every device of ``replicated``. The
  start is static: with a traced one XLA all-gathers the whole tensor and then slices it."""
  return jax.jit(_rows, static_argnums=(1, 2), out_shardings=replicated)


def _gathered(arr: jax.Array, wanted: bool) -> np.ndarray | None:
  """``arr``, spread over several processes, on this host (None where not ``wanted``):
  all-gathered in runs of leading rows of at most ``GATHER_BYTES``, so that each device holds
  one run beside its shards, not the whole tensor (a 70B model's float32 embedding is 4.2 GB).
  Every process must call it; one program per run (the same runs for every layer)."""
  mesh = arr.sharding.mesh
  if _sharding.is_explicit(mesh):
    # Explicit axes refuse a slice that cuts across shards: the same layout on Auto axes (no
    # data moves) leaves the slicing to XLA's partitioner.
    mesh = jax.sharding.Mesh(
      mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names)
    )
    arr = jax.device_put(arr, NamedSharding(mesh, arr.sharding.spec))
  replicated = NamedSharding(mesh, P())
  rows = arr.shape[0]
  step = max(1, min(rows, GATHER_BYTES * rows // max(arr.nbytes, 1)))
  gather = _run_gatherer(replicated)
  host = np.empty(arr.shape, arr.dtype) if wanted else None
  for start in range(0, rows, step):
    run = gather(arr, start, min(step, rows - start))
    if host is None:
      run.block_until_ready()  # one gathered run on the devices at a time
    else:
      host[start : start + run.shape[0]] = np.asarray(run.addressable_data(0))
  return host


def _to_host(
  arr: jax.Array, layer: int | None, kernel: bool, wanted: bool = True
) -> np.ndarray | None:
  """One HF tensor (a parameter, or one layer of a stacked one) as a host array.

  A layer is first taken on the devices, sharded like the rest of its parameter. When this
  process holds every shard, the host copy is assembled from the shards (each distinct one
  copied once), so no device ever holds more than its shard. Otherwise (several processes)
  this one tensor is all-gathered, which every process must join; a process that does not
  write (``wanted`` False) joins the gather and returns None, copying nothing to its host.
  """
  if not isinstance(arr, jax.Array):  # already on the host (e.g. a gathered numpy tree)
    host = np.asarray(arr if layer is None else arr[layer])
    return np.ascontiguousarray(np.swapaxes(host, -1, -2)) if kernel else host
  sharding = arr.sharding
  mesh = getattr(sharding, "mesh", None)
  if layer is not None:
    # one SPMD program per parameter shape (the layer is traced), not one per device
    out = sharding if mesh is None else NamedSharding(mesh, P(*sharding.spec[1:]))
    arr = jax.jit(_take, out_shardings=out)(arr, layer)
  if not arr.is_fully_addressable:
    host = _gathered(arr, wanted)
    if host is None:
      return None
  elif not wanted:
    return None
  else:
    host = np.empty(arr.shape, arr.dtype)
    done = set()
    for shard in arr.addressable_shards:
      key = index_key(shard.index, arr.shape)
      if key not in done:
        done.add(key)
        host[tuple(slice(lo, hi) for lo, hi in key)] = np.asarray(shard.data)
  return np.ascontiguousarray(np.swapaxes(host, -1, -2)) if kernel else host


def hf_tensors_from_model(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
  """Exports the parameters under Hugging Face names and layouts, whole on the host.

  Args:
    model: the model (sharded or not); its ``config`` decides tying and stacking.

  Returns:
    Name -> host array in the parameter dtype; 2-D weights are ``[out, in]``.

  Example:
    >>> from mofo_jax.finetune.model import LlamaConfig
    >>> config = LlamaConfig(96, 64, 96, 1, 4, 2, tie_word_embeddings=True)
    >>> t = hf_tensors_from_model(LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    >>> t["model.layers.0.self_attn.k_proj.weight"].shape
    (32, 64)
  """
  return {name: _to_host(arr, layer, kernel) for name, arr, layer, kernel in _export_entries(model)}


def _file_plan(entries, max_shard_size: int) -> list[tuple[str, list]]:
  """Splits the entries into files of at most ``max_shard_size`` bytes (HF's shard names)."""
  groups: list[list] = [[]]
  size = 0
  for entry in entries:
    arr, layer = entry[1], entry[2]
    nbytes = arr.nbytes // (arr.shape[0] if layer is not None else 1)
    if groups[-1] and size + nbytes > max_shard_size:
      groups.append([])
      size = 0
    groups[-1].append(entry)
    size += nbytes
  if len(groups) == 1:
    return [(SINGLE, groups[0])]
  n = len(groups)
  return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


def save_hf_checkpoint(
  model: LlamaForCausalLM,
  config: LlamaConfig,
  path: str | os.PathLike,
  *,
  max_shard_size: int = 5 * 10**9,
) -> None:
  """Writes ``config.json`` and safetensors weights that transformers can load.

  The model may be sharded. Tensors are copied to the host one at a time (one layer of a
  stacked parameter at a time) and written in files of at most ``max_shard_size`` bytes: one
  ``model.safetensors`` if everything fits, else numbered shards plus
  ``model.safetensors.index.json`` as transformers writes them. Host memory peaks at about
  one file; no device gathers the model. When the parameters are spread over several
  processes, every process must call this with the same arguments (they join one
  all-gather per tensor) and only process 0 writes; all return once the directory is
  complete. A model whose parameters one process holds whole is written by the caller alone.

  The files are written into a fresh sibling directory that is then renamed to ``path``,
  so ``path`` never holds a half-written checkpoint; an existing ``path`` is replaced.

  Args:
    model: the model to save.
    config: its config (written as a Hugging Face ``config.json``).
    path: target directory.
    max_shard_size: largest size of one safetensors file in bytes (a bigger single tensor
      gets a file of its own).

  Example:
    >>> import os, tempfile
    >>> from mofo_jax.finetune.model import LlamaConfig
    >>> config = LlamaConfig(96, 64, 96, 1, 4, 2)
    >>> d = tempfile.mkdtemp()
    >>> model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    >>> save_hf_checkpoint(model, config, f"{d}/m", max_shard_size=40_000)
    >>> files = sorted(os.listdir(f"{d}/m"))
    >>> files[:2], files[-1]
    (['config.json', 'model-00001-of-00007.safetensors'], 'model.safetensors.index.json')
  """
  path = Path(path)
  entries = _export_entries(model)
  # Parameters spread over several processes need every process here; a process that
  # holds the whole model (e.g. after a gather) may save it alone.
  collective = any(isinstance(e[1], jax.Array) and not e[1].is_fully_addressable for e in entries)
  lead = jax.process_index() == 0 or not collective
  plan = _file_plan(entries, max_shard_size)
  tmp = None
  if lead:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
  error = None
  try:
    for file, entries in plan:
      # every process takes part in the gathers, even after a write failed on process 0,
      # so that none waits forever in a collective
      # only the writer copies the tensors to its host; the others join the gathers alone
      tensors = {name: _to_host(arr, layer, kernel, lead) for name, arr, layer, kernel in entries}
      if lead and error is None:
        try:
          save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        except OSError as e:
          error = e
      del tensors
    if lead and error is None:
      if len(plan) > 1:
        weight_map = {e[0]: file for file, entries in plan for e in entries}
        total = sum((tmp / file).stat().st_size for file, _ in plan)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
      (tmp / "config.json").write_text(json.dumps(config_to_hf(config), indent=2) + "\n")
      os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only
      if path.exists():
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex}"
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old)
      else:
        os.rename(tmp, path)
  except BaseException:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
    raise
  if error is not None:
    shutil.rmtree(tmp, ignore_errors=True)
    raise error
  if collective:
    multihost_utils.sync_global_devices(f"save_hf_checkpoint {path}")
