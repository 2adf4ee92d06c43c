"""Blocks: how each parameter leaf is cut into the groups inside which MoFO ranks entries."""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any, Union

import jax


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """How one leaf is split into top-k blocks.

  A leaf (optionally viewed through ``reshape`` first, which must keep its size and costs
  nothing for row-major splits of an axis) is split along ``split_axes``: every index along
  those axes is a block of its own (with its own threshold), and the top-k of a block is taken
  over all the remaining axes.

  * ``BlockSpec()``: the whole leaf is one block (the paper's default).
  * ``BlockSpec(split_axes=(0,))``: each layer of a stacked ``[layers, d_in, d_out]`` leaf.
  * ``BlockSpec(split_axes=(0,))`` on a ``[d_in, d_out]`` kernel: each row.
  * ``BlockSpec(reshape=(d, heads, head_dim), split_axes=(1,))`` on a ``[d, heads * head_dim]``
    projection: each attention head.

  Attributes:
    split_axes: axes (negative counts from the end) along which the leaf is split: one block
      per index along them.
    reshape: optional shape to view the leaf with before cutting (same number of entries, every
      size a non-negative integer).

  Example:
    >>> import jax.numpy as jnp
    >>> BlockSpec(split_axes=(0,)).block_shape((4, 8, 8))
    (4, 1, 1)
  """

  split_axes: tuple[int, ...] = ()
  reshape: tuple[int, ...] | None = None

  def __post_init__(self):
    object.__setattr__(self, "split_axes", _ints(self.split_axes, "split_axes"))
    if self.reshape is not None:
      reshape = _ints(self.reshape, "reshape")
      if any(d < 0 for d in reshape):
        raise ValueError(f"BlockSpec(reshape={reshape}): every size must be >= 0.")
      object.__setattr__(self, "reshape", reshape)

  def view_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
    """The shape the leaf is viewed with; raises ValueError if ``reshape`` does not fit."""
    shape = tuple(shape)
    if self.reshape is None:
      return shape
    if math.prod(self.reshape) != math.prod(shape):
      raise ValueError(
        f"BlockSpec.reshape={self.reshape} has {math.prod(self.reshape)} entries but the "
        f"leaf of shape {shape} has {math.prod(shape)}."
      )
    return self.reshape

  def block_axes(self, shape: Sequence[int]) -> tuple[int, ...]:
    """The normalised (non-negative, sorted) split axes for a leaf of ``shape``."""
    view = self.view_shape(shape)
    out = []
    for a in self.split_axes:
      if not -len(view) <= a < len(view):
        raise ValueError(
          f"BlockSpec.split_axes={self.split_axes} names axis {a}, but the leaf (viewed as "
          f"{view}) has {len(view)} axes."
        )
      out.append(a % len(view))
    if len(set(out)) != len(out):
      raise ValueError(f"BlockSpec.split_axes={self.split_axes} repeats an axis.")
    return tuple(sorted(out))

  def block_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
    """Shape of the per-block thresholds: the view shape with every ranked axis set to 1."""
    view = self.view_shape(shape)
    keep = self.block_axes(shape)
    return tuple(d if i in keep else 1 for i, d in enumerate(view))

  def block_size(self, shape: Sequence[int]) -> int:
    """Number of entries in each block."""
    view = self.view_shape(shape)
    keep = self.block_axes(shape)
    return math.prod(d for i, d in enumerate(view) if i not in keep)


def _ints(values: Sequence[Any], name: str) -> tuple[int, ...]:
  try:
    return tuple(operator.index(v) for v in values)
  except TypeError as e:
    raise TypeError(f"BlockSpec({name}={values!r}): entries must be integers.") from e


PER_LEAF = BlockSpec()

Partition = Union[None, str, BlockSpec, Any, Callable[[Any], Any]]


def resolve_partition(partition: Partition, params: Any) -> tuple[bool, Any]:
  """Turns the user's ``partition`` argument into ``(is_global, tree of BlockSpec)``.

  Args:
    partition: ``None`` or ``"leaf"`` (one block per leaf), ``"global"`` (one block over every
      filtered leaf of the tree), a ``BlockSpec`` for every leaf, or a pytree (a prefix of
      ``params``) or a callable ``params -> pytree`` of ``BlockSpec``.
    params: the parameter pytree (arrays or shape-dtype structs).

  Returns:
    Whether the block is global, and a pytree of ``BlockSpec`` with the structure of ``params``.
  """
  if partition is None or (isinstance(partition, str) and partition == "leaf"):
    return False, jax.tree.map(lambda _: PER_LEAF, params)
  if isinstance(partition, str):
    if partition == "global":
      return True, jax.tree.map(lambda _: PER_LEAF, params)
    raise ValueError(
      f"partition={partition!r} is not understood: use 'leaf', 'global', a BlockSpec, or a "
      "pytree or callable giving a BlockSpec per leaf."
    )
  if isinstance(partition, BlockSpec):
    return False, jax.tree.map(lambda _: partition, params)
  specs = partition(params) if callable(partition) else partition
  try:
    specs = jax.tree.map(lambda s, p: jax.tree.map(lambda _: s, p), specs, params)
  except (ValueError, TypeError) as e:
    raise ValueError(
      "partition must be a prefix of the params pytree (or a callable returning one) whose "
      f"leaves are BlockSpec: {e}"
    ) from e
  for s in jax.tree.leaves(specs):
    if not isinstance(s, BlockSpec):
      raise TypeError(f"partition holds {s!r}; every entry must be a mofo_jax.BlockSpec.")
  return False, specs
