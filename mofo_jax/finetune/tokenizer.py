"""Tokenizers from a GGUF file's vocabulary or from a Hugging Face ``tokenizer.json``."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import gguf
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from mofo_jax.finetune import storage

# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) that we can rebuild exactly.
_PRE_TOKENIZERS = {
  "smollm": lambda: pre_tokenizers.Sequence(
    [
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ]
  ),
  "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
}


@dataclasses.dataclass(frozen=True)
class TextTokenizer:
  """A ``tokenizers.Tokenizer`` with the special token ids the model was trained with.

  Attributes:
    tokenizer: the underlying tokenizer (adds no BOS/EOS by itself).
    eos_token_id: end-of-sequence id, or None if unknown.
    pad_token_id: padding id, or None if unknown.
    bos_token_id: beginning-of-sequence id, or None if unknown.
    chat_template: the model's Jinja chat template, or None.
  """

  tokenizer: tokenizers.Tokenizer
  eos_token_id: int | None = None
  pad_token_id: int | None = None
  bos_token_id: int | None = None
  chat_template: str | None = None

  @property
  def vocab_size(self) -> int:
    """Number of token ids, special tokens included."""
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    """Tokenizes ``text`` without adding special tokens.

    Args:
      text: input string; special tokens written in it (e.g. ``<|im_start|>``) map to
        their single ids.

    Returns:
      The token ids.
    """
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids, skip_special_tokens: bool = False) -> str:
    """Turns token ids back into text.

    Args:
      ids: a sequence of ints.
      skip_special_tokens: drop control tokens from the output.

    Returns:
      The decoded string.
    """
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
  field = reader.get_field(key)
  return default if field is None else field.contents()


def _reader(reader_or_path) -> gguf.GGUFReader:
  if isinstance(reader_or_path, gguf.GGUFReader):
    return reader_or_path
  return gguf.GGUFReader(os.fspath(reader_or_path))


def tokenizer_from_gguf(reader_or_path) -> tokenizers.Tokenizer:
  """Rebuilds the byte-level BPE tokenizer stored in a GGUF file.

  Uses ``tokenizer.ggml.tokens``/``merges`` for the BPE model, the pre-tokenizer named by
  ``tokenizer.ggml.pre`` (SmolLM's: single digits, then byte-level without a prefix space),
  a byte-level decoder, no post-processor (no BOS), and registers control tokens as special.

  Args:
    reader_or_path: a ``gguf.GGUFReader`` or the path of a ``.gguf`` file.

  Returns:
    The tokenizer.

  Raises:
    ValueError: the GGUF holds no tokenizer, or one of another kind (not ``gpt2`` BPE, or an
      unknown pre-tokenizer).
  """
  reader = _reader(reader_or_path)
  kind = _field(reader, "tokenizer.ggml.model")
  if kind != "gpt2":
    raise ValueError(f"tokenizer.ggml.model={kind!r}: only 'gpt2' (byte-level BPE) is supported")
  pre = _field(reader, "tokenizer.ggml.pre", "smollm")
  if pre not in _PRE_TOKENIZERS:
    raise ValueError(
      f"tokenizer.ggml.pre={pre!r} is not supported (supported: {sorted(_PRE_TOKENIZERS)})"
    )
  tokens = _field(reader, "tokenizer.ggml.tokens")
  merges = _field(reader, "tokenizer.ggml.merges", [])
  types = _field(reader, "tokenizer.ggml.token_type", [])
  tok = tokenizers.Tokenizer(
    models.BPE(
      vocab={t: i for i, t in enumerate(tokens)},
      merges=[tuple(m.split(" ")) for m in merges],
    )
  )
  tok.pre_tokenizer = _PRE_TOKENIZERS[pre]()
  tok.decoder = decoders.ByteLevel()
  control, user = int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)
  tok.add_special_tokens(
    [
      tokenizers.AddedToken(tokens[i], special=True, normalized=False)
      for i, t in enumerate(types)
      if t == control
    ]
  )
  tok.add_tokens(
    [
      tokenizers.AddedToken(tokens[i], special=False, normalized=False)
      for i, t in enumerate(types)
      if t == user
    ]
  )
  return tok


def text_tokenizer_from_gguf(reader_or_path) -> TextTokenizer:
  """``tokenizer_from_gguf`` plus the eos/pad/bos ids from the GGUF metadata.

  Args:
    reader_or_path: a ``gguf.GGUFReader`` or the path of a ``.gguf`` file.

  Returns:
    The wrapped tokenizer.
  """
  reader = _reader(reader_or_path)
  return TextTokenizer(
    tokenizer_from_gguf(reader),
    eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
    pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
    chat_template=_field(reader, "tokenizer.chat_template"),
  )


def _special_id(tok: tokenizers.Tokenizer, cfg: dict, key: str) -> int | None:
  """Id of a special token named in a ``tokenizer_config.json`` (string or AddedToken dict)."""
  value = cfg.get(key)
  if isinstance(value, dict):
    value = value.get("content")
  return None if value is None else tok.token_to_id(value)


def load_tokenizer(path: str | os.PathLike) -> TextTokenizer:
  """Loads a tokenizer from a ``.gguf`` file, a ``tokenizer.json``, or a directory holding one.

  For ``tokenizer.json`` the special ids and the chat template come from a
  ``tokenizer_config.json`` beside it (``eos_token``, ``pad_token``, ``bos_token``,
  ``chat_template``), when there is one.

  Args:
    path: the file or directory: a local path, or a ``gs://`` URL for ``tokenizer.json``.

  Returns:
    The wrapped tokenizer.

  Raises:
    FileNotFoundError: nothing loadable at ``path``.
  """
  path = storage.as_path(path)
  if path.is_dir():
    path = path / "tokenizer.json"
  if not path.is_file():
    raise FileNotFoundError(f"no tokenizer at {path}")
  if path.suffix == ".gguf":
    return text_tokenizer_from_gguf(Path(path))
  tok = tokenizers.Tokenizer.from_str(path.read_text())
  cfg_file = path.parent / "tokenizer_config.json"
  cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
  return TextTokenizer(
    tok,
    eos_token_id=_special_id(tok, cfg, "eos_token"),
    pad_token_id=_special_id(tok, cfg, "pad_token"),
    bos_token_id=_special_id(tok, cfg, "bos_token"),
    chat_template=cfg.get("chat_template") if isinstance(cfg.get("chat_template"), str) else None,
  )


def save_tokenizer(tok: TextTokenizer, directory: str | os.PathLike) -> None:
  """Writes ``tokenizer.json`` and a ``tokenizer_config.json`` that :func:`load_tokenizer` and
  ``transformers.AutoTokenizer`` read back to the same tokens, special ids and chat template.

  Args:
    tok: the tokenizer.
    directory: an existing directory (a saved model's).

  Example:
    >>> import tempfile, tokenizers
    >>> raw = tokenizers.Tokenizer(tokenizers.models.WordLevel({"hi": 0, "</s>": 1}, "hi"))
    >>> d = tempfile.mkdtemp()
    >>> save_tokenizer(TextTokenizer(raw, eos_token_id=1, chat_template="{{ x }}"), d)
    >>> back = load_tokenizer(d)
    >>> back.eos_token_id, back.chat_template
    (1, '{{ x }}')
  """
  directory = Path(directory)
  tok.tokenizer.save(str(directory / "tokenizer.json"))
  cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
  for key, token_id in (
    ("bos_token", tok.bos_token_id),
    ("eos_token", tok.eos_token_id),
    ("pad_token", tok.pad_token_id),
  ):
    if token_id is not None:
      cfg[key] = tok.tokenizer.id_to_token(int(token_id))
  if tok.chat_template is not None:
    cfg["chat_template"] = tok.chat_template
  (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
