"""Data for fine-tuning: users' JSONL/Parquet records and chat templates, packing, the
arithmetic task, eval corpora."""

from .arithmetic import ArithmeticProblem, ArithmeticTask, exact_match, parse_answer
from .chat import (
  PlainConcatenation,
  assistant_spans,
  chat_template_for,
  tokenize_conversation,
  tokenize_dataset,
  tokenize_record,
  tokenize_text,
)
from .cloze import CLOZE_ITEMS
from .corpora import bible_text, eval_batches, pydoc_topics_text
from .jsonl import InstructionRecord, load_jsonl
from .packing import BATCH_KEYS, batch_iterator, pack_examples
from .records import (
  FORMATS,
  Conversation,
  Dataset,
  Fields,
  TextRecord,
  detect_format,
  iter_rows,
  load_dataset,
  read_turns,
)
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
  "Conversation",
  "Dataset",
  "FORMATS",
  "Fields",
  "InstructionRecord",
  "JinjaChatTemplate",
  "PlainConcatenation",
  "TextRecord",
  "TokenizedExample",
  "assistant_spans",
  "batch_iterator",
  "bible_text",
  "chat_template_for",
  "detect_format",
  "eval_batches",
  "exact_match",
  "iter_rows",
  "load_dataset",
  "load_jsonl",
  "pack_examples",
  "parse_answer",
  "pydoc_topics_text",
  "read_turns",
  "split_format_template",
  "tokenize_conversation",
  "tokenize_dataset",
  "tokenize_example",
  "tokenize_record",
  "tokenize_text",
]
