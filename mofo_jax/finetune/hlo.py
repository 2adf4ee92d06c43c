"""A reader of XLA's optimised HLO text (``Compiled.as_text()``): the project's one HLO parser.

It splits a module into computations of instructions, reads array shapes and their bytes
(the dtype-size table lives here), follows the computations an instruction calls, and reads the
trip count of a while loop and a collective's replica groups. ``plan``'s collective accounting
and ``benchmarks/hlo_bytes.py``'s byte count both read HLO through it.

An instruction line reads ``%name = SHAPE opcode(ARGS), ATTRS``; ``SHAPE`` is an array
``dtype[dims]{layout}`` or a tuple of them, and ``ARGS`` names the operands (``%x``), with their
shapes where XLA prints them.
"""

from __future__ import annotations

import dataclasses
import math
import re

# Bytes per entry of each XLA element type (s4 and u4 pack two entries a byte).
DTYPE_BYTES = {
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
ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([0-9,]*)\](\{[^}]*\})?")
ON_CHIP = re.compile(r"S\([1-9]\d*\)")
_NAME = re.compile(r"%[\w.\-]+")
_CALLS = re.compile(
  r"\b(?:body|condition|calls|to_apply|true_computation|false_computation)=(%[\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_KNOWN_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_INT_CONSTANT = re.compile(r"^\s*(?:ROOT )?(%[\w.\-]+) = [su]\d+\[\]\S* constant\((-?\d+)\)")
_GROUPS_LIST = re.compile(r"replica_groups=\{\{([^}]*)\}")
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[\d+,(\d+)\]<=")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def arrays(text: str) -> list[tuple[str, tuple[int, ...], str]]:
  """The arrays of a shape (or any HLO text), in order, as ``(dtype, dims, layout)``.

  Example:
    >>> arrays("(f32[8,2]{1,0}, s32[])")
    [('f32', (8, 2), '{1,0}'), ('s32', (), '')]
  """
  return [
    (dtype, tuple(int(d) for d in dims.split(",") if d), layout)
    for dtype, dims, layout in ARRAY.findall(text)
  ]


def shape_bytes(text: str, device_memory_only: bool = False) -> float:
  """Bytes of the arrays a shape (or any HLO text) names.

  Args:
    text: a shape such as ``(f32[1024,8]{1,0}, s32[])``, or an operand list.
    device_memory_only: leave out arrays the layout places in on-chip memory (``S(1)``).

  Returns:
    The bytes: an int, unless a sub-byte type leaves half a byte.

  Example:
    >>> shape_bytes("(bf16[4,2]{1,0}, u32[256]{0:S(1)})")
    1040
    >>> shape_bytes("(bf16[4,2]{1,0}, u32[256]{0:S(1)})", device_memory_only=True)
    16
  """
  return sum(
    DTYPE_BYTES[d] * math.prod(dims)
    for d, dims, layout in arrays(text)
    if not (device_memory_only and ON_CHIP.search(layout))
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
  """One instruction line of a computation.

  Attributes:
    name: ``%name``.
    shape: its result shape, as printed.
    opcode: ``fusion``, ``while``, ``all-gather-start``, ...
    operands: the ``%names`` its arguments refer to, in order.
    args: the text between the opcode's parentheses (operands, with shapes where printed).
    attrs: the text after them (``, replica_groups=..., metadata={...}``).
  """

  name: str
  shape: str
  opcode: str
  operands: list[str]
  args: str
  attrs: str


def parse_instruction(line: str) -> Instruction | None:
  """The instruction on ``line``, or ``None`` when the line holds none.

  Example:
    >>> i = parse_instruction("  ROOT %r = f32[8]{0} all-reduce(f32[8]{0} %x), to_apply=%add")
    >>> (i.name, i.shape, i.opcode, i.operands, i.attrs)
    ('%r', 'f32[8]{0}', 'all-reduce', ['%x'], ', to_apply=%add')
  """
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


def parse_module(text: str) -> tuple[dict[str, list[Instruction]], str | None]:
  """The computations of an HLO module's text, by name, and the entry's name (``None``: none)."""
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
    inst = parse_instruction(line)
    if inst is not None:
      computations[current].append(inst)
  return computations, entry


def attr(attrs: str, key: str) -> str | None:
  """The computation an attribute names (``body=%b`` -> ``%b``), or ``None``."""
  m = re.search(key + r"=(%[\w.\-]+)", attrs)
  return m.group(1) if m else None


def replica_group_size(attrs: str) -> int | None:
  """Devices per replica group of a collective's attributes (``None``: not stated).

  Example:
    >>> replica_group_size("channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}")
    4
    >>> replica_group_size("replica_groups=[2,4]<=[8]")
    4
  """
  m = _GROUPS_LIST.search(attrs)
  if m:
    return len(m.group(1).split(","))
  m = _GROUPS_MESH.search(attrs)
  if m:
    sizes = dict(re.findall(r"'?([\w]+)'?=(\d+)", m.group(1)))
    chosen = re.findall(r"'?([\w]+)'?", m.group(2))
    return math.prod(int(sizes[a]) for a in chosen if a in sizes)
  m = _GROUPS_IOTA.search(attrs)
  return int(m.group(1)) if m else None


def op_name(attrs: str) -> str | None:
  """The JAX operation an instruction came from (its metadata's ``op_name``), or ``None``."""
  m = _OP_NAME.search(attrs)
  return m.group(1) if m else None


class Module:
  """A parsed HLO module: its computations, its instructions by name, its integer constants.

  Example:
    >>> m = Module('''
    ... ENTRY %main (x: f32[8]) -> f32[8] {
    ...   %x = f32[8]{0} parameter(0)
    ...   ROOT %y = f32[8]{0} fusion(f32[8]{0} %x), kind=kLoop, calls=%fused
    ... }''')
    >>> m.entry, [i.opcode for i in m.computations["%main"]], m.callees(m.by_name["%y"])
    ('%main', ['parameter', 'fusion'], ['%fused'])
  """

  def __init__(self, text: str):
    self.computations, self.entry = parse_module(text)
    self.by_name = {i.name: i for insts in self.computations.values() for i in insts}
    self.constants = {}
    for line in text.splitlines():
      m = _INT_CONSTANT.match(line)
      if m:
        self.constants[m.group(1)] = int(m.group(2))

  def value(self, name: str) -> int | None:
    """The integer a scalar instruction holds when it is a constant (through copies)."""
    while name not in self.constants:
      inst = self.by_name.get(name)
      if inst is None or inst.opcode not in ("copy", "bitcast", "convert") or not inst.operands:
        return None
      name = inst.operands[0]
    return self.constants[name]

  def callees(self, inst: Instruction) -> list[str]:
    """The computations ``inst`` calls: a loop's body and condition, a fusion's, branches."""
    names = _CALLS.findall(inst.attrs)
    for group in _BRANCHES.findall(inst.attrs):
      names += [b.strip() for b in group.split(",")]
    return names

  def trip_count(self, inst: Instruction) -> int | None:
    """The trip count of a while instruction, or ``None`` when it cannot be read.

    XLA's ``known_trip_count`` where it wrote one; else the loop's shape as ``lax.fori_loop``
    and ``lax.scan`` emit it: a counter in the loop tuple compared ``LT`` with a constant in
    the condition, starting from a constant and stepping by one in the body.
    """
    m = _KNOWN_TRIPS.search(inst.attrs)
    if m:
      return int(m.group(1))
    cond = self.computations.get(attr(inst.attrs, "condition"), [])
    body = self.computations.get(attr(inst.attrs, "body"), [])
    if not cond or not body:
      return None
    root = cond[-1]
    m = re.search(r"direction=(LT|GT)", root.attrs)
    if root.opcode != "compare" or not m or len(root.operands) != 2:
      return None
    a, b = (self.by_name.get(n) for n in root.operands)
    counter, bound = (a, b) if m.group(1) == "LT" else (b, a)
    limit = self.value(bound.name) if bound is not None else None
    if counter is None or counter.opcode != "get-tuple-element" or limit is None:
      return None
    index = int(re.search(r"index=(\d+)", counter.attrs).group(1))
    # The counter's start: the while's operand tuple at that index.
    init_tuple = self.by_name.get(inst.operands[0])
    if init_tuple is None or init_tuple.opcode != "tuple":
      return None
    start = self.value(init_tuple.operands[index])
    # The body must step the counter by one.
    body_root = body[-1]
    if body_root.opcode != "tuple" or start is None:
      return None
    step = self.by_name.get(body_root.operands[index])
    if step is None or step.opcode != "add":
      return None
    if 1 not in [self.value(n) for n in step.operands]:
      return None
    return max(0, limit - start)
