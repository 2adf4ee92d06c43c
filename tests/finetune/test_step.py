"""The pure train step: chunked loss, sharded loss, mixed precision."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import mofo_jax
from mofo_jax.finetune import model as model_lib
from mofo_jax.finetune import optimizers
from mofo_jax.finetune import step as step_lib
from tests.finetune.conftest import TINY, random_model, tiny_config


def _batch(b=4, t=24, seed=0):
  rs = np.random.RandomState(seed)
  ids = rs.randint(0, TINY["vocab_size"], (b, t + 1)).astype(np.int32)
  return {
    "input_ids": ids[:, :-1],
    "targets": ids[:, 1:],
    "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
    "segment_ids": np.ones((b, t), np.int32),
    "loss_mask": (rs.rand(b, t) < 0.8).astype(np.int32),
  }


def _reference_losses(model, batch):
  """NumPy cross entropy and argmax from the full float64 logits."""
  logits = np.asarray(
    model(batch["input_ids"], batch["positions"], batch["segment_ids"]), np.float64
  )
  top = logits.max(-1, keepdims=True)
  lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
  picked = np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
  return lse - picked, logits.argmax(-1)


@pytest.mark.parametrize("chunk", [5, 24, 512])
@pytest.mark.parametrize("tied", [True, False])
def test_chunked_losses_match_full_logits(chunk, tied):
  model = random_model(tiny_config(tie_word_embeddings=tied))
  batch = _batch()
  losses, pred = nnx.jit(lambda m, b: step_lib.token_losses(m, b, chunk))(model, batch)
  ref_losses, ref_pred = _reference_losses(model, batch)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(pred, ref_pred)


def _mesh(data, fsdp, tensor):
  return jax.make_mesh(
    (data, fsdp, tensor), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3
  )


def _run_step(model, optimizer, batch, mesh=None, steps=1):
  """Runs the step jitted like the trainer: on ``mesh`` with the params' shardings, or plainly."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  fn = step_lib.make_train_step(graphdef, rest, optimizer, mesh=mesh)
  if mesh is None:
    opt_state = optimizer.init(params)
    step = jax.jit(fn)
  else:
    shardings = model_lib.param_shardings(model, mesh)
    params = jax.device_put(params, shardings)
    rest = jax.device_put(rest, NamedSharding(mesh, P()))
    opt_shardings = mofo_jax.state_shardings(optimizer, params)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    batch = jax.device_put(batch, NamedSharding(mesh, P(model_lib.ACTIVATION_BATCH_AXES)))
    step = jax.jit(fn, out_shardings=(shardings, opt_shardings, None))
  for _ in range(steps):
    params, opt_state, metrics = step(params, opt_state, batch)
  return params, metrics


def test_sharded_step_equals_unsharded():
  # fsdp x tensor: the loss runs per device under shard_map, combining over the vocabulary
  model = random_model(tiny_config(scan_layers=True, tie_word_embeddings=False))
  batch = _batch()
  # SGD: the params' change is the gradient itself (Adam's first step is its sign)
  opt = optax.sgd(1.0)
  ref_params, ref_metrics = _run_step(model, opt, batch)
  params, metrics = _run_step(model, opt, batch, mesh=_mesh(1, 4, 2))
  for k in ref_metrics:
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=2e-5, err_msg=k)
  for (path, a), (_, b) in zip(nnx.to_flat_state(params), nnx.to_flat_state(ref_params)):
    np.testing.assert_allclose(a.get_value(), b.get_value(), atol=2e-6, err_msg=str(path))


def test_sharded_loss_predictions_match_with_vocabulary_split():
  model = random_model(tiny_config(tie_word_embeddings=True))
  batch = _batch()
  mesh = _mesh(2, 2, 2)
  ref_losses, ref_pred = _reference_losses(model, batch)
  sharded = jax.device_put(batch, NamedSharding(mesh, P(model_lib.ACTIVATION_BATCH_AXES)))
  nnx.update(model, jax.device_put(nnx.state(model), model_lib.param_shardings(model, mesh)))

  @nnx.jit
  def f(m, b):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return step_lib.token_losses(m, b, 10)

  losses, pred = f(model, sharded)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(pred, ref_pred)


def _changed_fraction_of_filtered(before, after, config):
  """Fraction of the filtered (matrix) entries that moved, and the relative step size."""
  changed = total = 0
  for (_, a), (_, b) in zip(nnx.to_flat_state(before), nnx.to_flat_state(after)):
    a, b = np.asarray(a.get_value(), np.float32), np.asarray(b.get_value(), np.float32)
    if a.ndim - int(config.scan_layers) >= 2:
      changed += int((a != b).sum())
      total += a.size
  return changed / total


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_small_filtered_steps_survive_only_in_float32_masters(param_dtype):
  # bfloat16 compute, scanned + rematerialised layers, sharded over fsdp x tensor; weights of
  # magnitude ~0.1 and a first Adam step of size lr = 1e-5 per moved entry: relative 1e-4,
  # far below bfloat16's spacing (2**-8 relative), far above float32's.
  config = tiny_config(
    scan_layers=True, remat=True, dtype="bfloat16", param_dtype=param_dtype, num_hidden_layers=2
  )
  model = random_model(config)
  before = nnx.state(model, nnx.Param)
  assert {x.dtype for x in jax.tree.leaves(before)} == {jnp.dtype(param_dtype)}
  fraction = 0.1
  opt = optimizers.make_optimizer(
    optimizers.OptimizerConfig(name="mofo", learning_rate=1e-5, fraction=fraction, clip_norm=0),
    before,
    stacked_layers=True,
  )
  after, metrics = _run_step(model, opt, _batch(), mesh=_mesh(1, 2, 2))
  assert {x.dtype for x in jax.tree.leaves(after)} == {jnp.dtype(param_dtype)}
  assert np.isfinite(metrics["loss"])
  moved = _changed_fraction_of_filtered(before, after, config)
  if param_dtype == "float32":
    # every selected entry moved (ties at the threshold can add a few)
    assert fraction * 0.95 <= moved <= fraction * 1.1, moved
  else:
    # only the few weights smaller than ~2**8 x the step keep it (0.27% of the entries here)
    assert moved < 0.05 * fraction, moved


def test_float32_masters_compute_like_bfloat16_weights():
  # With bfloat16 compute the float32 masters enter every op rounded to bfloat16: the losses
  # are those of the model stored in bfloat16.
  master = random_model(tiny_config(scan_layers=True, remat=True, dtype="bfloat16"))
  config = dataclasses.replace(master.config, param_dtype="bfloat16")
  graphdef = nnx.graphdef(
    nnx.eval_shape(lambda: model_lib.LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
  )
  rounded = nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(master)))
  batch = _batch()
  losses = nnx.jit(lambda m, b: step_lib.token_losses(m, b)[0])
  np.testing.assert_array_equal(losses(master, batch), losses(rounded, batch))


def test_grad_accum_must_be_positive():
  model = random_model(tiny_config())
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  with pytest.raises(ValueError, match="grad_accum"):
    step_lib.make_train_step(graphdef, rest, optax.sgd(0.1), grad_accum=0)


def test_abstract_batch_has_the_step_fields():
  b = step_lib.abstract_batch(4, 8)
  assert set(b) == set(_batch()) and all(x.shape == (4, 8) for x in b.values())
