"""The pure training step: chunked next-token loss, gradients, one optimizer update.

The step is a pure function of ``(params, opt_state, batch)``, so the trainer jits it with the
params' shardings and ``plan`` AOT-compiles exactly the same function for a TPU slice it does
not have. Two things keep a large step's memory per device bounded by its shard:

- Activations are pinned batch-sharded over ``data`` and ``fsdp`` (see
  ``model.constrain_activation``); the step makes the mesh visible to the model while tracing.
- The loss never materialises all the logits: each device computes the loss of its own rows
  (``jax.shard_map``), cut into chunks of ``loss_chunk`` positions whose float32 logits are
  reduced to per-token losses, dropped, and recomputed in the backward pass
  (``jax.checkpoint``). Logits of one chunk are ``[B/(data*fsdp), loss_chunk, V/tensor]`` per
  device.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from mofo_jax.finetune import model as model_lib

Batch = Mapping[str, Any]
# Tokens per row whose logits exist at once; 512 x 128k-vocabulary float32 logits are 256 MB
# per row of a device's batch shard.
LOSS_CHUNK = 512
# The optimizer update runs under this name, so its collectives can be told apart in the HLO.
OPTIMIZER_SCOPE = "optimizer_update"


def chunked_token_losses(
  h: jax.Array, kernel: jax.Array, targets: jax.Array, chunk: int = LOSS_CHUNK
) -> tuple[jax.Array, jax.Array]:
  r"""Cross entropy and greedy prediction per token, ``chunk`` positions at a time.

  .. math:: \ell_{bt} = \operatorname{logsumexp}_v (h_{bt} W)_v - (h_{bt} W)_{y_{bt}}

  With a mesh in context it runs per device (``jax.shard_map``): each device takes its rows
  of the batch and its ``tensor`` slice of the vocabulary (the log-sum-exp, the target's logit
  and the argmax are combined over ``tensor`` with scalar-per-token collectives), and the
  head's gradient is summed over the batch shards once, after the loop over chunks.

  Args:
    h: final hidden states [B,T,D] (compute dtype).
    kernel: the LM head [D,V] (compute dtype).
    targets: int [B,T] next tokens.
    chunk: positions per chunk; ``T`` is padded up to a multiple of it.

  Returns:
    ``(losses, predictions)``: float32 [B,T] and int32 [B,T] (argmax of the logits, the first
    one on ties).

  Example:
    >>> import jax.numpy as jnp
    >>> h = jnp.ones((1, 3, 2)); w = jnp.asarray([[1.0, 0.0], [0.0, 0.0]])
    >>> losses, pred = chunked_token_losses(h, w, jnp.asarray([[0, 1, 0]]), chunk=2)
    >>> [round(float(x), 4) for x in losses[0]], pred.tolist()
    ([0.3133, 1.3133, 0.3133], [[0, 0, 0]])
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return _chunked_losses(h, kernel, targets, chunk, None, None)
  names = set(mesh.axis_names)
  batch = tuple(a for a in model_lib.ACTIVATION_BATCH_AXES if a in names) or None
  tensor = "tensor" if mesh.shape.get("tensor", 1) > 1 else None
  per_device = jax.shard_map(
    functools.partial(_chunked_losses, chunk=chunk, tensor_axis=tensor, batch_axes=batch),
    mesh=mesh,
    in_specs=(P(batch, None, None), P(None, tensor), P(batch, None)),
    out_specs=(P(batch, None), P(batch, None)),
  )
  return per_device(h, kernel, targets)


def _chunked_losses(h, kernel, targets, chunk, tensor_axis, batch_axes):
  if batch_axes:
    # The head is the same on every batch shard; marking it per-shard here, before the loop,
    # puts the sum of its gradient over the shards after the loop instead of in every chunk.
    kernel = jax.lax.pcast(kernel, batch_axes, to="varying")
  b, t, d = h.shape
  n = -(-t // chunk) if t > chunk else 1
  c = t if n == 1 else chunk
  pad = n * c - t
  if pad:
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
  vocab = kernel.shape[1]
  offset = 0 if tensor_axis is None else jax.lax.axis_index(tensor_axis) * vocab

  def over_vocab(op, x):
    return x if tensor_axis is None else op(x, tensor_axis)

  # Recomputed in the backward pass: only one chunk's logits ever exist.
  @jax.checkpoint
  def one(args):
    hc, yc = args
    logits = jnp.einsum("btd,dv->btv", hc, kernel, preferred_element_type=jnp.float32)
    local_max = jax.lax.stop_gradient(logits.max(axis=-1))
    top = over_vocab(jax.lax.pmax, local_max)
    sum_exp = over_vocab(jax.lax.psum, jnp.exp(logits - top[..., None]).sum(axis=-1))
    local = yc - offset
    inside = (local >= 0) & (local < vocab)
    picked = jnp.take_along_axis(logits, jnp.clip(local, 0, vocab - 1)[..., None], axis=-1)
    target_logit = over_vocab(jax.lax.psum, jnp.where(inside, picked[..., 0], 0.0))
    losses = top + jnp.log(sum_exp) - target_logit
    arg = jnp.argmax(logits, axis=-1).astype(jnp.int32) + offset
    if tensor_axis is not None:
      arg = jax.lax.pmin(jnp.where(local_max == top, arg, jnp.iinfo(jnp.int32).max), tensor_axis)
    return losses, arg

  # [B, n*c, ...] -> [n, B, c, ...]
  hs = jnp.moveaxis(h.reshape(b, n, c, d), 1, 0)
  ys = jnp.moveaxis(targets.reshape(b, n, c), 1, 0)
  losses, pred = jax.lax.map(one, (hs, ys))
  losses = jnp.moveaxis(losses, 0, 1).reshape(b, n * c)[:, :t]
  pred = jnp.moveaxis(pred, 0, 1).reshape(b, n * c)[:, :t]
  return losses, pred


def token_losses(
  model: nnx.Module, batch: Batch, chunk: int = LOSS_CHUNK
) -> tuple[jax.Array, jax.Array]:
  """Per-token next-token cross entropy [B,T] and the model's greedy prediction [B,T].

  Args:
    model: a ``LlamaForCausalLM`` (anything with ``model`` and ``head_kernel``).
    batch: ``input_ids``, ``positions``, ``segment_ids``, ``targets``, each [B,T].
    chunk: sequence positions whose logits exist at once (see ``chunked_token_losses``).

  Returns:
    ``(losses, predictions)``: float32 [B,T] and int32 [B,T].
  """
  h = model.model(
    batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"]
  )
  return chunked_token_losses(h, model.head_kernel(), batch["targets"], chunk)


def make_train_step(
  graphdef: nnx.GraphDef,
  rest: Any,
  optimizer: optax.GradientTransformation,
  *,
  grad_accum: int = 1,
  mesh: jax.sharding.Mesh | None = None,
  loss_chunk: int = LOSS_CHUNK,
) -> Callable[[Any, Any, Batch], tuple[Any, Any, dict[str, jax.Array]]]:
  """The pure train step ``(params, opt_state, batch) -> (params, opt_state, metrics)``.

  The gradient is that of the summed masked loss divided once by the batch's token count, so
  ``grad_accum`` micro-batches (a scan over slices of the batch's leading dimension) give the
  same gradient as one big batch.

  Args:
    graphdef: the model's graph (``nnx.split(model, nnx.Param, ...)``).
    rest: the model's non-parameter state from the same split.
    optimizer: the optax transformation.
    grad_accum: micro-batches per step.
    mesh: the device mesh; the model pins its activations onto it while tracing.
    loss_chunk: sequence positions whose logits exist at once.

  Returns:
    The step function (not jitted). ``metrics`` holds ``loss``, ``tokens``, ``grad_norm``.

  Example:
    >>> import jax.numpy as jnp, numpy as np, optax
    >>> from flax import nnx
    >>> from mofo_jax.finetune.model import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16,
    ...                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    >>> graphdef, params, rest = nnx.split(LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    >>> opt = optax.adam(1e-2)
    >>> step = jax.jit(make_train_step(graphdef, rest, opt))
    >>> ids = jnp.arange(8, dtype=jnp.int32).reshape(2, 4)
    >>> batch = dict(input_ids=ids, targets=ids, positions=ids % 4, segment_ids=0 * ids,
    ...              loss_mask=jnp.ones_like(ids))
    >>> _, _, metrics = step(params, opt.init(params), batch)
    >>> int(metrics["tokens"]), bool(metrics["loss"] > 0)
    (8, True)
  """
  if grad_accum < 1:
    raise ValueError(f"grad_accum={grad_accum} must be at least 1.")

  def summed(p, b):
    losses, _ = token_losses(nnx.merge(graphdef, p, rest), b, loss_chunk)
    mask = b["loss_mask"].astype(jnp.float32)
    return (losses * mask).sum(), mask.sum()

  grad_fn = jax.value_and_grad(summed, has_aux=True)

  def step(params, opt_state, batch):
    if grad_accum == 1:
      (loss_sum, count), grads = grad_fn(params, batch)
    else:
      micro = jax.tree.map(lambda x: x.reshape((grad_accum, -1) + x.shape[1:]), batch)

      def body(carry, b):
        (s, c), g = grad_fn(params, b)
        return jax.tree.map(jnp.add, carry, (s, c, g)), None

      zero = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
      (loss_sum, count, grads), _ = jax.lax.scan(body, zero, micro)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    with jax.named_scope(OPTIMIZER_SCOPE):
      updates, opt_state = optimizer.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
    return (
      params,
      opt_state,
      {"loss": loss_sum / denom, "tokens": count, "grad_norm": optax.tree.norm(grads)},
    )

  if mesh is None:
    return step

  def step_on_mesh(params, opt_state, batch):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return step(params, opt_state, batch)

  return step_on_mesh


def abstract_batch(batch_size: int, seq_len: int, sharding: Any = None) -> dict[str, Any]:
  """``jax.ShapeDtypeStruct`` s of a training batch (for lowering without data).

  Args:
    batch_size: rows ``B``.
    seq_len: tokens per row ``T``.
    sharding: the batch's sharding (e.g. ``NamedSharding(mesh, P(("data", "fsdp")))``).

  Returns:
    The five [B,T] int32 fields the step reads.

  Example:
    >>> abstract_batch(2, 8)["input_ids"].shape
    (2, 8)
  """
  shape = (batch_size, seq_len)
  keys = ("input_ids", "targets", "positions", "segment_ids", "loss_mask")
  return {k: jax.ShapeDtypeStruct(shape, np.int32, sharding=sharding) for k in keys}
