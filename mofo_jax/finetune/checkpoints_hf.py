"""Hugging Face safetensors checkpoints <-> ``LlamaForCausalLM``, on one device or sharded.

A Hugging Face tensor name is the NNX parameter path joined by dots with the leaf renamed:
``kernel``/``embedding``/``scale`` -> ``weight`` and ``bias`` -> ``bias``. Torch ``Linear``
weights are ``[out, in]``; our kernels are ``[in, out]``, so kernels are transposed on the way
in and out. Stacked layers (``scan_layers``) map slice ``i`` of the leading axis to
``model.layers.{i}``. ``config_from_hf`` / ``config_to_hf`` translate ``config.json``.

Loading onto a mesh: the model is built abstractly (``nnx.eval_shape``); each parameter's
``NamedSharding`` comes from its logical axis names and the rules. For every distinct shard
index this process's devices hold, exactly that slice is read from the files
(``safe_open(...).get_slice``: kernels are transposed and stacked layers assembled slice by
slice on the host) and put on those devices, one slice at a time. So host memory peaks at
about one shard of one tensor, no device ever holds more than its shard, and in a
multi-process run each process reads only its own devices' part of the checkpoint.

Saving: tensors go to the host one Hugging Face tensor at a time (one layer of a stacked
parameter) -- assembled from the local shards when the process holds them all, else
all-gathered one tensor at a time -- and are written into safetensors files of bounded size.
In a multi-process run every process joins the gathers and process 0 alone writes.
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from mofo_jax.finetune.model import (
  _MODEL_TYPES,
  LOGICAL_AXIS_RULES,
  Llama3RopeScaling,
  LlamaConfig,
  LlamaForCausalLM,
  param_shardings,
)

_LEAF_TO_HF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
_MAX_LISTED = 20
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


def config_from_hf(d: collections.abc.Mapping[str, Any], **overrides: Any) -> LlamaConfig:
  """Builds a ``LlamaConfig`` from a Hugging Face ``config.json`` dict (Llama, SmolLM, Qwen2).

  Accepts both the transformers 4 keys (``rope_theta``, ``rope_scaling``) and the
  transformers 5 ``rope_parameters`` dict.

  Args:
    d: the parsed ``config.json``.
    **overrides: fields to set regardless of ``d`` (e.g. ``dtype``, ``scan_layers``).

  Returns:
    The config.

  Raises:
    ValueError: naming the field when the model uses something this implementation does
      not (another ``model_type``, sliding-window attention, a non-SiLU activation, MLP
      biases, an unsupported RoPE type, partial rotary embeddings, attention dropout) or
      when a required field is missing.

  Example:
    >>> c = config_from_hf({"model_type": "llama", "vocab_size": 96, "hidden_size": 64,
    ...                     "intermediate_size": 96, "num_hidden_layers": 2,
    ...                     "num_attention_heads": 4}, scan_layers=True)
    >>> c.head_dim, c.num_key_value_heads, c.scan_layers
    (16, 4, True)
    >>> config_from_hf(config_to_hf(c), scan_layers=True) == c
    True
  """
  model_type = d.get("model_type")
  if model_type not in _MODEL_TYPES:
    raise ValueError(f"unsupported model_type {model_type!r}; supported: {_MODEL_TYPES}")
  unsupported = []
  if d.get("hidden_act", "silu") != "silu":
    unsupported.append(f"hidden_act={d['hidden_act']!r} (only 'silu')")
  if d.get("mlp_bias"):
    unsupported.append("mlp_bias=true")
  if d.get("use_sliding_window"):
    unsupported.append("use_sliding_window=true (sliding-window attention)")
  layer_types = set(d.get("layer_types") or ()) - {"full_attention"}
  if layer_types:
    unsupported.append(f"layer_types containing {sorted(layer_types)}")
  if d.get("partial_rotary_factor", 1.0) != 1.0:
    unsupported.append(f"partial_rotary_factor={d['partial_rotary_factor']}")
  if d.get("attention_dropout", 0.0):
    unsupported.append(f"attention_dropout={d['attention_dropout']}")
  rope = dict(d.get("rope_parameters") or {})
  rope.update(d.get("rope_scaling") or {})
  rope_type = rope.pop("rope_type", rope.pop("type", "default"))
  rope_theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
  rope_scaling = None
  if rope_type == "llama3":
    try:
      rope_scaling = Llama3RopeScaling(
        factor=float(rope["factor"]),
        low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
      )
    except KeyError as e:
      unsupported.append(f"rope_scaling of type llama3 without {e.args[0]!r}")
  elif rope_type != "default":
    unsupported.append(f"rope_scaling type {rope_type!r} (only 'default' and 'llama3')")
  if unsupported:
    raise ValueError(f"unsupported {model_type} config: " + "; ".join(unsupported))

  # Qwen2 always has q/k/v biases and never an output bias; Llama's attention_bias
  # switches all four.
  qkv_bias = True if model_type == "qwen2" else bool(d.get("attention_bias", False))
  out_bias = False if model_type == "qwen2" else qkv_bias
  try:
    kwargs = {
      "vocab_size": int(d["vocab_size"]),
      "hidden_size": int(d["hidden_size"]),
      "intermediate_size": int(d["intermediate_size"]),
      "num_hidden_layers": int(d["num_hidden_layers"]),
      "num_attention_heads": int(d["num_attention_heads"]),
      "num_key_value_heads": int(d.get("num_key_value_heads") or d["num_attention_heads"]),
      "head_dim": d.get("head_dim"),
      "rope_theta": float(rope_theta),
      "rope_scaling": rope_scaling,
      "rms_norm_eps": float(d.get("rms_norm_eps", 1e-6)),
      "tie_word_embeddings": bool(d.get("tie_word_embeddings", False)),
      "max_position_embeddings": int(d.get("max_position_embeddings", 2048)),
      "attention_bias": qkv_bias,
      "attention_out_bias": out_bias,
      "model_type": model_type,
    }
  except KeyError as e:
    raise ValueError(f"{model_type} config is missing required field {e.args[0]!r}") from e
  except (TypeError, ValueError) as e:
    raise ValueError(f"{model_type} config has a malformed field: {e}") from e
  kwargs.update(overrides)
  return LlamaConfig(**kwargs)


def config_to_hf(config: LlamaConfig) -> dict[str, Any]:
  """Returns a Hugging Face ``config.json`` dict that ``config_from_hf`` reads back.

  Args:
    config: the config to translate (training-only fields such as ``remat`` are dropped).

  Returns:
    A JSON-serialisable dict (transformers-4 style keys, which transformers 5 also reads).

  Example:
    >>> from mofo_jax.finetune.model import LlamaConfig
    >>> d = config_to_hf(LlamaConfig(96, 64, 96, 2, 4, 2, model_type="qwen2"))
    >>> d["architectures"], d["num_key_value_heads"], d["torch_dtype"]
    (['Qwen2ForCausalLM'], 2, 'float32')
  """
  c = config
  arch = "Qwen2ForCausalLM" if c.model_type == "qwen2" else "LlamaForCausalLM"
  d: dict[str, Any] = {
    "architectures": [arch],
    "model_type": c.model_type,
    "vocab_size": c.vocab_size,
    "hidden_size": c.hidden_size,
    "intermediate_size": c.intermediate_size,
    "num_hidden_layers": c.num_hidden_layers,
    "num_attention_heads": c.num_attention_heads,
    "num_key_value_heads": c.num_key_value_heads,
    "head_dim": c.head_dim,
    "hidden_act": "silu",
    "rope_theta": c.rope_theta,
    "rope_scaling": None,
    "rms_norm_eps": c.rms_norm_eps,
    "tie_word_embeddings": c.tie_word_embeddings,
    "max_position_embeddings": c.max_position_embeddings,
    "torch_dtype": c.param_dtype.name,
  }
  if c.rope_scaling is not None:
    d["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(c.rope_scaling)}
  if c.model_type == "llama":
    d["attention_bias"] = c.attention_bias
    d["mlp_bias"] = False
  else:
    d["use_sliding_window"] = False
  return d


def _hf_names(path: tuple, config: LlamaConfig) -> tuple[list[str], bool]:
  """HF tensor names of one parameter (one per layer for a stacked one), and whether stacked."""
  parts = [str(p) for p in path[:-1]] + [_LEAF_TO_HF[path[-1]]]
  if config.scan_layers and tuple(path[:2]) == ("model", "layers"):
    names = [".".join(parts[:2] + [str(i)] + parts[2:]) for i in range(config.num_hidden_layers)]
    return names, True
  return [".".join(parts)], False


def _hf_shape(shape: tuple, kernel: bool) -> tuple:
  """A (per-layer) shape or index as the HF tensor has it: kernels are transposed."""
  shape = tuple(shape)
  return shape[:-2] + shape[-2:][::-1] if kernel else shape


def _ignorable(name: str, config: LlamaConfig) -> bool:
  # Tied checkpoints sometimes still carry the head; old ones carry RoPE buffers.
  return (config.tie_word_embeddings and name == "lm_head.weight") or name.endswith(
    "rotary_emb.inv_freq"
  )


def _listing(names) -> str:
  names = sorted(names)
  more = f" ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
  return ", ".join(names[:_MAX_LISTED]) + more


def _index_key(index: tuple, shape: tuple) -> tuple[tuple[int, int], ...]:
  """A shard index (tuple of slices, possibly open) as hashable ``(start, stop)`` pairs."""
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


# --- where the tensors come from ------------------------------------------------------------


class _SafetensorsSource:
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
    """``index -> host array`` of one parameter in our layout, reading only that slice."""

    def read(key):
      shape = [hi - lo for lo, hi in key]
      out = np.empty(shape, dtype)
      rest = key[1:] if stacked else key
      hf_index = tuple(slice(lo, hi) for lo, hi in _hf_shape(rest, kernel))
      layer_names = names[key[0][0] : key[0][1]] if stacked else names
      for i, name in enumerate(layer_names):
        part = self.read(name, hf_index)
        # assignment converts the file dtype to the parameter dtype (round to nearest even)
        (out[i] if stacked else out)[...] = np.swapaxes(part, -1, -2) if kernel else part
      return out

    return read


class _HostSource:
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
  the next is read, so host memory holds about one slice. ``jax.make_array_from_callback``
  would read once per device and hold every local slice at once.
  """
  if sharding is None:  # one device, as the unsharded loader always did
    return jnp.asarray(read(tuple((0, n) for n in shape)))
  groups: dict[tuple, list] = {}
  index_map = sharding.addressable_devices_indices_map(shape)
  for device, index in index_map.items():
    groups.setdefault(_index_key(index, shape), []).append(device)
  placed = {}
  for key, devices in groups.items():
    host = read(key)
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
  tensors: collections.abc.Mapping[str, Any] | _SafetensorsSource | _HostSource,
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
    >>> config = LlamaConfig(96, 64, 96, 1, 4, 2, tie_word_embeddings=True)
    >>> tensors = hf_tensors_from_model(LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    >>> mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1])
    >>> model = model_from_hf_tensors(config, tensors, mesh=mesh)
    >>> tuple(model.model.embed_tokens.embedding[...].sharding.spec)
    ('tensor', 'fsdp')
  """
  is_source = isinstance(tensors, (_SafetensorsSource, _HostSource))
  source = tensors if is_source else _HostSource(tensors)
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
    names, stacked = _hf_names(path, config)
    kernel = path[-1] == "kernel"
    absent = [n for n in names if n not in available]
    if absent:
      missing += absent
      continue
    used.update(names)
    want = _hf_shape(var.shape[1:] if stacked else var.shape, kernel)
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
  index = path / _INDEX
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
  if (path / _SINGLE).is_file():
    return {_SINGLE: None}
  others = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
  hint = f" (found {others}: only safetensors is supported)" if others else ""
  raise FileNotFoundError(f"no {_SINGLE} or {_INDEX} in {path}{hint}")


@contextlib.contextmanager
def _open_safetensors(path: Path):
  """Opens the checkpoint's safetensors files (memory-mapped; nothing is read yet)."""
  with contextlib.ExitStack() as stack:
    handles = {}
    for file, names in _weight_map(path).items():
      try:
        f = stack.enter_context(safe_open(path / file, framework="numpy"))
      except SafetensorError as e:
        raise ValueError(f"{path / file} is truncated or not a safetensors file: {e}") from e
      held = set(f.keys())
      if names is None:
        names = held
      elif absent := sorted(set(names) - held):
        raise ValueError(
          f"{path / _INDEX} maps {_listing(absent)} to {file}, which does not hold them"
        )
      handles.update(dict.fromkeys(names, f))
    yield _SafetensorsSource(handles)


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
      ``model.safetensors.index.json`` plus its shards.
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
    >>> config = LlamaConfig(96, 64, 96, 1, 4, 2)
    >>> d = tempfile.mkdtemp()
    >>> save_hf_checkpoint(LlamaForCausalLM(config, rngs=nnx.Rngs(0)), config, f"{d}/m")
    >>> loaded, model = load_hf_checkpoint(f"{d}/m")
    >>> loaded == config
    True
  """
  path = Path(path)
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


# --- saving -----------------------------------------------------------------------------------


def _export_entries(model: LlamaForCausalLM) -> list[tuple[str, Any, int | None, bool]]:
  """(HF name, parameter array, layer or None, kernel) for every tensor the model saves."""
  entries = []
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    names, stacked = _hf_names(path, model.config)
    arr = var.get_value()
    for i, name in enumerate(names):
      entries.append((name, arr, i if stacked else None, path[-1] == "kernel"))
  return entries


def _take(arr: jax.Array, layer: jax.Array | None) -> jax.Array:
  return arr if layer is None else jax.lax.dynamic_index_in_dim(arr, layer, 0, keepdims=False)


def _to_host(arr: jax.Array, layer: int | None, kernel: bool) -> np.ndarray:
  """One HF tensor (a parameter, or one layer of a stacked one) as a host array.

  A layer is first taken on the devices, sharded like the rest of its parameter. When this
  process holds every shard, the host copy is assembled from the shards (each distinct one
  copied once), so no device ever holds more than its shard. Otherwise (several processes)
  this one tensor is all-gathered, which every process must join.
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
  if arr.is_fully_addressable:
    host = np.empty(arr.shape, arr.dtype)
    done = set()
    for shard in arr.addressable_shards:
      key = _index_key(shard.index, arr.shape)
      if key not in done:
        done.add(key)
        host[tuple(slice(lo, hi) for lo, hi in key)] = np.asarray(shard.data)
  else:
    gathered = jax.jit(_take, out_shardings=NamedSharding(mesh, P()))(arr, None)
    host = np.asarray(gathered.addressable_data(0))
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
    return [(_SINGLE, groups[0])]
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
      tensors = {name: _to_host(arr, layer, kernel) for name, arr, layer, kernel in entries}
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
        (tmp / _INDEX).write_text(json.dumps(index, indent=2) + "\n")
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
