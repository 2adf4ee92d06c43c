"""The paper's two-dimensional picture: from the same "pretrained" point, Adam and MoFO both reach
a minimum of the fine-tuning loss, but MoFO's minimum is nearer the start.

The fine-tuning loss is L(a, b) = (a*b - 1)^2, a two-layer scalar linear network a*b*x fitted to
y = x. Every point of the hyperbola a*b = 1 is a global minimum, so where an optimizer ends
depends on the path it takes, as in an over-parameterized LLM. Starting at (3.5, 0.6), the
gradient 2(ab - 1)(b, a) is about six times larger along b. Adam normalizes each coordinate and
moves both about equally, sliding diagonally down to the hyperbola; MoFO with fraction 0.5 over
the 2-entry block moves only the coordinate of largest momentum, here b on all steps but one
(where b's momentum changes sign after an overshoot), and drops straight onto the hyperbola.

Run: python examples/toy_2d.py [--steps 300] [--lr 0.02] [--out toy_2d.png]
"""

from __future__ import annotations

import argparse
from typing import NamedTuple

import jax
import jax.numpy as jnp
import matplotlib
import matplotlib.colors
import matplotlib.pyplot as plt
import numpy as np
import optax

import mofo_jax

matplotlib.use("Agg")  # headless: only a PNG is written

START = (3.5, 0.6)


class Result(NamedTuple):
  path: np.ndarray  # [steps + 1, 2], the start included
  loss: float  # fine-tuning loss at the end
  distance: float  # Euclidean distance of the end from START


def loss_fn(params):
  return (params[0] * params[1] - 1.0) ** 2


def fine_tune(opt: optax.GradientTransformation, steps: int) -> Result:
  start = jnp.asarray(START, jnp.float32)

  def step(carry, _):
    params, state = carry
    updates, state = opt.update(jax.grad(loss_fn)(params), state, params)
    params = optax.apply_updates(params, updates)
    return (params, state), params

  (end, _), path = jax.lax.scan(step, (start, opt.init(start)), length=steps)
  return Result(
    path=np.concatenate([np.asarray(start)[None], np.asarray(path)]),
    loss=float(loss_fn(end)),
    distance=float(jnp.linalg.norm(end - start)),
  )


def plot(results: dict[str, Result], title: str, out: str) -> None:
  points = np.concatenate([r.path for r in results.values()])
  # Wide enough to show the hyperbola bend, not only the stretch the paths cross.
  lo = np.minimum(points.min(0) - 0.15, [1.0, 0.0])
  hi = np.maximum(points.max(0) + 0.15, [4.0, 1.2])
  a, b = np.meshgrid(np.linspace(lo[0], hi[0], 400), np.linspace(lo[1], hi[1], 400))
  # Log-spaced levels: the loss spans orders of magnitude and the valley floor is what matters.
  loss = np.clip((a * b - 1) ** 2, 1e-3, None)
  levels = 10.0 ** np.arange(-3, np.log10(loss.max()) + 0.25, 0.25)

  fig, ax = plt.subplots(figsize=(10, 4.4))
  cs = ax.contourf(a, b, loss, levels=levels, cmap="Blues_r", norm=matplotlib.colors.LogNorm())
  fig.colorbar(
    cs,
    ax=ax,
    label="fine-tuning loss (a·b - 1)²",
    shrink=0.8,
    pad=0.02,
    ticks=10.0 ** np.arange(-3, np.log10(loss.max()) + 1),
  )
  curve_a = np.linspace(max(lo[0], 1e-2), hi[0], 200)  # the a > 0 branch
  ax.plot(curve_a, 1 / curve_a, "k--", lw=1.2, label="minima: a·b = 1")
  for (name, r), color in zip(results.items(), ("tab:red", "tab:green")):
    ax.plot(
      r.path[:, 0],
      r.path[:, 1],
      ".-",
      color=color,
      ms=3,
      lw=1.2,
      label=f"{name}: distance from start {r.distance:.3f}",
    )
    ax.plot(*r.path[-1], "o", color=color, ms=8, mec="k")
  ax.plot(*START, "*", color="gold", ms=18, mec="k", label="pretrained start")
  ax.set(xlim=(lo[0], hi[0]), ylim=(lo[1], hi[1]), xlabel="a", ylabel="b", title=title)
  ax.set_aspect("equal")  # so distances on the page are the distances printed
  ax.legend(loc="upper right", fontsize=9)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Result]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--lr", type=float, default=0.02)
  parser.add_argument("--out", default="toy_2d.png")
  args = parser.parse_args(argv)

  results = {
    "Adam": fine_tune(optax.adam(args.lr), args.steps),
    # One (2,)-shaped leaf is a single block of 2; 1-D leaves are dense unless filter_mask
    # says otherwise. k = max(1, floor(0.5 * 2)) = 1: the larger-momentum coordinate moves.
    "MoFO": fine_tune(mofo_jax.mofo(args.lr, fraction=0.5, filter_mask=True), args.steps),
  }
  print(f"start ({START[0]:.3f}, {START[1]:.3f})  loss {loss_fn(jnp.asarray(START)):.4f}")
  for name, r in results.items():
    print(
      f"{name:4s}  final ({r.path[-1, 0]:.3f}, {r.path[-1, 1]:.3f})  loss {r.loss:.2e}  "
      f"distance from start {r.distance:.3f}"
    )
  plot(
    results,
    f"Fine-tuning from the same start: Adam vs MoFO (fraction 0.5), "
    f"lr {args.lr:g}, {args.steps} steps",
    args.out,
  )
  print(f"wrote {args.out}")
  return results


if __name__ == "__main__":
  main()
