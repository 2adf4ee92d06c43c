"""One frozen description of a fine-tuning run: what the CLI parses, the demos build, resume checks."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from mofo_jax.finetune.optimizers import OPTIMIZERS, OptimizerConfig

DTYPES = ("float32", "bfloat16")
DISTANCE_METRICS = ("device", "host", "off")  # distance.MODES, without importing jax here
FORMAT = 1  # version of the JSON written by ``RunConfig.to_dict``


class UserError(Exception):
  """A problem with what the user asked for; the message names the flag or file at fault.

  The CLI prints it as one line and exits with status 2 (no traceback: tracebacks are for bugs).
  """


@dataclasses.dataclass(frozen=True)
class ModelSettings:
  """Which pretrained model, and how it is held.

  Attributes:
    path: a ``.gguf`` file or a Hugging Face checkpoint directory; None: the embedded
      SmolLM2-135M-Instruct.
    param_dtype: dtype the weights (and so MoFO's updates) are stored in.
    compute_dtype: dtype of the matmuls; logits are float32 regardless.
    remat: rematerialise layers in the backward pass (memory for compute; same numbers).
    scan_layers: stack the layers and scan over them.
    fingerprint: a hash of the pretrained weights as loaded (``distance.fingerprint``),
      recorded by the run; a resume refuses a model whose weights hash otherwise.
  """

  path: str | None = None
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  remat: bool = False
  scan_layers: bool = True
  fingerprint: str | None = None


@dataclasses.dataclass(frozen=True)
class DataSettings:
  """The training data and how it is batched.

  Attributes:
    source: ``"arithmetic"`` (synthetic word problems) or a JSON Lines or Parquet file of
      conversations, prompt/completion pairs or text.
    difficulty: arithmetic difficulty.
    train_examples: arithmetic problems generated for training.
    seq_len: tokens per row.
    batch_size: rows per optimizer step (all devices and micro-batches).
    grad_accum: micro-batches per step; must divide ``batch_size``.
    truncate: cut examples longer than ``seq_len + 1`` tokens instead of refusing them.
    seed: data order (and the arithmetic problems).
    data_format: ``"auto"`` (read off the first record), ``"messages"``,
      ``"prompt-completion"`` or ``"text"``.
    messages_field: the field holding a conversation's turns.
    prompt_field: the field holding the prompt.
    completion_field: the field holding the completion (None: ``completion``, or
      ``response`` when the first record has that instead).
    text_field: the field holding a text record's document.
    chat_template: None (the model's), ``"none"`` (the turns' contents concatenated) or a
      Jinja file rendering conversations.
  """

  source: str = "arithmetic"
  difficulty: int = 2
  train_examples: int = 4000
  seq_len: int = 128
  batch_size: int = 8
  grad_accum: int = 1
  truncate: bool = False
  seed: int = 0
  data_format: str = "auto"
  messages_field: str = "messages"
  prompt_field: str = "prompt"
  completion_field: str | None = None
  text_field: str = "text"
  chat_template: str | None = None


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """What is measured, and when.

  Attributes:
    eval_examples: held-out task examples scored for accuracy.
    old_text_batches: batches of pydoc / Bible text scored for forgetting; when above 0 the
      general-knowledge cloze prompts are scored too.
    eval_every: evaluate every this many steps besides the start and the end (0: never).
    at_start: evaluate the pretrained model before the first step (the baseline).
    eval_data: a file of the user's held-out records (as ``DataSettings.source``), scored for
      loss beside the forgetting measures; None holds out the end of the training file.
    distance_metrics: where the pretrained copy behind ``l2_from_pretrained`` and
      ``fraction_changed`` lives: ``"device"``, ``"host"`` or ``"off"`` (no such metrics); see
      ``distance``.
  """

  eval_examples: int = 64
  old_text_batches: int = 2
  eval_every: int = 0
  at_start: bool = True
  eval_data: str | None = None
  distance_metrics: str = "device"


@dataclasses.dataclass(frozen=True)
class OutputSettings:
  """Where results go, and how existing ones are treated.

  Attributes:
    output_dir: metrics.jsonl, summary.json, run_config.json and the model go here.
    checkpoint_dir: orbax checkpoints (and run_config.json, baseline.json) go here.
    checkpoint_every: save every this many steps (0: at the end and on Ctrl-C only).
    keep_checkpoints: steps kept in ``checkpoint_dir``.
    resume: continue the run whose checkpoints are in ``checkpoint_dir``.
    overwrite: replace the results of another run in ``output_dir``/``checkpoint_dir``.
    allow_config_change: resume although settings that change the optimization differ.
    progress: show a progress bar.
  """

  output_dir: str | None = None
  checkpoint_dir: str | None = None
  checkpoint_every: int = 0
  keep_checkpoints: int = 2
  resume: bool = False
  overwrite: bool = False
  allow_config_change: bool = False
  progress: bool = True


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
  """Multi-process runs (a TPU pod, several GPU hosts).

  Attributes:
    enabled: call ``jax.distributed.initialize`` before anything else.
    coordinator_address: ``host:port`` of process 0 (None: found by JAX on TPU/SLURM).
    num_processes: with ``coordinator_address``.
    process_id: with ``coordinator_address``.
    timeout_s: give up waiting for the other processes after this many seconds.
  """

  enabled: bool = False
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  timeout_s: int = 300


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """A whole fine-tuning run.

  ``optimizer.total_steps`` is the learning-rate schedule's horizon; ``steps`` is how far this
  run goes. They are equal unless a resumed run extends ``steps``, which keeps the schedule it
  started with (the rate then stays at its final value, 10% of the peak).

  Attributes:
    model: the pretrained model.
    data: training data and batching.
    optimizer: the optimizer and its schedule.
    steps: optimizer steps of the run.
    mesh: device mesh, e.g. ``"data=1,fsdp=8,tensor=1"``.
    eval: what is measured.
    output: where results go.
    distributed: multi-process settings.

  Example:
    >>> cfg = RunConfig(steps=20, optimizer=OptimizerConfig(learning_rate=1e-4, total_steps=20))
    >>> RunConfig.from_dict(cfg.to_dict()) == cfg
    True
    >>> differences(cfg, dataclasses.replace(cfg, steps=40))
    []
  """

  model: ModelSettings = ModelSettings()
  data: DataSettings = DataSettings()
  optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
  steps: int = 100
  mesh: str = "data=-1"
  eval: EvalSettings = EvalSettings()
  output: OutputSettings = OutputSettings()
  distributed: DistributedSettings = DistributedSettings()

  def to_dict(self) -> dict[str, Any]:
    """The config as JSON-ready nested dicts (with a format version)."""
    return {"format": FORMAT, **dataclasses.asdict(self)}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> RunConfig:
    """Rebuilds a config written by :meth:`to_dict` (unknown keys are an error)."""
    d = dict(d)
    d.pop("format", None)
    parts = {
      "model": ModelSettings,
      "data": DataSettings,
      "optimizer": OptimizerConfig,
      "eval": EvalSettings,
      "output": OutputSettings,
      "distributed": DistributedSettings,
    }
    return cls(**{k: parts[k](**v) if k in parts else v for k, v in d.items()})

  def validate(self) -> None:
    """Raises ``UserError`` naming the flag of the first setting that cannot work."""
    positive = {
      "--steps": self.steps,
      "--batch-size": self.data.batch_size,
      "--seq-len": self.data.seq_len,
      "--train-examples": self.data.train_examples,
      "--eval-examples": self.eval.eval_examples,
      "--grad-accum": self.data.grad_accum,
      "--difficulty": self.data.difficulty,
      "--keep-checkpoints": self.output.keep_checkpoints,
      "--distributed-timeout": self.distributed.timeout_s,
    }
    for flag, value in positive.items():
      if value < 1:
        raise UserError(f"{flag} must be at least 1 (got {value}).")
    for flag, value in {
      "--eval-every": self.eval.eval_every,
      "--checkpoint-every": self.output.checkpoint_every,
      "--warmup-steps": self.optimizer.warmup_steps,
      "--old-text-batches": self.eval.old_text_batches,
    }.items():
      if value < 0:
        raise UserError(f"{flag} must not be negative (got {value}).")
    opt = self.optimizer
    for flag, value in {
      "--lr": opt.learning_rate,
      "--fraction": opt.fraction,
      "--weight-decay": opt.weight_decay,
      "--clip-norm": opt.clip_norm,
    }.items():
      if not math.isfinite(value):
        raise UserError(f"{flag} must be a finite number (got {value}).")
    if opt.learning_rate <= 0:
      raise UserError(f"--lr must be positive (got {opt.learning_rate}).")
    if not 0 < opt.fraction <= 1:
      raise UserError(f"--fraction must be in (0, 1] (got {opt.fraction}).")
    if opt.name not in OPTIMIZERS:
      raise UserError(f"--optimizer {opt.name!r} is not one of {', '.join(OPTIMIZERS)}.")
    for flag, value in {
      "--param-dtype": self.model.param_dtype,
      "--compute-dtype": self.model.compute_dtype,
    }.items():
      if value not in DTYPES:
        raise UserError(f"{flag} {value!r} is not one of {', '.join(DTYPES)}.")
    if self.data.batch_size % self.data.grad_accum:
      raise UserError(
        f"--grad-accum {self.data.grad_accum} does not divide --batch-size "
        f"{self.data.batch_size}: each micro-batch must have the same number of rows."
      )
    if self.eval.distance_metrics not in DISTANCE_METRICS:
      raise UserError(
        f"--distance-metrics {self.eval.distance_metrics!r} is not one of "
        f"{', '.join(DISTANCE_METRICS)}."
      )
    if self.eval.eval_data is not None and self.data.source == "arithmetic":
      raise UserError("--eval-data is the held-out part of your own --data FILE; pass both.")
    if self.output.resume and not self.output.checkpoint_dir:
      raise UserError("--resume needs --checkpoint-dir (where the run's checkpoints are).")
    if self.output.resume and self.output.overwrite:
      raise UserError("--resume and --overwrite contradict each other: pass one.")


# Settings that do not change what the optimizer computes: they may differ on resume. Everything
# else (model, dtypes, data, batching, optimizer, schedule) must match the checkpoint's run.
_FREE = {
  "steps",
  "mesh",
  "model.remat",
  # Checked on its own after loading (the runner), where the new model's hash is known.
  "model.fingerprint",
  "eval",
  "output",
  "distributed",
}


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flat(v, key + "."))
    else:
      out[key] = v
  return out


def differences(saved: RunConfig, new: RunConfig) -> list[str]:
  """The settings that change the optimization and differ, as ``"name: saved -> new"`` lines.

  Args:
    saved: the config the checkpoints were written with.
    new: the config of the run that would continue them.

  Returns:
    One line per differing field (empty when the run may resume).
  """
  a, b = _flat(dataclasses.asdict(saved)), _flat(dataclasses.asdict(new))
  free = lambda k: k in _FREE or k.split(".")[0] in _FREE
  return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in a if not free(k) and a[k] != b.get(k)]
