"""The fine-tuning loop on a tiny random Llama: steps, accumulation, sharding, resume, Ctrl-C."""

import itertools
import os
import signal

import jax
import numpy as np
import pytest
from flax import nnx

from mofo_jax.finetune import data as data_lib
from mofo_jax.finetune import checkpointing, evaluation, optimizers, preemption, train
from mofo_jax.finetune.step import token_losses
from mofo_jax.finetune import model as model_lib

VOCAB = 64


def tiny_model(seed=0):
  cfg = model_lib.LlamaConfig(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
  )
  return model_lib.LlamaForCausalLM(cfg, rngs=nnx.Rngs(seed))


def examples(n=64, seed=0):
  # A learnable task: each example counts up from a random start (mod VOCAB).
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    length = int(rng.integers(6, 14))
    ids = (rng.integers(0, VOCAB) + np.arange(length)) % VOCAB
    mask = np.r_[np.zeros(2), np.ones(length - 2)].astype(np.int32)
    out.append((ids.astype(np.int32), mask))
  return out


def make(name="mofo", mesh="data=1", accum=1, steps=6, seed=0, distance_metrics="device"):
  cfg = optimizers.OptimizerConfig(name=name, learning_rate=1e-2, total_steps=steps)
  return train.make_trainer(tiny_model(seed), cfg, mesh, accum, distance_metrics)


def batches(seed=0):
  return data_lib.batch_iterator(examples(), 8, 16, seed=seed, num_epochs=None)


def evaluator():
  ev = evaluation.one_per_row(examples(8, seed=1), 16, 8)
  return evaluation.Evaluator(ev, np.ones(VOCAB, bool), {"held": ev})


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("name", optimizers.OPTIMIZERS)
def test_every_optimizer_lowers_a_loss(name):
  import jax.numpy as jnp
  import optax

  rng = np.random.default_rng(0)
  target = {
    "layers": [
      {"w": rng.normal(size=(6, 5)), "v": rng.normal(size=(5, 4)), "b": rng.normal(size=5)}
      for _ in range(2)
    ],
    "embed": rng.normal(size=(10, 6)),
  }
  params = jax.tree.map(lambda t: jnp.zeros(t.shape, jnp.float32), target)
  opt = optimizers.make_optimizer(
    optimizers.OptimizerConfig(name=name, learning_rate=5e-2, total_steps=30), params
  )
  state = opt.init(params)
  loss = lambda p: sum(
    jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(target))
  )

  @jax.jit
  def step(params, state):
    updates, state = opt.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  start = loss(params)
  for _ in range(30):
    params, state = step(params, state)
  assert loss(params) < 0.9 * start


def test_trainer_lowers_the_loss():
  trainer = make(steps=12)
  it = batches()
  first = trainer.train_step(next(it))["loss"]
  for _ in range(10):
    last = trainer.train_step(next(it))["loss"]
  assert last < first


def test_half_fine_tuning_freezes_half_of_each_layer():
  params = {
    "layers": [
      {
        "q": np.ones((2, 2)),
        "k": np.ones((2, 2)),
        "v": np.ones((2, 2)),
        "o": np.ones((2, 2)),
        "norm": np.ones(2),
      }
      for _ in range(3)
    ],
    "embed": np.ones((4, 2)),
  }
  mask = optimizers.half_fine_tuning_mask(params, seed=1)
  for layer in mask["layers"]:
    assert sum(layer[k] for k in "qkvo") == 2 and layer["norm"]
  assert mask["embed"]


def test_mofo_moves_a_fraction_of_each_matrix():
  trainer = make("mofo")
  trainer.train_step(next(batches()))
  assert trainer.distance_from_pretrained()["fraction_changed"] < 0.2


def test_gradient_accumulation_matches_one_big_batch():
  b = next(batches())
  one, two = make("adamw", accum=1), make("adamw", accum=2)
  m1, m2 = one.train_step(b), two.train_step(b)
  assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-5)
  # Adam's first step is g / (|g| + eps): entries with |g| near eps amplify summation-order
  # differences, so allow 2% of a step (lr = 1e-2).
  for a, c in zip(leaves(one.state.params), leaves(two.state.params)):
    np.testing.assert_allclose(a, c, rtol=1e-4, atol=2e-4)
  assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-5)
  assert m1["tokens"] == m2["tokens"]


def test_sharded_mesh_matches_single_axis_mesh():
  base, sharded = make(mesh="data=1"), make(mesh="data=2,fsdp=2,tensor=2")
  # Evaluation traces under the mesh too (batch-sharded activations, per-device loss).
  (b,) = evaluation.one_per_row(examples(4, seed=3), 16, 4)
  acc0, loss0 = evaluation.answer_accuracy(base, [b], np.ones(VOCAB, bool))
  acc1, loss1 = evaluation.answer_accuracy(sharded, [b], np.ones(VOCAB, bool))
  assert acc0 == acc1 and np.isclose(loss0, loss1, rtol=1e-5)
  it1, it2 = batches(), batches()
  for _ in range(3):
    base.train_step(next(it1))
    sharded.train_step(next(it2))
  for a, c in zip(leaves(base.state.params), leaves(sharded.state.params)):
    np.testing.assert_allclose(a, c, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize(
  "mode",
  ["device"] + [pytest.param(m, marks=pytest.mark.slow) for m in ("host", "off", "old checkpoint")],
)
def test_resume_reproduces_the_uninterrupted_run(tmp_path, mode, monkeypatch):
  """Each --distance-metrics mode resumes bit for bit, with the distance metrics of the
  uninterrupted run (whose copy is on the devices); so does a checkpoint of an older run that
  holds the pretrained copy. Not the pretrained copy, only params and optimizer state are saved.
  """
  import orbax.checkpoint as ocp

  full = make(steps=6)
  full_records = train.run(full, batches(), train.LoopConfig(steps=6, progress=False), evaluator())
  metrics = "device" if mode == "old checkpoint" else mode
  if mode == "old checkpoint":
    old = train.Trainer.checkpoint_state
    monkeypatch.setattr(
      train.Trainer,
      "checkpoint_state",
      lambda self: {**old(self), "reference": jax.tree.map(jax.numpy.copy, self.state.params)},
    )
  part = make(steps=6, distance_metrics=metrics)
  train.run(
    part,
    batches(),
    train.LoopConfig(steps=3, checkpoint_dir=str(tmp_path), progress=False),
    evaluator(),
  )
  monkeypatch.undo()
  with ocp.StandardCheckpointer() as checkpointer:
    saved = checkpointer.metadata(tmp_path / "3" / "default").item_metadata.tree
  assert set(saved) == {"params", "opt_state"} | (
    {"reference"} if mode == "old checkpoint" else set()
  )
  resumed = make(steps=6, distance_metrics=metrics)
  records = train.run(
    resumed,
    batches(),
    train.LoopConfig(steps=6, checkpoint_dir=str(tmp_path), progress=False),
    evaluator(),
    resume=True,
  )
  assert resumed.state.step == 6
  for a, c in zip(leaves(full.state.params), leaves(resumed.state.params)):
    np.testing.assert_array_equal(a, c)
  assert records[-1]["task_answer_loss"] == full_records[-1]["task_answer_loss"]
  distances = ("l2_from_pretrained", "fraction_changed")
  if mode == "off":
    assert not set(distances) & set(records[-1])
  else:
    assert {k: records[-1][k] for k in distances} == {k: full_records[-1][k] for k in distances}
    assert records[-1]["fraction_changed"] > 0


def test_the_pretrained_copy_costs_the_devices_one_param_copy_only_in_device_mode():
  """Live device bytes after building a trainer (the caller's model dropped): params and
  optimizer state, plus one more copy of the params with --distance-metrics device only."""
  import gc

  def live_bytes():
    gc.collect()
    return sum(x.nbytes for x in jax.live_arrays())

  grown = {}
  for mode in ("device", "host", "off"):
    before = live_bytes()
    model = tiny_model()
    cfg = optimizers.OptimizerConfig(name="adamw", learning_rate=1e-2, total_steps=2)
    trainer = train.make_trainer(model, cfg, "data=1", distance_metrics=mode)
    params = sum(x.nbytes for x in leaves(trainer.state.params))
    del model
    grown[mode] = live_bytes() - before
    assert trainer.distance_from_pretrained() == (
      {}
      if mode == "off"
      else {
        "l2_from_pretrained": 0.0,
        "fraction_changed": 0.0,
      }
    )
    del trainer
  assert grown["host"] == grown["off"]
  assert grown["device"] - grown["host"] == params


def test_ctrl_c_saves_the_last_finished_step(tmp_path):
  def interrupted_after(n):
    it = batches()
    for _ in range(n):
      yield next(it)
    raise KeyboardInterrupt

  trainer = make()
  with pytest.raises(KeyboardInterrupt, match="step 2"):
    train.run(
      trainer,
      interrupted_after(2),
      train.LoopConfig(steps=6, checkpoint_dir=str(tmp_path), progress=False),
      evaluator(),
    )
  assert checkpointing.RunCheckpoints(tmp_path).latest_step() == 2


def test_sigterm_saves_the_step_in_progress_and_stops(tmp_path):
  def sigterm_during(n):
    it = batches()
    for i in itertools.count(1):
      if i == n:
        os.kill(os.getpid(), signal.SIGTERM)  # while step n fetches its batch
      yield next(it)

  trainer = make()
  before = signal.getsignal(signal.SIGTERM)
  with pytest.raises(preemption.Preempted, match="stopped at step 3; checkpoint saved"):
    train.run(
      trainer,
      sigterm_during(3),
      train.LoopConfig(steps=6, checkpoint_dir=str(tmp_path), progress=False),
      evaluator(),
    )
  assert checkpointing.RunCheckpoints(tmp_path).all_steps() == [3]
  assert signal.getsignal(signal.SIGTERM) is before  # the run's handler is gone again


def test_metrics_jsonl_has_train_and_eval_lines(tmp_path):
  import json

  path = tmp_path / "m.jsonl"
  train.run(
    make(),
    batches(),
    train.LoopConfig(steps=3, eval_every=2, metrics_path=str(path), progress=False),
    evaluator(),
  )
  lines = [json.loads(x) for x in path.read_text().splitlines()]
  assert [x["step"] for x in lines if x["kind"] == "eval"] == [0, 2, 3]
  assert [x["step"] for x in lines if x["kind"] == "train"] == [1, 2, 3]
  assert {"task_accuracy", "held_loss", "l2_from_pretrained", "fraction_changed"} <= set(lines[0])


def test_answer_accuracy_scores_greedy_exact_match():
  trainer = make()
  (b,) = evaluation.one_per_row(examples(4, seed=3), 16, 4)
  acc, loss = evaluation.answer_accuracy(trainer, [b], np.ones(VOCAB, bool))
  assert acc == 0.0 and loss > 0  # an untrained model does not count
  # Targets set to the model's own greedy predictions: every row is then an exact match...
  _, pred = token_losses(trainer.model(), b)
  greedy = {**b, "targets": np.where(b["loss_mask"] > 0, np.asarray(pred), b["targets"])}
  assert evaluation.answer_accuracy(trainer, [greedy], np.ones(VOCAB, bool))[0] == 1.0
  # ...unless the token predicted after the answer would continue the number.
  assert evaluation.answer_accuracy(trainer, [greedy], np.zeros(VOCAB, bool))[0] == 0.0


def test_cloze_accuracy_counts_rows_whose_every_completion_token_is_the_argmax():
  trainer = make()
  (b,) = evaluation.one_per_row(examples(4, seed=5), 16, 4)
  _, pred = token_losses(trainer.model(), b)
  mask = b["loss_mask"] > 0
  greedy = np.where(mask, np.asarray(pred), b["targets"])
  assert evaluation.cloze_accuracy(trainer, [{**b, "targets": greedy}]) == 1.0
  # One completion token off in the first row (its last masked position) fails only that row.
  row, col = 0, np.flatnonzero(mask[0])[-1]
  off = greedy.copy()
  off[row, col] = (off[row, col] + 1) % VOCAB
  assert evaluation.cloze_accuracy(trainer, [{**b, "targets": off}]) == 0.75


@pytest.mark.parametrize(
  "spec, err",
  [
    ("data=2,model=4", "model"),
    ("data=x", "not an integer"),
    ("data=16", "needs 16 devices"),
    ("data=-1,fsdp=-1", "at most one"),
  ],
)
def test_bad_mesh_specs(spec, err):
  with pytest.raises(ValueError, match=err):
    train.make_mesh(spec)


def test_batch_not_divisible_by_the_mesh_is_a_clear_error():
  trainer = make(mesh="data=4")
  rows = evaluation.one_per_row(examples(6), 16, 6)
  with pytest.raises(ValueError, match="multiple of 4"):
    evaluation.eval_loss(trainer, rows)


def test_data_running_out_is_a_clear_error():
  short = data_lib.batch_iterator(examples(16), 8, 16, seed=0, num_epochs=1)
  with pytest.raises(ValueError, match="ran out"):
    train.run(make(), short, train.LoopConfig(steps=50, progress=False), evaluator())


def test_stacked_layers_get_per_layer_blocks_like_separate_layers():
  import dataclasses

  from mofo_jax.finetune import checkpoints_hf

  plain = tiny_model()
  stacked = checkpoints_hf.model_from_hf_tensors(
    dataclasses.replace(plain.config, scan_layers=True), checkpoints_hf.hf_tensors_from_model(plain)
  )
  moved = {}
  for name, model in (("plain", plain), ("stacked", stacked)):
    trainer = train.make_trainer(model, optimizers.OptimizerConfig(total_steps=2), "data=1")
    for batch in list(itertools.islice(batches(), 2)):
      trainer.train_step(batch)
    after = checkpoints_hf.hf_tensors_from_model(trainer.model())
    before = checkpoints_hf.hf_tensors_from_model(model)
    moved[name] = {k: after[k] != before[k] for k in after}
  for k, plain_moved in moved["plain"].items():
    # Same blocks: every matrix moves its own top 10%, norms move densely, in both layouts.
    assert plain_moved.mean() == moved["stacked"][k].mean(), k
  q = moved["stacked"]["model.layers.0.self_attn.q_proj.weight"]
  assert 0.1 <= q.mean() <= 0.2
  assert moved["stacked"]["model.layers.1.input_layernorm.weight"].all()


def test_half_fine_tuning_refuses_stacked_layers():
  with pytest.raises(ValueError, match="separate"):
    optimizers.make_optimizer(
      optimizers.OptimizerConfig(name="hft"), {"w": np.ones((2, 2))}, stacked_layers=True
    )


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
  """Defect 8: a diverging run stops at the first non-finite step and saves nothing after it."""
  import json

  cfg = optimizers.OptimizerConfig(name="adamw", learning_rate=1e30, total_steps=6, clip_norm=0)
  trainer = train.make_trainer(tiny_model(), cfg, "data=1")
  metrics = tmp_path / "m.jsonl"
  warnings = []
  loop = train.LoopConfig(
    steps=6,
    checkpoint_dir=str(tmp_path / "ckpt"),
    checkpoint_every=1,
    metrics_path=str(metrics),
    progress=False,
    eval_at_start=False,
  )
  with pytest.raises(train.TrainingDiverged, match="stopped without saving"):
    train.run(trainer, batches(), loop, evaluator(), warn=warnings.append)
  ckpt = checkpointing.RunCheckpoints(tmp_path / "ckpt")
  last = ckpt.latest_step()
  assert last is not None and last < trainer.state.step
  step, tree = ckpt.restore_latest(trainer.checkpoint_state())
  assert all(np.isfinite(x).all() for x in leaves(tree["params"]))
  assert any(f"last good checkpoint is step {last}" in w for w in warnings)
  lines = [json.loads(x) for x in metrics.read_text().splitlines()]
  assert not np.isfinite(lines[-1]["loss"]) or not np.isfinite(lines[-1]["grad_norm"])


def test_nan_learning_rate_is_refused():
  for lr in (float("nan"), float("inf"), 0.0):
    with pytest.raises(ValueError, match="positive and finite"):
      optimizers.OptimizerConfig(learning_rate=lr)


def _corrupt(step_dir, kind):
  from etils import epath

  data = epath.Path(step_dir) / "default"
  if kind == "metadata":
    (data / "_METADATA").unlink()
  elif kind == "default":
    data.rmtree()
  else:
    for f in (data / "d").iterdir():
      raw = bytearray(f.read_bytes())
      if kind == "truncated":
        raw = raw[: len(raw) // 3]
      else:
        raw[len(raw) // 2 :] = bytes(b ^ 0xFF for b in raw[len(raw) // 2 :])
      f.write_bytes(bytes(raw))


@pytest.mark.parametrize("kind", ["metadata", "default", "truncated", "bit-flipped"])
def test_an_unreadable_latest_step_falls_back_to_the_newest_intact_one(run_dir, kind):
  """Defect 6: a damaged newest step is moved aside with a warning naming it (locally and on GCS)."""
  import jax.numpy as jnp

  ckpt = checkpointing.RunCheckpoints(run_dir, keep=3)
  for step in (1, 2, 3):
    ckpt.save(step, {"w": jnp.full((64, 64), float(step))})
  ckpt.close()
  _corrupt(run_dir / "3", kind)
  warnings = []
  ckpt = checkpointing.RunCheckpoints(run_dir, keep=3)
  step, tree = ckpt.restore_latest({"w": jnp.zeros((64, 64))}, warn=warnings.append)
  # Whatever restores holds its own step's values; only a step that cannot be read is skipped
  # (orbax reads this step's arrays without its _METADATA file).
  assert (tree["w"] == step).all()
  if kind == "metadata" and step == 3:
    return
  assert step == 2
  assert len(warnings) == 1 and "step 3" in warnings[0] and "3.corrupt" in warnings[0]
  ckpt.save(3, {"w": jnp.full((64, 64), 3.0)})  # the step number is free again
  assert ckpt.all_steps()[-1] == 3 and (run_dir / "3.corrupt").is_dir()
  ckpt.close()


def test_no_step_is_moved_when_none_restores(run_dir):
  import jax.numpy as jnp

  ckpt = checkpointing.RunCheckpoints(run_dir)
  ckpt.save(1, {"w": jnp.ones(3)})
  with pytest.raises(checkpointing.NoIntactCheckpoint, match="step 1"):
    ckpt.restore_latest({"v": jnp.ones(3)})  # another run's structure: nothing is corrupt
  assert ckpt.all_steps() == [1] and not (run_dir / "1.corrupt").exists()
  ckpt.close()


def test_a_step_with_more_entries_restores_what_is_asked_for(run_dir):
  """Checkpoints of older runs hold a "reference" entry (the pretrained copy): it is skipped."""
  import jax.numpy as jnp

  ckpt = checkpointing.RunCheckpoints(run_dir)
  ckpt.save(2, {"params": {"w": jnp.arange(3.0)}, "reference": {"w": jnp.ones(3)}})
  step, tree = ckpt.restore_latest({"params": {"w": jnp.zeros(3)}})
  assert step == 2 and set(tree) == {"params"}
  np.testing.assert_array_equal(tree["params"]["w"], np.arange(3.0))
  with pytest.raises(checkpointing.NoIntactCheckpoint, match="step 2"):
    ckpt.restore_latest({"params": {"w": jnp.zeros(3)}, "opt_state": jnp.zeros(2)})
  ckpt.close()


def _two_processes_in_one(monkeypatch, allgather):
  """``processes_not_sharing`` as process 0 of 2 sees it, its collectives answered here."""
  from jax.experimental import multihost_utils

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "sync_global_devices", lambda name: None)
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: x)
  monkeypatch.setattr(multihost_utils, "process_allgather", allgather)


def test_the_shared_directory_probe_leaves_the_users_files_as_they_were(tmp_path, monkeypatch):
  """The marker and every directory the probe made are gone, also when a collective fails."""
  _two_processes_in_one(monkeypatch, lambda seen: np.stack([seen, seen]))
  assert checkpointing.processes_not_sharing(tmp_path / "runs" / "a" / "ckpt") == []
  assert list(tmp_path.iterdir()) == []  # runs/ and runs/a/ too, not only ckpt/
  (tmp_path / "ckpt").mkdir()
  (tmp_path / "ckpt" / "notes.txt").write_text("keep")
  assert checkpointing.processes_not_sharing(tmp_path / "ckpt") == []
  assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["notes.txt"]

  def lost(seen):
    raise RuntimeError("process 1 went away")

  _two_processes_in_one(monkeypatch, lost)
  for directory in (tmp_path / "ckpt", tmp_path / "new" / "ckpt"):
    with pytest.raises(RuntimeError, match="went away"):
      checkpointing.processes_not_sharing(directory)
  assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["notes.txt"]
  assert not (tmp_path / "new").exists()


def test_a_checkpoint_dir_process_0_cannot_write_answers_without_a_hang(tmp_path, monkeypatch):
  """A file where the directory (or its parent) should be: process 0 is reported among those
  that do not see the marker, after it joined the collectives (its peers would wait there)."""
  joined = []

  def allgather(seen):
    joined.append(True)
    return np.stack([seen, seen])

  _two_processes_in_one(monkeypatch, allgather)
  (tmp_path / "a-file").write_text("mine")
  for directory in (tmp_path / "a-file", tmp_path / "a-file" / "ckpt"):
    assert checkpointing.processes_not_sharing(directory) == [0, 1]
  assert joined == [True, True]
  assert [p.name for p in tmp_path.iterdir()] == ["a-file"]
  assert (tmp_path / "a-file").read_text() == "mine"
  from mofo_jax.finetune import runner
  from mofo_jax.finetune.run_config import UserError

  with pytest.raises(UserError, match="a-file: process 0 cannot write a file there"):
    runner._require_shared(str(tmp_path / "a-file"))
