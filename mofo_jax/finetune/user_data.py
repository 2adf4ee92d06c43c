"""A run's training and evaluation data from the user's files (``--data FILE``, ``--eval-data``).

Records are read and checked before the model loads (a bad line is reported at once, and
nothing is written); they are tokenized with the model's tokenizer and chat template after.
"""

from __future__ import annotations

import dataclasses

from mofo_jax.finetune import data as data_lib
from mofo_jax.finetune import evaluation
from mofo_jax.finetune.run_config import RunConfig, UserError


@dataclasses.dataclass(frozen=True)
class Loaded:
  """The checked records of a run's files.

  Attributes:
    train: the ``--data`` dataset.
    eval: the ``--eval-data`` dataset, or None (a split of ``--data`` is held out).
  """

  train: data_lib.Dataset
  eval: data_lib.Dataset | None


@dataclasses.dataclass(frozen=True)
class Setup:
  """Tokenized user data, ready for the trainer and the evaluator.

  Attributes:
    train_examples: ``(ids, mask)`` training examples.
    task_batches: the held-out examples, one per row.
    stop_ids: tokens that end a number (for the exact-match score).
  """

  train_examples: list
  task_batches: list
  stop_ids: object


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split()) or type(e).__name__


def load(cfg: RunConfig) -> Loaded:
  """Reads and checks the records of ``--data`` and ``--eval-data``.

  Raises:
    UserError: naming the flag, the file, the line (or Parquet row) and the field at fault.
  """
  d = cfg.data
  if d.data_format not in data_lib.FORMATS:
    raise UserError(f"--data-format {d.data_format!r} is not one of {', '.join(data_lib.FORMATS)}.")
  fields = data_lib.Fields(d.messages_field, d.prompt_field, d.completion_field, d.text_field)
  out = []
  for flag, path in (("--data", d.source), ("--eval-data", cfg.eval.eval_data)):
    if path is None:
      out.append(None)
      continue
    try:
      out.append(data_lib.load_dataset(path, d.data_format, fields))
    except FileNotFoundError:
      # gcsfs says only the object's API path ("b/bucket/o/name").
      raise UserError(f"{flag} {path}: no such file.") from None
    except (ValueError, OSError) as e:
      raise UserError(f"{flag} {path}: {_one_line(e)}") from None
  return Loaded(*out)


def _tokenized(flag: str, dataset: data_lib.Dataset, tok, template, cfg: RunConfig) -> list:
  try:
    examples = data_lib.tokenize_dataset(tok.tokenizer, dataset, template, tok.eos_token_id)
  except ValueError as e:
    raise UserError(f"{flag} {dataset.path}: {_one_line(e)}") from None
  seq_len = cfg.data.seq_len
  if not cfg.data.truncate:
    for i, (ids, _) in enumerate(examples):
      if len(ids) - 1 > seq_len:
        raise UserError(
          f"{flag} {dataset.path}: record {i + 1} ({dataset.where[i]}) has {len(ids)} tokens, "
          f"more than --seq-len {seq_len} + 1: raise --seq-len or pass --truncate to cut long "
          "examples."
        )
  return examples


def setup(loaded: Loaded, cfg: RunConfig, tok, vocab_size: int) -> Setup:
  """Tokenizes the loaded records and builds the held-out evaluation batches.

  Without ``--eval-data`` the last tenth of ``--data`` (at most ``--eval-examples`` records,
  at least one) is held out; with it, every ``--data`` record trains and every
  ``--eval-data`` record is scored.

  Args:
    loaded: what :func:`load` read.
    cfg: the run.
    tok: the model's ``TextTokenizer``.
    vocab_size: the model's vocabulary size.

  Returns:
    The setup.

  Raises:
    UserError: naming the flag and file (and record) that cannot be used.
  """
  d = cfg.data
  try:
    template = data_lib.chat_template_for(d.chat_template, tok)
  except (ValueError, OSError) as e:
    where = "--chat-template " + d.chat_template if d.chat_template else "--model's chat template"
    raise UserError(f"{where}: {_one_line(e)}") from None
  train = _tokenized("--data", loaded.train, tok, template, cfg)
  if loaded.eval is not None:
    held = _tokenized("--eval-data", loaded.eval, tok, template, cfg)
  else:
    count = max(1, min(cfg.eval.eval_examples, len(train) // 10))
    if len(train) - count < 1:
      raise UserError(
        f"--data {d.source}: {len(train)} example(s) is too few to hold out an evaluation set "
        "(pass --eval-data FILE)."
      )
    train, held = train[:-count], train[-count:]
  task_batches = evaluation.one_per_row(held, d.seq_len, d.batch_size, d.truncate)
  return Setup(train, task_batches, evaluation.number_stop_ids(tok.tokenizer, vocab_size))
