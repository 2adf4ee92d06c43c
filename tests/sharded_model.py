"""A small model and its mesh layouts, shared by the sharding tests and the multi-host worker."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import mofo_jax

SHAPES = {
  "embed": (64, 32),
  "stack": (8, 16, 32),  # [layers, d_in, d_out], as a scanned model keeps it
  "kernel": (32, 48),
  "proj": (32, 64),  # [d, heads * head_dim] with 8 heads of 8
  "bias": (48,),
  "scale": (32,),  # small, replicated everywhere
}

# name -> (mesh shape, axis names, PartitionSpec per leaf)
LAYOUTS = {
  "fsdp": (
    (8,),
    ("fsdp",),
    {
      "embed": P("fsdp", None),
      "stack": P("fsdp", None, None),
      "kernel": P("fsdp", None),
      "proj": P("fsdp", None),
      "bias": P(),
      "scale": P(),
    },
  ),
  "tp": (
    (8,),
    ("tp",),
    {
      "embed": P(None, "tp"),
      "stack": P(None, None, "tp"),
      "kernel": P(None, "tp"),
      "proj": P(None, "tp"),
      "bias": P("tp"),
      "scale": P(),
    },
  ),
  "2d": (
    (2, 4),
    ("fsdp", "tp"),
    {
      "embed": P("fsdp", "tp"),
      "stack": P(None, "fsdp", "tp"),
      "kernel": P("fsdp", "tp"),
      "proj": P("fsdp", "tp"),
      "bias": P("tp"),
      "scale": P(),
    },
  ),
}

PER_ROW = mofo_jax.BlockSpec(split_axes=(0,))
PER_LAYER = mofo_jax.BlockSpec(split_axes=(0,))
PER_HEAD = mofo_jax.BlockSpec(reshape=(32, 8, 8), split_axes=(1,))

# name -> (partition argument, {leaf: (block axes, reshape)} for tests/reference.py)
PARTITIONS = {
  "leaf": (None, {}),
  "slices": (
    {
      "embed": PER_ROW,
      "stack": PER_LAYER,
      "kernel": mofo_jax.BlockSpec(),
      "proj": PER_HEAD,
      "bias": mofo_jax.BlockSpec(),
      "scale": mofo_jax.BlockSpec(),
    },
    {"embed": ((0,), None), "stack": ((0,), None), "proj": ((1,), (32, 8, 8))},
  ),
  "callable": (
    lambda params: jax.tree.map(
      lambda p: PER_LAYER if np.ndim(p) == 3 else mofo_jax.BlockSpec(), params
    ),
    {"stack": ((0,), None)},
  ),
  "global": ("global", {}),
}


def params(seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def grads(step: int) -> dict[str, np.ndarray]:
  return params(1000 + step)


def mesh(layout: str, axis_type: AxisType = AxisType.Auto, devices=None) -> jax.sharding.Mesh:
  shape, names, _ = LAYOUTS[layout]
  return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names), devices=devices)


def shardings(layout: str, m: jax.sharding.Mesh) -> dict[str, NamedSharding]:
  return {k: NamedSharding(m, s) for k, s in LAYOUTS[layout][2].items()}


def abstract(shards: dict[str, NamedSharding]) -> dict[str, jax.ShapeDtypeStruct]:
  return {k: jax.ShapeDtypeStruct(SHAPES[k], jnp.float32, sharding=s) for k, s in shards.items()}


def step_fn(opt: optax.GradientTransformation):
  def step(p, state, g):
    updates, state = opt.update(g, state, p)
    return optax.apply_updates(p, updates), state

  return step


def run_unsharded(opt: optax.GradientTransformation, steps: int = 3):
  p = jax.tree.map(jnp.asarray, params())
  state = opt.init(p)
  step = jax.jit(step_fn(opt))
  for i in range(steps):
    p, state = step(p, state, grads(i))
  return p, state


_BYTES = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "bf16": 2,
  "f16": 2,
  "s16": 2,
  "u16": 2,
  "f32": 4,
  "s32": 4,
  "u32": 4,
  "f64": 8,
  "s64": 8,
  "u64": 8,
}


def collectives(hlo: str, loop_trips: int) -> dict[str, int]:
  """Collectives of a compiled HLO module: count per kind, and the bytes all-reduced per step.

  An all-reduce's operands are as large as its results, which the HLO line spells out. Those in a
  while body (the selection's search loop) run ``loop_trips`` times per step.
  """
  bodies = set(re.findall(r"body=%([\w.\-]+)", hlo))
  out = {
    "all-reduce": 0,
    "all-gather": 0,
    "all-to-all": 0,
    "collective-permute": 0,
    "reduce-scatter": 0,
    "all_reduce_bytes": 0,
    "largest_all_reduce_bytes": 0,
  }
  computation = None
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY )?%([\w.\-]+) ", line)
    if head:
      computation = head.group(1)
      continue
    op = re.search(
      r"= (.*?) (all-reduce|all-gather|all-to-all|collective-permute|"
      r"reduce-scatter)(?:-start)?\(",
      line,
    )
    if not op:
      continue
    out[op.group(2)] += 1
    if op.group(2) == "all-reduce":
      size = sum(
        _BYTES[t] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
        for t, dims in re.findall(r"(\w+)\[([\d,]*)\]", op.group(1))
      )
      out["largest_all_reduce_bytes"] = max(out["largest_all_reduce_bytes"], size)
      out["all_reduce_bytes"] += size * (loop_trips if computation in bodies else 1)
  return out


def opt() -> optax.GradientTransformation:
  """The optimizer of the multi-host and checkpoint tests: per-layer, per-row and per-head."""
  return mofo_jax.mofo(1e-2, 0.1, weight_decay=0.01, partition=PARTITIONS["slices"][0])
