"""Data for fine-tuning: instruction JSONL, templates, packing."""

from .jsonl import InstructionRecord, load_jsonl
from .packing import BATCH_KEYS, batch_iterator, pack_examples
from .templates import (
    JinjaChatTemplate,
    TokenizedExample,
    split_format_template,
    tokenize_example,
)

__all__ = [
    "BATCH_KEYS",
    "InstructionRecord",
    "JinjaChatTemplate",
    "TokenizedExample",
    "batch_iterator",
    "load_jsonl",
    "pack_examples",
    "split_format_template",
    "tokenize_example",
]
