"""Tests of the Llama-family model: config parsing, layer variants, masks, sharding, decoding."""

import dataclasses
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from mofo_jax.finetune.checkpoints_hf import (
  config_from_hf,
  config_to_hf,
  hf_tensors_from_model,
  model_from_hf_tensors,
)
from mofo_jax.finetune.model import (
  LOGICAL_AXIS_RULES,
  Llama3RopeScaling,
  count_params,
  greedy_generate,
  param_shardings,
)
from tests.finetune.conftest import TINY, forward, random_model, tiny_config

LLAMA3_ROPE = {
  "rope_type": "llama3",
  "factor": 8.0,
  "low_freq_factor": 1.0,
  "high_freq_factor": 4.0,
  "original_max_position_embeddings": 16,
}


def _hf_dict(**extra):
  return {"model_type": "llama", **TINY, **extra}


def test_from_hf_dict_llama_defaults_and_overrides():
  c = config_from_hf(
    _hf_dict(rope_theta=5e5, tie_word_embeddings=True), dtype="bfloat16", scan_layers=True
  )
  assert c.head_dim == 16 and c.rope_theta == 5e5 and c.tie_word_embeddings
  assert c.dtype == jnp.bfloat16 and c.param_dtype == jnp.float32 and c.scan_layers
  assert not c.attention_bias and c.rope_scaling is None
  hash(c)  # static module data must be hashable


@pytest.mark.parametrize("rope_key", ["rope_scaling", "rope_parameters"])
def test_from_hf_dict_llama3_rope_both_key_styles(rope_key):
  c = config_from_hf(_hf_dict(**{rope_key: dict(LLAMA3_ROPE, rope_theta=5e5)}))
  assert c.rope_scaling == Llama3RopeScaling(8.0, 1.0, 4.0, 16)
  assert c.rope_theta == 5e5
  assert config_from_hf(config_to_hf(c)) == c


def test_from_hf_dict_qwen2_biases():
  c = config_from_hf(
    {
      **_hf_dict(),
      "model_type": "qwen2",
      "use_sliding_window": False,
      "layer_types": ["full_attention"] * 2,
    }
  )
  assert c.attention_bias and not c.attention_out_bias and c.model_type == "qwen2"
  assert config_from_hf(config_to_hf(c)) == c
  llama = config_from_hf(_hf_dict(attention_bias=True))
  assert llama.attention_bias and llama.attention_out_bias


@pytest.mark.parametrize(
  "extra, needle",
  [
    ({"model_type": "mistral"}, "model_type 'mistral'"),
    ({"model_type": None}, "model_type None"),
    ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window"),
    ({"layer_types": ["sliding_attention", "full_attention"]}, "sliding_attention"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn'"),
    ({"rope_scaling": {"type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"attention_dropout": 0.1}, "attention_dropout"),
  ],
)
def test_from_hf_dict_rejects_unsupported(extra, needle):
  with pytest.raises(ValueError, match=needle):
    config_from_hf(_hf_dict(**extra))


def test_from_hf_dict_missing_field():
  d = _hf_dict()
  del d["intermediate_size"]
  with pytest.raises(ValueError, match="missing required field 'intermediate_size'"):
    config_from_hf(d)


def test_config_validation():
  with pytest.raises(ValueError, match="num_key_value_heads"):
    tiny_config(num_key_value_heads=3)
  with pytest.raises(ValueError, match="float16"):
    tiny_config(dtype="float16")


def _variant(model, **changes):
  """The same weights in a model built with other config flags (stacked, remat, ...)."""
  config = dataclasses.replace(model.config, **changes)
  return model_from_hf_tensors(config, hf_tensors_from_model(model))


@nnx.jit
def _logits_and_grads(model, token_ids):
  def loss(m):
    logits = m(token_ids)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

  (_, logits), grads = nnx.value_and_grad(loss, has_aux=True)(model)
  return logits, grads


def _grads_by_hf_name(model, grads):
  """Gradients keyed by Hugging Face tensor name (a copy of ``model`` holding them)."""
  copy = nnx.clone(model)
  nnx.update(copy, grads)
  return hf_tensors_from_model(copy)


@pytest.fixture(scope="module")
def plain_reference():
  """A random tiny model with its logits and gradients on fixed tokens."""
  model = random_model(tiny_config())
  ids = np.random.RandomState(0).randint(0, TINY["vocab_size"], (2, 24)).astype(np.int32)
  logits, grads = _logits_and_grads(model, ids)
  return model, ids, logits, _grads_by_hf_name(model, grads)


@pytest.mark.parametrize(
  "changes, check_grads",
  [
    (dict(scan_layers=True), False),
    (dict(remat=True), False),
    # one backward check covers both transforms (each gradient compile costs seconds)
    (dict(scan_layers=True, remat=True), True),
  ],
)
def test_stacked_and_remat_match_plain(plain_reference, changes, check_grads):
  model, ids, ref_logits, ref_grads = plain_reference
  other = _variant(model, **changes)
  if not check_grads:
    np.testing.assert_allclose(forward(other, ids), ref_logits, atol=2e-5, rtol=1e-5)
    return
  logits, grads = _logits_and_grads(other, ids)
  np.testing.assert_allclose(logits, ref_logits, atol=2e-5, rtol=1e-5)
  grads = _grads_by_hf_name(other, grads)
  for name, g in ref_grads.items():
    np.testing.assert_allclose(grads[name], g, atol=2e-5, rtol=1e-4, err_msg=name)


def test_stacked_params_have_layer_axis():
  model = random_model(tiny_config(scan_layers=True))
  q = model.model.layers.self_attn.q_proj.kernel
  assert q.shape == (2, 64, 64)
  assert q.get_metadata()["out_sharding"] == ("layers", "embed", "heads")


def test_segment_ids_isolate_packed_sequences():
  model = random_model(tiny_config())
  rs = np.random.RandomState(1)
  a, b = rs.randint(0, 96, 10), rs.randint(0, 96, 14)
  packed = np.concatenate([a, b])[None].astype(np.int32)
  segments = jnp.asarray([[0] * 10 + [1] * 14])
  positions = jnp.asarray([list(range(10)) + list(range(14))])
  out = forward(model, packed, positions=positions, segment_ids=segments)
  # separately, one per row; the padding after each sequence cannot reach it (causal)
  separate = np.zeros((2, 24), np.int32)
  separate[0, :10], separate[1, :14] = a, b
  alone = forward(
    model,
    separate,
    positions=jnp.tile(jnp.arange(24), (2, 1)),
    segment_ids=jnp.zeros((2, 24), jnp.int32),
  )
  np.testing.assert_allclose(out[0, :10], alone[0, :10], atol=2e-5)
  np.testing.assert_allclose(out[0, 10:], alone[1, :14], atol=2e-5)
  # without the segment mask the second sequence sees the first one
  unmasked = forward(model, packed, positions=positions, segment_ids=jnp.zeros_like(segments))
  assert np.abs(unmasked[:, 10:] - out[:, 10:]).max() > 1e-2


def test_rope_is_relative_in_positions(token_ids):
  model = random_model(tiny_config())
  t = token_ids.shape[1]
  base = forward(model, token_ids, jnp.broadcast_to(jnp.arange(t), token_ids.shape))
  shifted = forward(model, token_ids, jnp.broadcast_to(jnp.arange(t) + 7, token_ids.shape))
  np.testing.assert_allclose(shifted, base, atol=2e-4)
  squeezed = forward(model, token_ids, jnp.broadcast_to(jnp.arange(t) // 2, token_ids.shape))
  assert np.abs(squeezed - base).max() > 1e-2


def test_llama3_rope_scaling_changes_long_range_logits(token_ids):
  scaled = random_model(tiny_config(rope_scaling=Llama3RopeScaling(8.0, 1.0, 4.0, 16)))
  plain = _variant(scaled, rope_scaling=None)
  assert np.abs(forward(scaled, token_ids) - forward(plain, token_ids)).max() > 1e-2


def test_bfloat16_compute_keeps_float32_logits(token_ids):
  model = random_model(tiny_config())
  bf16 = _variant(model, dtype="bfloat16")
  out = forward(bf16, token_ids)
  assert out.dtype == jnp.float32
  ref = forward(model, token_ids)
  assert np.abs(out - ref).max() < 0.1 * np.abs(ref).max()


@pytest.mark.parametrize("tied", [True, False])
def test_count_params(tied):
  c = tiny_config(tie_word_embeddings=tied)
  d, f, v, kv = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_key_value_heads * 16
  per_layer = 2 * d + d * d * 2 + 2 * d * kv + 3 * d * f
  expected = v * d + 2 * per_layer + d + (0 if tied else d * v)
  model = random_model(c)
  assert count_params(model) == expected
  assert count_params(_variant(model, scan_layers=True)) == expected


def test_every_param_has_logical_axes_with_rules():
  for scan in (False, True):
    model = random_model(
      tiny_config(scan_layers=scan, attention_bias=True, attention_out_bias=True)
    )
    known = {name for name, _ in LOGICAL_AXIS_RULES}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
      names = var.get_metadata()["out_sharding"]
      assert len(names) == var.ndim, path
      assert set(names) <= known, path


def test_param_shardings_follow_rules():
  mesh = jax.make_mesh(
    (1, 1, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3
  )
  model = random_model(tiny_config(scan_layers=True, tie_word_embeddings=False))
  s = param_shardings(model, mesh)
  assert s["model"]["embed_tokens"]["embedding"].get_value().spec == P("tensor", "fsdp")
  assert s["lm_head"]["kernel"].get_value().spec == P("fsdp", "tensor")
  layers = s["model"]["layers"]
  assert layers["self_attn"]["q_proj"]["kernel"].get_value().spec == P(None, "fsdp", "tensor")
  assert layers["mlp"]["down_proj"]["kernel"].get_value().spec == P(None, "tensor", "fsdp")
  assert layers["input_layernorm"]["scale"].get_value().spec == P(None, None)


_SHARDED_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import PartitionSpec as P
    from flax import nnx
    from mofo_jax.finetune.model import shard_model
    from tests.finetune.conftest import forward, random_model, tiny_config
    assert len(jax.devices()) == 4
    mesh = jax.make_mesh((1, 2, 2), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    ids = np.random.RandomState(0).randint(0, 96, (2, 16)).astype(np.int32)
    model = random_model(tiny_config(scan_layers=True))
    ref = np.asarray(forward(model, ids))
    shard_model(model, mesh)
    emb = model.model.embed_tokens.embedding[...]
    assert emb.sharding.spec == P("tensor", "fsdp"), emb.sharding
    assert [s.data.shape for s in emb.addressable_shards] == [(48, 32)] * 4
    q = model.model.layers.self_attn.q_proj.kernel[...]
    assert [s.data.shape for s in q.addressable_shards] == [(2, 32, 32)] * 4
    out = forward(model, ids)
    np.testing.assert_allclose(np.asarray(out), ref, atol=5e-5)
    print("SHARDED-OK")
""")


def test_sharded_model_on_four_cpu_devices():
  flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  proc = subprocess.run(
    [sys.executable, "-c", _SHARDED_SCRIPT],
    env=env,
    cwd=root,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert "SHARDED-OK" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize("scan", [False, True])
def test_greedy_generate_matches_argmax_chain(scan):
  model = random_model(tiny_config(scan_layers=scan))
  prompt = np.random.RandomState(3).randint(0, 96, (2, 5)).astype(np.int32)
  out = np.asarray(greedy_generate(model, prompt, 6))
  assert out.shape == (2, 11) and (out[:, :5] == prompt).all()
  # causal: each generated token is the argmax of the logits one position earlier
  logits = np.asarray(forward(model, out))
  np.testing.assert_array_equal(out[:, 5:], logits[:, 4:-1].argmax(-1))
