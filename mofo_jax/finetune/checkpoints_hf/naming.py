"""Hugging Face names and configs: ``config.json`` <-> ``LlamaConfig``, and each parameter's
tensor names, layout and file names.

A Hugging Face tensor name is the NNX parameter path joined by dots with the leaf renamed:
``kernel``/``embedding``/``scale`` -> ``weight`` and ``bias`` -> ``bias``. Torch ``Linear``
weights are ``[out, in]``; our kernels are ``[in, out]``, so kernels are transposed on the way
in and out. Stacked layers (``scan_layers``) map slice ``i`` of the leading axis to
``model.layers.{i}``.
"""

from __future__ import annotations

import collections.abc
import dataclasses
from typing import Any

from mofo_jax.finetune.model import _MODEL_TYPES, Llama3RopeScaling, LlamaConfig

_LEAF_TO_HF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


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


def hf_names(path: tuple, config: LlamaConfig) -> tuple[list[str], bool]:
  """HF tensor names of one parameter (one per layer for a stacked one), and whether stacked."""
  parts = [str(p) for p in path[:-1]] + [_LEAF_TO_HF[path[-1]]]
  if config.scan_layers and tuple(path[:2]) == ("model", "layers"):
    names = [".".join(parts[:2] + [str(i)] + parts[2:]) for i in range(config.num_hidden_layers)]
    return names, True
  return [".".join(parts)], False


def hf_shape(shape: tuple, kernel: bool) -> tuple:
  """A (per-layer) shape or index as the HF tensor has it: kernels are transposed."""
  shape = tuple(shape)
  return shape[:-2] + shape[-2:][::-1] if kernel else shape


def index_key(index: tuple, shape: tuple) -> tuple[tuple[int, int], ...]:
  """A shard index (tuple of slices, possibly open) as hashable ``(start, stop)`` pairs."""
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape))
