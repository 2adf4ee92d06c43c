import json
import os
import shutil
import tempfile

import pytest
from hypothesis import settings

# Several simulated CPU devices for the sharding tests; this and the cache below must be set
# before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

# Many tests build the same program from different closures (an optimizer per test, a model per
# fixture): the persistent compilation cache compiles each once per run. It starts empty in a
# fresh temporary directory (never a user's cache: a cache key holds the whole program, so a hit
# is what compiling would give) and is removed at the end. The environment carries it to the
# CLI and multi-process runs the tests start.
_COMPILATION_CACHE = tempfile.mkdtemp(prefix="mofo-jax-tests-xla-")
os.environ["JAX_COMPILATION_CACHE_DIR"] = _COMPILATION_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

# Property tests: a short search in the everyday run, a long one in CI's second step
# (`--hypothesis-profile=thorough`). No deadline: a first example pays for jit compiles.
# No example database, so a run never depends on an earlier one's files.
settings.register_profile("quick", max_examples=12, deadline=None, database=None)
settings.register_profile("thorough", max_examples=150, deadline=None, database=None)
settings.load_profile("quick")


def pytest_unconfigure(config):
  shutil.rmtree(_COMPILATION_CACHE, ignore_errors=True)


TEXT = (
  "Question: Ann has 3 cards. Ann buys 4 more cards. How many cards does Ann have now?\n"
  "Answer: 7 The quick brown fox jumps over the lazy dog. 0123456789 "
) * 20


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
  """A tiny random Llama checkpoint directory with a byte-level BPE tokenizer.json."""
  import tokenizers
  from flax import nnx

  from mofo_jax.finetune import checkpoints_hf
  from mofo_jax.finetune.model import LlamaConfig, LlamaForCausalLM

  path = tmp_path_factory.mktemp("ckpt")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
    [
      tokenizers.pre_tokenizers.Digits(individual_digits=True),
      tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False),
    ]
  )
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
    vocab_size=300,
    special_tokens=["<|endoftext|>"],
    initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator([TEXT], trainer)
  config = LlamaConfig(
    vocab_size=tok.get_vocab_size(),
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
  )
  checkpoints_hf.save_hf_checkpoint(LlamaForCausalLM(config, rngs=nnx.Rngs(0)), config, path)
  tok.save(str(path / "tokenizer.json"))
  (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
  return path
