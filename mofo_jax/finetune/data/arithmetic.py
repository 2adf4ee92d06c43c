"""Synthetic multi-step arithmetic word problems: the fine-tuning task of the demo."""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from typing import NamedTuple

from .templates import JinjaChatTemplate, TokenizedExample, tokenize_example

_NAMES = (
  "Ava",
  "Ben",
  "Chen",
  "Dana",
  "Eli",
  "Fatima",
  "Gus",
  "Hana",
  "Ivan",
  "Jo",
  "Kofi",
  "Lena",
  "Mateo",
  "Nia",
  "Omar",
  "Priya",
  "Quinn",
  "Rosa",
  "Sam",
  "Tariq",
  "Uma",
  "Vik",
  "Wen",
  "Yara",
  "Zoe",
)
_ITEMS = (
  "apples",
  "marbles",
  "stickers",
  "pencils",
  "coins",
  "books",
  "shells",
  "cards",
  "stamps",
  "cookies",
  "buttons",
  "beads",
  "crayons",
  "eggs",
)
OPERATIONS = ("add", "sub", "packs", "scale", "div")
_ADD = ("{n} finds {b} more {i}.", "{n} buys {b} more {i}.", "A friend gives {n} {b} {i}.")
_SUB = ("{n} gives {b} {i} to a friend.", "{n} loses {b} {i}.", "{n} uses up {b} {i}.")
_PACKS = (
  "{n} buys {k} packs of {i} with {b} {i} in each pack.",
  "{n} gets {k} boxes holding {b} {i} each.",
)
_SCALE = ("{n} ends up with {k} times as many {i} as before.",)
_DIV = ("{n} splits the {i} equally into {k} bags and keeps only one bag.",)


class ArithmeticProblem(NamedTuple):
  """One word problem with its integer answer."""

  question: str
  answer: int
  marker: str = "Answer:"

  @property
  def prompt(self) -> str:
    """The text given to the model; it ends with the answer marker."""
    return f"Question: {self.question}\n{self.marker}"

  @property
  def response(self) -> str:
    """The text the model should continue the prompt with."""
    return f" {self.answer}"

  def tokenize(
    self,
    tokenizer,
    template: str | JinjaChatTemplate | None = None,
    eos_id: int | None = None,
  ) -> TokenizedExample:
    """Tokenizes the problem with the loss on the answer only.

    Without a template the prompt (question and marker) is masked and the
    loss falls on `` {answer}`` (and the EOS). With a template the user
    turn is the question and the reply is ``"{marker} {answer}"``.

    Args:
      tokenizer: a ``tokenizers.Tokenizer``.
      template: as for ``tokenize_example``.
      eos_id: as for ``tokenize_example``.

    Returns:
      A ``TokenizedExample``.
    """
    if template is None:
      return tokenize_example(tokenizer, self.prompt, self.response, None, eos_id)
    reply = f"{self.marker} {self.answer}"
    return tokenize_example(tokenizer, self.question, reply, template, eos_id)


@dataclasses.dataclass(frozen=True)
class ArithmeticTask:
  """A deterministic generator of arithmetic word problems of adjustable difficulty.

  A problem starts with someone holding some items, applies ``num_steps``
  operations to the count (buy more, give away, buy packs of several, scale,
  share equally), may mention irrelevant counts (distractors), and asks for
  the final count, which is always a non-negative integer of at most
  ``10 * max_value`` (and at least 1). ``difficulty`` sets the other knobs unless they are
  given: ``num_steps = difficulty``, ``max_value = 10 * 2**(difficulty-1)``,
  multiplication from difficulty 3, scaling and division from 4, and
  ``difficulty - 3`` distractor sentences from 4 on.

  Train and eval are disjoint by the arithmetic itself: a problem belongs to
  the eval split when a hash of its numbers and operations (not of the seed,
  names or wording) falls in the first ``eval_fraction`` of the hash range.
  So no eval computation appears in any train set, whatever the seeds.

  Attributes:
    difficulty: 1 (one small addition or subtraction) and up.
    num_steps: operations applied after the starting count.
    max_value: largest starting count and operand.
    operations: allowed subset of ``OPERATIONS``.
    distractors: irrelevant sentences with numbers mixed into the story.
    seed: selects the stream of problems.
    eval_fraction: share of computations reserved for eval.
    marker: the text that precedes the answer.
  """

  difficulty: int = 1
  num_steps: int | None = None
  max_value: int | None = None
  operations: tuple[str, ...] | None = None
  distractors: int | None = None
  seed: int = 0
  eval_fraction: float = 0.1
  marker: str = "Answer:"

  def __post_init__(self):
    d = self.difficulty
    if d < 1:
      raise ValueError(f"difficulty must be >= 1, got {d}")
    defaults = {
      "num_steps": d,
      "max_value": 10 * 2 ** (d - 1),
      "operations": OPERATIONS[: 2 if d < 3 else 3 if d < 4 else 5],
      "distractors": max(0, d - 3),
    }
    for name, value in defaults.items():
      if getattr(self, name) is None:
        object.__setattr__(self, name, value)
    object.__setattr__(self, "operations", tuple(self.operations))
    if self.num_steps < 1 or self.max_value < 2 or self.distractors < 0:
      raise ValueError("need num_steps >= 1, max_value >= 2, distractors >= 0")
    unknown = set(self.operations) - set(OPERATIONS)
    if unknown or not self.operations:
      raise ValueError(f"operations must be a non-empty subset of {OPERATIONS}")
    if not 0.0 < self.eval_fraction < 1.0:
      raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")

  def generate(self, count: int, split: str = "train", start: int = 0) -> list[ArithmeticProblem]:
    """Returns ``count`` problems of a split, deterministic given the task's fields.

    Args:
      count: number of problems.
      split: ``"train"`` or ``"eval"``.
      start: skip this many problems of the split first (the same list
        as ``generate(start + count)[start:]``).

    Returns:
      The problems.
    """
    if split not in ("train", "eval"):
      raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    want_eval = split == "eval"
    out: list[ArithmeticProblem] = []
    skipped = 0
    candidate = 0
    while len(out) < count:
      problem, skeleton = self._candidate(candidate)
      candidate += 1
      if self._is_eval(skeleton) != want_eval:
        continue
      if skipped < start:
        skipped += 1
        continue
      out.append(problem)
    return out

  def _is_eval(self, skeleton: str) -> bool:
    """Whether a computation is reserved for the eval split."""
    digest = hashlib.blake2b(skeleton.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < self.eval_fraction * 2**64

  def _candidate(self, index: int) -> tuple[ArithmeticProblem, str]:
    """Builds the ``index``-th problem of the stream and its arithmetic skeleton."""
    rng = random.Random(f"arithmetic-{self.seed}-{index}")
    name, other = rng.sample(_NAMES, 2)
    items, other_items = rng.sample(_ITEMS, 2)
    cap = 10 * self.max_value
    value = rng.randint(2, self.max_value)
    sentences = [f"{name} has {value} {items}."]
    skeleton = [str(value)]
    for _ in range(self.num_steps):
      feasible = [op for op in self.operations if _feasible(op, value, cap)]
      # When none of the chosen operations applies, add or subtract
      # (one of them always does) rather than fail.
      op = rng.choice(feasible or ["add" if _feasible("add", value, cap) else "sub"])
      value, sentence, step = _apply(op, value, cap, self.max_value, rng)
      sentences.append(sentence.format(n=name, i=items, **step))
      skeleton.append(f"{op}{sorted(step.items())}")
    for _ in range(self.distractors):
      who, what = rng.choice([(other, items), (other, other_items)])
      count = rng.randint(2, self.max_value)
      sentences.insert(rng.randint(1, len(sentences)), f"{who} has {count} {what}.")
    sentences.append(f"How many {items} does {name} have now?")
    return ArithmeticProblem(" ".join(sentences), value, self.marker), " ".join(skeleton)


def _feasible(op: str, value: int, cap: int) -> bool:
  """Whether an operation can apply to the count without leaving [1, cap].

  Operands of additions and subtractions are at least 2 (no "1 apples").
  """
  if op == "add":
    return value + 2 <= cap
  if op == "sub":
    return value >= 3
  if op == "packs":
    return value + 4 <= cap
  if op == "scale":
    return 0 < value * 2 <= cap
  return any(value % k == 0 for k in range(2, 10)) and value > 0


def _apply(op: str, value: int, cap: int, max_value: int, rng: random.Random):
  """Draws operands for ``op`` and returns (new value, sentence template, operands)."""
  if op == "add":
    b = rng.randint(2, min(max_value, cap - value))
    return value + b, rng.choice(_ADD), {"b": b}
  if op == "sub":
    b = rng.randint(2, min(max_value, value - 1))
    return value - b, rng.choice(_SUB), {"b": b}
  if op == "packs":
    k = rng.randint(2, max(2, min(9, (cap - value) // 2)))
    b = rng.randint(2, max(2, min(max_value // 2, (cap - value) // k)))
    return value + k * b, rng.choice(_PACKS), {"k": k, "b": b}
  if op == "scale":
    k = rng.randint(2, max(2, min(5, cap // value)))
    return value * k, rng.choice(_SCALE), {"k": k}
  k = rng.choice([k for k in range(2, 10) if value % k == 0])
  return value // k, rng.choice(_DIV), {"k": k}


_INTEGER = re.compile(r"-?\d+")


def parse_answer(text: str, marker: str = "Answer:") -> int | None:
  """Finds the first integer after the answer marker.

  If the marker does not occur, the whole text is taken to follow it (the
  usual case for a model's continuation of a prompt that ends with it).

  Args:
    text: generated or reference text.
    marker: the answer marker.

  Returns:
    The integer, or ``None`` if there is none.

  >>> parse_answer("Question: 3 apples and 4 more? Answer: 7 apples")
  7
  >>> parse_answer(" 12, I think")
  12
  """
  at = text.find(marker)
  rest = text if at < 0 else text[at + len(marker) :]
  found = _INTEGER.search(rest)
  return int(found.group()) if found else None


def exact_match(predicted_text: str, answer: int, marker: str = "Answer:") -> bool:
  """Scores a prediction: the first integer after the marker equals the answer.

  Args:
    predicted_text: the model's output (with or without the marker).
    answer: the correct integer.
    marker: the answer marker.

  Returns:
    Whether they match.
  """
  return parse_answer(predicted_text, marker) == int(answer)
