"""Conversations to token ids with the loss on the assistant's turns, as chat templates render
them; and any training record (conversation, prompt/completion, text) to a
``TokenizedExample``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .jsonl import InstructionRecord
from .records import Conversation, Dataset, Record, TextRecord
from .templates import JinjaChatTemplate, TokenizedExample, tokenize_example


class PlainConcatenation:
  """The renderer of ``--chat-template none``: the turns' contents back to back.

  It has the interface of ``JinjaChatTemplate`` and marks every assistant content as a
  generation block.
  """

  def render_marked(
    self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool
  ) -> tuple[str, list[tuple[int, int]]]:
    """The concatenated contents and the spans of the assistant's."""
    del add_generation_prompt  # there is no assistant header to add
    text, spans, at = [], [], 0
    for m in messages:
      content = m.get("content") or ""
      if m["role"] == "assistant":
        spans.append((at, at + len(content)))
      text.append(content)
      at += len(content)
    return "".join(text), spans

  def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool) -> str:
    """The concatenated contents."""
    return self.render_marked(messages, add_generation_prompt)[0]


def assistant_spans(template, messages: Sequence[dict[str, Any]], train_from: int = 0):
  """Renders a conversation and finds the text of the assistant turns to learn.

  A template with ``{% generation %}`` blocks marks that text itself (as ``transformers``'
  ``return_assistant_tokens_mask`` reads it). Otherwise the span of assistant turn ``k`` is
  what rendering ``messages[:k + 1]`` adds to the generation prompt of ``messages[:k]``: the
  reply and the template's end-of-turn text (the model must learn to emit it to stop), without
  the whitespace the template writes after it.

  Args:
    template: a ``JinjaChatTemplate`` or ``PlainConcatenation``.
    messages: the turns.
    train_from: only assistant turns from this index on are learned.

  Returns:
    ``(text, spans)``: the rendering and ``[start, end)`` character spans, in order.

  Raises:
    ValueError: the template fails on the conversation, or renders its first turns as
      something other than the start of the whole (so the turns cannot be located).
  """
  messages = list(messages)
  text, marked = template.render_marked(messages, add_generation_prompt=False)
  if marked:
    start = len(template.render(messages[:train_from], True)) if train_from else 0
    return text, [s for s in marked if s[0] >= start]
  spans = []
  for k in range(train_from, len(messages)):
    if messages[k]["role"] != "assistant":
      continue
    head = template.render(messages[:k], add_generation_prompt=True)
    upto = template.render(messages[: k + 1], add_generation_prompt=False)
    if not (text.startswith(upto) and upto.startswith(head)):
      raise ValueError(
        f"the chat template renders the conversation up to message {k + 1} as something other "
        "than the start of the whole, so the assistant's turns cannot be located; mark them "
        "with {% generation %} blocks in a --chat-template FILE"
      )
    end = len(upto.rstrip())
    content = messages[k].get("content") or ""
    found = upto.rfind(content, len(head)) if content else -1
    if found >= 0:  # the reply's own trailing whitespace is learned
      end = max(end, found + len(content))
    spans.append((len(head), end))
  return text, spans


def tokenize_conversation(
  tokenizer,
  messages: Sequence[dict[str, Any]],
  template,
  eos_id: int | None = None,
  train_from: int = 0,
) -> TokenizedExample:
  """Tokenizes a rendered conversation with the loss on the assistant's turns.

  The whole rendering is encoded at once (as ``apply_chat_template`` does) and a token is
  learned when its characters overlap an assistant span (see :func:`assistant_spans`). When
  the last learned turn holds no ``eos_id`` (a template that does not end turns with it), an
  EOS is inserted after it and learned, so that the model learns to stop.

  Args:
    tokenizer: a ``tokenizers.Tokenizer``.
    messages: the turns.
    template: a ``JinjaChatTemplate`` or ``PlainConcatenation``.
    eos_id: the end-of-sequence id, or None.
    train_from: only assistant turns from this index on are learned.

  Returns:
    A ``TokenizedExample``.

  Raises:
    ValueError: as for :func:`assistant_spans`, or when no token is learned.

  Example:
    >>> from tokenizers import Tokenizer, models, pre_tokenizers
    >>> tok = Tokenizer(models.WordLevel({"Hi": 0, "Hello": 1, "</s>": 2}, "Hi"))
    >>> tok.pre_tokenizer = pre_tokenizers.Whitespace()
    >>> turns = [{"role": "user", "content": "Hi "}, {"role": "assistant", "content": "Hello"}]
    >>> ex = tokenize_conversation(tok, turns, PlainConcatenation(), eos_id=2)
    >>> ex.input_ids.tolist(), ex.loss_mask.tolist()
    ([0, 1, 2], [0, 1, 1])
  """
  text, spans = assistant_spans(template, messages, train_from)
  enc = tokenizer.encode(text, add_special_tokens=False)
  ids = list(enc.ids)
  mask = [0] * len(ids)
  last: list[int] = []
  for start, end in spans:
    last = [i for i, (a, b) in enumerate(enc.offsets) if a < end and b > start]
    for i in last:
      mask[i] = 1
  if not last:
    raise ValueError("the conversation has no assistant text to learn from")
  if eos_id is not None and all(ids[i] != eos_id for i in last):
    at = last[-1] + 1
    ids.insert(at, eos_id)
    mask.insert(at, 1)
  return TokenizedExample(np.asarray(ids, np.int32), np.asarray(mask, np.int32))


def tokenize_text(tokenizer, text: str, eos_id: int | None = None) -> TokenizedExample:
  """Tokenizes a document with every token learned, ending it with ``eos_id`` (if not None and
  not already there)."""
  ids = tokenizer.encode(text, add_special_tokens=False).ids
  if eos_id is not None and ids[-1:] != [eos_id]:
    ids = ids + [eos_id]
  return TokenizedExample(np.asarray(ids, np.int32), np.ones(len(ids), np.int32))


def tokenize_record(tokenizer, record: Record, template, eos_id: int | None) -> TokenizedExample:
  """Tokenizes one record of a ``Dataset``.

  Conversations are rendered with ``template`` (the loss on the assistant's turns); string
  prompt/completion pairs are concatenated as they are, the loss on the completion and an
  appended EOS (as TRL trains them); text is learned entirely.

  Args:
    tokenizer: a ``tokenizers.Tokenizer``.
    record: a ``Conversation``, ``InstructionRecord`` or ``TextRecord``.
    template: a ``JinjaChatTemplate``, ``PlainConcatenation``, or None (only for records
      that are not conversations).
    eos_id: the end-of-sequence id, or None.

  Returns:
    A ``TokenizedExample``.

  Raises:
    ValueError: the record cannot be rendered, or a conversation has no template.
  """
  if isinstance(record, Conversation):
    if template is None:
      raise ValueError(
        "conversations need a chat template and the model has none: pass --chat-template "
        "FILE, or --chat-template none to concatenate the turns' contents"
      )
    return tokenize_conversation(tokenizer, record.messages, template, eos_id, record.train_from)
  if isinstance(record, InstructionRecord):
    return tokenize_example(tokenizer, record.prompt, record.response, None, eos_id)
  if isinstance(record, TextRecord):
    if not record.text:
      raise ValueError("empty text")
    return tokenize_text(tokenizer, record.text, eos_id)
  raise TypeError(f"not a record: {type(record).__name__}")


def tokenize_dataset(
  tokenizer, dataset: Dataset, template, eos_id: int | None
) -> list[TokenizedExample]:
  """Tokenizes every record of a dataset (see :func:`tokenize_record`).

  Raises:
    ValueError: naming the file and line (or row) of the first record that fails.
  """
  out = []
  for where, record in zip(dataset.where, dataset.records):
    try:
      out.append(tokenize_record(tokenizer, record, template, eos_id))
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None
  return out


def chat_template_for(choice: str | None, tok) -> JinjaChatTemplate | PlainConcatenation | None:
  """The renderer ``--chat-template`` names: the model's (None), ``"none"``, or a Jinja file.

  Args:
    choice: None (the model's template, if it has one), ``"none"`` or a file's path.
    tok: the model's ``TextTokenizer`` (its template and special tokens).

  Returns:
    A ``JinjaChatTemplate``, a ``PlainConcatenation``, or None when the model has no template.

  Raises:
    ValueError: the file cannot be read or is not a valid template.
    OSError: the file cannot be opened.
  """
  if choice == "none":
    return PlainConcatenation()
  if choice is None:
    source = tok.chat_template
    if source is None:
      return None
  else:
    from etils import epath

    source = epath.Path(choice).read_text()
  token = lambda i: "" if i is None else tok.tokenizer.id_to_token(int(i))
  return JinjaChatTemplate(source, token(tok.bos_token_id), token(tok.eos_token_id))
