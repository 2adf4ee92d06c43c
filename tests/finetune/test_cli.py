"""mofo-finetune end to end on a tiny checkpoint directory it could have been given by a user.

One real run (the module fixture) is reused by the tests that check what a run writes and that
nothing of it is overwritten, mixed or lost; most user errors are refused before any model loads.
"""

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mofo_jax.finetune import checkpoints_hf, cli, runner, tokenizer
from mofo_jax.finetune.run_config import RunConfig, UserError

TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
TINY = [
  "--train-examples",
  "32",
  "--eval-examples",
  "8",
  "--old-text-batches",
  "0",
  "--difficulty",
  "1",
  "--seq-len",
  "128",
  "--no-progress",
  "--mesh",
  "data=1",
  "--lr",
  "1e-2",
]


def snapshot(directory: Path) -> dict[str, str]:
  """Every file under ``directory`` with a hash of its bytes."""
  return {
    str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(directory.rglob("*"))
    if p.is_file()
  }


def user_error(argv, capsys, prog: str = "mofo-finetune") -> str:
  """Runs the CLI, expects exit status 2 and exactly one stderr line from ``prog``; returns it."""
  code = cli.main(argv)
  err = capsys.readouterr().err
  lines = [x for x in err.splitlines() if x.strip()]
  assert code == 2, err
  assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
  return lines[0]


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint, tmp_path_factory):
  """The tiny checkpoint with a chat template and BOS/PAD in its tokenizer_config.json."""
  path = tmp_path_factory.mktemp("model") / "model"
  shutil.copytree(tiny_checkpoint, path)
  cfg = {
    "eos_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "bos_token": "<|endoftext|>",
    "chat_template": TEMPLATE,
  }
  (path / "tokenizer_config.json").write_text(json.dumps(cfg))
  return path


@pytest.fixture(scope="module")
def trained(model_dir, tmp_path_factory):
  """One 4-step run with checkpoints every 2 steps: (output dir, checkpoint dir)."""
  root = tmp_path_factory.mktemp("run")
  out, ckpt = root / "out", root / "ckpt"
  argv = ["--model", str(model_dir), *TINY, "--steps", "4", "--eval-every", "2"]
  argv += ["--output-dir", str(out), "--checkpoint-dir", str(ckpt), "--checkpoint-every", "2"]
  assert cli.main(argv) == 0
  return out, ckpt


def copy_run(trained, tmp_path):
  out, ckpt = tmp_path / "out", tmp_path / "ckpt"
  shutil.copytree(trained[0], out)
  shutil.copytree(trained[1], ckpt)
  return out, ckpt


def test_help_reads_well(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  for flag in (
    "--optimizer",
    "--fraction",
    "--mesh",
    "--checkpoint-dir",
    "--resume",
    "--overwrite",
    "--allow-config-change",
    "--param-dtype",
    "--compute-dtype",
    "--truncate",
    "--distributed-timeout",
    "--distance-metrics",
    "SmolLM2",
  ):
    assert flag in out


def test_arithmetic_run_writes_metrics_summary_config_and_model(trained):
  out, ckpt = trained
  lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
  evals = [x for x in lines if x["kind"] == "eval"]
  assert [x["step"] for x in evals] == [0, 2, 4]
  assert [x["step"] for x in lines if x["kind"] == "train"] == [1, 2, 3, 4]
  assert evals[-1]["fraction_changed"] > 0
  summary = json.loads((out / "summary.json").read_text())
  assert summary["config"]["optimizer"]["name"] == "mofo"
  assert summary["before"]["step"] == 0
  assert summary["after"]["task_answer_loss"] < summary["before"]["task_answer_loss"]
  # The same run config beside the checkpoints and the outputs, and it reads back.
  saved = json.loads((out / "run_config.json").read_text())
  assert saved == json.loads((ckpt / "run_config.json").read_text()) == summary["config"]
  assert RunConfig.from_dict(saved).steps == 4
  assert len(saved["model"]["fingerprint"]) == 64  # the pretrained weights' hash
  config, _ = checkpoints_hf.load_hf_checkpoint(out / "model")
  assert config.hidden_size == 32


def test_saved_model_reloads_to_the_same_tokens(trained, model_dir):
  """Defect 3: the saved model has a tokenizer_config.json: EOS, specials, chat template."""
  before, after = (
    tokenizer.load_tokenizer(model_dir),
    tokenizer.load_tokenizer(trained[0] / "model"),
  )
  assert (trained[0] / "model" / "tokenizer_config.json").is_file()
  assert after.eos_token_id is not None
  for field in ("eos_token_id", "pad_token_id", "bos_token_id", "chat_template"):
    assert getattr(after, field) == getattr(before, field), field
  text = "Question: Ann has 3 cards.<|endoftext|> 0123"
  assert after.encode(text) == before.encode(text)
  transformers = pytest.importorskip("transformers")
  hf = transformers.AutoTokenizer.from_pretrained(str(trained[0] / "model"))
  assert hf.eos_token_id == before.eos_token_id and hf.chat_template == TEMPLATE
  assert hf(text, add_special_tokens=False)["input_ids"] == before.encode(text)
  # transformers' generate stops at our EOS (without generation_config.json, Llama's default 2).
  generation = transformers.GenerationConfig.from_pretrained(str(trained[0] / "model"))
  assert generation.eos_token_id == before.eos_token_id


def test_a_model_without_eos_is_warned_about(tiny_checkpoint, tmp_path):
  bare = tmp_path / "bare"
  shutil.copytree(tiny_checkpoint, bare)
  (bare / "tokenizer_config.json").unlink()
  warnings = []
  cfg = RunConfig.from_dict(
    {**RunConfig().to_dict(), "model": {"path": str(bare), "scan_layers": True}}
  )
  cfg = dataclasses.replace(
    cfg,
    data=dataclasses.replace(cfg.data, train_examples=8, difficulty=1),
    eval=dataclasses.replace(cfg.eval, eval_examples=8, old_text_batches=0),
  )
  runner.prepare(cfg, warn=warnings.append)
  assert any("no end-of-sequence token" in w for w in warnings), warnings


def test_a_new_run_refuses_a_checkpoint_dir_holding_a_run(trained, model_dir, tmp_path, capsys):
  """Defect 1: without --resume, another run's checkpoints are never evicted."""
  _, ckpt = copy_run(trained, tmp_path)
  before = snapshot(ckpt)
  argv = ["--model", str(model_dir), *TINY, "--steps", "2", "--checkpoint-dir", str(ckpt)]
  line = user_error(argv + ["--checkpoint-every", "1"], capsys)
  assert f"--checkpoint-dir {ckpt} already holds another run" in line and "--resume" in line
  assert snapshot(ckpt) == before
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("mine")
  line = user_error(
    ["--model", str(model_dir), "--checkpoint-dir", str(tmp_path / "other")], capsys
  )
  assert "already holds files" in line


def test_a_gs_path_without_the_gcs_client_is_one_line(model_dir, monkeypatch, capsys):
  """Without gcsfs (the gcs extra) a gs:// directory is refused before anything is loaded."""
  monkeypatch.setitem(sys.modules, "gcsfs", None)  # import gcsfs now raises ImportError
  line = user_error(["--model", str(model_dir), *TINY, "--output-dir", "gs://bkt/out"], capsys)
  assert "gs://bkt/out" in line and "mofo-jax[gcs]" in line


def test_outputs_are_never_overwritten_silently(trained, model_dir, tmp_path, capsys):
  """Defect 2: a second run into an output dir is refused; the input model is never written."""
  out, _ = copy_run(trained, tmp_path)
  before = snapshot(out)
  line = user_error(["--model", str(model_dir), *TINY, "--output-dir", str(out)], capsys)
  assert f"--output-dir {out} already holds another run" in line and "--overwrite" in line
  assert snapshot(out) == before
  # The input model inside the output directory: refused even with --overwrite.
  victim = tmp_path / "victim"
  shutil.copytree(model_dir, victim / "model")
  (victim / "model" / "my_notes.txt").write_text("keep me")
  model_files = snapshot(victim)
  for flags in (["--output-dir", str(victim)], ["--output-dir", str(victim), "--overwrite"]):
    line = user_error(["--model", str(victim / "model"), *flags], capsys)
    assert "would replace the input model" in line
  line = user_error(["--model", str(victim / "model"), "--checkpoint-dir", str(victim)], capsys)
  assert "--checkpoint-dir" in line and "input model" in line
  assert snapshot(victim) == model_files


def test_overwrite_replaces_only_the_runs_own_files(tmp_path):
  ckpt = tmp_path / "ckpt"
  for name in ("2", "4", "6.orbax-checkpoint-tmp"):
    (ckpt / name).mkdir(parents=True)
  (ckpt / "run_config.json").write_text("{}")
  (ckpt / "README").write_text("mine")
  runner._clear_checkpoints(ckpt)
  assert sorted(p.name for p in ckpt.iterdir()) == ["README"]


def test_resume_refuses_settings_that_change_the_optimization(trained, model_dir, tmp_path, capsys):
  """Defect 4: another --fraction, optimizer or dtype than the checkpoint's is refused."""
  out, ckpt = copy_run(trained, tmp_path)
  base = ["--model", str(model_dir), *TINY, "--steps", "4", "--eval-every", "2"]
  base += ["--checkpoint-dir", str(ckpt), "--checkpoint-every", "2", "--resume"]
  for flags, named in [
    (["--fraction", "0.3"], ["optimizer.fraction: 0.1 -> 0.3"]),
    (["--optimizer", "mofo-random"], ["optimizer.name: 'mofo' -> 'mofo-random'"]),
    (["--dtype", "bfloat16"], ["model.param_dtype", "model.compute_dtype"]),
    (["--fraction", "0.3", "--seed", "1"], ["optimizer.fraction", "data.seed", "optimizer.seed"]),
  ]:
    line = user_error(base + flags, capsys)
    assert "--allow-config-change" in line
    for name in named:
      assert name in line, (flags, line)
  cfg = cli.config_from_args(cli.build_parser().parse_args(base + ["--fraction", "0.3"]))
  # The explicit override resumes anyway; extending --steps keeps the saved schedule.
  allowed = dataclasses.replace(
    cfg, output=dataclasses.replace(cfg.output, allow_config_change=True)
  )
  assert runner.check_outputs(runner._resolved(allowed)).optimizer.fraction == 0.3
  longer = cli.config_from_args(cli.build_parser().parse_args(base + ["--steps", "10"]))
  kept = runner.check_outputs(runner._resolved(longer))
  assert kept.steps == 10 and kept.optimizer.total_steps == 4
  # Once extended, later resumes with the same --steps keep that schedule too.
  saved = json.loads((ckpt / "run_config.json").read_text())
  saved["steps"] = 10
  (ckpt / "run_config.json").write_text(json.dumps(saved))
  again = runner.check_outputs(runner._resolved(longer))
  assert again.steps == 10 and again.optimizer.total_steps == 4
  # An explicit, different horizon is an optimization change.
  other = cli.config_from_args(cli.build_parser().parse_args(base + ["--decay-steps", "8"]))
  with pytest.raises(UserError, match="optimizer.total_steps: 4 -> 8"):
    runner.check_outputs(runner._resolved(other))


def test_resume_refuses_a_model_with_other_weights(trained, model_dir, tmp_path, capsys):
  """The pretrained copy is re-read from --model on resume (checkpoints do not hold it): a model
  whose weights differ from the recorded fingerprint is refused in one line, nothing written."""
  import numpy as np
  from safetensors.numpy import load_file, save_file

  out, ckpt = copy_run(trained, tmp_path)
  recorded = json.loads((ckpt / "run_config.json").read_text())["model"]["fingerprint"]
  assert len(recorded) == 64
  other = tmp_path / "other"
  shutil.copytree(model_dir, other)
  tensors = load_file(other / "model.safetensors")
  name = sorted(tensors)[0]
  flat = tensors[name].reshape(-1).copy()
  flat[0] = np.nextafter(flat[0], np.float32(np.inf))  # one entry, one ulp
  tensors[name] = flat.reshape(tensors[name].shape)
  save_file(tensors, other / "model.safetensors")
  # The same path as the run's model, which changed in place (another path is refused anyway).
  saved = json.loads((ckpt / "run_config.json").read_text())
  saved["model"]["path"] = str(other)
  (ckpt / "run_config.json").write_text(json.dumps(saved))
  before = snapshot(ckpt)
  base = [*TINY, "--steps", "6", "--eval-every", "2", "--checkpoint-dir", str(ckpt), "--resume"]
  line = user_error(["--model", str(other), *base], capsys)
  assert "its weights are not those the run" in line and "--allow-config-change" in line
  assert snapshot(ckpt) == before


def test_resume_needs_an_existing_checkpoint_dir(model_dir, tmp_path, capsys):
  """Defect 5: --resume with a missing directory is an error, not a fresh start."""
  line = user_error(
    ["--model", str(model_dir), "--resume", "--checkpoint-dir", str(tmp_path / "nowhere")], capsys
  )
  assert "--resume" in line and "does not exist" in line
  assert not (tmp_path / "nowhere").exists()
  assert "--resume needs --checkpoint-dir" in user_error(["--resume"], capsys)


def test_resume_past_a_corrupted_step_keeps_the_baseline_and_logs_once(
  trained, model_dir, tmp_path, capsys
):
  """Defects 6 and 7: the damaged newest step is skipped with a warning naming it; after the
  resume the summary's "before" is still the pretrained baseline and no step is logged twice."""
  out, ckpt = copy_run(trained, tmp_path)
  for f in (ckpt / "4" / "default").rglob("*"):
    if f.is_file() and f.stat().st_size > 64:
      f.write_bytes(f.read_bytes()[:32])
  argv = ["--model", str(model_dir), *TINY, "--steps", "4", "--eval-every", "2"]
  argv += ["--output-dir", str(out), "--checkpoint-dir", str(ckpt), "--checkpoint-every", "2"]
  assert cli.main(argv + ["--resume"]) == 0
  err = capsys.readouterr().err
  assert "checkpoint step 4" in err and "unreadable" in err and "resumed from step 2" in err
  assert (ckpt / "4.corrupt").is_dir() and (ckpt / "4").is_dir()
  lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
  keys = [(x["kind"], x["step"]) for x in lines]
  assert len(keys) == len(set(keys))
  assert [s for k, s in keys if k == "eval"] == [0, 2, 4]
  summary = json.loads((out / "summary.json").read_text())
  original = json.loads((trained[0] / "summary.json").read_text())
  assert summary["before"] == original["before"] and summary["before"]["step"] == 0
  assert summary["after"]["step"] == 4


@pytest.mark.parametrize("lr", ["nan", "inf", "-inf"])
def test_non_finite_learning_rates_are_refused(lr, capsys):
  """Defect 8: --lr nan used to train to the end on NaN losses and save a NaN model."""
  assert "--lr" in user_error([f"--lr={lr}"], capsys)


def test_usage_errors_are_one_line(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["--lr"])
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.count("\n") == 1 and "argument --lr" in err


def _truncated(src: Path, dst: Path, keep: int) -> Path:
  dst.write_bytes(src.read_bytes()[:keep])
  return dst


@pytest.mark.parametrize(
  "make_argv, message",
  [
    (lambda d, m: ["--model", str(d / "nowhere")], "neither a .gguf file"),
    (lambda d, m: ["--model", str(m), "--steps", "0"], "--steps must be at least 1"),
    (lambda d, m: ["--model", str(m), "--seq-len", "8"], "--seq-len 8: "),
    (lambda d, m: ["--model", str(m), "--grad-accum", "3"], "--grad-accum 3 does not divide"),
    (lambda d, m: ["--model", str(m), *TINY, "--mesh", "data=16"], "--mesh data=16: "),
    (lambda d, m: ["--model", str(m), "--batch-size", "6", "--mesh", "data=4"], "data x fsdp"),
    (lambda d, m: ["--resume", "--overwrite", "--checkpoint-dir", str(d)], "contradict"),
    (lambda d, m: ["--fraction", "1.5"], "--fraction"),
    (lambda d, m: ["--param-dtype", "float32", "--decay-steps", "0"], "--decay-steps"),
  ],
  ids=[
    "missing-model",
    "steps",
    "seq-len",
    "grad-accum",
    "mesh",
    "batch-over-mesh",
    "resume-overwrite",
    "fraction",
    "decay-steps",
  ],
)
def test_user_errors_are_one_line(make_argv, message, model_dir, tmp_path, capsys):
  """Defect 9: every user error is one line, exit status 2, naming the flag or file."""
  assert message in user_error(make_argv(tmp_path, model_dir), capsys)


def test_grad_accum_not_dividing_the_batch_is_refused_before_compiling(model_dir, capsys):
  started = time.perf_counter()
  line = user_error(["--model", str(model_dir), *TINY, "--grad-accum", "3"], capsys)
  assert "--batch-size 8" in line and time.perf_counter() - started < 5


def test_jsonl_errors_name_the_file_line_and_flag(model_dir, tmp_path, capsys):
  base = ["--model", str(model_dir), "--steps", "1", "--mesh", "data=1"]
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"\n')
  assert f"--data {bad}: {bad}:2: malformed JSON" in user_error(base + ["--data", str(bad)], capsys)
  latin = tmp_path / "latin.jsonl"
  latin.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n')
  line = user_error(base + ["--data", str(latin)], capsys)
  assert f"{latin}:2: not UTF-8" in line
  long = tmp_path / "long.jsonl"
  rows = [{"prompt": f"Q{i}: 1+{i}=", "response": f" {1 + i}"} for i in range(20)]
  rows[4]["response"] = " 7" * 200
  long.write_text("\n".join(json.dumps(r) for r in rows))
  line = user_error(base + ["--data", str(long), "--seq-len", "32"], capsys)
  assert "record 5" in line and "--seq-len 32" in line and "--truncate" in line
  assert "truncate=True" not in line


def test_jsonl_data_trains_and_truncates_on_request(model_dir, tmp_path):
  good = tmp_path / "train.jsonl"
  rows = [{"prompt": f"Q{i}: 1+{i}=", "response": f" {1 + i}"} for i in range(40)]
  rows[3]["response"] = " 7" * 200  # cut by --truncate
  good.write_text("\n".join(json.dumps(r) for r in rows))
  argv = ["--model", str(model_dir), "--data", str(good), "--steps", "2", "--seq-len", "32"]
  argv += ["--old-text-batches", "0", "--no-progress", "--mesh", "data=1", "--optimizer", "adamw"]
  assert cli.main(argv + ["--truncate", "--batch-size", "4", "--grad-accum", "2"]) == 0


def test_loader_errors_are_one_line(model_dir, tmp_path, capsys, monkeypatch):
  broken = tmp_path / "broken"
  shutil.copytree(model_dir, broken)
  _truncated(model_dir / "model.safetensors", broken / "model.safetensors", 3000)
  line = user_error(["--model", str(broken)], capsys)
  assert f"--model {broken}: " in line
  # Whatever a loader rejects with ValueError or OSError (the loaders name the file) is one line.
  from mofo_jax.finetune import gguf_loader

  def reject(path, **kwargs):
    raise ValueError(f"{path}: truncated: tensor blk.0.attn_q.weight ends past the file")

  monkeypatch.setattr(gguf_loader, "load_gguf", reject)
  cut = tmp_path / "cut.gguf"
  line = user_error(["--model", str(cut)], capsys)
  assert f"--model {cut}: {cut}: truncated" in line


def test_distributed_without_peers_gives_up_in_bounded_time(tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  argv = ["--distributed", "--coordinator-address", f"127.0.0.1:{port}"]
  argv += ["--num-processes", "2", "--process-id", "1", "--distributed-timeout", "3"]
  started = time.perf_counter()
  proc = subprocess.run(
    [sys.executable, "-m", "mofo_jax.finetune", *argv],
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
  )
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [x for x in proc.stderr.splitlines() if x.startswith("mofo-finetune: error:")]
  assert len(errors) == 1 and "--distributed-timeout" in errors[0] and f":{port}" in errors[0]
  assert "Traceback" not in proc.stderr
  assert time.perf_counter() - started < 60


@pytest.mark.parametrize(
  "flags, param, compute",
  [
    ([], "float32", "float32"),
    (["--dtype", "bfloat16"], "bfloat16", "bfloat16"),
    (["--param-dtype", "float32", "--compute-dtype", "bfloat16"], "float32", "bfloat16"),
    (["--dtype", "bfloat16", "--param-dtype", "float32"], "float32", "bfloat16"),
  ],
)
def test_parameter_and_compute_dtypes_reach_the_model(flags, param, compute, model_dir):
  cfg = cli.config_from_args(cli.build_parser().parse_args(["--model", str(model_dir), *flags]))
  assert (cfg.model.param_dtype, cfg.model.compute_dtype) == (param, compute)
  config, model, _ = runner.load_model(cfg.model)
  assert (config.param_dtype.name, config.dtype.name) == (param, compute)
  assert model.model.embed_tokens.embedding[...].dtype.name == param


@pytest.mark.slow
def test_host_and_off_runs_keep_no_pretrained_copy_on_the_devices(model_dir, monkeypatch):
  """While the loop runs, the devices hold the params, the optimizer state and the model's other
  state; with --distance-metrics device one more copy of the params. The loaded model is not kept
  besides (without dropping it, every mode would hold that copy)."""
  import gc

  import jax

  from mofo_jax.finetune import train

  loop, live = train.run, {}

  def measured(trainer, *args, **kwargs):
    gc.collect()
    live[mode] = sum(x.nbytes for x in jax.live_arrays())
    return loop(trainer, *args, **kwargs)

  monkeypatch.setattr(train, "run", measured)
  for mode in ("device", "host", "off"):
    argv = ["--model", str(model_dir), *TINY, "--steps", "1", "--distance-metrics", mode]
    result = runner.run(cli.config_from_args(cli.build_parser().parse_args(argv)), log=lambda _: 0)
    params = sum(x.nbytes for x in jax.tree.leaves(result.trainer.state.params))
    assert ("l2_from_pretrained" in result.records[-1]) == (mode != "off")
    del result
  assert live["host"] == live["off"]
  assert live["device"] - live["host"] == params
