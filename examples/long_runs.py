"""The paper's regime on CPU: long fine-tuning runs at one learning rate, evaluated every 50 steps.

Every run fine-tunes SmolLM2-135M from the same pretrained weights on the same arithmetic
problems in the same order, with the paper's protocol: the same peak learning rate (2e-5) and
a cosine schedule for every optimizer, 400 steps. AdamW at 1e-5 adds a point to the frontier.
Each evaluation measures new-task skill (answer accuracy and loss), forgetting (pydoc and Bible
loss, the general-knowledge cloze prompts) and the distance from the pretrained weights.

Each run checkpoints every 50 steps: run the script again (same flags) and it resumes every
unfinished run where it stopped and skips the finished ones, so the sweep survives a killed
process or the end of a session. ``--report`` writes the table (per evaluation step) and the
figures from whatever has finished, without training.

Run: python examples/long_runs.py                 (6 runs of 400 steps: ~35 min each, 2 CPU cores)
     python examples/long_runs.py --runs adamw,mofo-0.1
     python examples/long_runs.py --report
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# name -> (label, optimizer settings that differ from the sweep's)
RUNS = {
  "adamw": ("AdamW", dict(name="adamw")),
  "mofo-0.1": ("MoFO 0.1", dict(name="mofo", fraction=0.1)),
  "mofo-0.15": ("MoFO 0.15", dict(name="mofo", fraction=0.15)),
  "adamw-lr1e-5": ("AdamW lr 1e-5", dict(name="adamw", learning_rate=1e-5)),
  "adamw-l2": ("AdamW + L2 to pretrained", dict(name="adamw-l2")),
  "hft": ("Half Fine-Tuning", dict(name="hft")),
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
  )
  p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {list(RUNS)}")
  p.add_argument("--steps", type=int, default=400)
  p.add_argument("--eval-every", type=int, default=50)
  p.add_argument("--lr", type=float, default=2e-5, help="peak learning rate of every run")
  p.add_argument(
    "--l2", type=float, default=1.0, help="strength of the L2 baseline (as examples/ablations.py)"
  )
  p.add_argument("--difficulty", type=int, default=2)
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--seq-len", type=int, default=64)
  p.add_argument("--warmup-steps", type=int, default=10)
  p.add_argument("--task-eval", type=int, default=128, help="held-out problems scored")
  p.add_argument("--old-batches", type=int, default=4, help="batches of pydoc / Bible text")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--model", default=None, help="a .gguf file or HF directory (default: SmolLM2)")
  p.add_argument("--out-dir", default="long_runs_out")
  p.add_argument("--report", action="store_true", help="only write the table and figures")
  args = p.parse_args(argv)
  unknown = [r for r in args.runs.split(",") if r not in RUNS]
  if unknown:
    p.error(f"--runs: unknown run {unknown[0]!r}; known: {', '.join(RUNS)}")
  return args


def run_config(args, name: str):
  """The run ``name`` of the sweep, writing under ``--out-dir/name``."""
  from mofo_jax.finetune import run_config as rc
  from mofo_jax.finetune.optimizers import OptimizerConfig

  settings = dict(
    learning_rate=args.lr,
    warmup_steps=args.warmup_steps,
    total_steps=args.steps,
    seed=args.seed,
  )
  if RUNS[name][1]["name"] == "adamw-l2":  # the other runs keep the default, unused
    settings["l2_strength"] = args.l2
  ckpt = Path(args.out_dir) / name / "checkpoints"
  return rc.RunConfig(
    # Half Fine-Tuning freezes matrices layer by layer: every run keeps the layers separate.
    model=rc.ModelSettings(path=args.model and str(Path(args.model).resolve()), scan_layers=False),
    data=rc.DataSettings(
      difficulty=args.difficulty,
      train_examples=max(4000, args.steps * args.batch_size),
      seq_len=args.seq_len,
      batch_size=args.batch_size,
      seed=args.seed,
    ),
    optimizer=OptimizerConfig(**{**settings, **RUNS[name][1]}),
    steps=args.steps,
    mesh="data=1",
    eval=rc.EvalSettings(
      eval_examples=args.task_eval, old_text_batches=args.old_batches, eval_every=args.eval_every
    ),
    output=rc.OutputSettings(
      output_dir=str(Path(args.out_dir) / name / "results"),
      checkpoint_dir=str(ckpt),
      checkpoint_every=args.eval_every,
      keep_checkpoints=1,
      resume=(ckpt / "run_config.json").exists(),
      progress=False,
    ),
  )


def train(args) -> None:
  """Runs (or resumes) every unfinished run of ``--runs``, one after another."""
  from mofo_jax.finetune import run_config as rc
  from mofo_jax.finetune import runner

  prepared = None
  for name in args.runs.split(","):
    cfg = run_config(args, name)
    done = Path(cfg.output.output_dir) / "summary.json"
    if done.exists():
      # Skip only the same run: a finished run of other settings would mix into the report.
      saved = rc.RunConfig.from_dict(json.loads(done.read_text())["config"])
      changed = rc.differences(saved, cfg)
      if cfg.optimizer.name != "adamw-l2":  # the strength only acts in the L2 run
        changed = [c for c in changed if not c.startswith("optimizer.l2_strength")]
      changed += [f"{k}: {getattr(saved, k)!r} -> {getattr(cfg, k)!r}" for k in ("steps", "eval")
                  if getattr(saved, k) != getattr(cfg, k)]  # fmt: skip
      if changed:
        raise rc.UserError(
          f"--out-dir {args.out_dir}: run {name} finished with other settings "
          f"({'; '.join(changed)}); use another --out-dir"
        )
      print(f"== {name}: finished earlier ({done})")
      continue
    print(f"== {name}: {'resuming' if cfg.output.resume else 'starting'}", flush=True)
    prepared = prepared or runner.prepare(cfg)
    start = time.perf_counter()
    runner.run(cfg, prepared)
    timing = Path(args.out_dir) / name / "wall_times.jsonl"
    with timing.open("a") as f:
      f.write(json.dumps({"session_s": time.perf_counter() - start}) + "\n")


def evaluations(out_dir: Path, name: str) -> list[dict]:
  """The evaluation records a run has logged so far (the pretrained baseline first)."""
  path = out_dir / name / "results" / "metrics.jsonl"
  if not path.exists():
    return []
  records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return [r for r in records if r.get("kind") == "eval"]


COLUMNS = [
  ("answer loss", lambda r, b: f"{r['task_answer_loss']:.3f}"),
  ("accuracy", lambda r, b: f"{r['task_accuracy']:.1%}"),
  ("pydoc rise", lambda r, b: f"{r['pydoc_loss'] - b['pydoc_loss']:+.3f}"),
  ("Bible rise", lambda r, b: f"{r['bible_loss'] - b['bible_loss']:+.3f}"),
  ("cloze kept", lambda r, b: f"{r['cloze_accuracy']:.1%}"),
  ("L2", lambda r, b: f"{r['l2_from_pretrained']:.2f}"),
  ("changed", lambda r, b: f"{r['fraction_changed']:.1%}"),
]


def table(runs: dict[str, list[dict]]) -> str:
  """Markdown: one row per run and evaluation step."""
  out = ["| run | step | " + " | ".join(c for c, _ in COLUMNS) + " |"]
  out.append("|---|---|" + "---|" * len(COLUMNS))
  for name, records in runs.items():
    for r in records:
      cells = " | ".join(f(r, records[0]) for _, f in COLUMNS)
      out.append(f"| {RUNS[name][0]} | {r['step']} | {cells} |")
  return "\n".join(out)


def _interpolate(x: float, points: list[tuple[float, float]]) -> float | None:
  """y at ``x`` on the polyline through ``points`` (sorted by x); None outside its range."""
  points = sorted(points)
  for (x0, y0), (x1, y1) in zip(points, points[1:]):
    if x0 <= x <= x1:
      return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
  return None


def equal_learning(runs: dict[str, list[dict]], reference: str = "adamw") -> str:
  """Markdown: each run's forgetting next to the reference's at the same answer-token loss.

  The reference's forgetting is interpolated along its own trajectory (answer loss, rise) at
  the loss the run reached, so a run that learns more slowly per step is compared with the
  reference when it had learned as much, not after as many steps.
  """
  if reference not in runs or len(runs) < 2:
    return ""
  ref = runs[reference]
  out = [
    f"| run | step | answer loss | pydoc rise | {RUNS[reference][0]}'s at that loss | "
    f"Bible rise | {RUNS[reference][0]}'s at that loss |",
    "|---|---|---|---|---|---|---|",
  ]
  for name, records in runs.items():
    if name == reference:
      continue
    for r in records[1:]:
      cells = []
      for key in ("pydoc_loss", "bible_loss"):
        line = [(e["task_answer_loss"], e[key] - ref[0][key]) for e in ref]
        at = _interpolate(r["task_answer_loss"], line)
        cells += [f"{r[key] - records[0][key]:+.3f}", "-" if at is None else f"{at:+.3f}"]
      out.append(
        f"| {RUNS[name][0]} | {r['step']} | {r['task_answer_loss']:.3f} | "
        + " | ".join(cells)
        + " |"
      )
  return "\n".join(out)


def plot(runs: dict[str, list[dict]], path: Path, title: str) -> None:
  """Curves over steps (skill, forgetting, knowledge, distance) and the frontier, one color a run."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = [
    ("New task: answer-token loss", lambda r, b: r["task_answer_loss"]),
    ("New task: answer accuracy", lambda r, b: r["task_accuracy"]),
    ("Forgetting: rise of pydoc loss", lambda r, b: r["pydoc_loss"] - b["pydoc_loss"]),
    ("Forgetting: rise of Bible loss", lambda r, b: r["bible_loss"] - b["bible_loss"]),
    ("General knowledge: cloze prompts kept", lambda r, b: r["cloze_accuracy"]),
    ("Distance from pretrained (L2)", lambda r, b: r["l2_from_pretrained"]),
  ]
  fig, axes = plt.subplots(2, 4, figsize=(20, 8.5))
  flat = list(axes.flat)
  frontier = [("pydoc", flat[6]), ("Bible", flat[7])]
  for name, records in runs.items():
    style = dict(marker="o", ms=3, label=RUNS[name][0])
    steps = [r["step"] for r in records]
    for ax, (_, value) in zip(flat, panels):
      ax.plot(steps, [value(r, records[0]) for r in records], **style)
    loss = [r["task_answer_loss"] for r in records]
    for corpus, ax in frontier:
      key = f"{corpus.lower()}_loss"
      ax.plot(loss, [r[key] - records[0][key] for r in records], **style)
  for ax, (heading, _) in zip(flat, panels):
    ax.set(title=heading, xlabel="step")
  for corpus, ax in frontier:
    ax.set(
      title=f"Forgetting ({corpus}) against learning",
      xlabel="answer-token loss (lower: learned more)",
      ylabel=f"rise of {corpus} loss",
    )
    ax.invert_xaxis()
  for ax in flat:
    ax.grid(alpha=0.3)
  flat[0].legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def report(args) -> None:
  """Writes long_runs.md, long_runs.json and long_runs.png from the runs logged so far."""
  out = Path(args.out_dir)
  runs = {n: r for n in args.runs.split(",") if (r := evaluations(out, n))}
  if not runs:
    print(f"error: --out-dir {out}: no run has logged an evaluation yet", file=sys.stderr)
    raise SystemExit(2)
  text = table(runs)
  if paired := equal_learning(runs):
    text += "\n\nAt equal learning (the reference interpolated at each run's answer loss):\n\n"
    text += paired
  (out / "long_runs.md").write_text(text + "\n")
  (out / "long_runs.json").write_text(json.dumps(runs, indent=1))
  title = (
    f"SmolLM2-135M, arithmetic difficulty {args.difficulty}, lr {args.lr:g} (cosine, warmup "
    f"{args.warmup_steps}), batch {args.batch_size} x {args.seq_len} tokens"
  )
  plot(runs, out / "long_runs.png", title)
  print(text)
  print(f"\nwrote {out / 'long_runs.md'}, {out / 'long_runs.json'} and {out / 'long_runs.png'}")


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.report:
    report(args)
    return
  from mofo_jax.finetune.run_config import UserError

  try:
    train(args)
  except UserError as e:  # one line, status 2
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
  report(args)


if __name__ == "__main__":
  main()
