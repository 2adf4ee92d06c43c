"""Runs a :class:`~mofo_jax.finetune.run_config.RunConfig`: the one recipe behind the CLI and demos.

Loading, data, trainer, the loop, and what is written where, in one place. Outputs are never
overwritten silently: a directory holding another run's files is refused unless the config says
``resume`` or ``overwrite``; the input model is never written to.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mofo_jax.finetune import checkpointing, storage
from mofo_jax.finetune.run_config import RunConfig, UserError, differences


def _stderr(message: str) -> None:
  print(message, file=sys.stderr)


@dataclasses.dataclass
class Prepared:
  """What a config's model, data and evaluation settings load to; reusable across runs.

  Attributes:
    model_config: the ``LlamaConfig``.
    model: the pretrained NNX model.
    tokenizer: its ``TextTokenizer``.
    train_examples: tokenized ``(ids, mask)`` training examples.
    evaluator: ``trainer -> metrics``.
    key: the settings it was prepared from (a run with other settings cannot reuse it).
  """

  model_config: Any
  model: Any
  tokenizer: Any
  train_examples: list
  evaluator: Callable
  key: tuple


def _prepared_key(cfg: RunConfig) -> tuple:
  d, e = cfg.data, cfg.eval
  # The fingerprint is what loading gives, not a setting of it.
  model = dataclasses.replace(cfg.model, fingerprint=None)
  return (model, d.source, d.difficulty, d.train_examples, d.seq_len, d.batch_size, d.truncate,
          d.seed, e.eval_examples, e.old_text_batches,
          d.data_format, d.messages_field, d.prompt_field, d.completion_field, d.text_field,
          d.chat_template, e.eval_data)  # fmt: skip


def load_model(settings, mesh=None) -> tuple[Any, Any, Any]:
  """``(config, model, TextTokenizer)`` from a GGUF file, a HF directory (local or ``gs://``), or
  the embedded default.

  With a ``mesh`` every parameter is created in its sharding on that mesh and each process reads
  only the slices its devices hold (``checkpoints_hf.load_hf_checkpoint``); without one the model
  is loaded onto the default device.

  Raises:
    UserError: naming ``--model`` and the file, for anything the loaders reject.
  """
  from safetensors import SafetensorError

  from mofo_jax.finetune import checkpoints_hf, gguf_loader, tokenizer

  path = settings.path
  kwargs = {
    "dtype": settings.compute_dtype,
    "param_dtype": settings.param_dtype,
    "remat": settings.remat,
    "scan_layers": settings.scan_layers,
    "mesh": mesh,
  }
  try:
    if path is not None and storage.is_remote(path) and str(path).endswith(".gguf"):
      raise UserError(
        f"--model {path}: a GGUF file is read from a local path only; copy it first "
        f"(gcloud storage cp {path} .)."
      )
    if path is None or str(path).endswith(".gguf"):
      return gguf_loader.load_gguf(path, **kwargs)
    directory = storage.as_path(path)
    if not directory.is_dir():
      raise UserError(f"--model {path}: neither a .gguf file nor a checkpoint directory.")
    if not (directory / "tokenizer.json").is_file():
      raise UserError(f"--model {path}: no tokenizer.json in the checkpoint directory.")
    config, model = checkpoints_hf.load_hf_checkpoint(directory, **kwargs)
    return config, model, tokenizer.load_tokenizer(directory)
  except (ValueError, OSError, SafetensorError) as e:
    raise UserError(f"--model {path or 'SmolLM2 (default)'}: {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split())
  return text or type(e).__name__


def prepare(cfg: RunConfig, warn: Callable[[str], None] = _stderr, mesh=None) -> Prepared:
  """Loads the model and tokenizer, tokenizes the data and builds the evaluation.

  ``mesh``: load the parameters straight into their shardings on it (see ``load_model``).

  Raises:
    UserError: naming the flag or file whose input cannot be used.
  """
  from mofo_jax.finetune import evaluation, user_data

  d = cfg.data
  loaded = None if d.source == "arithmetic" else user_data.load(cfg)
  model_config, model, tok = load_model(cfg.model, mesh)
  if tok.eos_token_id is None:
    warn(
      f"warning: --model {cfg.model.path}: the tokenizer names no end-of-sequence token "
      "(no eos_token in tokenizer_config.json): examples are trained without one, so the "
      "model does not learn to stop"
    )
  hf_tok = tok.tokenizer
  if loaded is None:
    try:
      train_examples, task_batches, stop_ids = evaluation.arithmetic_setup(
        hf_tok,
        tok.eos_token_id,
        model_config.vocab_size,
        difficulty=d.difficulty,
        num_train=d.train_examples,
        num_eval=cfg.eval.eval_examples,
        seq_len=d.seq_len,
        eval_batch_size=d.batch_size,
        seed=d.seed,
      )
    except ValueError as e:
      raise UserError(f"--seq-len {d.seq_len}: {_one_line(e)}") from None
  else:
    mine = user_data.setup(loaded, cfg, tok, model_config.vocab_size)
    train_examples, task_batches, stop_ids = mine.train_examples, mine.task_batches, mine.stop_ids
  old_text = evaluation.old_capability_batches(
    hf_tok, d.seq_len, cfg.eval.old_text_batches, d.batch_size, warn=warn
  )
  # Old capability measured at all: the text losses and the general-knowledge cloze prompts.
  cloze = evaluation.cloze_batches(hf_tok, d.batch_size) if cfg.eval.old_text_batches else []
  return Prepared(
    model_config,
    model,
    tok,
    train_examples,
    evaluation.Evaluator(task_batches, stop_ids, old_text, cloze, task_loss=loaded is not None),
    _prepared_key(_resolved(cfg)),
  )


@dataclasses.dataclass
class RunResult:
  """What a run returns.

  Attributes:
    config: the config that ran (paths made absolute, the schedule of a resumed run kept).
    records: evaluation records, the pretrained baseline first (when it was measured).
    summary: what ``summary.json`` holds.
    trainer: the trainer, in its final state.
  """

  config: RunConfig
  records: list[dict[str, Any]]
  summary: dict[str, Any]
  trainer: Any


def initialize_distributed(settings, exit_fn: Callable[[int], None] = os._exit) -> None:
  """``jax.distributed.initialize`` that gives up after ``settings.timeout_s`` with one line.

  JAX aborts the process with a C++ stack trace when its peers never connect; a watchdog
  prints what was waited for and exits with status 2 first.
  """
  import jax

  # CPU hosts need an implementation of cross-process collectives; accelerators ignore it.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  done = threading.Event()

  def give_up() -> None:
    if not done.is_set():
      where = settings.coordinator_address or "the cluster's coordinator"
      _stderr(
        f"mofo-finetune: error: --distributed: no answer from {where} within "
        f"{settings.timeout_s} s (--distributed-timeout): are all "
        f"{settings.num_processes or 'the'} processes started?"
      )
      sys.stderr.flush()
      exit_fn(2)

  timer = threading.Timer(settings.timeout_s, give_up)
  timer.daemon = True
  timer.start()
  try:
    jax.distributed.initialize(
      coordinator_address=settings.coordinator_address,
      num_processes=settings.num_processes,
      process_id=settings.process_id,
      # Longer than the watchdog, so that the message above comes instead of JAX's abort.
      initialization_timeout=settings.timeout_s + 60,
    )
  except (ValueError, RuntimeError) as e:
    raise UserError(f"--distributed: {_one_line(e)}") from None
  finally:
    done.set()
    timer.cancel()


def _resolved(cfg: RunConfig) -> RunConfig:
  """Absolute paths (URLs kept), so that a run resumed from another directory compares equal."""

  def absolute(p):
    if p is None:
      return None
    try:
      storage.require_client(p)
    except storage.MissingClient as e:
      raise UserError(str(e)) from None
    return storage.resolve(p)

  data = cfg.data
  if data.source != "arithmetic":
    data = dataclasses.replace(data, source=absolute(data.source))
  if data.chat_template not in (None, "none"):
    data = dataclasses.replace(data, chat_template=absolute(data.chat_template))
  return dataclasses.replace(
    cfg,
    model=dataclasses.replace(cfg.model, path=absolute(cfg.model.path)),
    data=data,
    eval=dataclasses.replace(cfg.eval, eval_data=absolute(cfg.eval.eval_data)),
    output=dataclasses.replace(
      cfg.output,
      output_dir=absolute(cfg.output.output_dir),
      checkpoint_dir=absolute(cfg.output.checkpoint_dir),
    ),
  )


def _saved_config(path, flag: str) -> RunConfig | None:
  file = path / checkpointing.RUN_CONFIG
  if not file.is_file():
    return None
  try:
    return RunConfig.from_dict(json.loads(file.read_text()))
  except (ValueError, TypeError) as e:
    raise UserError(
      f"{flag} {path}: unreadable {checkpointing.RUN_CONFIG}: {_one_line(e)}"
    ) from None


def check_outputs(cfg: RunConfig) -> RunConfig:
  """Refuses outputs that would overwrite something silently; returns the config to run.

  * The saved model and the checkpoints never go into (or around) the input model.
  * A non-empty output or checkpoint directory is refused unless ``resume`` (it must then be
    this run's: its ``run_config.json`` must agree on every setting that changes the
    optimization, unless ``allow_config_change``) or ``overwrite``.
  * ``resume`` needs an existing checkpoint directory.

  A resumed run that extends ``steps`` keeps the schedule horizon it started with.

  Raises:
    UserError: naming the flag, the directory and what to pass instead.

  Example:
    >>> import tempfile
    >>> from mofo_jax.finetune.run_config import OutputSettings
    >>> mine = Path(tempfile.mkdtemp())
    >>> _ = (mine / "notes.txt").write_text("keep")
    >>> try:
    ...   check_outputs(RunConfig(output=OutputSettings(output_dir=str(mine))))
    ... except UserError as e:
    ...   print(str(e).split(": ")[0].endswith("already holds files"))
    True
  """
  out = cfg.output
  dirs = {"--output-dir": out.output_dir, "--checkpoint-dir": out.checkpoint_dir}
  if cfg.model.path is not None:
    model = cfg.model.path
    targets = {"--output-dir": out.output_dir and storage.as_path(out.output_dir) / "model"}
    targets["--checkpoint-dir"] = out.checkpoint_dir and storage.as_path(out.checkpoint_dir)
    for flag, target in targets.items():
      if target and storage.overlap(target, model):
        raise UserError(
          f"{flag} {dirs[flag]}: writing {target} would replace the input model {model}; "
          "choose another directory."
        )
  if (
    out.output_dir
    and out.checkpoint_dir
    and storage.as_path(out.output_dir) == storage.as_path(out.checkpoint_dir)
  ):
    raise UserError("--output-dir and --checkpoint-dir must be different directories.")
  if out.resume and not storage.as_path(out.checkpoint_dir).is_dir():
    raise UserError(
      f"--resume: the checkpoint directory {out.checkpoint_dir} does not exist "
      "(drop --resume to start a new run)."
    )
  for flag, d in dirs.items():
    if d is None:
      continue
    path = storage.as_path(d)
    if path.exists() and not path.is_dir():
      raise UserError(f"{flag} {d}: exists and is not a directory.")
    if not path.is_dir() or not any(path.iterdir()):
      continue
    saved = _saved_config(path, flag)
    if out.resume:
      if saved is None:
        raise UserError(
          f"{flag} {d} holds files of something other than a mofo-finetune run "
          f"(no {checkpointing.RUN_CONFIG}); choose another directory."
        )
      if (
        cfg.optimizer.total_steps == cfg.steps
        and cfg.optimizer.total_steps != saved.optimizer.total_steps
      ):
        # A horizon that merely follows --steps: changing --steps keeps the learning-rate
        # schedule the run has followed so far (an explicit --decay-steps is compared below).
        cfg = dataclasses.replace(
          cfg,
          optimizer=dataclasses.replace(cfg.optimizer, total_steps=saved.optimizer.total_steps),
        )
      diff = differences(saved, cfg)
      if diff and not out.allow_config_change:
        raise UserError(
          f"--resume: {flag} {d} holds a run with other settings ("
          + "; ".join(diff)
          + "): resuming would mix two optimizations. Pass the same settings, or "
          "--allow-config-change to resume anyway."
        )
    elif not out.overwrite:
      what = "another run" if saved is not None else "files"
      raise UserError(
        f"{flag} {d} already holds {what}: pass --resume to continue it, --overwrite to "
        "replace it, or choose another directory."
      )
  return cfg


def _require_shared(directory: str) -> None:
  """Refuses a checkpoint directory that not every process of the run sees.

  Raises:
    UserError: on every process, naming the processes that do not see it.
  """
  import jax

  blind = checkpointing.processes_not_sharing(directory)
  if 0 in blind:
    raise UserError(
      f"--checkpoint-dir {directory}: process 0 cannot write a file there (a file by that "
      "name, or no permission?); choose a directory it can write."
    )
  if blind:
    raise UserError(
      f"--checkpoint-dir {directory}: process(es) {', '.join(map(str, blind))} of "
      f"{jax.process_count()} cannot see the files process 0 writes there (each host's own "
      "disk?), so no host would hold a whole checkpoint; use a directory every host "
      "shares, e.g. gs://BUCKET/PATH."
    )


def _with_fingerprint(cfg: RunConfig, model) -> RunConfig:
  """``cfg`` with the pretrained weights' fingerprint; a resume refuses other weights.

  A run with checkpoints records the hash of the weights it started from
  (``distance.fingerprint``): a resume re-reads the pretrained copy from ``--model`` rather
  than from the checkpoint, so a changed model would silently change the distance metrics.

  Raises:
    UserError: resuming a run that recorded other weights (unless ``allow_config_change``).
  """
  from flax import nnx

  from mofo_jax.finetune import distance

  out = cfg.output
  if out.checkpoint_dir is None:
    return cfg
  fingerprint = distance.fingerprint(nnx.state(model, nnx.Param))
  saved = (
    _saved_config(storage.as_path(out.checkpoint_dir), "--checkpoint-dir") if out.resume else None
  )
  recorded = saved and saved.model.fingerprint
  if recorded and recorded != fingerprint and not out.allow_config_change:
    raise UserError(
      f"--model {cfg.model.path or 'SmolLM2 (default)'}: its weights are not those the run in "
      f"--checkpoint-dir {out.checkpoint_dir} started from (fingerprint {fingerprint[:12]}, "
      f"recorded {recorded[:12]}): the distance from pretrained would be measured from another "
      "model. Pass the run's model, or --allow-config-change to resume anyway."
    )
  return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, fingerprint=fingerprint))


def _clear_checkpoints(directory) -> None:
  """With ``overwrite``: removes a previous run's steps and run files (nothing else)."""
  for entry in storage.as_path(directory).iterdir():
    if checkpointing.is_step_dir(entry.name) and entry.is_dir():
      entry.rmtree(missing_ok=True)
    elif entry.name in (checkpointing.RUN_CONFIG, checkpointing.BASELINE):
      entry.unlink(missing_ok=True)


def run(
  cfg: RunConfig,
  prepared: Prepared | None = None,
  *,
  log: Callable[[str], None] = print,
  warn: Callable[[str], None] = _stderr,
) -> RunResult:
  """Runs a whole fine-tuning run as ``cfg`` describes it.

  Args:
    cfg: the run.
    prepared: the result of :func:`prepare` for the same model, data and evaluation settings,
      to share one loaded model between several runs (the demos); None loads it here.
    log: receives the summary table (on process 0).
    warn: receives warnings.

  Returns:
    The run's records, summary and trainer.

  Raises:
    UserError: a setting, flag or file that cannot be used (the message names it).
    mofo_jax.finetune.train.TrainingDiverged: the loss became NaN or Inf.
    KeyboardInterrupt: on Ctrl-C, after the last finished step was saved.
    mofo_jax.finetune.preemption.Preempted: on SIGTERM, after every process saved one agreed
      step.
  """
  cfg.validate()
  if cfg.distributed.enabled:
    initialize_distributed(cfg.distributed)
  import jax

  from mofo_jax.finetune import train
  from mofo_jax.finetune import data as data_lib

  started = time.perf_counter()
  cfg = _resolved(cfg)
  ckpt = cfg.output.checkpoint_dir
  # Before check_outputs: on per-host disks each process would judge its own directory
  # differently. Not in the input model, which check_outputs refuses without writing there.
  if ckpt and not (cfg.model.path and storage.overlap(ckpt, cfg.model.path)):
    _require_shared(ckpt)
  cfg = check_outputs(cfg)
  lead = jax.process_index() == 0  # the process that writes files and prints
  d = cfg.data
  try:
    mesh = train.make_mesh(cfg.mesh)
  except ValueError as e:
    raise UserError(f"--mesh {cfg.mesh}: {_one_line(e)}") from None
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  micro = d.batch_size // d.grad_accum
  if micro % shards:
    raise UserError(
      f"--batch-size {d.batch_size} / --grad-accum {d.grad_accum} = {micro} rows per "
      f"micro-batch cannot be split over the {shards} data x fsdp shards of --mesh {cfg.mesh}."
    )
  if prepared is None:
    loaded_here, prepared = True, prepare(cfg, warn, mesh)
  elif prepared.key != _prepared_key(cfg):
    raise ValueError("prepared was built from other model, data or evaluation settings.")
  else:
    loaded_here = False
  cfg = _with_fingerprint(cfg, prepared.model)
  trainer = train.make_trainer(
    prepared.model, cfg.optimizer, cfg.mesh, d.grad_accum, cfg.eval.distance_metrics
  )
  if loaded_here:
    # The trainer has its own copy of the weights (and the pretrained copy where the user put
    # it): the loaded model would otherwise hold one more copy on the devices for the whole run.
    prepared = dataclasses.replace(prepared, model=None)
  try:
    batches = data_lib.batch_iterator(
      prepared.train_examples,
      d.batch_size,
      d.seq_len,
      seed=d.seed,
      num_epochs=None,
      truncate=d.truncate,
      pad_id=prepared.tokenizer.pad_token_id or 0,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
  except ValueError as e:
    raise UserError(f"--data {d.source}: {_one_line(e)}") from None

  out = storage.as_path(cfg.output.output_dir) if cfg.output.output_dir else None
  ckpt_dir = storage.as_path(cfg.output.checkpoint_dir) if cfg.output.checkpoint_dir else None
  config_json = cfg.to_dict()
  if lead:
    if ckpt_dir is not None:
      if cfg.output.overwrite and ckpt_dir.is_dir():
        _clear_checkpoints(ckpt_dir)
      ckpt_dir.mkdir(parents=True, exist_ok=True)
      checkpointing.write_json_atomic(ckpt_dir / checkpointing.RUN_CONFIG, config_json)
    if out is not None:
      out.mkdir(parents=True, exist_ok=True)
      checkpointing.write_json_atomic(out / checkpointing.RUN_CONFIG, config_json)
  loop = train.LoopConfig(
    steps=cfg.steps,
    eval_every=cfg.eval.eval_every,
    checkpoint_every=cfg.output.checkpoint_every,
    checkpoint_dir=cfg.output.checkpoint_dir,
    metrics_path=str(out / "metrics.jsonl") if out and lead else None,
    progress=cfg.output.progress and lead,
    eval_at_start=cfg.eval.at_start,
    keep_checkpoints=cfg.output.keep_checkpoints,
  )
  records = train.run(
    trainer,
    batches,
    loop,
    prepared.evaluator,
    resume=cfg.output.resume,
    # tensorboardX writes local files only.
    tensorboard_dir=str(out / "tb") if out and lead and not storage.is_remote(out) else None,
    warn=warn,
  )
  wall = time.perf_counter() - started
  first, last = records[0], records[-1]
  before = first if first["step"] == 0 else None
  summary = {"config": config_json, "wall_time_s": wall, "before": before, "after": last}
  if lead:
    log(format_summary(before or {}, last, wall))
  if out is not None:
    _save_model(trainer, prepared, out / "model", lead, cfg.model.path)
    if lead:
      checkpointing.write_json_atomic(out / "summary.json", summary)
  return RunResult(cfg, records, summary, trainer)


def _save_model(trainer, prepared, target, lead: bool, source: str | None) -> None:
  """The fine-tuned model, tokenizer and generation config (``source``'s, or the tokenizer's
  special ids) as a Hugging Face directory at ``target``.

  Every process joins the save (params may span hosts; it copies one tensor at a time to the
  host and process 0 writes), so no device ever holds the whole model. A ``gs://`` target is
  written to a local temporary directory first and uploaded with ``config.json`` last.
  """
  from mofo_jax.finetune import checkpoints_hf, generate, tokenizer

  if not storage.is_remote(target):
    checkpoints_hf.save_hf_checkpoint(trainer.model(), prepared.model_config, target)
    if lead:
      tokenizer.save_tokenizer(prepared.tokenizer, target)
      generate.save_generation_config(prepared.tokenizer, target, source)
    return
  # Every process passes the same path (the save synchronises on it); process 0 alone writes.
  staging = Path(tempfile.gettempdir()) / f"mofo-model-{checkpointing.common_token()}"
  try:
    checkpoints_hf.save_hf_checkpoint(trainer.model(), prepared.model_config, staging / "model")
    if lead:
      tokenizer.save_tokenizer(prepared.tokenizer, staging / "model")
      generate.save_generation_config(prepared.tokenizer, staging / "model", source)
      storage.upload_dir(staging / "model", target, last="config.json")
  finally:
    if lead:
      shutil.rmtree(staging, ignore_errors=True)


def format_summary(before: dict, after: dict, wall: float) -> str:
  """A before/after table of the evaluation metrics."""
  keys = [k for k in after if k not in ("kind", "step")]
  lines = [f"{'metric':<24}{'before':>12}{'after':>12}"]
  for k in keys:
    lines.append(f"{k:<24}{before.get(k, float('nan')):>12.4f}{after[k]:>12.4f}")
  lines.append(f"steps {after['step']}, wall time {wall:.1f} s")
  return "\n".join(lines)
