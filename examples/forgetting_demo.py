"""The forgetting demo: fine-tune a real pretrained LLM with AdamW and with MoFO, side by side.

Both runs start from the same SmolLM2-135M-Instruct weights, see the same arithmetic word
problems in the same order with the same learning-rate schedule, and are measured the same way:

* new-task skill: greedy exact-match accuracy on held-out problems, and the loss on the answer
  tokens (not on the random numbers of the question);
* old capability: next-token loss on held-out general text the model knew (Python's pydoc
  topics, the World English Bible) - its rise is the forgetting;
* how far the weights moved: L2 distance from the pretrained weights, fraction ever changed.

* general knowledge: the fraction of cloze prompts the model still completes.

With ``--seeds 0,1,2`` the comparison repeats over data orders and held-out sets, and the table
and figure show the mean and the standard deviation over seeds.

Run: python examples/forgetting_demo.py            (about 8 minutes on 2 CPU cores)
     python examples/forgetting_demo.py --seeds 0,1,2   (three seeds: about 25 minutes)
     python examples/forgetting_demo.py --quick    (6 steps each: a smoke run)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
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
  p.add_argument(
    "--seeds", default="0", help="comma-separated seeds of the data order and held-out sets"
  )
  p.add_argument("--model", default=None, help="a .gguf file or HF directory (default: SmolLM2)")
  p.add_argument("--out-dir", default="forgetting_demo_out", help="table, JSON and PNG go here")
  p.add_argument("--overwrite", action="store_true", help="replace an earlier run's results")
  args = p.parse_args(argv)
  preset = QUICK if args.quick else DEFAULTS
  args.steps = args.steps or preset["steps"]
  args.eval_every = preset["eval_every"] if args.eval_every is None else args.eval_every
  args.task_eval, args.old_batches = preset["task_eval"], preset["old_batches"]
  args.eval_at_start, args.scan_layers = True, True
  try:
    args.seeds = [int(x) for x in args.seeds.split(",")]
  except ValueError:
    p.error(f"--seeds {args.seeds}: give comma-separated integers, e.g. 0,1,2")
  if len(set(args.seeds)) != len(args.seeds):
    p.error(f"--seeds {args.seeds}: a seed is repeated")
  args.seed = args.seeds[0]
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
  """Fine-tunes with each optimizer at each seed.

  Returns:
    ``{"settings": flags, "runs": {optimizer: {"seeds": {seed: run}}}}``, where a run holds its
    evaluation records (the pretrained baseline first), wall time and optimizer settings.
  """
  from mofo_jax.finetune import runner

  names = args.optimizers.split(",")
  runs = {name: {"seeds": {}} for name in names}
  for seed in args.seeds:
    at_seed = argparse.Namespace(**{**vars(args), "seed": seed})
    prepared = runner.prepare(run_config(at_seed))
    for name in names:
      label = f"{name}, seed {seed}"
      runs[name]["seeds"][str(seed)] = fine_tune(run_config(at_seed, name=name), prepared, label)
  return {"settings": vars(args), "runs": runs}


LABELS = {"adamw": "AdamW", "mofo": "MoFO"}


def old_text_keys(record: dict) -> list[str]:
  """The old-text losses a record holds (``pydoc_loss``, ``bible_loss``)."""
  return [k for k in record if k.endswith("_loss") and not k.startswith("task")]


def stat(values: list[float], fmt: str) -> str:
  """One value, or the mean and standard deviation of several, formatted alike."""
  if len(values) == 1:
    return fmt.format(values[0])
  spread = fmt.format(statistics.stdev(values)).lstrip("+")
  return f"{fmt.format(statistics.mean(values))} ± {spread}"


def table(results: dict) -> str:
  """A markdown table: pretrained, then each optimizer after fine-tuning (mean ± sd over seeds)."""
  runs = results["runs"]
  per_seed = {name: list(run["seeds"].values()) for name, run in runs.items()}
  firsts = [r["records"][0] for r in next(iter(per_seed.values()))]
  old = old_text_keys(firsts[0])
  rows = [
    ("new task: answer accuracy", "task_accuracy", "{:.1%}"),
    ("new task: answer-token loss", "task_answer_loss", "{:.3f}"),
  ]
  rows += [(f"old: {k[:-5]} loss", k, "{:.3f}") for k in old]
  if "cloze_accuracy" in firsts[0]:
    rows.append(("old: cloze prompts completed", "cloze_accuracy", "{:.1%}"))
  rows += [
    ("L2 from pretrained", "l2_from_pretrained", "{:.2f}"),
    ("fraction of weights changed", "fraction_changed", "{:.1%}"),
  ]
  names = [LABELS.get(n, n) for n in runs]
  out = ["| metric | pretrained | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
  for label, key, fmt in rows:
    cells = [stat([r["records"][-1][key] for r in seeds], fmt) for seeds in per_seed.values()]
    out.append(f"| {label} | {stat([f[key] for f in firsts], fmt)} | " + " | ".join(cells) + " |")
  for k in old:
    rises = {n: [r["records"][-1][k] - r["records"][0][k] for r in s] for n, s in per_seed.items()}
    cells = [stat(v, "{:+.3f}") for v in rises.values()]
    out.append(f"| rise of {k[:-5]} loss (forgetting) | - | " + " | ".join(cells) + " |")
    if "adamw" in rises and len(firsts) > 1:
      # Seeds pair the runs (same data, same held-out sets): count where each forgot less.
      less = [sum(a < b for a, b in zip(v, rises["adamw"])) for v in rises.values()]
      cells = ["-" if n == "adamw" else f"{c} of {len(firsts)}" for n, c in zip(rises, less)]
      out.append(f"| seeds forgetting less {k[:-5]} than AdamW | - | " + " | ".join(cells) + " |")
  walls = [stat([r["wall_s"] for r in s], "{:.0f}") + " s" for s in per_seed.values()]
  out.append("| wall time | - | " + " | ".join(walls) + " |")
  if len(firsts) > 1:
    out.append(
      f"\nMean ± standard deviation over seeds {', '.join(runs[next(iter(runs))]['seeds'])}."
    )
  return "\n".join(out)


def _curve(seeds: list[dict], value) -> tuple[list[int], list[float], list[float]]:
  """Steps, mean and standard deviation over seeds of ``value(record, first record)``."""
  steps = [r["step"] for r in seeds[0]["records"]]
  per_step = [[value(s["records"][i], s["records"][0]) for s in seeds] for i in range(len(steps))]
  sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in per_step]
  return steps, [statistics.mean(v) for v in per_step], sd


def plot(results: dict, path: Path) -> None:
  """New-task loss, forgetting, cloze, distance over steps, and forgetting against learning."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  runs = results["runs"]
  first = next(iter(next(iter(runs.values()))["seeds"].values()))["records"][0]
  old = old_text_keys(first)
  panels = [
    ("New task: answer-token loss", "loss", lambda r, f: r["task_answer_loss"]),
    (
      "Forgetting: rise of old-text loss",
      f"mean rise over {', '.join(k[:-5] for k in old)}",
      lambda r, f: sum(r[k] - f[k] for k in old) / max(len(old), 1),
    ),
    ("Distance from pretrained", "L2", lambda r, f: r["l2_from_pretrained"]),
  ]
  if "cloze_accuracy" in first:
    panels.insert(
      2, ("General knowledge kept", "cloze prompts completed", lambda r, f: r["cloze_accuracy"])
    )
  fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4.6 * (len(panels) + 1), 4.2))
  for name, run in runs.items():
    seeds = list(run["seeds"].values())
    label = LABELS.get(name, name)
    curves = [_curve(seeds, value) for _, _, value in panels]
    for ax, (steps, mean, sd) in zip(axes, curves):
      ax.errorbar(steps, mean, yerr=sd, fmt="o-", capsize=3, label=label)
    (_, loss, loss_sd), (_, rise, rise_sd) = curves[0], curves[1]
    axes[-1].errorbar(loss, rise, xerr=loss_sd, yerr=rise_sd, fmt="o-", capsize=3, label=label)
  for ax, (title, ylabel, _) in zip(axes, panels):
    ax.set(title=title, xlabel="step", ylabel=ylabel)
  axes[-1].set(
    title="Forgetting against learning",
    xlabel="answer-token loss (lower: learned)",
    ylabel="rise of old-text loss",
  )
  axes[-1].invert_xaxis()
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend()
  s = results["settings"]
  seeds = s["seeds"]
  spread = f", mean ± sd over {len(seeds)} seeds" if len(seeds) > 1 else ""
  fig.suptitle(
    f"SmolLM2-135M on arithmetic (difficulty {s['difficulty']}), {s['steps']} steps, "
    f"lr {s['lr']:g}, MoFO fraction {s['fraction']:g}{spread}"
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
