"""Ablations of the forgetting demo: the forgetting-vs-learning frontier of MoFO and baselines.

Every run fine-tunes SmolLM2-135M from the same pretrained weights on the same arithmetic
problems in the same order, with the same schedule; only the optimizer differs:

* learning-rate sweeps of AdamW and of MoFO (fraction 0.1): the frontier;
* MoFO's fraction: 0.05, 0.1, 0.2, 0.4, 1.0 (1.0 updates every entry: Adam);
* the score MoFO ranks by: momentum (MoFO), gradient, Adam update, random;
* the paper's baselines: L2 regularisation toward the pretrained weights, Half Fine-Tuning.

Writes ablations.md (a table), ablations.json and ablations.png (forgetting against learning)
to --out-dir, results.json after each run so that an interrupted sweep keeps what it measured.

Run: python examples/ablations.py   (15 runs of 20 steps; 13 of them took 40 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import forgetting_demo

GROUPS = {
  "lr": [("AdamW lr {lr}", dict(name="adamw", learning_rate=lr), lr) for lr in (1e-5, 3e-5, 1e-4)]
  + [("MoFO lr {lr}", dict(name="mofo", learning_rate=lr), lr) for lr in (3e-5, 1e-4, 3e-4)],
  "fraction": [
    (f"MoFO fraction {f}", dict(name="mofo", fraction=f), None) for f in (0.05, 0.2, 0.4, 1.0)
  ],
  "score": [
    (f"MoFO score {s}", dict(name=f"mofo-{s}"), None) for s in ("gradient", "update", "random")
  ],
  "baselines": [
    ("AdamW + L2 to pretrained", dict(name="adamw-l2"), None),
    ("Half Fine-Tuning", dict(name="hft"), None),
  ],
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
  )
  p.add_argument("--groups", default=",".join(GROUPS), help=f"which of {list(GROUPS)}")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--lr", type=float, default=1e-4, help="rate of the non-sweep runs")
  p.add_argument("--fraction", type=float, default=0.1)
  p.add_argument("--l2", type=float, default=1.0, help="strength of the L2 baseline")
  p.add_argument("--difficulty", type=int, default=2)
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--seq-len", type=int, default=64)
  p.add_argument("--warmup-steps", type=int, default=5)
  p.add_argument("--task-eval", type=int, default=48)
  p.add_argument("--old-batches", type=int, default=2)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--model", default=None)
  p.add_argument("--out-dir", default="ablations_out")
  p.add_argument("--overwrite", action="store_true", help="replace an earlier sweep's results")
  args = p.parse_args(argv)
  # Half Fine-Tuning freezes matrices layer by layer: keep the layers separate for every run.
  args.eval_every, args.scan_layers = 0, False
  return args


def runs_of(args):
  """(label, optimizer overrides) of every run, each once (MoFO at lr, fraction 0.1 is shared)."""
  seen, out = set(), []
  for group in args.groups.split(","):
    if group not in GROUPS:
      raise SystemExit(f"unknown group {group!r}; known: {list(GROUPS)}")
    for label, overrides, lr in GROUPS[group]:
      label = label.format(lr=f"{lr:g}" if lr else "")
      if overrides.get("name") == "adamw-l2":
        overrides = {**overrides, "l2_strength": args.l2}
      key = json.dumps(
        {"learning_rate": args.lr, "fraction": args.fraction, **overrides}, sort_keys=True
      )
      if key not in seen:
        seen.add(key)
        out.append((group, label, overrides))
  return out


def frontier_plot(results: dict, path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  base = results["pretrained"]
  old_keys = [k for k in base if k.endswith("_loss") and not k.startswith("task")]
  rise = lambda r: sum(r[k] - base[k] for k in old_keys) / len(old_keys)
  fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
  styles = {"lr": "o", "fraction": "s", "score": "^", "baselines": "D"}
  for ax, (xkey, xlabel) in zip(
    axes,
    [
      ("task_answer_loss", "new task: answer-token loss"),
      ("task_accuracy", "new task: answer accuracy"),
    ],
  ):
    for name in ("AdamW", "MoFO"):
      pts = sorted(
        (r["final"][xkey], rise(r["final"]))
        for r in results["runs"].values()
        if r["group"] == "lr" and r["label"].startswith(name)
      )
      if pts:
        ax.plot(*zip(*pts), "-", alpha=0.5, label=f"{name} learning-rate sweep")
    for r in results["runs"].values():
      ax.plot(r["final"][xkey], rise(r["final"]), styles[r["group"]], color="k", ms=5)
      ax.annotate(
        r["label"],
        (r["final"][xkey], rise(r["final"])),
        fontsize=7,
        xytext=(3, 3),
        textcoords="offset points",
      )
    ax.plot(base[xkey], 0.0, "*", ms=12, color="gold", mec="k", label="pretrained")
    ax.set(xlabel=xlabel, ylabel="forgetting: mean rise of old-text loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  axes[0].invert_xaxis()
  fig.suptitle(
    "Forgetting against learning (down and right is better): SmolLM2-135M, "
    f"{results['settings']['steps']} steps of arithmetic"
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def markdown(results: dict) -> str:
  base = results["pretrained"]
  old_keys = [k for k in base if k.endswith("_loss") and not k.startswith("task")]
  head = (
    "| group | run | accuracy | answer loss | "
    + " | ".join(f"rise of {k[:-5]} loss" for k in old_keys)
    + " | L2 from pretrained | changed | wall |"
  )
  lines = [
    head,
    "|" + "---|" * (7 + len(old_keys)),
    f"| - | pretrained | {base['task_accuracy']:.1%} | {base['task_answer_loss']:.3f} | "
    + " | ".join("0" for _ in old_keys)
    + " | 0 | 0 | - |",
  ]
  for r in results["runs"].values():
    f = r["final"]
    lines.append(
      f"| {r['group']} | {r['label']} | {f['task_accuracy']:.1%} | "
      f"{f['task_answer_loss']:.3f} | "
      + " | ".join(f"{f[k] - base[k]:+.3f}" for k in old_keys)
      + f" | {f['l2_from_pretrained']:.2f} | {f['fraction_changed']:.1%} | "
      f"{r['wall_s']:.0f} s |"
    )
  return "\n".join(lines)


def main(argv=None) -> dict:
  args = parse_args(argv)
  out = Path(args.out_dir)
  forgetting_demo.refuse_to_overwrite(
    out, ["ablations.json", "ablations.md", "ablations.png"], args.overwrite
  )
  out.mkdir(parents=True, exist_ok=True)
  started = time.perf_counter()
  from mofo_jax.finetune import runner

  args.eval_at_start = True
  prepared = runner.prepare(forgetting_demo.run_config(args))
  results = {"settings": vars(args), "pretrained": None, "runs": {}}
  for group, label, overrides in runs_of(args):
    run = forgetting_demo.fine_tune(forgetting_demo.run_config(args, **overrides), prepared, label)
    # Every run starts from the same weights: the pretrained point is measured by the first only.
    if args.eval_at_start:
      results["pretrained"], args.eval_at_start = run["records"][0], False
    results["runs"][label] = {
      "group": group,
      "label": label,
      "final": run["records"][-1],
      "wall_s": run["wall_s"],
      "optimizer": run["optimizer"],
    }
    (out / "ablations.json").write_text(json.dumps(results, indent=2))
  results["total_wall_s"] = time.perf_counter() - started
  table = markdown(results)
  (out / "ablations.md").write_text(
    f"settings: {vars(args)}\n\ntotal wall time {results['total_wall_s'] / 60:.1f} min\n\n{table}\n"
  )
  (out / "ablations.json").write_text(json.dumps(results, indent=2))
  frontier_plot(results, out / "ablations.png")
  print(f"\n{table}\n\ntotal wall time {results['total_wall_s'] / 60:.1f} min; wrote {out}/")
  return results


if __name__ == "__main__":
  main()
