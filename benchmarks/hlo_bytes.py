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
constant and stepping by one in the body).

``bytes_accessed(text, trips=False)`` (every loop counted once) should agree with
``cost_analysis()`` to within a few percent; the report carries both so that any disagreement
is visible. The every-pass figure the benchmarks print is ``cost_analysis()`` plus the extra
trips, ``(trip - 1) x (body + condition)``, as counted here. With ``device_memory_only`` the
count keeps only arrays in memory space 0 (HBM), leaving out buffers the compiler placed in
on-chip memory (``S(1)`` in TPU layouts), which ``cost_analysis()`` bills too.
"""

from __future__ import annotations

import dataclasses
import math
import re

_DTYPE_BYTES = {
  "pred": 1,
  "s4": 0.5,
  "u4": 0.5,
  "s8": 1,
  "u8": 1,
  "f8e4m3fn": 1,
  "f8e5m2": 1,
  "s16": 2,
  "u16": 2,
  "f16": 2,
  "bf16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
  "c64": 8,
  "c128": 16,
}
# dtype[dims] and the layout after it, where a memory space other than 0 (device memory) shows
# as S(n): on TPU, S(1) is the on-chip vector memory.
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\](\{[^}]*\})?")
_ON_CHIP = re.compile(r"S\([1-9]\d*\)")
_NAME = re.compile(r"%[\w.\-]+")
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


def _shape_bytes(shape: str, device_memory_only: bool = False) -> float:
  return sum(
    _DTYPE_BYTES[d] * math.prod(int(x) for x in dims.split(",") if x)
    for d, dims, layout in _ARRAY.findall(shape)
    if not (device_memory_only and _ON_CHIP.search(layout))
  )


def _balanced(s: str, i: int) -> int:
  """Index just past the parenthesised group that starts at ``s[i] == '('``."""
  depth = 0
  for j in range(i, len(s)):
    if s[j] == "(":
      depth += 1
    elif s[j] == ")":
      depth -= 1
      if depth == 0:
        return j + 1
  raise ValueError(f"unbalanced parentheses in {s[:80]!r}")


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str
  opcode: str
  operands: list[str]
  args: str
  attrs: str


def _parse_instruction(line: str) -> Instruction | None:
  line = line.strip()
  line = line.removeprefix("ROOT ")
  if not line.startswith("%") or " = " not in line:
    return None
  name, rest = line.split(" = ", 1)
  if rest.startswith("("):
    end = _balanced(rest, 0)
    shape, rest = rest[:end], rest[end:].lstrip()
  else:
    shape, rest = rest.split(" ", 1)
  paren = rest.index("(")
  opcode = rest[:paren]
  end = _balanced(rest, paren)
  args = rest[paren + 1 : end - 1]
  return Instruction(name, shape, opcode, _NAME.findall(args), args, rest[end:])


def parse_module(text: str) -> tuple[dict[str, list[Instruction]], str]:
  """The computations of an HLO module's text, by name, and the entry computation's name."""
  computations: dict[str, list[Instruction]] = {}
  entry, current = None, None
  for line in text.splitlines():
    if current is None:
      m = re.match(r"^(ENTRY )?(%[\w.\-]+) .*\{\s*$", line)
      if m:
        current = m.group(2)
        computations[current] = []
        if m.group(1):
          entry = current
      continue
    if line.startswith("}"):
      current = None
      continue
    inst = _parse_instruction(line)
    if inst is not None:
      computations[current].append(inst)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  return computations, entry


def _attr(attrs: str, key: str) -> str | None:
  m = re.search(key + r"=(%[\w.\-]+)", attrs)
  return m.group(1) if m else None


class _Module:
  def __init__(self, text: str, device_memory_only: bool = False):
    self.device_memory_only = device_memory_only
    self.computations, self.entry = parse_module(text)
    self.by_name = {i.name: i for insts in self.computations.values() for i in insts}
    self.constants = {}
    for line in text.splitlines():
      m = re.match(r"^\s*(?:ROOT )?(%[\w.\-]+) = [su]\d+\[\]\S* constant\((-?\d+)\)", line)
      if m:
        self.constants[m.group(1)] = int(m.group(2))

  def _value(self, name: str) -> int | None:
    """The integer a scalar instruction holds when it is a constant (through copies)."""
    while name not in self.constants:
      inst = self.by_name.get(name)
      if inst is None or inst.opcode not in ("copy", "bitcast", "convert") or not inst.operands:
        return None
      name = inst.operands[0]
    return self.constants[name]

  def trip_count(self, inst: Instruction) -> int | None:
    """The trip count of a while instruction, or None when it cannot be read."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', inst.attrs)
    if m:
      return int(m.group(1))
    cond = self.computations.get(_attr(inst.attrs, "condition"), [])
    body = self.computations.get(_attr(inst.attrs, "body"), [])
    if not cond or not body:
      return None
    root = cond[-1]
    m = re.search(r"direction=(LT|GT)", root.attrs)
    if root.opcode != "compare" or not m or len(root.operands) != 2:
      return None
    a, b = (self.by_name.get(n) for n in root.operands)
    counter, bound = (a, b) if m.group(1) == "LT" else (b, a)
    limit = self._value(bound.name) if bound is not None else None
    if counter is None or counter.opcode != "get-tuple-element" or limit is None:
      return None
    index = int(re.search(r"index=(\d+)", counter.attrs).group(1))
    # The counter's start: the while's operand tuple at that index.
    init_tuple = self.by_name.get(inst.operands[0])
    if init_tuple is None or init_tuple.opcode != "tuple":
      return None
    start = self._value(init_tuple.operands[index])
    # The body must step the counter by one.
    body_root = body[-1]
    if body_root.opcode != "tuple" or start is None:
      return None
    step = self.by_name.get(body_root.operands[index])
    if step is None or step.opcode != "add":
      return None
    ones = [self._value(n) for n in step.operands]
    if 1 not in ones:
      return None
    return max(0, limit - start)

  def _operand_bytes(self, inst: Instruction) -> float:
    """Bytes read from the operands; a fusion reads only the slices it takes of an operand."""
    sliced = {}
    fused = self.computations.get(_attr(inst.attrs, "calls")) if inst.opcode == "fusion" else None
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
          sliced[params[p]] = sum(_shape_bytes(u.shape) for u in us)
          if self.device_memory_only and _ON_CHIP.search(
            self.by_name[inst.operands[params[p]]].shape
          ):
            sliced[params[p]] = 0.0
    total = 0.0
    for k, n in enumerate(inst.operands):
      if n in self.by_name and n not in inst.operands[:k]:
        total += sliced.get(k, self._bytes(self.by_name[n].shape))
    return total

  def _bytes(self, shape: str) -> float:
    return _shape_bytes(shape, self.device_memory_only)

  def instruction_bytes(self, inst: Instruction) -> float:
    """Bytes one (non-while) instruction moves."""
    if inst.opcode in _FREE:
      return 0.0
    out = self._bytes(inst.shape)
    if inst.opcode == "slice-done":
      # The end of an asynchronous slice: reads the slice from the source, writes it.
      if not self.device_memory_only:
        return 2 * _shape_bytes(inst.shape)
      start = self.by_name[inst.operands[0]]
      source = self.by_name[start.operands[0]] if start.operands else None
      read = _shape_bytes(inst.shape) if source is not None and self._bytes(source.shape) else 0
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
        dest = _ARRAY.search(inst.shape)
        return self._bytes(source) + (self._bytes(dest.group(0)) if dest else 0.0)
      # An asynchronous copy (e.g. to on-chip memory), billed at both ends as XLA:TPU does.
      return 2 * _shape_bytes(source if inst.opcode == "copy-start" else inst.shape)
    return self._operand_bytes(inst) + out

  def cost(self, computation: str, trips: bool, loops: list, branch=max) -> float:
    total = 0.0
    for inst in self.computations[computation]:
      if inst.opcode == "conditional":
        # One branch runs, which is known only at run time: ``branch`` (max or min) picks the
        # bill. Operands are passed as buffers, so only the branch moves bytes.
        names = re.search(r"branch_computations=\{([^}]*)\}", inst.attrs)
        if names:
          branches = [b.strip() for b in names.group(1).split(",")]
        else:
          branches = [_attr(inst.attrs, k) for k in ("false_computation", "true_computation")]
        costs = [self.cost(b, trips, loops, branch) for b in branches]
        loops.append({"conditional": inst.name, "branch_bytes": costs})
        total += branch(costs)
      elif inst.opcode == "while":
        body, cond = _attr(inst.attrs, "body"), _attr(inst.attrs, "condition")
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
