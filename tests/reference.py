"""A plain NumPy restatement of the MoFO update of ../shared/mofo_spec.md, for tests."""

import math

import numpy as np


def top_fraction_mask(score: np.ndarray, fraction: float) -> np.ndarray:
  """|score| >= the k-th largest |score|, k = max(1, floor(fraction * n)), by sorting."""
  mag = np.abs(score.astype(np.float32)).ravel()
  if mag.size == 0:
    return np.zeros(score.shape, bool)
  k = max(1, math.floor(fraction * mag.size))
  tau = np.sort(mag)[::-1][k - 1]
  return (np.abs(score.astype(np.float32)) >= tau).reshape(score.shape)


def block_mask(score: np.ndarray, fraction: float, block_axes=(), reshape=None) -> np.ndarray:
  """The per-block mask: every index along block_axes is its own block."""
  view = score.reshape(reshape) if reshape is not None else score
  rest = [i for i in range(view.ndim) if i not in block_axes]
  moved = np.transpose(view, list(block_axes) + rest)
  lead = moved.shape[: len(block_axes)]
  flat = moved.reshape(lead + (-1,))
  out = np.zeros(flat.shape, bool)
  for idx in np.ndindex(*lead):
    out[idx] = top_fraction_mask(flat[idx], fraction)
  out = out.reshape(moved.shape)
  return np.transpose(out, np.argsort(list(block_axes) + rest)).reshape(score.shape)


class MoFO:
  """MoFO on a dict of float32 NumPy arrays, step by step, exactly as the spec states it."""

  def __init__(self, params, lr, fraction, b1=0.9, b2=0.999, eps=1e-8, wd=0.0, filtered=None):
    self.p = {k: v.astype(np.float32).copy() for k, v in params.items()}
    self.m = {k: np.zeros_like(v) for k, v in self.p.items()}
    self.v = {k: np.zeros_like(v) for k, v in self.p.items()}
    self.t = 0
    self.lr, self.fraction, self.b1, self.b2, self.eps, self.wd = lr, fraction, b1, b2, eps, wd
    self.filtered = filtered or {k: v.ndim >= 2 for k, v in self.p.items()}

  def step(self, grads):
    self.t += 1
    # Coefficients are rounded to float32 once, as JAX does with Python scalars.
    b1, b2 = np.float32(self.b1), np.float32(self.b2)
    c1, c2 = np.float32(1 - self.b1), np.float32(1 - self.b2)
    masks = {}
    for k, g in grads.items():
      g = g.astype(np.float32)
      self.m[k] = b1 * self.m[k] + c1 * g
      self.v[k] = b2 * self.v[k] + c2 * g * g
      mhat = self.m[k] / (1 - b1**self.t)
      vhat = self.v[k] / (1 - b2**self.t)
      u = mhat / (np.sqrt(vhat) + np.float32(self.eps))
      f = (
        top_fraction_mask(self.m[k], self.fraction) if self.filtered[k] else np.ones(u.shape, bool)
      )
      masks[k] = f
      self.p[k] = self.p[k] - np.float32(self.lr) * (f * u + np.float32(self.wd) * self.p[k])
    return masks
