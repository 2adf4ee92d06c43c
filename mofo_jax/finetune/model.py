"""Llama-family decoder (Llama, SmolLM, Qwen2) in Flax NNX, laid out like Hugging Face's.

Parameter paths follow the Hugging Face module names, so ``model.layers[3].self_attn.q_proj``
here is ``model.layers.3.self_attn.q_proj`` there. Every projection is an ``nnx.Linear`` whose
``kernel`` is 2-D ``[in, out]`` (the transpose of a torch ``weight``); with
``scan_layers=True`` the decoder layers are one module whose parameters carry a leading
``layers`` axis of size ``num_hidden_layers``.

Each parameter carries logical axis names (``out_sharding`` metadata); ``LOGICAL_AXIS_RULES``
maps them onto a ``(data, fsdp, tensor)`` mesh and ``param_shardings`` / ``shard_model`` apply
them. Activations are constrained too, when a mesh is in context (``jax.set_mesh`` outside
``jit``, or ``jax.sharding.use_abstract_mesh`` inside, as the train step does): their batch
dimension is split over ``data`` and ``fsdp`` and their head / FFN dimension over ``tensor``,
so FSDP gives data parallelism instead of every device computing the global batch.

Precision: ``param_dtype`` is what the parameters (and so the optimizer's master copy) are
stored in, ``dtype`` what the matmuls compute in. Pods use float32 parameters with bfloat16
compute: weights are cast to bfloat16 inside each layer (after the FSDP shard is gathered, so
the gather moves half the bytes), gradients come back in float32, and steps far smaller than
a weight's bfloat16 spacing still accumulate. bfloat16 parameters halve parameter memory but
round every update to 8 significant bits: see ``docs/pod.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Logical axis name -> mesh axis. Weights are sharded along the model dimension by the
# "fsdp" axis (ZeRO-3 style) and along heads / FFN / vocabulary by "tensor" (Megatron style);
# norm scales and the stacked-layer axis stay replicated.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("norm", None),
  ("layers", None),
)

# Mesh axes the batch dimension of activations is split over (in this order).
ACTIVATION_BATCH_AXES = ("data", "fsdp")

_DTYPES = ("float32", "bfloat16")
_MODEL_TYPES = ("llama", "qwen2")


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
  """Llama-3.1 style RoPE frequency scaling (Hugging Face ``rope_type: llama3``).

  Attributes:
    factor: divisor applied to the low (long-wavelength) frequencies.
    low_freq_factor: wavelengths above ``original_max_position_embeddings / low_freq_factor``
      are fully scaled.
    high_freq_factor: wavelengths below ``original_max_position_embeddings /
      high_freq_factor`` are left alone; in between the two are blended.
    original_max_position_embeddings: context length of the unscaled model.
  """

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture and numerics of a Llama-family model.

  Hashable (it is static data of the module graph): ``rope_scaling`` given as a dict is
  converted to ``Llama3RopeScaling`` and dtypes given as strings to numpy dtypes.

  Attributes:
    vocab_size: number of token embeddings.
    hidden_size: model width ``D``.
    intermediate_size: SwiGLU hidden width.
    num_hidden_layers: decoder layers.
    num_attention_heads: query heads ``H``.
    num_key_value_heads: key/value heads (grouped-query attention); divides ``H``.
    head_dim: per-head width; ``None`` means ``hidden_size // num_attention_heads``.
    rope_theta: RoPE base.
    rope_scaling: ``None`` or Llama-3 scaling (``Llama3RopeScaling`` or its dict).
    rms_norm_eps: RMSNorm epsilon.
    tie_word_embeddings: LM head reuses the embedding table.
    max_position_embeddings: context length (informational; RoPE has no table).
    attention_bias: biases on the q/k/v projections (Qwen2).
    attention_out_bias: bias on the output projection (Llama with ``attention_bias``).
    model_type: ``"llama"`` or ``"qwen2"``; only used to write a Hugging Face config.
    dtype: compute dtype, ``float32`` or ``bfloat16``; logits are always float32.
    param_dtype: storage dtype of the parameters.
    remat: rematerialise each decoder layer in the backward pass (``nnx.remat``).
    scan_layers: stack the layers (leading ``layers`` axis) and run them with ``nnx.scan``.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int | None = None
  rope_theta: float = 10000.0
  rope_scaling: Llama3RopeScaling | Mapping[str, Any] | None = None
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 2048
  attention_bias: bool = False
  attention_out_bias: bool = False
  model_type: str = "llama"
  dtype: Any = "float32"
  param_dtype: Any = "float32"
  remat: bool = False
  scan_layers: bool = False

  def __post_init__(self):
    set_ = functools.partial(object.__setattr__, self)
    if self.head_dim is None:
      set_("head_dim", self.hidden_size // self.num_attention_heads)
    if isinstance(self.rope_scaling, Mapping):
      set_("rope_scaling", Llama3RopeScaling(**self.rope_scaling))
    for name in ("dtype", "param_dtype"):
      dt = jnp.dtype(getattr(self, name))
      if dt.name not in _DTYPES:
        raise ValueError(f"{name}={dt.name} is not supported (use one of {_DTYPES})")
      set_(name, dt)
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
        f"num_attention_heads={self.num_attention_heads} is not a multiple of "
        f"num_key_value_heads={self.num_key_value_heads}"
      )
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
    if self.model_type not in _MODEL_TYPES:
      raise ValueError(f"model_type={self.model_type!r} is not one of {_MODEL_TYPES}")


def _meta(*names: str) -> dict[str, Any]:
  # Eager sharding would need a mesh at construction time; the model is sharded afterwards
  # (param_shardings / shard_model) so it can also be built and run without one.
  return {"out_sharding": names, "eager_sharding": False}


def constrain_activation(x: jax.Array, *dims: str | None) -> jax.Array:
  """Pins an activation's layout on the mesh in context; a no-op without one.

  Args:
    x: the activation.
    *dims: per dimension of ``x``: ``"batch"`` (split over the ``ACTIVATION_BATCH_AXES`` the
      mesh has), a mesh axis name (used when the mesh has it), or ``None`` (replicated).

  Returns:
    ``x`` with a sharding constraint, or ``x`` itself when no mesh is in context.

  Example:
    >>> import jax.numpy as jnp
    >>> constrain_activation(jnp.ones((2, 3)), "batch", None).shape  # no mesh: unchanged
    (2, 3)
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  names = set(mesh.axis_names)
  batch = tuple(a for a in ACTIVATION_BATCH_AXES if a in names)
  spec = []
  for d in dims:
    if d == "batch":
      spec.append(batch or None)
    else:
      spec.append(d if d in names else None)
  if all(e is None for e in spec):
    return x
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*spec))


def _inv_freq(config: LlamaConfig) -> np.ndarray:
  """RoPE inverse frequencies, with Llama-3 scaling if configured (float32, [head_dim/2])."""
  dim = config.head_dim
  inv = 1.0 / config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  s = config.rope_scaling
  if s is not None:
    wavelen = 2 * math.pi / inv
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
      s.high_freq_factor - s.low_freq_factor
    )
    blended = (1 - smooth) * inv / s.factor + smooth * inv
    inv = np.where(
      wavelen > low_wavelen, inv / s.factor, np.where(wavelen < high_wavelen, inv, blended)
    )
  return inv.astype(np.float32)


def _rotate_half(x: jax.Array) -> jax.Array:
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates ``x`` [B,T,heads,hd] by the angles in ``cos``/``sin`` [B,T,hd] (float32)."""
  xf = x.astype(jnp.float32)
  out = xf * cos[:, :, None, :] + _rotate_half(xf) * sin[:, :, None, :]
  return out.astype(x.dtype)


class LlamaAttention(nnx.Module):
  """Grouped-query self-attention with rotary position embeddings."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    """Creates the q/k/v/o projections.

    Args:
      config: model config.
      rngs: random streams for initialisation.
    """
    c = config
    self.num_heads = c.num_attention_heads
    self.num_kv_heads = c.num_key_value_heads
    self.head_dim = c.head_dim
    linear = functools.partial(
      nnx.Linear,
      dtype=c.dtype,
      param_dtype=c.param_dtype,
      kernel_init=nnx.initializers.normal(0.02),
      rngs=rngs,
    )
    q_out, kv_out = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    self.q_proj = linear(
      c.hidden_size,
      q_out,
      use_bias=c.attention_bias,
      kernel_metadata=_meta("embed", "heads"),
      bias_metadata=_meta("heads"),
    )
    self.k_proj = linear(
      c.hidden_size,
      kv_out,
      use_bias=c.attention_bias,
      kernel_metadata=_meta("embed", "kv_heads"),
      bias_metadata=_meta("kv_heads"),
    )
    self.v_proj = linear(
      c.hidden_size,
      kv_out,
      use_bias=c.attention_bias,
      kernel_metadata=_meta("embed", "kv_heads"),
      bias_metadata=_meta("kv_heads"),
    )
    self.o_proj = linear(
      q_out,
      c.hidden_size,
      use_bias=c.attention_out_bias,
      kernel_metadata=_meta("heads", "embed"),
      bias_metadata=_meta("norm"),
    )

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
    """Attends over the sequence.

    Args:
      x: hidden states [B,T,D].
      cos: RoPE cosines [B,T,head_dim], float32.
      sin: RoPE sines [B,T,head_dim], float32.
      mask: boolean [B or 1, 1, T, T], True where query t may attend to key s.

    Returns:
      [B,T,D].
    """
    return self.attend(*self.project(x, cos, sin), mask)

  def project(
    self, x: jax.Array, cos: jax.Array, sin: jax.Array
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The rotated queries and keys and the values of ``x`` (what a KV cache stores).

    Args:
      x: hidden states [B,T,D].
      cos: RoPE cosines [B,T,head_dim], float32.
      sin: RoPE sines [B,T,head_dim], float32.

    Returns:
      ``(q, k, v)``: [B,T,H,head_dim] and twice [B,T,num_key_value_heads,head_dim].
    """
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    q, k, v = (constrain_activation(a, "batch", None, "tensor", None) for a in (q, k, v))
    return _apply_rope(q, cos, sin), _apply_rope(k, cos, sin), v

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Attention of the queries over keys and values, through the output projection.

    Args:
      q: rotated queries [B,T,H,head_dim].
      k: rotated keys [B,S,num_key_value_heads,head_dim].
      v: values [B,S,num_key_value_heads,head_dim].
      mask: boolean [B or 1, 1, T, S], True where query t may attend to key s.

    Returns:
      [B,T,D].
    """
    b, t = q.shape[:2]
    # The XLA path groups the query heads over the shared K/V heads and keeps the
    # softmax in float32.
    out = jax.nn.dot_product_attention(q, k, v, mask=mask)
    out = constrain_activation(out.reshape(b, t, -1), "batch", None, "tensor")
    return constrain_activation(self.o_proj(out), "batch", None, None)


class LlamaMLP(nnx.Module):
  """SwiGLU feed-forward block: ``down(silu(gate(x)) * up(x))``."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    """Creates the gate/up/down projections.

    Args:
      config: model config.
      rngs: random streams for initialisation.
    """
    c = config
    linear = functools.partial(
      nnx.Linear,
      use_bias=False,
      dtype=c.dtype,
      param_dtype=c.param_dtype,
      kernel_init=nnx.initializers.normal(0.02),
      rngs=rngs,
    )
    self.gate_proj = linear(
      c.hidden_size, c.intermediate_size, kernel_metadata=_meta("embed", "mlp")
    )
    self.up_proj = linear(c.hidden_size, c.intermediate_size, kernel_metadata=_meta("embed", "mlp"))
    self.down_proj = linear(
      c.intermediate_size, c.hidden_size, kernel_metadata=_meta("mlp", "embed")
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the block.

    Args:
      x: [B,T,D].

    Returns:
      [B,T,D].
    """
    h = constrain_activation(
      jax.nn.silu(self.gate_proj(x)) * self.up_proj(x), "batch", None, "tensor"
    )
    return constrain_activation(self.down_proj(h), "batch", None, None)


def _rms_norm(config: LlamaConfig, rngs: nnx.Rngs) -> nnx.RMSNorm:
  return nnx.RMSNorm(
    config.hidden_size,
    epsilon=config.rms_norm_eps,
    dtype=config.dtype,
    param_dtype=config.param_dtype,
    scale_metadata=_meta("norm"),
    rngs=rngs,
  )


class LlamaDecoderLayer(nnx.Module):
  """Pre-norm transformer block: attention then SwiGLU, each with a residual."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    """Creates the block.

    Args:
      config: model config.
      rngs: random streams for initialisation.
    """
    self.input_layernorm = _rms_norm(config, rngs)
    self.self_attn = LlamaAttention(config, rngs=rngs)
    self.post_attention_layernorm = _rms_norm(config, rngs)
    self.mlp = LlamaMLP(config, rngs=rngs)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
    """Applies the block.

    Args:
      x: hidden states [B,T,D].
      cos: RoPE cosines [B,T,head_dim].
      sin: RoPE sines [B,T,head_dim].
      mask: boolean attention mask [B or 1,1,T,T].

    Returns:
      [B,T,D].
    """
    x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
    x = x + self.mlp(self.post_attention_layernorm(x))
    return constrain_activation(x, "batch", None, None)


def _layer_step(layer: LlamaDecoderLayer, x, cos, sin, mask):
  return layer(x, cos, sin, mask)


_layer_step_remat = nnx.remat(_layer_step)


class LlamaModel(nnx.Module):
  """Embedding, decoder layers and final norm (Hugging Face's ``model.*``)."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    """Creates the embedding, the layers (a list, or one stacked module) and the norm.

    Args:
      config: model config.
      rngs: random streams for initialisation.
    """
    c = config
    self.config = c
    self.embed_tokens = nnx.Embed(
      c.vocab_size,
      c.hidden_size,
      dtype=c.dtype,
      param_dtype=c.param_dtype,
      embedding_init=nnx.initializers.normal(0.02),
      embedding_metadata=_meta("vocab", "embed"),
      rngs=rngs,
    )
    if c.scan_layers:

      @nnx.split_rngs(splits=c.num_hidden_layers)
      @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def make_layers(r):
        return LlamaDecoderLayer(c, rngs=r)

      self.layers = make_layers(rngs)
    else:
      self.layers = nnx.List([LlamaDecoderLayer(c, rngs=rngs) for _ in range(c.num_hidden_layers)])
    self.norm = _rms_norm(c, rngs)

  def __call__(self, input_ids, positions=None, segment_ids=None) -> jax.Array:
    """Runs the decoder stack.

    Args:
      input_ids: [B,T] int token ids.
      positions: [B,T] int RoPE positions; default ``0..T-1`` in every row.
      segment_ids: [B,T] int; a token attends only to earlier tokens of the same segment
        (packed sequences). Default: one segment per row.

    Returns:
      Final-norm hidden states [B,T,D] in the compute dtype.
    """
    c = self.config
    b, t = input_ids.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cos, sin = rope(c, positions)
    mask = jnp.tril(jnp.ones((t, t), dtype=bool))[None, None]
    if segment_ids is not None:
      mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])

    x = self.embed(input_ids)
    step = _layer_step_remat if c.remat else _layer_step
    if c.scan_layers:
      # A plain lax.scan over the split state, rebuilding one layer per step: unlike
      # nnx.scan it also works when the model is closed over by an inner JAX transform
      # (e.g. a fori_loop inside jit), where nnx rejects Variables of an outer trace.
      graphdef, stacked = nnx.split(self.layers)
      # Projection weights are cast to the compute dtype before the loop (the layers would
      # cast them anyway), so each layer's FSDP gather moves compute-dtype bytes.
      stacked = nnx.map_state(
        lambda path, v: v.astype(c.dtype) if path[-1] in ("kernel", "bias") else v, stacked
      )

      def body(x, layer_state):
        return step(nnx.merge(graphdef, layer_state), x, cos, sin, mask), None

      x, _ = jax.lax.scan(body, x, stacked)
    else:
      for layer in self.layers:
        x = step(layer, x, cos, sin, mask)
    return constrain_activation(self.norm(x), "batch", None, None)

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """The token embeddings [B,T,D] of ``input_ids`` [B,T], in the compute dtype."""
    # Cast before the lookup, so FSDP gathers the table in the compute dtype.
    table = self.embed_tokens.embedding[...].astype(self.config.dtype)
    return constrain_activation(jnp.take(table, input_ids, axis=0), "batch", None, None)


def rope(config: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """RoPE cosines and sines for token positions.

  Args:
    config: model config (head size, base, scaling).
    positions: [B,T] int positions.

  Returns:
    ``(cos, sin)``, float32 [B,T,head_dim] each.
  """
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(_inv_freq(config))
  angles = jnp.concatenate([angles, angles], axis=-1)
  cos = constrain_activation(jnp.cos(angles), "batch", None, None)
  sin = constrain_activation(jnp.sin(angles), "batch", None, None)
  return cos, sin


class LlamaForCausalLM(nnx.Module):
  """Llama-family causal language model: ``model`` (decoder) plus an LM head."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    """Creates the model with random (std 0.02 normal, unit norm scale) parameters.

    Args:
      config: model config.
      rngs: random streams for initialisation.
    """
    self.config = config
    self.model = LlamaModel(config, rngs=rngs)
    self.lm_head = nnx.data(None)  # declared as data: it holds a module when untied
    if not config.tie_word_embeddings:
      self.lm_head = nnx.Linear(
        config.hidden_size,
        config.vocab_size,
        use_bias=False,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        preferred_element_type=jnp.float32,
        kernel_init=nnx.initializers.normal(0.02),
        kernel_metadata=_meta("embed", "vocab"),
        rngs=rngs,
      )

  def __call__(self, input_ids, positions=None, segment_ids=None) -> jax.Array:
    """Computes next-token logits.

    Args:
      input_ids: [B,T] int32 token ids.
      positions: optional [B,T] RoPE positions (default ``0..T-1``).
      segment_ids: optional [B,T] segment ids for packed sequences.

    Returns:
      float32 logits [B,T,vocab_size].
    """
    h = self.model(input_ids, positions=positions, segment_ids=segment_ids)
    return head_logits(h, self.head_kernel())

  def head_kernel(self) -> jax.Array:
    """The LM head as a ``[hidden, vocab]`` matrix in the compute dtype (tied: the embedding)."""
    if self.lm_head is None:
      return self.model.embed_tokens.embedding[...].astype(self.config.dtype).T
    return self.lm_head.kernel[...].astype(self.config.dtype)


def head_logits(h: jax.Array, kernel: jax.Array) -> jax.Array:
  """float32 logits ``h @ kernel`` [...,V], vocabulary split over ``tensor`` on a mesh.

  Args:
    h: hidden states [B,T,D] in the compute dtype.
    kernel: ``LlamaForCausalLM.head_kernel()`` [D,V].

  Returns:
    float32 [B,T,V].
  """
  logits = jnp.einsum("btd,dv->btv", h, kernel, preferred_element_type=jnp.float32)
  return constrain_activation(logits, "batch", None, "tensor")


def count_params(model: nnx.Module) -> int:
  """Counts the parameters (``nnx.Param`` entries) of a model.

  Args:
    model: any NNX module.

  Returns:
    The total number of parameter elements.
  """
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def param_shardings(
  model: nnx.Module, mesh: jax.sharding.Mesh, rules=LOGICAL_AXIS_RULES
) -> nnx.State:
  """Maps every parameter's logical axes onto ``mesh``.

  Args:
    model: a model whose parameters carry ``out_sharding`` names.
    mesh: a mesh whose axis names include those the rules use.
    rules: (logical name, mesh axis or None) pairs.

  Returns:
    A state shaped like ``nnx.state(model, nnx.Param)`` holding ``NamedSharding`` leaves.
  """
  with nnx.logical_axis_rules(rules):
    return nnx.get_named_sharding(nnx.state(model, nnx.Param), mesh)


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh, rules=LOGICAL_AXIS_RULES) -> None:
  """Places the model's parameters on ``mesh`` according to their logical axes, in place.

  Args:
    model: the model to reshard.
    mesh: target mesh, e.g. axes ``("data", "fsdp", "tensor")``.
    rules: (logical name, mesh axis or None) pairs.
  """
  state = nnx.state(model, nnx.Param)
  nnx.update(model, jax.device_put(state, param_shardings(model, mesh, rules)))


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _greedy_loop(graphdef, state, buf, start, steps):
  def body(i, buf):
    logits = nnx.merge(graphdef, state)(buf)
    nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, start + i - 1, 1, False), -1)
    return jax.lax.dynamic_update_index_in_dim(buf, nxt.astype(buf.dtype), start + i, 1)

  return jax.lax.fori_loop(0, steps, body, buf)


def greedy_generate(model: LlamaForCausalLM, input_ids, max_new_tokens: int) -> jax.Array:
  """Greedy decoding without a KV cache (each step reruns the whole causal forward).

  The sequence buffer has a fixed length so the loop compiles once; causality makes the
  padding after the current position irrelevant.

  Args:
    model: the language model.
    input_ids: [B,T] (or [T]) prompt token ids, no padding.
    max_new_tokens: tokens to append.

  Returns:
    int32 [B, T + max_new_tokens]: the prompt followed by the generated tokens.
  """
  ids = jnp.atleast_2d(jnp.asarray(input_ids, dtype=jnp.int32))
  buf = jnp.pad(ids, ((0, 0), (0, max_new_tokens)))
  graphdef, state = nnx.split(model)
  return _greedy_loop(graphdef, state, buf, ids.shape[1], max_new_tokens)
