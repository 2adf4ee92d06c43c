"""Fine-tuning a Flax NNX causal LM: loss, one jitted sharded step, evaluation, checkpoints."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import mofo_jax
from mofo_jax.finetune import optimizers
from mofo_jax.finetune.step import make_train_step, token_losses

Batch = Mapping[str, np.ndarray]
BATCH_AXES = ("data", "fsdp")


def parse_mesh(spec: str) -> dict[str, int]:
  """Parses ``"data=1,fsdp=8,tensor=1"`` into an ordered dict of axis sizes.

  Args:
    spec: comma-separated ``name=size`` pairs over the axes data, fsdp and tensor; one size may
      be -1 (all the remaining devices).

  Returns:
    ``{"data": d, "fsdp": f, "tensor": t}`` with every axis present.
  """
  sizes = {"data": 1, "fsdp": 1, "tensor": 1}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, sep, value = part.partition("=")
    if not sep or name not in sizes:
      raise ValueError(
        f"--mesh {spec!r}: expected name=size pairs over {list(sizes)}, got {part!r}."
      )
    try:
      sizes[name] = int(value)
    except ValueError:
      raise ValueError(f"--mesh {spec!r}: size {value!r} of {name} is not an integer.") from None
  return sizes


def make_mesh(spec: str | Mapping[str, int], devices=None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh over ``devices`` (default: all).

  With a -1 axis the mesh spans every device; with all sizes given it takes the first
  ``data * fsdp * tensor`` devices.
  """
  sizes = dict(parse_mesh(spec) if isinstance(spec, str) else spec)
  devices = jax.devices() if devices is None else devices
  free = [k for k, v in sizes.items() if v == -1]
  known = math.prod(v for v in sizes.values() if v != -1)
  if len(free) > 1:
    raise ValueError(f"mesh {sizes}: at most one axis may be -1.")
  if free:
    sizes[free[0]] = len(devices) // known
  needed = math.prod(sizes.values())
  if needed < 1 or needed > len(devices) or (free and needed != len(devices)):
    raise ValueError(f"mesh {sizes} needs {needed} devices; {len(devices)} are available.")
  arr = np.asarray(devices[:needed]).reshape(tuple(sizes.values()))
  return jax.sharding.Mesh(arr, tuple(sizes))


@dataclasses.dataclass
class TrainState:
  """Everything a step changes: the step count, the params, the optimizer state."""

  step: int
  params: Any
  opt_state: Any


class Trainer:
  """Fine-tunes an NNX model with an optax optimizer, sharded over a mesh.

  The model is split once into its graph, its parameters (``nnx.Param``, the trainable state)
  and the rest; the train step is a pure function of (params, opt_state, batch) jitted with the
  params' shardings, so one rule set shards params, optimizer state and batches alike.

  Args:
    model: the NNX model (its parameters are the pretrained weights).
    optimizer: an optax transformation.
    mesh: the device mesh (axes data, fsdp, tensor).
    param_shardings: a pytree of ``NamedSharding`` like the params (default: replicated).
    grad_accum: micro-batches per optimizer step; a batch's leading dimension is split into
      this many slices whose gradients are averaged inside the step.
  """

  def __init__(
    self,
    model: nnx.Module,
    optimizer: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    param_shardings: Any = None,
    grad_accum: int = 1,
  ):
    if grad_accum < 1:
      raise ValueError(f"grad_accum={grad_accum} must be at least 1.")
    self.graphdef, params, self.rest = nnx.split(model, nnx.Param, ...)
    self.mesh = mesh
    self.grad_accum = grad_accum
    self.optimizer = optimizer
    replicated = NamedSharding(mesh, P())
    self.param_shardings = (
      jax.tree.map(lambda _: replicated, params) if param_shardings is None else param_shardings
    )
    # The pretrained weights, for metrics; the trained copy is donated step after step, so it
    # must not share buffers with the caller's model.
    self.reference = jax.device_put(params, self.param_shardings)
    params = jax.tree.map(jnp.copy, self.reference)
    self.rest = jax.device_put(self.rest, replicated)
    self.opt_shardings = mofo_jax.state_shardings(optimizer, params)
    opt_state = jax.jit(optimizer.init, out_shardings=self.opt_shardings)(params)
    self.state = TrainState(0, params, opt_state)
    self.batch_sharding = NamedSharding(mesh, P(BATCH_AXES))
    self._step = jax.jit(
      make_train_step(self.graphdef, self.rest, optimizer, grad_accum=grad_accum, mesh=mesh),
      donate_argnums=(0, 1),
      out_shardings=(self.param_shardings, self.opt_shardings, None),
    )
    self._eval = jax.jit(self._eval_step)
    self._distance = jax.jit(self._distance_fn)

  def model(self, params: Any = None) -> nnx.Module:
    """The model with the current (or the given) params."""
    return nnx.merge(self.graphdef, self.state.params if params is None else params, self.rest)

  def _eval_step(self, params, batch, stop_ids):
    losses, pred = token_losses(nnx.merge(self.graphdef, params, self.rest), batch)
    mask = batch["loss_mask"].astype(bool)
    t = mask.shape[1]
    # The last masked target of a row is its end token; the ones before it are the answer.
    last = t - 1 - jnp.argmax(mask[:, ::-1], axis=1)
    has = mask.any(axis=1)
    is_last = (jnp.arange(t)[None, :] == last[:, None]) & has[:, None]
    answer = mask & ~is_last
    digits_ok = jnp.all(jnp.where(answer, pred == batch["targets"], True), axis=1)
    stops = stop_ids[jnp.take_along_axis(pred, last[:, None], axis=1)[:, 0]]
    f32 = jnp.float32
    return {
      "loss_sum": jnp.sum(losses * mask),
      "count": jnp.sum(mask, dtype=f32),
      "answer_loss_sum": jnp.sum(losses * answer),
      "answer_count": jnp.sum(answer, dtype=f32),
      "correct": jnp.sum(has & digits_ok & stops, dtype=f32),
      "rows": jnp.sum(has, dtype=f32),
    }

  def _evaluate(self, batches: Iterable[Batch], stop_ids: np.ndarray | None) -> dict[str, float]:
    stop = jnp.ones((1,), bool) if stop_ids is None else jnp.asarray(stop_ids)
    totals: dict[str, float] = {}
    for b in batches:
      out = self._eval(self.state.params, self.shard_batch(b), stop)
      for k, v in out.items():
        totals[k] = totals.get(k, 0.0) + float(v)
    return totals

  def eval_loss(self, batches: Iterable[Batch]) -> float:
    """Mean masked next-token loss over ``batches`` (weighted by token count)."""
    t = self._evaluate(batches, None)
    return t.get("loss_sum", 0.0) / max(t.get("count", 0.0), 1.0)

  def answer_accuracy(self, batches: Iterable[Batch], stop_ids: np.ndarray) -> tuple[float, float]:
    """Greedy exact match of answers by teacher forcing, and their mean token loss.

    Each row holds one problem whose masked targets are the answer tokens and then an end
    token. Greedy decoding writes the answer exactly iff the argmax at every answer position
    is the answer token and the argmax after the answer ends the number (``stop_ids``), which
    one forward pass decides.

    Args:
      batches: rows of one problem each (``loss_mask`` on the answer and its end token).
      stop_ids: bool [vocab]: True for tokens that end a number (not a digit).

    Returns:
      ``(accuracy, mean loss over the answer tokens)``.
    """
    t = self._evaluate(batches, stop_ids)
    return (
      t.get("correct", 0.0) / max(t.get("rows", 0.0), 1.0),
      t.get("answer_loss_sum", 0.0) / max(t.get("answer_count", 0.0), 1.0),
    )

  @staticmethod
  def _distance_fn(params, reference):
    diff = jax.tree.map(
      lambda p, r: p.astype(jnp.float32) - r.astype(jnp.float32), params, reference
    )
    changed = sum(jnp.sum(d != 0) for d in jax.tree.leaves(diff))
    return optax.tree.norm(diff), changed

  def shard_batch(self, batch: Batch) -> dict[str, jax.Array]:
    """Places a host batch (this process's rows) on the mesh, split over data and fsdp."""
    rows = len(next(iter(batch.values())))
    shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"] // jax.process_count()
    if rows % shards:
      raise ValueError(
        f"a batch of {rows} rows per process cannot be split over the "
        f"{shards} data x fsdp shards of this process: use a multiple of {shards}."
      )
    return {
      k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
      for k, v in batch.items()
    }

  def train_step(self, batch: Batch) -> dict[str, float]:
    """One optimizer step on a batch; returns its metrics as floats."""
    params, opt_state, metrics = self._step(
      self.state.params, self.state.opt_state, self.shard_batch(batch)
    )
    self.state = TrainState(self.state.step + 1, params, opt_state)
    return {k: float(v) for k, v in metrics.items()}

  def distance_from_pretrained(self) -> dict[str, float]:
    """L2 distance from the pretrained params and the fraction of entries ever changed."""
    l2, changed = self._distance(self.state.params, self.reference)
    total = sum(x.size for x in jax.tree.leaves(self.reference))
    return {"l2_from_pretrained": float(l2), "fraction_changed": int(changed) / total}

  # Checkpoints -------------------------------------------------------------------------------

  def checkpoint_manager(self, directory: str | os.PathLike, keep: int = 2):
    """An orbax CheckpointManager for this run (writes are atomic: temp dir, then rename)."""
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
      Path(directory).absolute(),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
    )

  def save(self, manager) -> None:
    """Saves params, optimizer state and the pretrained reference at the current step."""
    import orbax.checkpoint as ocp

    manager.save(
      self.state.step,
      args=ocp.args.StandardSave(
        {
          "params": self.state.params,
          "opt_state": self.state.opt_state,
          "reference": self.reference,
        }
      ),
      force=True,
    )
    manager.wait_until_finished()

  def restore(self, manager, step: int | None = None) -> int:
    """Restores the latest (or the given) checkpoint onto this run's shardings; returns its step."""
    import orbax.checkpoint as ocp

    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    target = {
      "params": self.state.params,
      "opt_state": self.state.opt_state,
      "reference": self.reference,
    }
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    self.state = TrainState(step, restored["params"], restored["opt_state"])
    self.reference = restored["reference"]
    return step


@dataclasses.dataclass
class LoopConfig:
  """How long to train and what to do along the way.

  Attributes:
    steps: optimizer steps.
    eval_every: evaluate every this many steps (and at the start and the end); 0: only then.
    checkpoint_every: save every this many steps; 0: only at the end and on Ctrl-C.
    checkpoint_dir: where checkpoints go; None disables them.
    metrics_path: JSONL file receiving one line per evaluation and per logged step.
    log_every: train metrics logged every this many steps.
    progress: show a progress bar.
    eval_at_start: evaluate before the first step (skip it when comparing many runs from the
      same weights, whose starting point is measured once).
  """

  steps: int
  eval_every: int = 0
  checkpoint_every: int = 0
  checkpoint_dir: str | None = None
  metrics_path: str | None = None
  log_every: int = 1
  progress: bool = True
  eval_at_start: bool = True


def run(
  trainer: Trainer,
  batches: Iterator[Batch],
  cfg: LoopConfig,
  evaluate: Callable[[Trainer], dict[str, float]],
  *,
  resume: bool = False,
  tensorboard_dir: str | None = None,
) -> list[dict[str, float]]:
  """Trains for ``cfg.steps`` steps, evaluating, logging and checkpointing; Ctrl-C saves.

  With ``resume`` the latest checkpoint in ``cfg.checkpoint_dir`` is restored and the batches
  already consumed are skipped, so the run continues exactly where it stopped.

  Args:
    trainer: the trainer (its state is advanced in place).
    batches: training batches, deterministic from the start of the run.
    cfg: loop settings.
    evaluate: ``trainer -> metrics`` called at each evaluation.
    resume: continue from the latest checkpoint.
    tensorboard_dir: also write scalars there (needs ``tensorboardX``).

  Returns:
    The evaluation records (each a dict with ``step`` and the metrics).
  """
  manager = trainer.checkpoint_manager(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
  if resume:
    if manager is None:
      raise ValueError("resume needs a checkpoint directory.")
    if manager.latest_step() is not None:
      trainer.restore(manager)
      for _ in range(trainer.state.step):
        next(batches)
  writer = _tensorboard(tensorboard_dir)
  metrics_file = open(cfg.metrics_path, "a") if cfg.metrics_path else None
  records: list[dict[str, float]] = []

  def log(record: dict[str, Any]) -> None:
    if metrics_file:
      metrics_file.write(json.dumps(record) + "\n")
      metrics_file.flush()
    if writer is not None:
      for k, v in record.items():
        if k not in ("step", "kind") and isinstance(v, (int, float)):
          writer.add_scalar(k, v, record["step"])

  def do_eval() -> None:
    record = {"kind": "eval", "step": trainer.state.step, **evaluate(trainer)}
    records.append(record)
    log(record)

  bar = _progress(cfg.steps, trainer.state.step, cfg.progress)
  interrupted = False
  try:
    if cfg.eval_at_start and trainer.state.step == 0:
      do_eval()
    while trainer.state.step < cfg.steps:
      start = time.perf_counter()
      try:
        batch = next(batches)
      except StopIteration:
        raise ValueError(
          f"the data ran out after {trainer.state.step} of {cfg.steps} steps; "
          "use more examples or more epochs."
        ) from None
      metrics = trainer.train_step(batch)
      metrics["step_time_s"] = time.perf_counter() - start
      step = trainer.state.step
      if step % cfg.log_every == 0:
        log({"kind": "train", "step": step, **metrics})
      bar.update(1)
      bar.set_postfix(loss=f"{metrics['loss']:.3f}", refresh=False)
      if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
        do_eval()
      if manager and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
        trainer.save(manager)
    do_eval()
  except KeyboardInterrupt:
    interrupted = True
  finally:
    bar.close()
    if manager is not None:
      # On Ctrl-C too: everything up to the last finished step is kept.
      if manager.latest_step() != trainer.state.step:
        trainer.save(manager)
      manager.close()
    if metrics_file:
      metrics_file.close()
    if writer is not None:
      writer.close()
  if interrupted:
    raise KeyboardInterrupt(
      f"stopped at step {trainer.state.step}; checkpoint saved"
      if manager
      else f"stopped at step {trainer.state.step}"
    )
  return records


def _progress(total: int, initial: int, enabled: bool):
  from tqdm.auto import tqdm

  return tqdm(
    total=total,
    initial=initial,
    disable=not enabled,
    dynamic_ncols=True,
    desc="fine-tuning",
    unit="step",
  )


def _tensorboard(directory: str | None):
  if not directory:
    return None
  try:
    from tensorboardX import SummaryWriter
  except ImportError:
    return None
  return SummaryWriter(directory)


def make_trainer(
  model: nnx.Module, opt_cfg: optimizers.OptimizerConfig, mesh_spec: str = "", grad_accum: int = 1
) -> Trainer:
  """A Trainer for ``model`` with the optimizer of ``opt_cfg`` on a (data, fsdp, tensor) mesh.

  Params are sharded by their logical axis names (``model.LOGICAL_AXIS_RULES``).
  """
  from mofo_jax.finetune import model as model_lib

  mesh = make_mesh(mesh_spec or "data=-1")
  shardings = model_lib.param_shardings(model, mesh)
  params = nnx.state(model, nnx.Param)
  stacked = bool(getattr(getattr(model, "config", None), "scan_layers", False))
  optimizer = optimizers.make_optimizer(opt_cfg, params, stacked_layers=stacked)
  return Trainer(model, optimizer, mesh, shardings, grad_accum)
