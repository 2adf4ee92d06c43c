"""mofo-finetune on users' own files: each format fine-tunes from the CLI; bad files are one line."""

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mofo_jax.finetune import cli
from tests.finetune.test_cli import user_error

TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
RUN = ["--steps", "2", "--seq-len", "64", "--batch-size", "4", "--no-progress", "--mesh", "data=1"]
RUN += ["--optimizer", "adamw", "--lr", "1e-3", "--old-text-batches", "0"]


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint, tmp_path_factory):
  """The tiny checkpoint with a chat template that does not end turns with its EOS."""
  path = tmp_path_factory.mktemp("model") / "model"
  shutil.copytree(tiny_checkpoint, path)
  cfg = {"eos_token": "<|endoftext|>", "chat_template": TEMPLATE}
  (path / "tokenizer_config.json").write_text(json.dumps(cfg))
  return path


def chat(i):
  return {
    "messages": [
      {"role": "system", "content": "Add."},
      {"role": "user", "content": f"{i}+1?"},
      {"role": "assistant", "content": f"{i + 1}"},
      {"role": "user", "content": f"{i}+2?"},
      {"role": "assistant", "content": f"{i + 2}"},
    ]
  }


ROWS = {
  "messages": chat,
  "prompt-completion": lambda i: {"prompt": f"{i}+1=", "completion": f" {i + 1}"},
  "text": lambda i: {"text": f"The quick brown fox jumps over {i} lazy dogs."},
}


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def evals(out):
  lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
  return [x for x in lines if x["kind"] == "eval"]


@pytest.mark.parametrize("fmt, suffix", [(f, ".jsonl") for f in ROWS] + [("messages", ".parquet")])
def test_each_format_fine_tunes_from_the_cli(model_dir, tmp_path, fmt, suffix):
  rows = [ROWS[fmt](i) for i in range(80)]
  data = tmp_path / f"train{suffix}"
  if suffix == ".parquet":
    pq.write_table(pa.Table.from_pylist(rows), data)
  else:
    write_jsonl(data, rows)
  out = tmp_path / "out"
  assert (
    cli.main(["--model", str(model_dir), "--data", str(data), *RUN, "--output-dir", str(out)]) == 0
  )
  before, after = evals(out)
  assert after["step"] == 2 and after["eval_data_loss"] != before["eval_data_loss"]
  config = json.loads((out / "run_config.json").read_text())
  assert config["data"]["source"] == str(data) and config["data"]["data_format"] == "auto"
  assert (out / "model" / "model.safetensors").is_file()


def test_eval_data_is_scored_beside_the_forgetting_measures(model_dir, tmp_path):
  train = write_jsonl(tmp_path / "train.jsonl", [chat(i) for i in range(8)])
  held = tmp_path / "held.parquet"
  pq.write_table(pa.Table.from_pylist([chat(i) for i in range(100, 103)]), held)
  out = tmp_path / "out"
  argv = ["--model", str(model_dir), "--data", str(train), "--eval-data", str(held), *RUN]
  argv += ["--old-text-batches", "1", "--output-dir", str(out)]
  assert cli.main(argv) == 0
  before, after = evals(out)
  assert {"eval_data_loss", "pydoc_loss", "cloze_accuracy"} <= set(after)
  assert after["eval_data_loss"] < before["eval_data_loss"]  # lr 1e-3 on the tiny model
  summary = json.loads((out / "summary.json").read_text())
  assert summary["config"]["eval"]["eval_data"] == str(held)


def test_chat_template_flag_chooses_the_rendering(model_dir, tmp_path, capsys):
  train = write_jsonl(tmp_path / "train.jsonl", [chat(i) for i in range(40)])
  template = tmp_path / "t.jinja"
  template.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
  baselines = []
  for choice in (str(template), "none"):
    out = tmp_path / f"out-{choice[-4:]}"
    argv = ["--model", str(model_dir), "--data", str(train), *RUN, "--seq-len", "96"]
    assert cli.main(argv + ["--output-dir", str(out), "--chat-template", choice]) == 0
    baselines.append(evals(out)[0]["eval_data_loss"])
    config = json.loads((out / "run_config.json").read_text())
    assert config["data"]["chat_template"] == choice
  assert baselines[0] != baselines[1]  # other text, other tokens: the pretrained loss differs
  bad = tmp_path / "bad.jinja"
  bad.write_text("{% for m in messages %}")
  line = user_error(
    ["--model", str(model_dir), "--data", str(train), "--chat-template", str(bad)], capsys
  )
  assert f"--chat-template {bad}: chat template line 1" in line
  line = user_error(
    ["--model", str(model_dir), "--data", str(train), "--chat-template", str(tmp_path / "no")],
    capsys,
  )
  assert f"--chat-template {tmp_path / 'no'}: " in line


def test_a_conversation_without_a_template_says_which_flag(tiny_checkpoint, tmp_path, capsys):
  train = write_jsonl(tmp_path / "train.jsonl", [chat(i) for i in range(12)])
  line = user_error(["--model", str(tiny_checkpoint), "--data", str(train), *RUN], capsys)
  assert f"--data {train}: {train}:1: conversations need a chat template" in line
  assert "--chat-template" in line


@pytest.mark.parametrize(
  "rows, flags, message",
  [
    (
      [chat(0), {"messages": [{"role": "user", "content": 3}]}],
      [],
      ":2: field 'messages', message 1",
    ),
    ([{"text": "a"}] * 3 + [{"prompt": "a"}], [], ":4: missing field 'text'"),
    ([{"q": "a", "a": "b"}], ["--data-format", "prompt-completion"], ":1: missing field 'prompt'"),
    (
      [{"q": "a", "a": "b"}] * 12,
      ["--prompt-field", "q", "--completion-field", "x"],
      ":1: missing field 'x'",
    ),
  ],
)
def test_bad_records_are_one_line_and_nothing_is_written(
  model_dir, tmp_path, capsys, rows, flags, message
):
  data = write_jsonl(tmp_path / "bad.jsonl", rows)
  out, ckpt = tmp_path / "out", tmp_path / "ckpt"
  argv = ["--model", str(model_dir), "--data", str(data), *flags, *RUN]
  line = user_error(argv + ["--output-dir", str(out), "--checkpoint-dir", str(ckpt)], capsys)
  assert f"--data {data}: {data}{message}" in line
  assert not out.exists() and not ckpt.exists()


def test_a_file_that_is_not_jsonl_or_parquet_is_one_line(model_dir, tmp_path, capsys):
  data = tmp_path / "train.csv"
  data.write_text("prompt,completion\n1+1=,2\n")
  line = user_error(["--model", str(model_dir), "--data", str(data), *RUN], capsys)
  assert f"--data {data}: {data}: neither JSON Lines (one JSON object per line) nor Parquet" in line
  line = user_error(
    ["--model", str(model_dir), "--data", str(tmp_path / "train.jsonl"), "--eval-data", str(data)],
    capsys,
  )
  # the missing training file comes first
  assert f"--data {tmp_path / 'train.jsonl'}: no such file." in line
  line = user_error(["--eval-data", str(data)], capsys)
  assert "--eval-data" in line and "--data" in line


def test_long_examples_are_refused_or_truncated_in_every_format(model_dir, tmp_path, capsys):
  long = {
    "messages": lambda: {
      **chat(0),
      "messages": chat(0)["messages"][:2] + [{"role": "assistant", "content": "9 " * 60}],
    },
    "text": lambda: {"text": "fox " * 60},
  }
  for fmt, make in long.items():
    rows = [ROWS[fmt](i) for i in range(12)]
    rows[5] = make()
    data = write_jsonl(tmp_path / f"{fmt}.jsonl", rows)
    argv = ["--model", str(model_dir), "--data", str(data), *RUN]
    line = user_error(argv, capsys)
    assert f"record 6 ({data}:6) has" in line and "--seq-len 64" in line and "--truncate" in line
    assert cli.main(argv + ["--truncate"]) == 0


# ---------------------------------------------------------------- gs:// files (GCS emulator)


def upload(local, url):
  url.write_bytes(local.read_bytes())
  return url


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_gs_files_read_as_local_ones(tmp_path, gcs_dir, suffix):
  from mofo_jax.finetune.data import load_dataset

  rows = [ROWS["messages"](i) for i in range(3)] + [{"messages": "oops"}]
  local = tmp_path / f"d{suffix}"
  if suffix == ".parquet":
    pq.write_table(pa.Table.from_pylist(rows[:3]), local)
  else:
    write_jsonl(local, rows[:3])
  remote = upload(local, gcs_dir / f"d{suffix}")
  got, want = load_dataset(str(remote)), load_dataset(local)
  assert got.records == want.records and got.format == want.format == "messages"
  assert got.where[0].startswith(f"{remote}:" if suffix == ".jsonl" else f"{remote}: row 1")
  bad = gcs_dir / "bad.jsonl"
  write_jsonl(tmp_path / "bad.jsonl", rows)
  with pytest.raises(ValueError, match=rf"^{bad}:4: field 'messages' must be a non-empty list"):
    load_dataset(str(upload(tmp_path / "bad.jsonl", bad)))


@pytest.mark.slow
def test_gs_data_and_eval_data_fine_tune_from_the_cli(model_dir, tmp_path, gcs_dir, capsys):
  train = upload(write_jsonl(tmp_path / "train.jsonl", [chat(i) for i in range(8)]), gcs_dir / "t")
  pq.write_table(pa.Table.from_pylist([chat(i) for i in range(100, 103)]), tmp_path / "h.parquet")
  held = upload(tmp_path / "h.parquet", gcs_dir / "held.parquet")
  out = tmp_path / "out"
  argv = ["--model", str(model_dir), "--data", str(train), "--eval-data", str(held), *RUN]
  assert cli.main(argv + ["--output-dir", str(out)]) == 0
  before, after = evals(out)
  assert after["eval_data_loss"] < before["eval_data_loss"]
  config = json.loads((out / "run_config.json").read_text())
  assert (config["data"]["source"], config["eval"]["eval_data"]) == (str(train), str(held))
  # A bad record or a missing object: one line naming the URL, nothing written.
  bad = upload(write_jsonl(tmp_path / "bad.jsonl", [chat(0), {"text": "x"}]), gcs_dir / "b.jsonl")
  out = tmp_path / "out2"
  line = user_error(
    ["--model", str(model_dir), "--data", str(bad), *RUN, "--output-dir", str(out)], capsys
  )
  assert f"--data {bad}: {bad}:2: missing field 'messages'" in line and not out.exists()
  line = user_error([*argv[:4], "--eval-data", str(gcs_dir / "none.jsonl"), *RUN], capsys)
  assert f"--eval-data {gcs_dir / 'none.jsonl'}: no such file." in line
