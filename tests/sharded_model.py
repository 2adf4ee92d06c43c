"""A small model and its mesh layouts, shared by the sharding tests and the multi-host worker."""

from __future__ import annotations


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


def collectives(hlo: str) -> dict[str, int]:
  """Collectives of a compiled HLO module: ops per kind, and the bytes all-reduced per step.

  Parsed by ``plan.collectives`` (the one HLO reader of the project), which counts each
  collective once per execution (loop trips read from the HLO).
  """
  from mofo_jax.finetune import plan

  found = plan.collectives(hlo)
  out = {kind: sum(c.kind == kind for c in found) for kind in plan.COLLECTIVE_KINDS}
  reduces = [c for c in found if c.kind == "all-reduce"]
  out["all_reduce_bytes"] = sum(c.bytes * c.times for c in reduces)
  out["largest_all_reduce_bytes"] = max((c.bytes for c in reduces), default=0)
  return out


def opt() -> optax.GradientTransformation:
  """The optimizer of the multi-host and checkpoint tests: per-layer, per-row and per-head."""
  return mofo_jax.mofo(1e-2, 0.1, weight_decay=0.01, partition=PARTITIONS["slices"][0])
