"""Text generation with a KV cache, and ``mofo-finetune generate``: look at what a model says.

Decoding is greedy or sampled (temperature, top-p) and stops at EOS.

The prompt is run once through the model (prefill), writing every layer's rotated keys and
values into a cache sized for the prompt plus ``max_new_tokens``; each new token then costs one
position's forward pass attending over the cache. The whole decode is one ``jax.jit`` program (a
``lax.while_loop`` that ends when every row has emitted an end-of-sequence token or the budget is
spent), compiled once per prompt length and budget.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mofo_jax.finetune.model import LlamaForCausalLM, head_logits, rope
from mofo_jax.finetune.run_config import ModelSettings, UserError


class KVCache(NamedTuple):
  """Every layer's rotated keys and values, for positions ``0..length-1``.

  Attributes:
    k: [num_hidden_layers, B, length, num_key_value_heads, head_dim] compute dtype.
    v: [num_hidden_layers, B, length, num_key_value_heads, head_dim] compute dtype.
  """

  k: jax.Array
  v: jax.Array


class Generated(NamedTuple):
  """What :func:`generate` returns.

  Attributes:
    tokens: [B, max_new_tokens] int32 new tokens; after a row's first EOS, that EOS repeated.
    lengths: [B] int32 tokens each row generated, its EOS included.
  """

  tokens: jax.Array
  lengths: jax.Array


def init_cache(model: LlamaForCausalLM, batch: int, length: int) -> KVCache:
  """An empty (zero) cache for ``batch`` rows of up to ``length`` positions."""
  c = model.config
  shape = (c.num_hidden_layers, batch, length, c.num_key_value_heads, c.head_dim)
  return KVCache(jnp.zeros(shape, c.dtype), jnp.zeros(shape, c.dtype))


def _layer(layer, i, x, cos, sin, mask, cache: KVCache, index) -> tuple[jax.Array, KVCache]:
  """Decoder layer ``i`` over new positions ``index..``, their keys and values cached.

  Only the new positions of the cache are written (in place inside the decode loop) and layer
  ``i``'s slice is read, so a step moves no more cache bytes than its attention reads.
  """
  q, k, v = layer.self_attn.project(layer.input_layernorm(x), cos, sin)
  at = (i, 0, index, 0, 0)
  cache = KVCache(
    jax.lax.dynamic_update_slice(cache.k, k[None].astype(cache.k.dtype), at),
    jax.lax.dynamic_update_slice(cache.v, v[None].astype(cache.v.dtype), at),
  )
  keys, values = (jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False) for a in cache)
  x = x + layer.self_attn.attend(q, keys, values, mask)
  return x + layer.mlp(layer.post_attention_layernorm(x)), cache


def forward_cached(
  model: LlamaForCausalLM, input_ids: jax.Array, index: jax.Array, cache: KVCache
) -> tuple[jax.Array, KVCache]:
  """Logits of tokens at positions ``index..index+T-1`` given the cache of those before.

  Equal to the matching positions of ``model(ids)`` on the whole sequence: query ``t`` attends
  to the cached keys ``s <= index + t``.

  Args:
    model: the language model (layers stacked or a list).
    input_ids: [B,T] int32 tokens.
    index: int scalar, the position of ``input_ids[:, 0]``.
    cache: the cache, filled below ``index``.

  Returns:
    ``(logits, cache)``: float32 [B,T,vocab_size], and the cache filled below ``index + T``.
  """
  c = model.config
  b, t = input_ids.shape
  positions = index + jnp.arange(t, dtype=jnp.int32)
  cos, sin = rope(c, jnp.broadcast_to(positions, (b, t)))
  mask = (jnp.arange(cache.k.shape[2]) <= positions[:, None])[None, None]
  x = model.model.embed(input_ids)
  if c.scan_layers:
    graphdef, stacked = nnx.split(model.model.layers)

    def body(carry, xs):
      (x, cache), (state, i) = carry, xs
      return _layer(nnx.merge(graphdef, state), i, x, cos, sin, mask, cache, index), None

    (x, cache), _ = jax.lax.scan(body, (x, cache), (stacked, jnp.arange(c.num_hidden_layers)))
  else:
    for i, layer in enumerate(model.model.layers):
      x, cache = _layer(layer, i, x, cos, sin, mask, cache, index)
  return head_logits(model.model.norm(x), model.head_kernel()), cache


def sample_token(
  logits: jax.Array, key: jax.Array, temperature: jax.typing.ArrayLike, top_p: jax.typing.ArrayLike
) -> jax.Array:
  """Draws one token per row from ``softmax(logits / temperature)`` cut to its top-p nucleus.

  The nucleus is the most likely tokens whose probabilities, in decreasing order, first reach
  ``top_p`` in sum (at least the most likely one); the draw is renormalised over it:

  .. math:: P(i) \\propto p_i \\, [\\textstyle\\sum_{j:\\, p_j > p_i} p_j < \\text{top\\_p}],
    \\quad p = \\operatorname{softmax}(\\text{logits} / T)

  Args:
    logits: [B,V] float32.
    key: a PRNG key.
    temperature: positive scalar.
    top_p: scalar in (0, 1]; 1 keeps every token.

  Returns:
    [B] int32 tokens.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> logits = jnp.log(jnp.array([[0.6, 0.3, 0.1]]))
    >>> int(sample_token(logits, jax.random.key(0), 1.0, 0.5)[0])  # the nucleus is token 0
    0
  """
  scaled = logits / temperature
  order = jnp.argsort(-scaled, axis=-1)
  ranked = jnp.take_along_axis(scaled, order, -1)
  probs = jax.nn.softmax(ranked, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs
  kept = jnp.where(before < top_p, ranked, -jnp.inf)
  choice = jax.random.categorical(key, kept, axis=-1)
  return jnp.take_along_axis(order, choice[:, None], -1)[:, 0].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy"))
def _decode(graphdef, state, prompt, key, temperature, top_p, eos_ids, max_new_tokens, greedy):
  model = nnx.merge(graphdef, state)
  b, t = prompt.shape
  logits, cache = forward_cached(model, prompt, 0, init_cache(model, b, t + max_new_tokens))

  def cond(carry):
    i, _, done, *_ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, last, done, out, cache, key = carry
    key, draw = jax.random.split(key)
    if greedy:
      token = jnp.argmax(last, axis=-1).astype(jnp.int32)
    else:
      token = sample_token(last, draw, temperature, top_p)
    # A finished row repeats its EOS; its later positions are not part of its output.
    token = jnp.where(done, out[:, jnp.maximum(i - 1, 0)], token)
    out = out.at[:, i].set(token)
    done = done | jnp.isin(token, eos_ids)
    logits, cache = forward_cached(model, token[:, None], t + i, cache)
    return i + 1, logits[:, 0], done, out, cache, key

  out = jnp.zeros((b, max_new_tokens), jnp.int32)
  done = jnp.zeros((b,), bool)
  carry = (jnp.int32(0), logits[:, -1], done, out, cache, key)
  steps, _, done, out, _, _ = jax.lax.while_loop(cond, body, carry)
  first_eos = jnp.argmax(jnp.isin(out, eos_ids), axis=-1)
  lengths = jnp.where(done, first_eos + 1, steps).astype(jnp.int32)
  # Positions the loop never reached (every row stopped early) repeat each row's last token.
  at = jnp.minimum(jnp.arange(max_new_tokens), jnp.maximum(steps - 1, 0))
  return Generated(out[:, at], lengths)


def generate(
  model: LlamaForCausalLM,
  input_ids: jax.typing.ArrayLike,
  max_new_tokens: int,
  *,
  eos_ids: Sequence[int] = (),
  temperature: float = 0.0,
  top_p: float = 1.0,
  seed: int = 0,
) -> Generated:
  """Continues prompts token by token with a KV cache, until EOS or ``max_new_tokens``.

  ``temperature == 0`` is greedy decoding (the most likely token each step, as
  ``transformers``' ``generate(do_sample=False)``); a positive temperature samples with
  :func:`sample_token`, reproducibly for a ``seed``.

  Args:
    model: the language model.
    input_ids: [B,T] (or [T]) prompt token ids; rows of equal length, no padding.
    max_new_tokens: the most tokens to add (at least 1).
    eos_ids: tokens that end a row (it stops when every row has emitted one).
    temperature: 0 for greedy, else the sampling temperature.
    top_p: nucleus mass for sampling, in (0, 1].
    seed: the sampling seed.

  Returns:
    The new tokens and how many each row generated.

  Example:
    >>> from flax import nnx
    >>> from mofo_jax.finetune.model import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(64, 32, 64, 1, 4, 2), rngs=nnx.Rngs(0))
    >>> out = generate(model, [[1, 2, 3]], 5)
    >>> out.tokens.shape, int(out.lengths[0])  # no EOS given: all 5 tokens
    ((1, 5), 5)
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be at least 1 (got {max_new_tokens})")
  if not (temperature >= 0 and np.isfinite(temperature)):
    raise ValueError(f"temperature must be a finite number >= 0 (got {temperature})")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1] (got {top_p})")
  prompt = jnp.atleast_2d(jnp.asarray(input_ids, dtype=jnp.int32))
  if prompt.shape[1] == 0:
    raise ValueError("the prompt has no tokens")
  graphdef, state = nnx.split(model)
  return _decode(
    graphdef,
    state,
    prompt,
    jax.random.key(seed),
    jnp.float32(temperature or 1.0),
    jnp.float32(top_p),
    jnp.asarray(list(eos_ids) or [-1], jnp.int32),
    max_new_tokens,
    temperature == 0,
  )


# --- mofo-finetune generate -------------------------------------------------------------------

EXAMPLES = """\
examples:
  mofo-finetune generate --model runs/mofo/model --prompt "What is 17 + 25?"
  mofo-finetune generate --model runs/mofo/model --messages chat.json --temperature 0.7 --seed 1
  mofo-finetune generate --model runs/mofo/model --prompt "The capital of France is" --raw

--messages FILE: a JSON list of {"role", "content"} turns, or an object with a "messages" list
(one line of a conversational --data file).
"""


def build_parser() -> argparse.ArgumentParser:
  """The ``mofo-finetune generate`` command line."""
  from mofo_jax.finetune.cli import _Parser

  p = _Parser(
    prog="mofo-finetune generate",
    description="Continue a prompt or a conversation with a model (a fine-tuned run's model\n"
    "directory, a Hugging Face checkpoint directory or a .gguf file) and print the reply.\n"
    "Greedy unless --temperature is given; stops at the model's end-of-sequence token.",
    epilog=EXAMPLES,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument(
    "--model",
    default=None,
    help="a Hugging Face checkpoint directory or a .gguf file (default: the embedded SmolLM2)",
  )
  what = p.add_mutually_exclusive_group(required=True)
  what.add_argument("--prompt", help="a user turn (or, with --raw, the text to continue)")
  what.add_argument("--messages", metavar="FILE", help="a conversation to reply to (JSON)")
  p.add_argument(
    "--raw",
    action="store_true",
    help="continue --prompt as plain text (the tokenizer's special tokens added, as "
    "transformers' tokenizer(prompt) does) instead of as a chat turn",
  )
  p.add_argument(
    "--chat-template",
    default=None,
    metavar="none|FILE",
    help="render the conversation with this Jinja template file instead of the model's, or "
    "'none': the turns' contents back to back (as in training)",
  )
  p.add_argument(
    "--max-new-tokens",
    type=int,
    default=256,
    metavar="N",
    help="the most tokens to generate (default: 256)",
  )
  p.add_argument(
    "--temperature",
    type=float,
    default=0.0,
    metavar="T",
    help="sample at this temperature; 0 is greedy decoding (default: 0)",
  )
  p.add_argument(
    "--top-p",
    type=float,
    default=1.0,
    metavar="P",
    help="with --temperature: sample from the smallest set of likeliest tokens holding this "
    "much probability (default: 1, every token)",
  )
  p.add_argument("--seed", type=int, default=0, metavar="N", help="sampling seed (default: 0)")
  p.add_argument(
    "--dtype",
    choices=("float32", "bfloat16"),
    default="float32",
    help="parameter and compute dtype (default: float32)",
  )
  p.add_argument(
    "--mesh",
    default=None,
    metavar="SPEC",
    help="shard the model over this host's devices, e.g. fsdp=4,tensor=2 (as in training; "
    "each device reads only its slices); default: the whole model on one device",
  )
  return p


def _check(args: argparse.Namespace) -> None:
  if args.max_new_tokens < 1:
    raise UserError(f"--max-new-tokens must be at least 1 (got {args.max_new_tokens}).")
  if not (math.isfinite(args.temperature) and args.temperature >= 0):
    raise UserError(f"--temperature must be a finite number >= 0 (got {args.temperature}).")
  if not 0 < args.top_p <= 1:
    raise UserError(f"--top-p must be in (0, 1] (got {args.top_p}).")
  if args.top_p < 1 and args.temperature == 0:
    raise UserError("--top-p samples, so it needs --temperature > 0 (0 is greedy decoding).")
  if args.raw and args.messages is not None:
    raise UserError("--raw continues a --prompt as plain text; --messages are a conversation.")
  if args.raw and args.chat_template is not None:
    raise UserError("--raw applies no chat template, so --chat-template has nothing to do.")


def read_messages(path: str) -> tuple[dict, ...]:
  """The turns of a ``--messages`` file (local or ``gs://``).

  Raises:
    UserError: naming the file and what is wrong with it.
  """
  from etils import epath

  from mofo_jax.finetune.data import read_turns

  try:
    value = json.loads(epath.Path(path).read_text())
  except FileNotFoundError:
    raise UserError(f"--messages {path}: no such file.") from None
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f"--messages {path}: {_one_line(e)}") from None
  except json.JSONDecodeError as e:
    raise UserError(f"--messages {path}: not JSON ({e.msg} at line {e.lineno})") from None
  if isinstance(value, list):
    value = {"messages": value}
  if not isinstance(value, dict):
    raise UserError(
      f"--messages {path}: expected a list of turns or an object with 'messages', got "
      f"{type(value).__name__}"
    )
  try:
    return read_turns(value, "messages", need_assistant=False)
  except ValueError as e:
    raise UserError(f"--messages {path}: {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split()) or type(e).__name__


GENERATION_CONFIG = "generation_config.json"


def save_generation_config(tok, directory, source: str | None = None) -> None:
  """Writes a saved model's ``generation_config.json``, so ``transformers`` stops where we do.

  Without one, ``transformers`` takes its architecture's default ids (Llama: BOS 1, EOS 2)
  whatever the tokenizer's. The source model's file is kept when it has one (its EOS list, its
  sampling defaults, as ``save_pretrained`` keeps them); else the tokenizer's special ids are
  written, if it names any.

  Args:
    tok: the model's ``TextTokenizer``.
    directory: the saved model's local directory.
    source: the model it was fine-tuned from (a directory, local or ``gs://``, or a ``.gguf``
      file), or None.
  """
  from etils import epath

  theirs = epath.Path(source) / GENERATION_CONFIG if source else None
  if theirs is not None and theirs.is_file():
    (epath.Path(directory) / GENERATION_CONFIG).write_bytes(theirs.read_bytes())
    return
  ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
  ids["pad_token_id"] = tok.pad_token_id
  ids = {k: int(v) for k, v in ids.items() if v is not None}
  if ids:
    (epath.Path(directory) / GENERATION_CONFIG).write_text(json.dumps(ids, indent=2) + "\n")


def stop_ids(model_path: str | None, tok) -> list[int]:
  """The tokens that end a reply: the tokenizer's EOS and a ``generation_config.json``'s
  ``eos_token_id`` (an id or a list, as Llama 3's), when the model directory has one."""
  from etils import epath

  ids = [] if tok.eos_token_id is None else [int(tok.eos_token_id)]
  file = epath.Path(model_path) / GENERATION_CONFIG if model_path else None
  if file is not None and file.is_file():
    try:
      eos = json.loads(file.read_text()).get("eos_token_id")
    except (json.JSONDecodeError, AttributeError):
      eos = None
    ids += [int(i) for i in (eos if isinstance(eos, list) else [eos]) if isinstance(i, int)]
  return sorted(set(ids))


def prompt_ids(args: argparse.Namespace, tok, messages: Sequence[dict] | None) -> list[int]:
  """The prompt's tokens: the conversation rendered with the chat template and a generation
  prompt (as ``apply_chat_template(..., add_generation_prompt=True)``), or the raw text.

  Raises:
    UserError: the messages, the template or the prompt cannot be used.
  """
  from mofo_jax.finetune.data import chat_template_for

  if args.raw:
    ids = tok.tokenizer.encode(args.prompt, add_special_tokens=True).ids
  else:
    if messages is None:
      messages = ({"role": "user", "content": args.prompt},)
    where = f"--chat-template {args.chat_template}" if args.chat_template else "--model"
    try:
      template = chat_template_for(args.chat_template, tok)
      if template is None:
        raise ValueError(
          "the model has no chat template: pass --raw to continue plain text, or "
          "--chat-template FILE|none"
        )
      text = template.render(list(messages), add_generation_prompt=True)
    except (ValueError, OSError) as e:
      raise UserError(f"{where}: {_one_line(e)}") from None
    ids = tok.encode(text)
  if not ids:
    raise UserError("the prompt is empty (it has no tokens).")
  return ids


def main(argv: Sequence[str] | None = None) -> int:
  """``mofo-finetune generate``: prints the reply; user errors are one line, exit status 2."""
  from mofo_jax.finetune import runner, train

  args = build_parser().parse_args(argv)
  try:
    _check(args)
    # A bad --messages file is refused before the model loads.
    messages = None if args.messages is None else read_messages(args.messages)
    try:
      mesh = None if args.mesh is None else train.make_mesh(args.mesh)
    except ValueError as e:
      raise UserError(f"--mesh {args.mesh}: {_one_line(e)}") from None
    settings = ModelSettings(path=args.model, param_dtype=args.dtype, compute_dtype=args.dtype)
    config, model, tok = runner.load_model(settings, mesh)
    ids = prompt_ids(args, tok, messages)
  except UserError as e:
    print(f"mofo-finetune generate: error: {e}", file=sys.stderr)
    return 2
  if len(ids) + args.max_new_tokens > config.max_position_embeddings:
    print(
      f"mofo-finetune generate: warning: {len(ids)} prompt tokens + --max-new-tokens "
      f"{args.max_new_tokens} exceed the model's context of {config.max_position_embeddings}",
      file=sys.stderr,
    )
  out = generate(
    model,
    [ids],
    args.max_new_tokens,
    eos_ids=stop_ids(args.model, tok),
    temperature=args.temperature,
    top_p=args.top_p,
    seed=args.seed,
  )
  new = np.asarray(out.tokens[0, : int(out.lengths[0])])
  print(tok.decode(new, skip_special_tokens=True))
  return 0
