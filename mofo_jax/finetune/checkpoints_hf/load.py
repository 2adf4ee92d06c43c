"""Reading a Hugging Face checkpoint onto one device or a mesh, each process only its part.

The model is built abstractly (``nnx.eval_shape``); each parameter's ``NamedSharding`` comes from
its logical axis names and the rules. For every distinct shard index this process's devices
hold, exactly that slice is read from the files (``safe_open(...).get_slice``: kernels are
transposed and stacked layers assembled slice by slice on the host) and put on those devices,
one slice at a time. So host memory peaks at about one shard of one tensor, no device ever holds
more than its shard, and in a multi-process run each process reads only its own devices' part of
the checkpoint. A ``gs://`` directory is read the same way through ranged reads
(``safetensors_ranges``): a process reads the rows of each tensor its slices span.
"""

from __future__ import annotations

import collections.abc
import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from mofo_jax.finetune import storage
from mofo_jax.finetune.checkpoints_hf.naming import (
  INDEX,
  SINGLE,
  config_from_hf,
  hf_names,
  hf_shape,
  index_key,
)
from mofo_jax.finetune.safetensors_ranges import SafetensorsFile
from mofo_jax.finetune.model import (
  LOGICAL_AXIS_RULES,
  LlamaConfig,
  LlamaForCausalLM,
  param_shardings,
)

_MAX_LISTED = 20


def _ignorable(name: str, config: LlamaConfig) -> bool:
  # Tied checkpoints sometimes still carry the head; old ones carry RoPE buffers.
  return (config.tie_word_embeddings and name == "lm_head.weight") or name.endswith(
    "rotary_emb.inv_freq"
  )


def _listing(names) -> str:
  names = sorted(names)
  more = f" ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
  return ", ".join(names[:_MAX_LISTED]) + more


# --- where the tensors come from ------------------------------------------------------------


class SafetensorsSource:
  """Tensors read slice by slice from open safetensors files (``safe_open(...).get_slice``)."""

  def __init__(self, handles: dict[str, Any]):
    self._handles = handles  # tensor name -> open safe_open handle

  def names(self) -> set[str]:
    return set(self._handles)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handles[name].get_slice(name).get_shape())

  def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
    """Reads ``tensor[index]`` (HF layout) and nothing else from the file."""
    return self._handles[name].get_slice(name)[index]

  def reader(self, names, stacked, kernel, dtype):
    """``index -> host array`` of one parameter in our layout, reading only that slice.

    Where the files are read by ranges of whole rows (``gs://``), the function also has
    ``many(keys)``: every key's slice from one read of the rows each HF tensor holds for them,
    or None when no two keys share rows (see :func:`_place`).
    """

    def hf_key(key):
      return hf_shape(key[1:] if stacked else key, kernel)

    def hf_index(key):
      return tuple(slice(lo, hi) for lo, hi in hf_key(key))

    def layers(key):
      return range(*key[0]) if stacked else range(len(names))

    def put(out, key, layer, part):
      # assignment converts the file dtype to the parameter dtype (round to nearest even)
      target = out[layer - key[0][0]] if stacked else out
      target[...] = np.swapaxes(part, -1, -2) if kernel else part

    def read(key):
      out = np.empty([hi - lo for lo, hi in key], dtype)
      for layer in layers(key):
        put(out, key, layer, self.read(names[layer], hf_index(key)))
      return out

    def many(keys):
      by_rows: dict[tuple, list] = {}
      for key in keys:
        by_rows.setdefault((key[0] if stacked else None, hf_key(key)[0]), []).append(key)
      if all(len(group) == 1 for group in by_rows.values()):
        return None
      outs = {key: np.empty([hi - lo for lo, hi in key], dtype) for key in keys}
      for (_, rows), group in by_rows.items():
        for layer in layers(group[0]):
          whole = self.read(names[layer], (slice(*rows),))  # once, for every key's columns
          for key in group:
            put(outs[key], key, layer, whole[(slice(None), *hf_index(key)[1:])])
      return outs

    if all(getattr(self._handles[n], "reads_whole_rows", False) for n in names):
      read.many = many
    return read


class HostSource:
  """Tensors held whole in host memory (an in-memory mapping, or GGUF dequantized on access).

  Each parameter is assembled once on the host, then only its slices go to the devices.
  """

  def __init__(
    self,
    tensors: collections.abc.Mapping[str, Any],
    shape: collections.abc.Callable[[str], tuple[int, ...]] | None = None,
  ):
    self._tensors = tensors
    self._shape = shape  # name -> shape without reading the tensor, if the mapping can

  def names(self) -> set[str]:
    return set(self._tensors)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._shape(name) if self._shape else np.shape(self._tensors[name]))

  def reader(self, names, stacked, kernel, dtype):
    parts = [np.asarray(self._tensors[n]) for n in names]
    arr = np.stack(parts) if stacked else parts[0]
    arr = np.asarray(np.swapaxes(arr, -1, -2) if kernel else arr, dtype=dtype)
    return lambda key: arr[tuple(slice(lo, hi) for lo, hi in key)]


def _place(shape: tuple, sharding: jax.sharding.Sharding | None, read) -> jax.Array:
  """Builds one global array from host reads of the slices this process's devices hold.

  Each distinct shard index is read once (replicas share it) and put on its devices before
  the next is read, so host memory holds about one slice (all of this process's slices where
  ``read.many`` reads shared rows once). ``jax.make_array_from_callback``
  would read once per device and hold every local slice at once.
  """
  if sharding is None:  # one device, as the unsharded loader always did
    return jnp.asarray(read(tuple((0, n) for n in shape)))
  groups: dict[tuple, list] = {}
  index_map = sharding.addressable_devices_indices_map(shape)
  for device, index in index_map.items():
    groups.setdefault(index_key(index, shape), []).append(device)
  # Slices that split a file's rows (columns of an HF tensor) would each fetch the whole rows
  # from a ranged source: there the rows are read once and every local slice cut from them,
  # holding this process's slices of the parameter at once instead of one.
  many = getattr(read, "many", None)
  hosts = many(list(groups)) if many is not None and len(groups) > 1 else None
  placed = {}
  for key, devices in groups.items():
    host = read(key) if hosts is None else hosts.pop(key)
    for device in devices:
      placed[device] = jax.device_put(host, device)
    jax.block_until_ready([placed[d] for d in devices])  # transfers are async; free `host` now
    del host
  return jax.make_array_from_single_device_arrays(shape, sharding, [placed[d] for d in index_map])


# --- the mesh ---------------------------------------------------------------------------------

# Logical axis -> the config field that counts it, for the divisibility check.
_LOGICAL_COUNTS = {
  "vocab": "vocab_size",
  "embed": "hidden_size",
  "mlp": "intermediate_size",
  "heads": "num_attention_heads",
  "kv_heads": "num_key_value_heads",
  "layers": "num_hidden_layers",
}


def check_mesh(config: LlamaConfig, mesh: jax.sharding.Mesh, rules=LOGICAL_AXIS_RULES) -> None:
  """Checks that every mesh axis a model dimension is sharded over divides that dimension.

  Attention heads are never split across devices: ``heads`` and ``kv_heads`` must be divided
  by the head counts, not only by their widths.

  Args:
    config: the model.
    mesh: the target mesh (a ``Mesh`` or an ``AbstractMesh``).
    rules: (logical name, mesh axis or axes or None) pairs, as in ``LOGICAL_AXIS_RULES``.

  Raises:
    ValueError: one line naming each mesh axis, its size and the model size it does not
      divide, or a mesh axis the rules use that the mesh lacks.

  Example:
    >>> from mofo_jax.finetune.model import LlamaConfig
    >>> mesh = jax.sharding.AbstractMesh((1, 1, 8), ("data", "fsdp", "tensor"))
    >>> check_mesh(LlamaConfig(96, 64, 96, 2, 4, 2), mesh)
    Traceback (most recent call last):
    ...
    ValueError: mesh axis 'tensor' of size 8 does not divide num_attention_heads=4 (logical axis 'heads'); mesh axis 'tensor' of size 8 does not divide num_key_value_heads=2 (logical axis 'kv_heads')
  """
  sizes = dict(mesh.shape)
  problems = []
  for logical, axes in rules:
    if logical not in _LOGICAL_COUNTS or axes is None:
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    absent = [a for a in axes if a not in sizes]
    if absent:
      problems.append(
        f"rules map {logical!r} to mesh axis {absent[0]!r}, which the mesh "
        f"{tuple(mesh.axis_names)} lacks"
      )
      continue
    size = math.prod(sizes[a] for a in axes)
    field = _LOGICAL_COUNTS[logical]
    count = getattr(config, field)
    if count % size:
      name = "/".join(axes)
      problems.append(
        f"mesh axis {name!r} of size {size} does not divide {field}={count} "
        f"(logical axis {logical!r})"
      )
  if problems:
    raise ValueError("; ".join(problems))


# --- loading ----------------------------------------------------------------------------------


def model_from_hf_tensors(
  config: LlamaConfig,
  tensors: collections.abc.Mapping[str, Any] | SafetensorsSource | HostSource,
  *,
  mesh: jax.sharding.Mesh | None = None,
  rules=LOGICAL_AXIS_RULES,
) -> LlamaForCausalLM:
  """Builds a model whose parameters come from Hugging Face named tensors.

  The model is created abstractly (``nnx.eval_shape``: no random initialisation). Without a
  mesh each parameter is assembled on the host and put on the default device. With a mesh
  each parameter is built directly in its ``NamedSharding`` (from its logical axis names
  and ``rules``): only the slices this process's devices hold are read, one at a time.

  Args:
    config: the architecture (its ``param_dtype`` is the dtype of the result).
    tensors: name -> array-like in Hugging Face layout (read lazily, each name once), or a
      tensor source of this module (the safetensors one reads slices from the files).
    mesh: target mesh, e.g. axes ``("data", "fsdp", "tensor")``; None for one device.
    rules: (logical name, mesh axis or None) pairs; used only with a mesh.

  Returns:
    The model.

  Raises:
    ValueError: listing missing tensors, unexpected tensors, or shape mismatches; or a mesh
      axis that does not divide the dimension it shards.

  Example:
    >>> from mofo_jax.finetune.model import LlamaConfig
    >>> from mofo_jax.finetune.checkpoints_hf.save import hf_tensors_from_model
    >>> config = LlamaConfig(96, 64, 96, 1, 4, 2, tie_word_embeddings=True)
    >>> tensors = hf_tensors_from_model(LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    >>> mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1])
    >>> model = model_from_hf_tensors(config, tensors, mesh=mesh)
    >>> tuple(model.model.embed_tokens.embedding[...].sharding.spec)
    ('tensor', 'fsdp')
  """
  is_source = isinstance(tensors, (SafetensorsSource, HostSource))
  source = tensors if is_source else HostSource(tensors)
  abstract = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flat = nnx.to_flat_state(state)
  shardings = [None] * len(flat)
  if mesh is not None:
    check_mesh(config, mesh, rules)
    shardings = [
      v.get_value() for _, v in nnx.to_flat_state(param_shardings(abstract, mesh, rules))
    ]
  available = source.names()
  missing, bad_shapes, used = [], [], set()
  plans = []
  for path, var in flat:
    names, stacked = hf_names(path, config)
    kernel = path[-1] == "kernel"
    absent = [n for n in names if n not in available]
    if absent:
      missing += absent
      continue
    used.update(names)
    want = hf_shape(var.shape[1:] if stacked else var.shape, kernel)
    got = [source.shape(n) for n in names]
    wrong = [(n, s) for n, s in zip(names, got) if s != want]
    if wrong:
      bad_shapes.append(f"{wrong[0][0]}: expected {want}, got {wrong[0][1]}")
    plans.append((names, stacked, kernel))
  unexpected = {n for n in available - used if not _ignorable(n, config)}
  problems = []
  if missing:
    problems.append(f"missing tensors: {_listing(missing)}")
  if unexpected:
    problems.append(f"unexpected tensors: {_listing(unexpected)}")
  if bad_shapes:
    problems.append("shape mismatches: " + "; ".join(bad_shapes[:_MAX_LISTED]))
  if problems:
    raise ValueError("checkpoint does not match the config: " + " | ".join(problems))
  filled = []
  for (path, var), sharding, (names, stacked, kernel) in zip(flat, shardings, plans):
    read = source.reader(names, stacked, kernel, config.param_dtype)
    filled.append((path, var.replace(_place(var.shape, sharding, read))))
  return nnx.merge(graphdef, nnx.from_flat_state(filled))


def _read_config(path: Path) -> dict:
  cfg_file = path / "config.json"
  if not cfg_file.is_file():
    raise FileNotFoundError(f"no config.json in {path}")
  try:
    d = json.loads(cfg_file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{cfg_file} is not valid JSON: {e}") from e
  if not isinstance(d, dict):
    raise ValueError(f"{cfg_file} must hold a JSON object, got {type(d).__name__}")
  return d


def _weight_map(path: Path) -> dict[str, list[str] | None]:
  """File -> the tensor names the index assigns to it (None: every tensor of the file)."""
  index = path / INDEX
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
      files: dict[str, list[str] | None] = {}
      for name, file in weight_map.items():
        files.setdefault(str(file), []).append(str(name))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
      raise ValueError(f"{index} is not a valid safetensors index: {e!r}") from e
    absent = sorted(f for f in files if not (path / f).is_file())
    if absent:
      raise FileNotFoundError(f"{index} names shard files that are missing: {absent}")
    return files
  if (path / SINGLE).is_file():
    return {SINGLE: None}
  others = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
  hint = f" (found {others}: only safetensors is supported)" if others else ""
  raise FileNotFoundError(f"no {SINGLE} or {INDEX} in {path}{hint}")


@contextlib.contextmanager
def _open_safetensors(path: Path):
  """Opens the checkpoint's safetensors files (memory-mapped, or streams on ``gs://``; nothing
  is read yet but their headers)."""
  with contextlib.ExitStack() as stack:
    handles = {}
    for file, names in _weight_map(path).items():
      try:
        f = stack.enter_context(
          # Cloud storage cannot be memory-mapped: ranged reads of the same slices instead.
          SafetensorsFile(path / file)
          if storage.is_remote(path)
          else safe_open(path / file, framework="numpy")
        )
      except SafetensorError as e:
        raise ValueError(f"{path / file} is truncated or not a safetensors file: {e}") from e
      held = set(f.keys())
      if names is None:
        names = held
      elif absent := sorted(set(names) - held):
        raise ValueError(
          f"{path / INDEX} maps {_listing(absent)} to {file}, which does not hold them"
        )
      handles.update(dict.fromkeys(names, f))
    yield SafetensorsSource(handles)


def load_hf_checkpoint(
  path: str | os.PathLike,
  dtype: Any = "float32",
  param_dtype: Any = None,
  *,
  mesh: jax.sharding.Mesh | None = None,
  rules=LOGICAL_AXIS_RULES,
  **overrides: Any,
) -> tuple[LlamaConfig, LlamaForCausalLM]:
  """Loads a Hugging Face Llama/SmolLM/Qwen2 checkpoint directory, optionally sharded.

  With a mesh, every parameter is created directly in its ``NamedSharding`` and each process
  reads from the files only the slices its devices hold (see ``model_from_hf_tensors``).

  Args:
    path: directory with ``config.json`` and ``model.safetensors`` or a sharded
      ``model.safetensors.index.json`` plus its shards; a local path or a ``gs://`` URL (read
      in ranges, see ``safetensors_ranges``).
    dtype: compute dtype (``"float32"`` or ``"bfloat16"``).
    param_dtype: parameter dtype; defaults to ``dtype``.
    mesh: target mesh (axes as ``rules`` use them); None loads onto the default device.
    rules: (logical name, mesh axis or None) pairs; default ``LOGICAL_AXIS_RULES``.
    **overrides: further ``LlamaConfig`` fields (e.g. ``scan_layers=True``, ``remat=True``).

  Returns:
    ``(config, model)``.

  Raises:
    FileNotFoundError: the directory, config or weight files are missing.
    ValueError: the config is malformed or unsupported, a file is truncated or corrupt, the
      index and its files disagree, the tensors do not match the config, or the mesh does
      not divide the model.

  Example:
    >>> import tempfile
    >>> from mofo_jax.finetune.model import LlamaConfig
    >>> from mofo_jax.finetune.checkpoints_hf.save import save_hf_checkpoint
    >>> config = LlamaConfig(96, 64, 96, 1, 4, 2)
    >>> d = tempfile.mkdtemp()
    >>> save_hf_checkpoint(LlamaForCausalLM(config, rngs=nnx.Rngs(0)), config, f"{d}/m")
    >>> loaded, model = load_hf_checkpoint(f"{d}/m")
    >>> loaded == config
    True
  """
  path = storage.as_path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"checkpoint directory {path} does not exist")
  config = config_from_hf(
    _read_config(path),
    dtype=dtype,
    param_dtype=dtype if param_dtype is None else param_dtype,
    **overrides,
  )
  with _open_safetensors(path) as source:
    model = model_from_hf_tensors(config, source, mesh=mesh, rules=rules)
  return config, model
