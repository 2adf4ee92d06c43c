"""Reading JSON Lines files: their objects, and prompt/response records."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

from etils import epath

_NOT_JSONL = "neither JSON Lines (one JSON object per line) nor Parquet"


class InstructionRecord(NamedTuple):
  """One instruction-tuning example as raw text."""

  prompt: str
  response: str


def load_jsonl(
  path: str | os.PathLike,
  prompt_key: str = "prompt",
  response_key: str = "response",
) -> list[InstructionRecord]:
  """Reads prompt/response pairs from a JSON Lines file.

  Each non-blank line must be a JSON object holding string values under
  ``prompt_key`` and ``response_key``; other keys are ignored.

  Args:
    path: the ``.jsonl`` file.
    prompt_key: name of the field holding the prompt.
    response_key: name of the field holding the response.

  Returns:
    The records in file order.

  Raises:
    ValueError: naming the file and the 1-based line number of the first
      malformed line (not UTF-8, bad JSON, not an object, a missing field, or
      a field that is not a string), or if the file holds no records at all.
  """
  records = []
  for where, obj in iter_jsonl(path):
    values = []
    for key in (prompt_key, response_key):
      if key not in obj:
        raise ValueError(f"{where}: missing field {key!r} (has {sorted(obj)})")
      if not isinstance(obj[key], str):
        raise ValueError(f"{where}: field {key!r} must be a string, got {type(obj[key]).__name__}")
      values.append(obj[key])
    records.append(InstructionRecord(*values))
  if not records:
    raise ValueError(f"{os.fspath(path)}: no records (file is empty)")
  return records


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, Any]]]:
  """Yields the JSON objects of a JSON Lines file with where each was read.

  Blank lines are skipped. A first line that is not a JSON object (a CSV file, a JSON
  array, a binary file) is reported as a file that is not JSON Lines at all.

  Args:
    path: the file (anything ``etils.epath`` opens).

  Yields:
    ``("file:line", object)`` pairs, the line 1-based.

  Raises:
    ValueError: naming the file and line of the first line that is not UTF-8, not JSON,
      or not an object.
  """
  first = True
  with epath.Path(path).open("rb") as f:
    for lineno, raw in enumerate(f, start=1):
      where = f"{os.fspath(path)}:{lineno}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        if first:
          raise ValueError(f"{os.fspath(path)}: {_NOT_JSONL} (line 1 is not UTF-8 text)") from None
        raise ValueError(
          f"{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
        ) from None
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        if first:
          raise ValueError(f"{os.fspath(path)}: {_NOT_JSONL} (line {lineno}: {e.msg})") from None
        raise ValueError(f"{where}: malformed JSON ({e.msg})") from None
      if not isinstance(obj, dict):
        if first:
          raise ValueError(
            f"{os.fspath(path)}: {_NOT_JSONL} (line {lineno} is a JSON "
            f"{type(obj).__name__}, not an object)"
          )
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
      first = False
      yield where, obj
