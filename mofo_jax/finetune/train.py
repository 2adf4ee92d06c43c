"""Fine-tuning a Flax NNX causal LM: the loss, one jitted sharded step, and the training loop."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import mofo_jax
from mofo_jax.finetune import checkpointing, distance, optimizers, preemption, storage
from mofo_jax.finetune.step import make_train_step

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
  return jax.sharding.Mesh(device_grid(devices[:needed], tuple(sizes.values())), tuple(sizes))


def device_grid(devices: Sequence[jax.Device], shape: tuple[int, ...]) -> np.ndarray:
  """``devices`` as an array of ``shape`` whose axes follow the chips' links where JAX knows
  them (a whole TPU slice: ``mesh_utils.create_device_mesh``), else in the order given.

  The trainer and ``mofo-finetune plan`` both lay meshes out here, so the collectives plan
  compiles are the ones a run makes.
  """
  try:
    return mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    # A part of a slice (the first devices of it) has no physical layout of its own.
    return np.asarray(devices).reshape(shape)


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
    distance_metrics: where the pretrained copy for :meth:`distance_from_pretrained` lives:
      ``"device"`` (a second copy of the params on the devices), ``"host"`` (in host memory,
      put back one leaf at a time) or ``"off"`` (none; no such metrics). See ``distance``.
  """

  def __init__(
    self,
    model: nnx.Module,
    optimizer: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    param_shardings: Any = None,
    grad_accum: int = 1,
    distance_metrics: str = "device",
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
    # The trained copy is donated step after step, so it must not share buffers with the
    # caller's model (which the "device" copy keeps as the pretrained weights).
    pretrained = jax.device_put(params, self.param_shardings)
    self.pretrained = distance.pretrained_copy(distance_metrics, pretrained)
    params = jax.tree.map(jnp.copy, pretrained)
    del pretrained
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
    self._evals: dict[Callable, Callable] = {}
    self._finite = jax.jit(
      lambda p: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(p)]))
    )

  def model(self, params: Any = None) -> nnx.Module:
    """The model with the current (or the given) params."""
    return nnx.merge(self.graphdef, self.state.params if params is None else params, self.rest)

  def evaluate(
    self, metric: Callable[..., Mapping[str, jax.Array]], batches: Iterable[Batch], *args
  ):
    """Sums a metric over batches with the current params.

    Args:
      metric: ``(model, batch, *args) -> {name: array}`` of per-batch sums (traced under jit,
        compiled once per metric function).
      batches: host batches.
      *args: further array arguments of ``metric``, the same for every batch.

    Returns:
      ``{name: float}``: each metric summed over the batches.
    """
    if metric not in self._evals:
      abstract_mesh = self.mesh.abstract_mesh

      def on_mesh(params, batch, *a):
        # The mesh in context lets the model keep activations batch-sharded, as in training.
        with jax.sharding.use_abstract_mesh(abstract_mesh):
          return metric(nnx.merge(self.graphdef, params, self.rest), batch, *a)

      self._evals[metric] = jax.jit(on_mesh)
    fn = self._evals[metric]
    totals: dict[str, float] = {}
    for b in batches:
      out = fn(self.state.params, self.shard_batch(b), *args)
      for k, v in out.items():
        totals[k] = totals.get(k, 0.0) + float(v)
    return totals

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
    """L2 distance from the pretrained params and the fraction of entries ever changed.

    Empty with ``distance_metrics="off"``. The count of changed entries is exact for any model
    size, with or without ``jax_enable_x64`` (see ``distance.distance_from_pretrained``).
    """
    return distance.distance_from_pretrained(self.state.params, self.pretrained)

  def params_finite(self) -> bool:
    """Whether every parameter is finite (no NaN or Inf)."""
    return bool(self._finite(self.state.params))

  def checkpoint_state(self) -> dict[str, Any]:
    """What a checkpoint holds: params and optimizer state.

    Not the pretrained copy: a resumed run reads it again from its input model.
    """
    return {"params": self.state.params, "opt_state": self.state.opt_state}

  def load_checkpoint_state(self, step: int, tree: Mapping[str, Any]) -> None:
    """Continues from a restored :meth:`checkpoint_state` taken at ``step``."""
    self.state = TrainState(step, tree["params"], tree["opt_state"])


class TrainingDiverged(Exception):
  """The loss, the gradient or the params became NaN or Inf; the run stopped without saving."""


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
    keep_checkpoints: checkpoint steps kept.
  """

  steps: int
  eval_every: int = 0
  checkpoint_every: int = 0
  checkpoint_dir: str | None = None
  metrics_path: str | None = None
  log_every: int = 1
  progress: bool = True
  eval_at_start: bool = True
  keep_checkpoints: int = 2


def _kept_metrics(path: str, step: int) -> list[dict[str, Any]]:
  """The records of a metrics file up to ``step`` (a resumed run redoes the ones after it)."""
  lines = [json.loads(x) for x in storage.read_lines(path)]
  return [r for r in lines if r.get("step", 0) <= step]


def run(
  trainer: Trainer,
  batches: Iterator[Batch],
  cfg: LoopConfig,
  evaluate: Callable[[Trainer], dict[str, float]],
  *,
  resume: bool = False,
  tensorboard_dir: str | None = None,
  warn: Callable[[str], None] = print,
) -> list[dict[str, float]]:
  """Trains for ``cfg.steps`` steps, evaluating, logging and checkpointing; Ctrl-C and SIGTERM save.

  With ``resume`` the newest readable checkpoint in ``cfg.checkpoint_dir`` is restored (an
  unreadable newer step is moved aside with a warning), the batches already consumed are
  skipped, and the metrics file is cut back to that step, so the run continues exactly where it
  stopped and no step is logged twice. The first evaluation (the pretrained baseline) is kept
  beside the checkpoints and returned again after a resume.

  A NaN or Inf loss, gradient norm or parameter stops the run with ``TrainingDiverged`` and
  saves nothing: the last checkpoint on disk is the last good state.

  On SIGTERM (a preempted VM) every process stops after one step they agree on (see
  :mod:`~mofo_jax.finetune.preemption`), saves it, and ``Preempted`` is raised.

  Args:
    trainer: the trainer (its state is advanced in place).
    batches: training batches, deterministic from the start of the run.
    cfg: loop settings.
    evaluate: ``trainer -> metrics`` called at each evaluation.
    resume: continue from the latest checkpoint (from step 0 when there is none yet).
    tensorboard_dir: also write scalars there (needs ``tensorboardX``).
    warn: receives warnings (an unreadable checkpoint step that was skipped).

  Returns:
    The evaluation records (each a dict with ``kind``, ``step`` and the metrics), the
    baseline first.

  Raises:
    TrainingDiverged: a non-finite loss, gradient norm or parameter.
    KeyboardInterrupt: on Ctrl-C, after saving the last finished step.
    mofo_jax.finetune.preemption.Preempted: on SIGTERM, after saving the agreed step.
  """
  ckpt = (
    checkpointing.RunCheckpoints(cfg.checkpoint_dir, cfg.keep_checkpoints)
    if cfg.checkpoint_dir
    else None
  )
  if resume and ckpt is None:
    raise ValueError("resume needs a checkpoint directory.")
  kept, records = _restore(trainer, batches, cfg, ckpt, warn) if resume else ([], [])
  loop = _Loop(trainer, batches, cfg, evaluate, ckpt, records, kept, tensorboard_dir, warn)
  interrupted = diverged = False
  try:
    loop.train()
  except KeyboardInterrupt:
    interrupted = True
  except TrainingDiverged:
    diverged = True
    raise
  finally:
    loop.close(diverged)
  if loop.preempted:
    raise preemption.Preempted(
      f"SIGTERM: stopped at step {trainer.state.step}"
      + ("; checkpoint saved" if ckpt else "; nothing saved (no checkpoint directory)")
    )
  if interrupted:
    raise KeyboardInterrupt(
      f"stopped at step {trainer.state.step}; checkpoint saved"
      if ckpt
      else f"stopped at step {trainer.state.step}"
    )
  return loop.records


def _restore(
  trainer: Trainer,
  batches: Iterator[Batch],
  cfg: LoopConfig,
  ckpt: checkpointing.RunCheckpoints,
  warn: Callable[[str], None],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """Resumes from the newest readable checkpoint (if any): skips the batches it consumed.

  Returns:
    ``(kept, records)``: the metrics file's records up to the restored step, and the
    evaluation records among them, the baseline first.
  """
  if ckpt.latest_step() is not None:
    step, tree = ckpt.restore_latest(trainer.checkpoint_state(), warn)
    trainer.load_checkpoint_state(step, tree)
    for _ in range(step):
      next(batches)
  kept = _kept_metrics(cfg.metrics_path, trainer.state.step) if cfg.metrics_path else []
  records = [r for r in kept if r.get("kind") == "eval"]
  baseline = ckpt.read_json(checkpointing.BASELINE)
  if baseline is not None and not (records and records[0]["step"] == 0):
    records.insert(0, baseline)
  return kept, records


class _Loop:
  """One call of ``run``: the steps, and where their metrics, evaluations and checkpoints go."""

  def __init__(
    self,
    trainer: Trainer,
    batches: Iterator[Batch],
    cfg: LoopConfig,
    evaluate: Callable[[Trainer], dict[str, float]],
    ckpt: checkpointing.RunCheckpoints | None,
    records: list[dict[str, Any]],
    kept: list[dict[str, Any]],
    tensorboard_dir: str | None,
    warn: Callable[[str], None],
  ):
    self.trainer, self.batches, self.cfg, self._evaluate = trainer, batches, cfg, evaluate
    self.ckpt, self.records, self.warn = ckpt, records, warn
    self.writer = _tensorboard(tensorboard_dir)
    self.metrics_file = (
      storage.LineLog(cfg.metrics_path, [json.dumps(r) for r in kept]) if cfg.metrics_path else None
    )
    self.bar = _progress(cfg.steps, trainer.state.step, cfg.progress)
    self.watch = preemption.PreemptionWatch().start()
    self.preempted = False

  def log(self, record: dict[str, Any]) -> None:
    """Writes a record to the metrics file and its numbers to TensorBoard."""
    if self.metrics_file:
      self.metrics_file.write(json.dumps(record))
    if self.writer is not None:
      for k, v in record.items():
        if k not in ("step", "kind") and isinstance(v, (int, float)):
          self.writer.add_scalar(k, v, record["step"])

  def evaluate(self) -> None:
    """Evaluates and records; the step-0 record (the baseline) is kept beside the checkpoints."""
    record = {"kind": "eval", "step": self.trainer.state.step, **self._evaluate(self.trainer)}
    self.records.append(record)
    self.log(record)
    if self.ckpt is not None and record["step"] == 0:
      self.ckpt.write_json(checkpointing.BASELINE, record)

  def save(self) -> None:
    """Checkpoints the current step, unless a parameter is NaN or Inf."""
    trainer = self.trainer
    if not trainer.params_finite():
      raise TrainingDiverged(
        f"step {trainer.state.step}: a parameter is NaN or Inf; stopped without saving"
      )
    if self.metrics_file:
      # Before the step: a resume cuts the metrics back to the step it restores, so they may
      # run ahead of the checkpoints but never behind.
      self.metrics_file.sync()
    self.ckpt.save(trainer.state.step, trainer.checkpoint_state())

  def train(self) -> None:
    """The steps up to ``cfg.steps``, with the evaluations at the start and the end."""
    cfg, trainer = self.cfg, self.trainer
    if cfg.eval_at_start and trainer.state.step == 0 and not self.records:
      self.evaluate()
    # Asked before the first step too: JAX's sync point is one past the step a process last
    # reported, so a notice during the first step must find this run's step, not 0.
    self.preempted = self.watch.reached(trainer.state.step)
    while not self.preempted and trainer.state.step < cfg.steps:
      self.step()
      self.preempted = self.watch.reached(trainer.state.step)
    if self.preempted:
      return
    if not (self.records and self.records[-1]["step"] == trainer.state.step):
      self.evaluate()

  def step(self) -> None:
    """One optimizer step, then its log line and the evaluation and checkpoint it is due."""
    cfg, trainer = self.cfg, self.trainer
    start = time.perf_counter()
    try:
      batch = next(self.batches)
    except StopIteration:
      raise ValueError(
        f"the data ran out after {trainer.state.step} of {cfg.steps} steps; "
        "use more examples or more epochs."
      ) from None
    metrics = trainer.train_step(batch)
    metrics["step_time_s"] = time.perf_counter() - start
    step = trainer.state.step
    if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
      self.log({"kind": "train", "step": step, **metrics})
      raise TrainingDiverged(
        f"step {step}: loss {metrics['loss']}, gradient norm {metrics['grad_norm']}; "
        "stopped without saving"
      )
    if step % cfg.log_every == 0:
      self.log({"kind": "train", "step": step, **metrics})
    self.bar.update(1)
    self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", refresh=False)
    if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
      self.evaluate()
    if self.ckpt and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
      self.save()

  def close(self, diverged: bool) -> None:
    """Saves the last finished step (on Ctrl-C too; never a diverged state) and closes."""
    self.watch.stop()
    self.bar.close()
    ckpt = self.ckpt
    if ckpt is not None:
      try:
        if not diverged and ckpt.latest_step() != self.trainer.state.step:
          self.save()
      finally:
        last = ckpt.latest_step()
        ckpt.close()
    if self.metrics_file:
      self.metrics_file.close()
    if self.writer is not None:
      self.writer.close()
    if diverged and ckpt is not None:
      self.warn(
        "the last good checkpoint is "
        + (
          f"step {last} in {self.cfg.checkpoint_dir}"
          if last is not None
          else "none (none was saved)"
        )
      )


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
  model: nnx.Module,
  opt_cfg: optimizers.OptimizerConfig,
  mesh_spec: str = "",
  grad_accum: int = 1,
  distance_metrics: str = "device",
) -> Trainer:
  """A Trainer for ``model`` with the optimizer of ``opt_cfg`` on a (data, fsdp, tensor) mesh.

  Params are sharded by their logical axis names (``model.LOGICAL_AXIS_RULES``);
  ``distance_metrics`` as in :class:`Trainer`.
  """
  from mofo_jax.finetune import model as model_lib

  mesh = make_mesh(mesh_spec or "data=-1")
  shardings = model_lib.param_shardings(model, mesh)
  params = nnx.state(model, nnx.Param)
  stacked = bool(getattr(getattr(model, "config", None), "scan_layers", False))
  optimizer = optimizers.make_optimizer(
    opt_cfg, params, stacked_layers=stacked, shardings=shardings
  )
  return Trainer(model, optimizer, mesh, shardings, grad_accum, distance_metrics)
