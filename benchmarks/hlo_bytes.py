"""Bytes a compiled XLA program moves, with every trip of every while loop counted.

``Compiled.cost_analysis()["bytes accessed"]`` adds a while loop's body once, whatever its trip
count, so a search that makes 8 passes over the momentum is billed as one. This module reads the
optimised HLO text (``Compiled.as_text()``) and bills each instruction the way XLA's
``HloCostAnalysis`` does to first order: the bytes of its operands plus the bytes of its output,
nothing for bookkeeping (parameters, constants, tuples, bitcasts), and a fusion as one
instruction (its operands and outputs, not its fused body). A while loop costs its trip count
times (body + condition); the trip count is read from the loop's ``known_trip_count`` backend
config when XLA wrote one, else from the loop's shape as ``lax.fori_loop``/``lax.scan`` emit it
(a counter in the loop tuple compared ``LT`` with a constant in the condition, starting from a
constant and stepping by one in the body). The parsing, the dtype sizes and the trip counts are
``mofo_jax.finetune.hlo``'s, the reader ``plan`` uses too.

``bytes_accessed(text, trips=False)`` (every loop counted once) should agree with
``cost_analysis()`` to within a few percent; the report carries both so that any disagreement
is visible. The every-pass figure the benchmarks print is ``cost_analysis()`` plus the extra
trips, ``(trip - 1) x (body + condition)``, as counted here. With ``device_memory_only`` the
count keeps only arrays in memory space 0 (HBM), leaving out buffers the compiler placed in
on-chip memory (``S(1)`` in TPU layouts), which ``cost_analysis()`` bills too.
"""

from __future__ import annotations

import re
from typing import Any

from mofo_jax.finetune.hlo import ARRAY, ON_CHIP, Instruction, Module, attr, shape_bytes

# Instructions that move no data of their own (a while's cost is its body's, added separately).
_FREE = {
  "parameter",
  "constant",
  "get-tuple-element",
  "tuple",
  "bitcast",
  "while",
  "slice-start",
  "after-all",
  "partition-id",
  "replica-id",
  "iota",
  "all-reduce-done",
  "all-gather-done",
  "collective-permute-done",
}


_SLICING = ("gather", "dynamic-slice", "slice")


class _Module(Module):
  """A parsed module that bills bytes, all of them or only those in device memory."""

  def __init__(self, text: str, device_memory_only: bool = False):
    super().__init__(text)
    if self.entry is None:
      raise ValueError("no ENTRY computation in the HLO text")
    self.device_memory_only = device_memory_only

  def _operand_bytes(self, inst: Instruction) -> float:
    """Bytes read from the operands; a fusion reads only the slices it takes of an operand."""
    sliced = {}
    fused = self.computations.get(attr(inst.attrs, "calls")) if inst.opcode == "fusion" else None
    if fused:
      params = {}
      for i in fused:
        if i.opcode == "parameter":
          params[i.name] = int(i.args)
      users: dict[str, list[Instruction]] = {}
      for i in fused:
        for n in i.operands:
          if n in params:
            users.setdefault(n, []).append(i)
      for p, us in users.items():
        if all(u.opcode in _SLICING and u.operands[0] == p for u in us):
          sliced[params[p]] = sum(shape_bytes(u.shape) for u in us)
          if self.device_memory_only and ON_CHIP.search(
            self.by_name[inst.operands[params[p]]].shape
          ):
            sliced[params[p]] = 0.0
    total = 0.0
    for k, n in enumerate(inst.operands):
      if n in self.by_name and n not in inst.operands[:k]:
        total += sliced.get(k, self._bytes(self.by_name[n].shape))
    return total

  def _bytes(self, shape: str) -> float:
    return shape_bytes(shape, self.device_memory_only)

  def instruction_bytes(self, inst: Instruction) -> float:
    """Bytes one (non-while) instruction moves."""
    if inst.opcode in _FREE:
      return 0.0
    out = self._bytes(inst.shape)
    if inst.opcode == "slice-done":
      # The end of an asynchronous slice: reads the slice from the source, writes it.
      if not self.device_memory_only:
        return 2 * shape_bytes(inst.shape)
      start = self.by_name[inst.operands[0]]
      source = self.by_name[start.operands[0]] if start.operands else None
      read = shape_bytes(inst.shape) if source is not None and self._bytes(source.shape) else 0
      return read + out
    if inst.opcode in ("dynamic-slice", "slice"):
      # Reads and writes only the slice.
      return 2 * out
    if inst.opcode == "dynamic-update-slice":
      update = self.by_name.get(inst.operands[1])
      return 2 * self._bytes(update.shape) if update is not None else out
    if inst.opcode in ("copy-start", "copy-done"):
      source = self.by_name[inst.operands[0]].shape
      if self.device_memory_only:
        # The copy reads its source and writes its destination (the start's first output).
        if inst.opcode == "copy-done":
          return 0.0
        dest = ARRAY.search(inst.shape)
        return self._bytes(source) + (self._bytes(dest.group(0)) if dest else 0.0)
      # An asynchronous copy (e.g. to on-chip memory), billed at both ends as XLA:TPU does.
      return 2 * shape_bytes(source if inst.opcode == "copy-start" else inst.shape)
    return self._operand_bytes(inst) + out

  def cost(self, computation: str, trips: bool, loops: list, branch=max) -> float:
    total = 0.0
    for inst in self.computations[computation]:
      if inst.opcode == "conditional":
        # One branch runs, which is known only at run time: ``branch`` (max or min) picks the
        # bill. Operands are passed as buffers, so only the branch moves bytes.
        costs = [self.cost(b, trips, loops, branch) for b in _branches(inst)]
        loops.append({"conditional": inst.name, "branch_bytes": costs})
        total += branch(costs)
      elif inst.opcode == "while":
        body, cond = attr(inst.attrs, "body"), attr(inst.attrs, "condition")
        per_trip = self.cost(body, trips, loops, branch) + self.cost(cond, trips, loops, branch)
        n = self.trip_count(inst)
        by_opcode: dict[str, float] = {}
        for i in self.computations[body]:
          by_opcode[i.opcode] = by_opcode.get(i.opcode, 0.0) + self.instruction_bytes(i)
        loops.append(
          {
            "while": inst.name,
            "trips": n,
            "bytes_per_trip": per_trip,
            "by_opcode": {k: v for k, v in by_opcode.items() if v},
          }
        )
        total += per_trip * (n if trips and n is not None else 1)
      else:
        total += self.instruction_bytes(inst)
    return total

  def bills(self, computation: str, branch=max, trips: int = 1) -> list[tuple[float, int, Any]]:
    """``(bytes, trips, instruction)`` of every instruction that moves bytes, loop bodies
    included with their trip counts (bytes counts every trip), in the branch ``branch`` picks."""
    out = []
    for inst in self.computations[computation]:
      if inst.opcode == "conditional":
        paths = [self.bills(b, branch, trips) for b in _branches(inst)]
        out.extend(branch(paths, key=lambda p: sum(b for b, _, _ in p)))
      elif inst.opcode == "while":
        n = trips * (self.trip_count(inst) or 1)
        out.extend(self.bills(attr(inst.attrs, "body"), branch, n))
        out.extend(self.bills(attr(inst.attrs, "condition"), branch, n))
      elif b := self.instruction_bytes(inst):
        out.append((b * trips, trips, inst))
    return out


def _branches(inst: Instruction) -> list[str]:
  """The computations a conditional picks between."""
  names = re.search(r"branch_computations=\{([^}]*)\}", inst.attrs)
  if names:
    return [b.strip() for b in names.group(1).split(",")]
  return [attr(inst.attrs, k) for k in ("false_computation", "true_computation")]


def instructions(
  text: str, device_memory_only: bool = False, branch=max
) -> list[tuple[float, int, Instruction]]:
  """Every instruction of the HLO module ``text`` that moves bytes, as ``(bytes, trips,
  instruction)``: its bytes times the trips of the loops around it, in the dearest (``max``) or
  cheapest (``min``) branch of each conditional. They add up to :func:`bytes_accessed`'s."""
  module = _Module(text, device_memory_only)
  return module.bills(module.entry, branch)


def bytes_accessed(
  text: str, trips: bool = True, device_memory_only: bool = False, branch=max
) -> tuple[float, list[dict]]:
  """Bytes moved by the HLO module ``text``: every loop trip counted, or each loop body once.

  Args:
    text: the optimised HLO of a compiled program (``Compiled.as_text()``).
    trips: multiply each while loop's body by its trip count (loops whose trip count cannot be
      read count once, and are reported with ``trips: None``).
    device_memory_only: count only arrays in memory space 0 (HBM on TPU and GPU), not those
      the compiler placed in on-chip memory (``S(1)`` in the layout on TPU).
    branch: ``max`` or ``min``: which branch of a conditional to bill (which one runs is known
      at run time only); each conditional is reported with every branch's bytes.

  Returns:
    The bytes, and one ``{"while", "trips", "bytes_per_trip", "by_opcode"}`` record per while
    loop (``by_opcode``: the body's bytes per trip by instruction kind, nested loops excluded).
  """
  module = _Module(text, device_memory_only)
  loops: list[dict] = []
  return module.cost(module.entry, trips, loops, branch), loops


def every_pass(compiled) -> dict:
  """``cost_analysis()`` bytes of a compiled program, and the same with every loop trip counted.

  The extra trips, ``(trips - 1) x bytes_per_trip`` per loop as this module counts them, are
  added to ``cost_analysis()``'s own figure, which has each loop body once.
  ``device_memory_bytes`` is this module's own count, every trip included, of the bytes read
  from and written to device memory (HBM) only, leaving out the traffic between on-chip
  buffers that ``cost_analysis()`` also bills. A conditional is billed its dearest branch, and
  its cheapest in the ``*_min`` figures.
  """
  ca = compiled.cost_analysis()
  if isinstance(ca, list):  # older jax: one dict per program
    ca = ca[0]
  once = float(ca["bytes accessed"])
  text = compiled.as_text()
  # Parse once per view (all bytes, device memory only); each bill is a walk of the parse.
  every, hbm = _Module(text), _Module(text, device_memory_only=True)
  loops: list[dict] = []
  parsed_once = every.cost(every.entry, False, loops)
  # Nested loops: a loop inside a body is already multiplied into that body's bytes_per_trip
  # when trips are counted; only top-level loops are listed once here, so recount from scratch.
  parsed_all = every.cost(every.entry, True, [])
  # Where a conditional picks between a short and a long search, also the bill when the
  # cheapest branches run (``*_min``), beside the bill when the dearest do.
  parsed_min = every.cost(every.entry, True, [], min)
  return {
    "cost_analysis_bytes": once,
    "parsed_bytes_loops_once": parsed_once,
    "every_pass_bytes": once + (parsed_all - parsed_once),
    "every_pass_bytes_min": once + (parsed_min - parsed_once),
    # This module's own count, every trip: it bills a custom call (a Pallas kernel) by its
    # operands and outputs, which cost_analysis() does not.
    "parsed_bytes": parsed_all,
    "parsed_bytes_min": parsed_min,
    "device_memory_bytes": hbm.cost(hbm.entry, True, []),
    "device_memory_bytes_min": hbm.cost(hbm.entry, True, [], min),
    "loops": [x for x in loops if "while" in x],
    "conditionals": [x for x in loops if "conditional" in x],
    "unknown_trip_counts": sum(x.get("trips", 0) is None for x in loops),
  }
