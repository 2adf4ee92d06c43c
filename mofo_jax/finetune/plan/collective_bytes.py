"""``plan``'s collective accounting: the collectives of a compiled step, read through ``hlo``,
with their bytes per device and their executions per step."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

from mofo_jax.finetune import hlo

COLLECTIVE_KINDS = (
  "all-gather",
  "all-reduce",
  "reduce-scatter",
  "all-to-all",
  "collective-permute",
)


@dataclasses.dataclass
class Collective:
  """One collective of the compiled step.

  Attributes:
    kind: ``all-gather``, ``all-reduce``, ``reduce-scatter``, ``all-to-all`` or
      ``collective-permute``.
    bytes: the larger of its result and operand buffers on one device (the gathered result,
      the scattered input, the reduced buffer).
    shapes: its result shapes ``(dtype, dims)``.
    times: executions per step (trip counts of the loops it sits in).
    optimizer: it belongs to the optimizer update (``step.OPTIMIZER_SCOPE``).
  """

  kind: str
  bytes: int
  shapes: list[tuple[str, tuple[int, ...]]]
  times: int
  optimizer: bool


def collectives(text: str) -> list[Collective]:
  """The collectives of an optimized HLO module, each with its executions per step.

  A collective inside a ``while`` body runs once per trip (XLA's ``known_trip_count``, else
  the integer bound the loop's condition compares with); executions add up over the call
  sites of a computation. Async pairs are counted at their ``-start``; collectives within
  groups of one device are left out.

  Args:
    text: ``compiled.as_text()``.

  Returns:
    The collectives.
  """
  from mofo_jax.finetune.step import OPTIMIZER_SCOPE

  module = hlo.Module(text)
  # Executions per step of each computation: (collective-permutes, other collectives).
  times: dict[str, list[int]] = {}

  def visit(name: str, permutes: int, others: int) -> None:
    # Executions add up over call sites (a fused computation may be shared).
    if name not in module.computations:
      return
    counts = times.setdefault(name, [0, 0])
    counts[0] += permutes
    counts[1] += others
    for inst in module.computations[name]:
      trip, windowed = 1, False
      if inst.opcode == "while":
        trip = module.trip_count(inst)
        if trip is None:
          # No annotation (the TPU compiler's HLO): the loop bound is the integer constant
          # its condition compares the counter with.
          cond = module.computations.get(hlo.attr(inst.attrs, "condition"), [])
          bounds = [module.constants.get(i.name, -1) for i in cond]
          trip = max((b for b in bounds if b >= 0), default=1)
        # A windowed einsum loop passes shards around (a collective-permute per trip); other
        # collectives the TPU compiler schedules into it (the next layer's weights) run once.
        windowed = "windowed_dot_general" in inst.attrs
      for c in module.callees(inst):
        visit(c, permutes * trip, others * (1 if windowed else trip))

  if module.entry is not None:
    visit(module.entry, 1, 1)
  out = []
  for name, insts in module.computations.items():
    if name not in times:
      continue
    for inst in insts:
      kind = inst.opcode.removesuffix("-start")
      if kind not in COLLECTIVE_KINDS or inst.opcode.endswith("-done"):
        continue
      if hlo.replica_group_size(inst.attrs) == 1:
        continue  # groups of one device move nothing
      op_name = hlo.op_name(inst.attrs)
      result_shapes = [(dtype, dims) for dtype, dims, _ in hlo.arrays(inst.shape)]
      if inst.opcode.endswith("-start"):
        # An async start returns (operands, results, scalar contexts): keep the results.
        arrays = [x for x in result_shapes if x[1]]
        result_shapes = arrays[len(arrays) // 2 :] if len(arrays) > 1 else arrays
      size = max(
        sum(math.prod(d) * hlo.DTYPE_BYTES[t] for t, d in result_shapes),
        hlo.shape_bytes(inst.args),
      )
      out.append(
        Collective(
          kind=kind,
          # Sub-byte types (s4) can leave half a byte.
          bytes=math.ceil(size),
          shapes=result_shapes,
          times=times[name][0 if kind == "collective-permute" else 1],
          optimizer=bool(op_name and OPTIMIZER_SCOPE in op_name),
        )
      )
  return out


def global_batch_gathers(colls: Sequence[Collective], batch: int, seq_dims: Sequence[int]):
  """All-gathers (or all-to-alls) that assemble float activations over the global batch.

  The model's activations are laid out ``[B, T, ...]`` (the chunked loss: ``[n, B, c, ...]``):
  a floating-point result with a dimension of size ``batch`` followed by one of a size in
  ``seq_dims`` (the sequence length, the loss chunk) is such an activation.

  Example:
    >>> hidden = Collective("all-gather", 0, [("bf16", (16, 2048, 4096))], 1, False)
    >>> one_row = Collective("all-gather", 0, [("bf16", (16, 1, 2048, 256))], 1, False)
    >>> global_batch_gathers([hidden, one_row], 16, [2048]) == [hidden]
    True
  """
  found = []
  for c in colls:
    if c.kind not in ("all-gather", "all-to-all"):
      continue
    for dtype, dims in c.shapes:
      if dtype.startswith(("f", "bf")) and any(
        a == batch and b in seq_dims for a, b in itertools.pairwise(dims)
      ):
        found.append(c)
        break
  return found
