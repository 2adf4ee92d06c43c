"""mofo-finetune end to end on a tiny checkpoint directory it could have been given by a user."""

import json

import pytest

from mofo_jax.finetune import checkpoints_hf, cli


def test_help_reads_well(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  for flag in ("--optimizer", "--fraction", "--mesh", "--checkpoint-dir", "--resume", "SmolLM2"):
    assert flag in out


def test_arithmetic_run_writes_metrics_summary_and_model(tiny_checkpoint, tmp_path):
  checkpoint = tiny_checkpoint
  out = tmp_path / "run"
  code = cli.main(
    [
      "--model",
      str(checkpoint),
      "--steps",
      "4",
      "--eval-every",
      "2",
      "--train-examples",
      "64",
      "--eval-examples",
      "8",
      "--seq-len",
      "128",
      "--old-text-batches",
      "1",
      "--lr",
      "1e-2",
      "--difficulty",
      "1",
      "--output-dir",
      str(out),
      "--no-progress",
      "--mesh",
      "data=1",
    ]
  )
  assert code == 0
  lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
  evals = [x for x in lines if x["kind"] == "eval"]
  assert [x["step"] for x in evals] == [0, 2, 4]
  assert evals[-1]["fraction_changed"] > 0
  summary = json.loads((out / "summary.json").read_text())
  assert summary["settings"]["optimizer"] == "mofo"
  assert summary["after"]["task_answer_loss"] < summary["before"]["task_answer_loss"]
  config, model = checkpoints_hf.load_hf_checkpoint(out / "model")
  assert config.hidden_size == 32
  assert (out / "model" / "tokenizer.json").is_file()


def test_jsonl_data_and_its_errors(tiny_checkpoint, tmp_path):
  checkpoint = tiny_checkpoint
  good = tmp_path / "train.jsonl"
  good.write_text(
    "\n".join(json.dumps({"prompt": f"Q{i}: 1+{i}=", "response": f" {1 + i}"}) for i in range(40))
  )
  assert (
    cli.main(
      [
        "--model",
        str(checkpoint),
        "--data",
        str(good),
        "--steps",
        "2",
        "--seq-len",
        "32",
        "--old-text-batches",
        "1",
        "--no-progress",
        "--mesh",
        "data=1",
        "--optimizer",
        "adamw",
      ]
    )
    == 0
  )
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"\n')
  with pytest.raises(ValueError, match=":2"):
    cli.main(["--model", str(checkpoint), "--data", str(bad), "--steps", "1", "--mesh", "data=1"])


def test_bad_arguments_are_clear_errors(tiny_checkpoint, tmp_path):
  checkpoint = tiny_checkpoint
  with pytest.raises(FileNotFoundError, match="neither a .gguf file"):
    cli.main(["--model", str(tmp_path / "nowhere"), "--steps", "1"])
  with pytest.raises(SystemExit, match="--steps must be at least 1"):
    cli.main(["--model", str(checkpoint), "--steps", "0"])
  with pytest.raises(ValueError, match="needs .* positions"):
    cli.main(["--model", str(checkpoint), "--steps", "1", "--seq-len", "8", "--mesh", "data=1"])
