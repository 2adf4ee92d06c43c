"""Data for fine-tuning: instruction JSONL, packing, the arithmetic task, eval corpora."""

from .arithmetic import ArithmeticProblem, ArithmeticTask, exact_match, parse_answer
from .cloze import CLOZE_ITEMS
from .corpora import bible_text, eval_batches, pydoc_topics_text
from .jsonl import InstructionRecord, load_jsonl
from .packing import BATCH_KEYS, batch_iterator, pack_examples
from .templates import (
  JinjaChatTemplate,
  TokenizedExample,
  split_format_template,
  tokenize_example,
)

__all__ = [
  "ArithmeticProblem",
  "ArithmeticTask",
  "BATCH_KEYS",
  "CLOZE_ITEMS",
  "InstructionRecord",
  "JinjaChatTemplate",
  "TokenizedExample",
  "batch_iterator",
  "bible_text",
  "eval_batches",
  "exact_match",
  "load_jsonl",
  "pack_examples",
  "parse_answer",
  "pydoc_topics_text",
  "split_format_template",
  "tokenize_example",
]
