"""Loading prompt/response records from JSON Lines files."""

from __future__ import annotations

import json
import os
from typing import NamedTuple


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
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      where = f"{os.fspath(path)}:{lineno}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(
          f"{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
        ) from None
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: malformed JSON ({e.msg})") from None
      if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
      values = []
      for key in (prompt_key, response_key):
        if key not in obj:
          raise ValueError(f"{where}: missing field {key!r} (has {sorted(obj)})")
        if not isinstance(obj[key], str):
          raise ValueError(
            f"{where}: field {key!r} must be a string, got {type(obj[key]).__name__}"
          )
        values.append(obj[key])
      records.append(InstructionRecord(*values))
  if not records:
    raise ValueError(f"{os.fspath(path)}: no records (file is empty)")
  return records
