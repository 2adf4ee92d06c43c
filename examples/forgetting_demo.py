"""The forgetting demo: fine-tune a real pretrained LLM with AdamW and with MoFO, side by side.

Both runs start from the same SmolLM2-135M-Instruct weights, see the same arithmetic word
problems in the same order with the same learning-rate schedule, and are measured the same way:

* new-task skill: greedy exact-match accuracy on held-out problems, and the loss on the answer
  tokens (not on the random numbers of the question);
* old capability: next-token loss on held-out general text the model knew (Python's pydoc
  topics, the World English Bible) - its rise is the forgetting;
* how far the weights moved: L2 distance from the pretrained weights, fraction ever changed.

Run: python examples/forgetting_demo.py            (about 8 minutes on 2 CPU cores)
     python examples/forgetting_demo.py --quick    (6 steps each: a smoke run)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
  from mofo_jax.finetune.run_config import RunConfig

DEFAULTS = {"steps": 40, "eval_every": 20, "task_eval": 64, "old_batches": 2}
QUICK = {"steps": 6, "eval_every": 0, "task_eval": 24, "old_batches": 1}


def parse_args(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
  )
  p.add_argument(
    "--quick", action="store_true", help="6 steps per optimizer and smaller evaluations"
  )
  p.add_argument("--steps", type=int, default=None, help="optimizer steps per run")
  p.add_argument(
    "--eval-every", type=int, default=None, help="steps between evaluations (0: start and end)"
  )
  p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate, both optimizers")
  p.add_argument("--fraction", type=float, default=0.1, help="MoFO's fraction per block")
  p.add_argument("--optimizers", default="adamw,mofo", help="comma-separated optimizer names")
  p.add_argument("--difficulty", type=int, default=2, help="arithmetic difficulty")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--seq-len", type=int, default=64)
  p.add_argument("--warmup-steps", type=int, default=5)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--model", default=None, help="a .gguf file or HF directory (default: SmolLM2)")
  p.add_argument("--out-dir", default="forgetting_demo_out", help="table, JSON and PNG go here")
  p.add_argument("--overwrite", action="store_true", help="replace an earlier run's results")
  args = p.parse_args(argv)
  preset = QUICK if args.quick else DEFAULTS
  args.steps = args.steps or preset["steps"]
  args.eval_every = preset["eval_every"] if args.eval_every is None else args.eval_every
  args.task_eval, args.old_batches = preset["task_eval"], preset["old_batches"]
  args.eval_at_start, args.scan_layers = True, True
  return args


def run_config(args, **optimizer) -> RunConfig:
  """The run the demo's flags describe; ``optimizer`` overrides its optimizer settings."""
  from mofo_jax.finetune import run_config as rc
  from mofo_jax.finetune.optimizers import OptimizerConfig

  settings = {
    "name": "mofo",
    "learning_rate": args.lr,
    "fraction": args.fraction,
    "warmup_steps": args.warmup_steps,
    "total_steps": args.steps,
    "seed": args.seed,
  }
  return rc.RunConfig(
    # Stacked layers compile several times faster; MoFO still ranks every layer's matrices on
    # their own (Half Fine-Tuning, in the ablations, needs separate layers).
    model=rc.ModelSettings(path=args.model, scan_layers=args.scan_layers),
    data=rc.DataSettings(
      difficulty=args.difficulty,
      train_examples=args.steps * args.batch_size * 2,
      seq_len=args.seq_len,
      batch_size=args.batch_size,
      seed=args.seed,
    ),
    optimizer=OptimizerConfig(**{**settings, **optimizer}),
    steps=args.steps,
    mesh="data=1",
    eval=rc.EvalSettings(
      eval_examples=args.task_eval,
      old_text_batches=args.old_batches,
      eval_every=args.eval_every,
      at_start=args.eval_at_start,
    ),
  )


def fine_tune(config: RunConfig, prepared, label: str) -> dict:
  """One run from the pretrained weights (the same seed: the same problems in the same order)."""
  from mofo_jax.finetune import runner

  print(f"\n== {label}")
  start = time.perf_counter()
  result = runner.run(config, prepared)
  return {
    "records": result.records,
    "wall_s": time.perf_counter() - start,
    "optimizer": dataclasses.asdict(config.optimizer),
  }


def run_all(args) -> dict:
  """Fine-tunes with each optimizer; returns the settings and each run's evaluation records."""
  from mofo_jax.finetune import runner

  names = args.optimizers.split(",")
  prepared = runner.prepare(run_config(args))
  runs = {name: fine_tune(run_config(args, name=name), prepared, name) for name in names}
  return {"settings": vars(args), "runs": runs}


LABELS = {"adamw": "AdamW", "mofo": "MoFO"}


def table(results: dict) -> str:
  """A markdown table: pretrained, then each optimizer after fine-tuning."""
  runs = results["runs"]
  first = next(iter(runs.values()))["records"][0]
  rows = [
    ("new task: answer accuracy", "task_accuracy", "{:.1%}"),
    ("new task: answer-token loss", "task_answer_loss", "{:.3f}"),
  ]
  for k in first:
    if k.endswith("_loss") and not k.startswith("task"):
      rows.append((f"old: {k[:-5]} loss", k, "{:.3f}"))
  rows += [
    ("L2 from pretrained", "l2_from_pretrained", "{:.2f}"),
    ("fraction of weights changed", "fraction_changed", "{:.1%}"),
  ]
  names = [LABELS.get(n, n) for n in runs]
  out = ["| metric | pretrained | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
  for label, key, fmt in rows:
    cells = [fmt.format(r["records"][-1][key]) for r in runs.values()]
    out.append(f"| {label} | {fmt.format(first[key])} | " + " | ".join(cells) + " |")
  for k in first:
    if k.endswith("_loss") and not k.startswith("task"):
      rises = [r["records"][-1][k] - first[k] for r in runs.values()]
      out.append(
        f"| rise of {k[:-5]} loss (forgetting) | - | "
        + " | ".join(f"{x:+.3f}" for x in rises)
        + " |"
      )
  out.append(
    "| wall time | - | " + " | ".join(f"{r['wall_s']:.0f} s" for r in runs.values()) + " |"
  )
  return "\n".join(out)


def plot(results: dict, path: Path) -> None:
  """Learning curves, forgetting curves, distance, and forgetting against learning."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  runs = results["runs"]
  first = next(iter(runs.values()))["records"][0]
  old_keys = [k for k in first if k.endswith("_loss") and not k.startswith("task")]
  fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
  for name, run in runs.items():
    rec = run["records"]
    steps = [r["step"] for r in rec]
    label = LABELS.get(name, name)
    axes[0].plot(steps, [r["task_answer_loss"] for r in rec], "o-", label=label)
    old = [sum(r[k] - first[k] for k in old_keys) / max(len(old_keys), 1) for r in rec]
    axes[1].plot(steps, old, "o-", label=label)
    axes[2].plot(steps, [r["l2_from_pretrained"] for r in rec], "o-", label=label)
    axes[3].plot([r["task_answer_loss"] for r in rec], old, "o-", label=label)
  axes[0].set(title="New task: answer-token loss", xlabel="step", ylabel="loss")
  axes[1].set(
    title="Forgetting: rise of old-text loss",
    xlabel="step",
    ylabel=f"mean rise over {', '.join(k[:-5] for k in old_keys)}",
  )
  axes[2].set(title="Distance from pretrained", xlabel="step", ylabel="L2")
  axes[3].set(
    title="Forgetting against learning",
    xlabel="answer-token loss (lower: learned)",
    ylabel="rise of old-text loss",
  )
  axes[3].invert_xaxis()
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend()
  s = results["settings"]
  fig.suptitle(
    f"SmolLM2-135M on arithmetic (difficulty {s['difficulty']}), {s['steps']} steps, "
    f"lr {s['lr']:g}, MoFO fraction {s['fraction']:g}"
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def refuse_to_overwrite(out: Path, names: list[str], overwrite: bool) -> None:
  """Exits with status 2 before any work if an earlier run's result file would be replaced."""
  existing = [out / n for n in names if (out / n).exists()]
  if existing and not overwrite:
    print(
      f"error: {existing[0]} exists (an earlier run's result); pass --overwrite or another "
      "--out-dir",
      file=sys.stderr,
    )
    raise SystemExit(2)


def main(argv=None) -> dict:
  args = parse_args(argv)
  out = Path(args.out_dir)
  refuse_to_overwrite(out, ["results.md", "results.json", "forgetting.png"], args.overwrite)
  out.mkdir(parents=True, exist_ok=True)
  results = run_all(args)
  text = table(results)
  settings = ", ".join(f"{k}={v}" for k, v in results["settings"].items())
  print(f"\nsettings: {settings}\n\n{text}")
  (out / "results.md").write_text(f"settings: {settings}\n\n{text}\n")
  (out / "results.json").write_text(json.dumps(results, indent=2))
  plot(results, out / "forgetting.png")
  print(f"\nwrote {out / 'results.md'}, {out / 'results.json'} and {out / 'forgetting.png'}")
  return results


if __name__ == "__main__":
  main()
