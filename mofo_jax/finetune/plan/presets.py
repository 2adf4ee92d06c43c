"""The model configs ``plan`` knows by name, and reading one from a Hugging Face ``config.json``."""

from __future__ import annotations

import json
from typing import Any

from mofo_jax.finetune.plan.targets import PlanError

# Published configs (Hugging Face config.json) of the presets, as LlamaConfig fields.
_LLAMA3_ROPE = {
  "low_freq_factor": 1.0,
  "high_freq_factor": 4.0,
  "original_max_position_embeddings": 8192,
}
_LLAMA = {
  "vocab_size": 128256,
  "rope_theta": 500000.0,
  "rms_norm_eps": 1e-5,
  "max_position_embeddings": 131072,
}
PRESETS: dict[str, dict[str, Any]] = {
  "llama-3.2-1b": dict(
    _LLAMA,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    tie_word_embeddings=True,
    rope_scaling=dict(factor=32.0, **_LLAMA3_ROPE),
  ),
  "llama-3.2-3b": dict(
    _LLAMA,
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=28,
    num_attention_heads=24,
    num_key_value_heads=8,
    head_dim=128,
    tie_word_embeddings=True,
    rope_scaling=dict(factor=32.0, **_LLAMA3_ROPE),
  ),
  "llama-3.1-8b": dict(
    _LLAMA,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    rope_scaling=dict(factor=8.0, **_LLAMA3_ROPE),
  ),
  "llama-3.1-70b": dict(
    _LLAMA,
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    rope_scaling=dict(factor=8.0, **_LLAMA3_ROPE),
  ),
  "qwen2.5-7b": {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 32768,
    "attention_bias": True,
    "model_type": "qwen2",
  },
}


def model_config(model: str, **fields: Any):
  """The ``LlamaConfig`` of a preset name or of a Hugging Face ``config.json`` path.

  Args:
    model: a preset (``PRESETS``) or a path to ``config.json`` (or its directory), local or
      ``gs://``.
    **fields: ``LlamaConfig`` fields to set (dtypes, remat, scan_layers).

  Returns:
    The config.

  Example:
    >>> model_config("llama-3.1-8b").num_hidden_layers
    32
  """
  from mofo_jax.finetune import storage
  from mofo_jax.finetune.checkpoints_hf import config_from_hf
  from mofo_jax.finetune.model import LlamaConfig

  if model.lower() in PRESETS:
    return LlamaConfig(**{**PRESETS[model.lower()], **fields})
  path = storage.as_path(model)
  if path.is_dir():
    path = path / "config.json"
  if not path.is_file():
    raise PlanError(
      f"--model {model!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json file"
    )
  try:
    return config_from_hf(json.loads(path.read_text()), **fields)
  except (ValueError, OSError) as e:
    raise PlanError(f"--model {path}: {e}") from None
