"""Turning a prompt/response pair into token ids with a response-only loss mask."""

from __future__ import annotations

import datetime
import json
import re
import string
from typing import Any, NamedTuple

import numpy as np


class TokenizedExample(NamedTuple):
  """Token ids of one example and which of them the loss is taken on.

  ``loss_mask[i]`` is 1 when token ``i`` is a response token (one the model
  should learn to produce) and 0 for prompt tokens.
  """

  input_ids: np.ndarray  # int32 [L]
  loss_mask: np.ndarray  # int32 [L]


# Private-use characters that bracket ``{% generation %}`` blocks in a rendering until their
# offsets are read off; user text holding them is refused.
_GEN_OPEN, _GEN_CLOSE = "\ue000", "\ue001"


def _generation_extension():
  """A Jinja extension for the ``{% generation %}...{% endgeneration %}`` blocks with which
  Hugging Face chat templates mark the text the assistant writes."""
  from jinja2 import nodes
  from jinja2.ext import Extension

  class GenerationBlocks(Extension):
    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return nodes.CallBlock(self.call_method("_bracket"), [], [], body).set_lineno(lineno)

    def _bracket(self, caller):
      return _GEN_OPEN + caller() + _GEN_CLOSE

  return GenerationBlocks


class JinjaChatTemplate:
  """A Hugging Face style Jinja chat template (needs the ``jinja2`` package).

  Rendered the way ``transformers`` renders chat templates: a sandboxed
  environment with ``trim_blocks``, ``lstrip_blocks`` and loop controls, a
  ``tojson`` that keeps non-ASCII text and HTML characters as they are, the
  variables ``messages``, ``add_generation_prompt``, ``bos_token``,
  ``eos_token``, the helpers ``raise_exception`` and ``strftime_now``, and the
  ``{% generation %}`` blocks that mark assistant text.
  """

  def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
    """Compiles the template.

    Args:
      source: the template text, e.g. a GGUF file's
        ``tokenizer.chat_template`` metadata.
      bos_token: text the template may insert as ``bos_token``.
      eos_token: text the template may insert as ``eos_token``.

    Raises:
      ImportError: if ``jinja2`` is not installed.
      ValueError: if the template is not valid Jinja.
    """
    try:
      import jinja2
      from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
      raise ImportError("Jinja chat templates need jinja2: pip install jinja2") from e

    def raise_exception(message):
      raise ValueError(f"chat template error: {message}")

    def tojson(value, indent=None, separators=None, sort_keys=False):
      return json.dumps(
        value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys
      )

    env = ImmutableSandboxedEnvironment(
      trim_blocks=True,
      lstrip_blocks=True,
      extensions=["jinja2.ext.loopcontrols", _generation_extension()],
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
      self._template = env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
      raise ValueError(f"chat template line {e.lineno}: {e.message}") from None
    self._jinja = jinja2
    self._bos_token = bos_token
    self._eos_token = eos_token

  def render_marked(
    self, messages: list[dict[str, Any]], add_generation_prompt: bool
  ) -> tuple[str, list[tuple[int, int]]]:
    """Renders a conversation and finds the template's ``{% generation %}`` blocks.

    Args:
      messages: ``[{"role": ..., "content": ...}, ...]``; other keys (``tool_calls``,
        ``name``) reach the template as they are.
      add_generation_prompt: whether to end with the assistant header.

    Returns:
      ``(text, spans)``: the rendering and the ``[start, end)`` character spans of its
      generation blocks, in order (empty for a template without them).

    Raises:
      ValueError: the template raised, or the text holds the private-use characters
        U+E000/U+E001 that delimit the blocks while rendering.
    """
    try:
      raw = self._template.render(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=self._bos_token,
        eos_token=self._eos_token,
      )
    # What a template raises on data it cannot render (an undefined or mistyped field).
    except (self._jinja.TemplateError, TypeError, KeyError, AttributeError, IndexError) as e:
      raise ValueError(f"chat template error: {type(e).__name__}: {e}") from None
    text, spans, start = [], [], None
    at = 0
    for piece in re.split(f"([{_GEN_OPEN}{_GEN_CLOSE}])", raw):
      if piece == _GEN_OPEN:
        if start is not None:
          raise ValueError("text holds U+E000/U+E001, which cannot be told from the template's")
        start = at
      elif piece == _GEN_CLOSE:
        if start is None:
          raise ValueError("text holds U+E000/U+E001, which cannot be told from the template's")
        spans.append((start, at))
        start = None
      else:
        text.append(piece)
        at += len(piece)
    return "".join(text), spans

  def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    """Renders a conversation.

    Args:
      messages: ``[{"role": ..., "content": ...}, ...]``.
      add_generation_prompt: whether to end with the assistant header.

    Returns:
      The rendered text.
    """
    return self.render_marked(messages, add_generation_prompt)[0]

  def split(self, prompt: str, response: str) -> tuple[str, str]:
    """Renders a one-turn chat and splits it where the assistant's reply starts.

    The prompt part is the conversation rendered up to and including the
    generation prompt, i.e. exactly what the model is given at inference;
    the completion is the rest (the reply plus the template's end-of-turn
    text, which the model must learn to emit to stop).

    Args:
      prompt: the user's message.
      response: the assistant's reply.

    Returns:
      ``(prompt_text, completion_text)`` whose concatenation is the
      rendered conversation.

    Raises:
      ValueError: if the reply cannot be located in the rendering.
    """
    user = {"role": "user", "content": prompt}
    head = self.render([user], add_generation_prompt=True)
    full = self.render(
      [user, {"role": "assistant", "content": response}],
      add_generation_prompt=False,
    )
    if full.startswith(head) and response.strip() in full[len(head) :]:
      return head, full[len(head) :]
    # Templates whose generation prompt is not a prefix of the full
    # rendering: fall back to the last place the reply text occurs.
    start = full.rfind(response.strip()) if response.strip() else -1
    if start < 0:
      raise ValueError("could not locate the assistant reply in the rendered chat template")
    return full[:start], full[start:]


def split_format_template(template: str, prompt: str, response: str) -> tuple[str, str]:
  """Fills a ``str.format`` template and splits it where the response starts.

  The template must use the fields ``{prompt}`` and ``{response}`` exactly
  once each, ``{prompt}`` first, with no conversions or format specs.
  Literal braces are written ``{{`` and ``}}`` as usual.

  Args:
    template: e.g. ``"Question: {prompt}\\nAnswer: {response}"``.
    prompt: text for ``{prompt}``.
    response: text for ``{response}``.

  Returns:
    ``(prompt_text, completion_text)``: everything before the response,
    and the response followed by the template's trailing text.

  Raises:
    ValueError: if the template has other fields, lacks one, or repeats one.
  """
  parts = ["", ""]
  side = 0
  seen = []
  for literal, field, spec, conversion in string.Formatter().parse(template):
    parts[side] += literal
    if field is None:
      continue
    if field not in ("prompt", "response") or spec or conversion:
      raise ValueError(
        f"template field {{{field}}} is not allowed: use only "
        "{prompt} and {response}, without conversions or format specs"
      )
    seen.append(field)
    if field == "response":
      side = 1
    parts[side] += prompt if field == "prompt" else response
  if seen != ["prompt", "response"]:
    raise ValueError(
      f"template must contain {{prompt}} then {{response}}, once each; found fields {seen}"
    )
  return parts[0], parts[1]


def tokenize_example(
  tokenizer,
  prompt: str,
  response: str,
  template: str | JinjaChatTemplate | None = None,
  eos_id: int | None = None,
) -> TokenizedExample:
  """Tokenizes a prompt/response pair with a loss mask on the response only.

  The prompt text and the completion text are encoded separately and
  concatenated, so the prompt's tokens are exactly those the model sees when
  it is given the prompt alone at inference (byte-level BPE may merge across
  the boundary if both were encoded together).

  Args:
    tokenizer: a ``tokenizers.Tokenizer``.
    prompt: the instruction or question.
    response: the text the model should produce.
    template: ``None`` (prompt and response are concatenated as they are),
      a ``str.format`` template with ``{prompt}`` and ``{response}``, or a
      ``JinjaChatTemplate``.
    eos_id: token appended after the completion and included in the loss;
      ``None`` appends nothing (chat templates usually end the turn
      themselves).

  Returns:
    A ``TokenizedExample``; its mask is 1 exactly on the completion tokens
    and the EOS.
  """
  if template is None:
    head, tail = prompt, response
  elif isinstance(template, JinjaChatTemplate):
    head, tail = template.split(prompt, response)
  else:
    head, tail = split_format_template(template, prompt, response)
  head_ids = tokenizer.encode(head, add_special_tokens=False).ids if head else []
  tail_ids = tokenizer.encode(tail, add_special_tokens=False).ids if tail else []
  if eos_id is not None:
    tail_ids = tail_ids + [eos_id]
  ids = np.asarray(head_ids + tail_ids, dtype=np.int32)
  mask = np.zeros(len(ids), dtype=np.int32)
  mask[len(head_ids) :] = 1
  return TokenizedExample(ids, mask)
