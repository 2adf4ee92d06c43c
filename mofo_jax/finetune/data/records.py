"""Users' training data: JSON Lines or Parquet files of conversations, prompt/completion pairs,
or plain text, the format read off the first record.

The three formats are those of Hugging Face TRL's SFT datasets (and of OpenAI's fine-tuning
files, for conversations):

* ``messages``: a list of ``{"role", "content"}`` turns (system, user, assistant, tool; other
  keys such as ``tool_calls`` are passed to the chat template);
* ``prompt`` and ``completion`` (or ``response``): strings, or lists of turns (a conversational
  prompt and the assistant's reply);
* ``text``: a document, every token of which is learned.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any, NamedTuple, Union

from etils import epath

from .jsonl import InstructionRecord, iter_jsonl

FORMATS = ("auto", "messages", "prompt-completion", "text")


class Conversation(NamedTuple):
  """A conversation whose assistant turns are learned.

  Attributes:
    messages: the turns, ``{"role": ..., "content": ..., ...}`` dicts.
    train_from: the loss is on the assistant turns from this index on (the turns before it
      are a conversational prompt).
  """

  messages: tuple[dict[str, Any], ...]
  train_from: int = 0


class TextRecord(NamedTuple):
  """A plain text document; the loss is on every token."""

  text: str


Record = Union[Conversation, InstructionRecord, TextRecord]


@dataclasses.dataclass(frozen=True)
class Fields:
  """Which fields hold the data (the names TRL and OpenAI files use by default).

  Attributes:
    messages: the conversation's list of turns.
    prompt: the prompt (a string or a list of turns).
    completion: the completion; None: ``completion``, or ``response`` when the first record
      has that and no ``completion``.
    text: the document of a text record.
  """

  messages: str = "messages"
  prompt: str = "prompt"
  completion: str | None = None
  text: str = "text"


@dataclasses.dataclass(frozen=True)
class Dataset:
  """The records of one file.

  Attributes:
    path: the file.
    format: ``"messages"``, ``"prompt-completion"`` or ``"text"``.
    records: the records, in file order.
    where: for each record, where it was read (``"file:line"`` or ``"file: row N"``).
  """

  path: str
  format: str
  records: list[Record]
  where: list[str]


def is_parquet(path: str | os.PathLike) -> bool:
  """Whether a file is Parquet: its name ends in ``.parquet`` or it starts with ``PAR1``."""
  if os.fspath(path).endswith(".parquet"):
    return True
  with epath.Path(path).open("rb") as f:
    return f.read(4) == b"PAR1"


def iter_rows(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, Any]]]:
  """Yields the rows of a JSON Lines or Parquet file as dicts, with where each was read.

  Args:
    path: the file.

  Yields:
    ``(where, row)``: ``where`` is ``"file:line"`` (JSON Lines) or ``"file: row N"``
    (Parquet), both 1-based.

  Raises:
    ValueError: naming the file (and line) for a file that is neither format or a
      malformed line.
  """
  if not is_parquet(path):
    yield from iter_jsonl(path)
    return
  import pyarrow
  import pyarrow.parquet as pq

  try:
    with epath.Path(path).open("rb") as f:
      table = pq.read_table(f)
  except pyarrow.ArrowException as e:
    raise ValueError(
      f"{os.fspath(path)}: unreadable Parquet ({' '.join(str(e).split())})"
    ) from None
  for i, row in enumerate(table.to_pylist(), start=1):
    yield f"{os.fspath(path)}: row {i}", row


def detect_format(row: dict[str, Any], fields: Fields = Fields()) -> str:
  """The format a record is in: the first of messages, prompt/completion and text it has.

  Args:
    row: the first record.
    fields: the field names.

  Returns:
    ``"messages"``, ``"prompt-completion"`` or ``"text"``.

  Raises:
    ValueError: the record has none of the fields.

  Example:
    >>> detect_format({"prompt": "2+2=", "completion": "4"})
    'prompt-completion'
  """
  if fields.messages in row:
    return "messages"
  if fields.prompt in row:
    return "prompt-completion"
  if fields.text in row:
    return "text"
  raise ValueError(
    f"no field {fields.messages!r}, {fields.prompt!r} or {fields.text!r} (has {sorted(row)}): "
    "pass --data-format and the field-name flags"
  )


def load_dataset(
  path: str | os.PathLike, data_format: str = "auto", fields: Fields = Fields()
) -> Dataset:
  """Reads a JSON Lines or Parquet file of training records.

  Args:
    path: the file.
    data_format: one of ``FORMATS``; ``"auto"`` detects it from the first record.
    fields: the field names.

  Returns:
    The dataset; every record is checked.

  Raises:
    ValueError: one line naming the file, the line (or Parquet row) and the field of the
      first bad record, or saying the file holds no records.

  Example:
    >>> import json, pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "chat.jsonl"
    >>> turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    >>> _ = path.write_text(json.dumps({"messages": turns}) + "\\n")
    >>> data = load_dataset(path)
    >>> data.format, data.records[0].messages[1]["content"]
    ('messages', 'Hello!')
  """
  if data_format not in FORMATS:
    raise ValueError(f"unknown data format {data_format!r} (one of {', '.join(FORMATS)})")
  records, where = [], []
  fmt, completion = data_format, fields.completion
  for at, row in iter_rows(path):
    if fmt == "auto":
      try:
        fmt = detect_format(row, fields)
      except ValueError as e:
        raise ValueError(f"{at}: {e}") from None
    if completion is None and fmt == "prompt-completion":
      completion = "response" if "response" in row and "completion" not in row else "completion"
    try:
      if fmt == "messages":
        record = Conversation(read_turns(row, fields.messages))
      elif fmt == "prompt-completion":
        record = _prompt_completion(row, fields.prompt, completion)
      else:
        record = TextRecord(_string(row, fields.text))
    except ValueError as e:
      raise ValueError(f"{at}: {e}") from None
    records.append(record)
    where.append(at)
  if not records:
    raise ValueError(f"{os.fspath(path)}: no records (file is empty)")
  return Dataset(os.fspath(path), fmt, records, where)


def _field(row: dict[str, Any], name: str) -> Any:
  if name not in row:
    raise ValueError(f"missing field {name!r} (has {sorted(row)})")
  return row[name]


def _string(row: dict[str, Any], name: str) -> str:
  value = _field(row, name)
  if not isinstance(value, str):
    raise ValueError(f"field {name!r} must be a string, got {_kind(value)}")
  return value


def _kind(value: Any) -> str:
  return "null" if value is None else type(value).__name__


def read_turns(row: dict[str, Any], name: str, need_assistant: bool = True) -> tuple[dict, ...]:
  """The checked turns of a conversation field: role strings, content strings (or null beside
  ``tool_calls``), null keys dropped.

  Args:
    row: a record.
    name: the field holding the list of turns.
    need_assistant: refuse a conversation without an assistant turn.

  Returns:
    The turns.

  Raises:
    ValueError: naming the field (and message) at fault.
  """
  value = _field(row, name)
  if not isinstance(value, list) or not value:
    raise ValueError(f"field {name!r} must be a non-empty list of messages, got {_kind(value)}")
  turns = []
  for i, m in enumerate(value):
    here = f"field {name!r}, message {i + 1}"
    if not isinstance(m, dict):
      raise ValueError(f"{here}: must be an object with 'role' and 'content', got {_kind(m)}")
    if not isinstance(m.get("role"), str):
      raise ValueError(f"{here}: 'role' must be a string, got {_kind(m.get('role'))}")
    content = m.get("content")
    # An assistant turn that only calls tools may carry no content.
    if not isinstance(content, str) and not (content is None and m.get("tool_calls")):
      raise ValueError(f"{here} ({m['role']}): 'content' must be a string, got {_kind(content)}")
    # Parquet gives every message every key of the column's struct; absent ones are null.
    turns.append({k: v for k, v in m.items() if v is not None or k == "content"})
  if need_assistant and not any(t["role"] == "assistant" for t in turns):
    raise ValueError(f"field {name!r}: no assistant message to learn from")
  return tuple(turns)


def _prompt_completion(row: dict[str, Any], prompt: str, completion: str) -> Record:
  """A string pair, or a conversational prompt and the assistant's reply."""
  if isinstance(_field(row, prompt), list):
    head = read_turns(row, prompt, need_assistant=False)
    tail = read_turns(row, completion)
    return Conversation(head + tail, train_from=len(head))
  return InstructionRecord(_string(row, prompt), _string(row, completion))
