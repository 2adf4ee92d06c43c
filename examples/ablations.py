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
import statistics
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
  p.add_argument(
    "--replot",
    action="store_true",
    help="only redraw ablations.png from --out-dir's ablations.json (replaces the figure)",
  )
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


GROUP_TITLES = {
  "lr": "learning rate",
  "fraction": "MoFO's fraction (lr of the sweep)",
  "score": "what MoFO ranks by",
  "baselines": "the paper's baselines",
}


def _limits(values: list[float], pad: float = 0.08) -> tuple[float, float]:
  """Axis limits that show the bulk of ``values``: an outlier beyond 3x the median spread
  from the median is left off the scale (and marked at the edge) instead of setting it."""
  med = statistics.median(values)
  spread = statistics.median(abs(v - med) for v in values) or max(abs(med), 1e-3)
  inside = [v for v in values if abs(v - med) <= 6 * spread] or values
  lo, hi = min(inside), max(inside)
  margin = (hi - lo) * pad or 1e-3
  return lo - margin, hi + margin


def frontier_plot(results: dict, path: Path) -> None:
  """Forgetting against learning, one panel per group, the learning-rate sweeps in every panel.

  Down and to the right is better: less forgetting at a lower answer loss. Each panel shows
  AdamW's learning-rate sweep as the reference to beat; a point far off the others' scale is
  drawn at the edge with its value, so it cannot squash the rest.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  base = results["pretrained"]
  old_keys = [k for k in base if k.endswith("_loss") and not k.startswith("task")]

  def point(final):
    rise = sum(final[k] - base[k] for k in old_keys) / len(old_keys)
    return final["task_answer_loss"], rise

  runs = list(results["runs"].values())
  groups = [g for g in GROUP_TITLES if any(r["group"] == g for r in runs)]
  xs, ys = zip(*[point(r["final"]) for r in runs])
  xlim, ylim = _limits(list(xs)), _limits([*ys, 0.0])
  sweep = sorted(point(r["final"]) for r in runs if r["optimizer"]["name"] == "adamw")
  fig, axes = plt.subplots(
    1, len(groups), figsize=(4.8 * len(groups), 6.2), sharex=True, sharey=True, squeeze=False
  )
  colors = plt.get_cmap("tab10").colors
  for ax, group in zip(axes[0], groups):
    ax.axhline(0.0, color="goldenrod", lw=1.5, label="no forgetting (pretrained)")
    if sweep and group != "lr":
      ax.plot(*zip(*sweep), "--", color="0.6", label="AdamW lr sweep (reference)")
    members = [r for r in runs if r["group"] == group]
    for i, r in enumerate(members):
      x, y = point(r["final"])
      cx, cy = min(max(x, xlim[0]), xlim[1]), min(max(y, ylim[0]), ylim[1])
      off_scale = (cx, cy) != (x, y)
      label = r["label"] + (f" (off scale: {x:.3f}, {y:+.3f})" if off_scale else "")
      marker = "^" if off_scale else "os^Dv<>p"[i % 8]
      ax.plot(cx, cy, marker, ms=8, color=colors[i % 10], mec="k", label=label, zorder=4)
    if group == "lr":
      for name, style in (("adamw", "-"), ("mofo", ":")):
        line = sorted(point(r["final"]) for r in members if r["optimizer"]["name"] == name)
        if len(line) > 1:
          ax.plot(*zip(*line), style, color="0.4", lw=1)
    ax.set(title=GROUP_TITLES[group], xlabel="new task: answer-token loss", xlim=xlim, ylim=ylim)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=1)
  axes[0][0].set_ylabel("forgetting: mean rise of old-text loss")
  axes[0][0].invert_xaxis()
  fig.suptitle(
    "Forgetting against learning (lower right is better): SmolLM2-135M, "
    f"{results['settings']['steps']} steps of arithmetic; pretrained answer loss "
    f"{base['task_answer_loss']:.3f}"
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
  if args.replot:
    saved = out / "ablations.json"
    if not saved.exists():
      raise SystemExit(f"error: --replot: {saved} does not exist")
    results = json.loads(saved.read_text())
    frontier_plot(results, out / "ablations.png")
    print(f"wrote {out / 'ablations.png'}")
    return results
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
