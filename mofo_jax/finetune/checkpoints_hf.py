"""Hugging Face safetensors checkpoints <-> ``LlamaForCausalLM``.

A Hugging Face tensor name is the NNX parameter path joined by dots with the leaf renamed:
``kernel``/``embedding``/``scale`` -> ``weight`` and ``bias`` -> ``bias``. Torch ``Linear``
weights are ``[out, in]``; our kernels are ``[in, out]``, so kernels are transposed on the way
in and out. Stacked layers (``scan_layers``) map slice ``i`` of the leading axis to
``model.layers.{i}``.
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import json
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
from safetensors import safe_open
from safetensors.numpy import save_file

from mofo_jax.finetune.model import _MODEL_TYPES, Llama3RopeScaling, LlamaConfig, LlamaForCausalLM

_LEAF_TO_HF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
_MAX_LISTED = 20


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


def _hf_names(path: tuple, config: LlamaConfig) -> list[str]:
  """HF tensor names of one parameter; several (one per layer) for a stacked one."""
  parts = [str(p) for p in path[:-1]] + [_LEAF_TO_HF[path[-1]]]
  if config.scan_layers and tuple(path[:2]) == ("model", "layers"):
    return [".".join(parts[:2] + [str(i)] + parts[2:]) for i in range(config.num_hidden_layers)]
  return [".".join(parts)]


def _ignorable(name: str, config: LlamaConfig) -> bool:
  # Tied checkpoints sometimes still carry the head; old ones carry RoPE buffers.
  return (config.tie_word_embeddings and name == "lm_head.weight") or name.endswith(
    "rotary_emb.inv_freq"
  )


def _listing(names) -> str:
  names = sorted(names)
  more = f" ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
  return ", ".join(names[:_MAX_LISTED]) + more


def hf_tensors_from_model(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
  """Exports the parameters under Hugging Face names and layouts.

  Args:
    model: the model; its ``config`` decides tying and stacking.

  Returns:
    Name -> host array in the parameter dtype; 2-D weights are ``[out, in]``.
  """
  config = model.config
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    arr = np.asarray(jax.device_get(var[...]))
    if path[-1] == "kernel":
      arr = np.swapaxes(arr, -1, -2)
    names = _hf_names(path, config)
    slices = arr if len(names) > 1 else [arr]
    out.update({n: np.ascontiguousarray(a) for n, a in zip(names, slices)})
  return out


def model_from_hf_tensors(
  config: LlamaConfig, tensors: collections.abc.Mapping[str, Any]
) -> LlamaForCausalLM:
  """Builds a model whose parameters come from Hugging Face named tensors.

  The model is created abstractly (no random initialisation), then filled.

  Args:
    config: the architecture (its ``param_dtype`` is the dtype of the result).
    tensors: name -> array-like in Hugging Face layout; read lazily, each name once.

  Returns:
    The model.

  Raises:
    ValueError: listing missing tensors, unexpected tensors, or shape mismatches.
  """
  abstract = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flat = nnx.to_flat_state(state)
  available = set(tensors)
  missing, bad_shapes, used = [], [], set()
  values = []
  for path, var in flat:
    names = _hf_names(path, config)
    absent = [n for n in names if n not in available]
    if absent:
      missing += absent
      values.append(None)
      continue
    used.update(names)
    parts = [np.asarray(tensors[n]) for n in names]
    arr = np.stack(parts) if len(names) > 1 else parts[0]
    if path[-1] == "kernel":
      arr = np.swapaxes(arr, -1, -2)
    if arr.shape != var.shape:
      bad_shapes.append(
        f"{names[0]}: expected {_hf_shape(var.shape, path)}, got {_hf_shape(arr.shape, path)}"
      )
    values.append(arr)
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
  filled = [
    (path, var.replace(jnp.asarray(arr, dtype=config.param_dtype)))
    for (path, var), arr in zip(flat, values)
  ]
  return nnx.merge(graphdef, nnx.from_flat_state(filled))


def _hf_shape(shape: tuple, path: tuple) -> tuple:
  """A shape as the (unstacked) HF tensor has it, for error messages."""
  shape = tuple(shape)
  return shape[:-2] + shape[-2:][::-1] if path[-1] == "kernel" else shape


class _SafetensorsTensors(collections.abc.Mapping):
  """Read-only name -> numpy mapping over one or more open safetensors files."""

  def __init__(self, files: dict[str, Any]):
    self._files = files  # tensor name -> open safe_open handle

  def __getitem__(self, name: str) -> np.ndarray:
    return self._files[name].get_tensor(name)

  def __iter__(self):
    return iter(self._files)

  def __len__(self) -> int:
    return len(self._files)


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


def _weight_files(path: Path) -> list[str]:
  """The safetensors files of a checkpoint (the shards named by the index, if any)."""
  index = path / "model.safetensors.index.json"
  single = path / "model.safetensors"
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ValueError(f"{index} is not a valid safetensors index: {e!r}") from e
    files = sorted(set(weight_map.values()))
    absent = [f for f in files if not (path / f).is_file()]
    if absent:
      raise FileNotFoundError(f"{index} names shard files that are missing: {absent}")
    return files
  if single.is_file():
    return ["model.safetensors"]
  others = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
  hint = f" (found {others}: only safetensors is supported)" if others else ""
  raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}{hint}")


def load_hf_checkpoint(
  path: str | os.PathLike, dtype: Any = "float32", param_dtype: Any = None, **overrides: Any
) -> tuple[LlamaConfig, LlamaForCausalLM]:
  """Loads a Hugging Face Llama/SmolLM/Qwen2 checkpoint directory.

  Args:
    path: directory with ``config.json`` and ``model.safetensors`` or a sharded
      ``model.safetensors.index.json`` plus its shards.
    dtype: compute dtype (``"float32"`` or ``"bfloat16"``).
    param_dtype: parameter dtype; defaults to ``dtype``.
    **overrides: further ``LlamaConfig`` fields (e.g. ``scan_layers=True``, ``remat=True``).

  Returns:
    ``(config, model)``.

  Raises:
    FileNotFoundError: the directory, config or weight files are missing.
    ValueError: the config is malformed or unsupported, or the tensors do not match it.
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
  with contextlib.ExitStack() as stack:
    handles = {}
    for file in _weight_files(path):
      f = stack.enter_context(safe_open(path / file, framework="numpy"))
      handles.update({name: f for name in f.keys()})
    model = model_from_hf_tensors(config, _SafetensorsTensors(handles))
  return config, model


def save_hf_checkpoint(
  model: LlamaForCausalLM, config: LlamaConfig, path: str | os.PathLike
) -> None:
  """Writes ``config.json`` and ``model.safetensors`` that transformers can load.

  The files are written into a fresh sibling directory that is then renamed to ``path``,
  so ``path`` never holds a half-written checkpoint; an existing ``path`` is replaced.

  Args:
    model: the model to save.
    config: its config (written as a Hugging Face ``config.json``).
    path: target directory.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
  try:
    save_file(
      hf_tensors_from_model(model), str(tmp / "model.safetensors"), metadata={"format": "pt"}
    )
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
    shutil.rmtree(tmp, ignore_errors=True)
    raise
