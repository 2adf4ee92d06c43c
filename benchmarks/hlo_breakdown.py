"""Where the bytes of a saved program's optimizer update go, instruction by instruction.

Run from the repository root on the HLO that ``mofo-finetune plan --save-hlo DIR`` writes:

    python benchmarks/hlo_breakdown.py DIR/mofo.hlo.txt DIR/adamw.hlo.txt --params 501891328

Each instruction under the optimizer's named scope (``optimizer_update``, see
``mofo_jax.finetune.step``) is billed as ``benchmarks/hlo_bytes.py`` bills it, in device memory
only unless ``--all-memory``, every loop trip counted, in the dearest branch of each conditional
(the bracket missed) and then the cheapest (held). The bytes are grouped by kind: a Pallas
kernel by its name, any other instruction by its opcode and the last part of its ``op_name``
(``fusion:select_n`` is optax's clip materialised, ``fusion:add`` the masked update), and
printed per parameter (kinds under 0.001 B/param in every file summed in one line) (``--params``: the parameters one device holds), one column per file,
with the ``--top`` dearest single instructions of the first file.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import hlo_bytes
from mofo_jax.finetune.step import OPTIMIZER_SCOPE

_OP_NAME = re.compile(r'op_name="([^"]*)"')
_KERNEL = re.compile(r"/([\w.]+)/pallas_call")


def kind(op_name: str, opcode: str) -> str:
  """The group an instruction is billed to: its Pallas kernel, else opcode and op_name's tail."""
  kernel = _KERNEL.search(op_name)
  return kernel.group(1) if kernel else f"{opcode}:{op_name.rsplit('/', 1)[-1]}"


def breakdown(text: str, device_memory_only: bool, branch) -> tuple[dict[str, float], list]:
  """Bytes of the optimizer's instructions by :func:`kind`, and those instructions as
  ``(bytes, trips, instruction, op_name)``, dearest first."""
  found = []
  for b, trips, inst in hlo_bytes.instructions(text, device_memory_only, branch):
    op_name = _OP_NAME.search(inst.attrs)
    if op_name and OPTIMIZER_SCOPE in op_name.group(1):
      found.append((b, trips, inst, op_name.group(1)))
  by_kind: dict[str, float] = collections.Counter()
  for b, _, inst, op_name in found:
    by_kind[kind(op_name, inst.opcode)] += b
  return dict(by_kind), sorted(found, key=lambda x: -x[0])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("hlo", nargs="+", help="optimised HLO text files (Compiled.as_text())")
  parser.add_argument("--params", type=float, default=1.0, help="parameters per device")
  parser.add_argument("--all-memory", action="store_true", help="also bill on-chip buffers")
  parser.add_argument("--top", type=int, default=12, help="dearest instructions of the first")
  args = parser.parse_args()
  texts = [open(path).read() for path in args.hlo]
  names = [os.path.basename(path) for path in args.hlo]
  for branch, label in ((max, "dearest branches (bracket missed)"), (min, "cheapest (held)")):
    parts = [breakdown(t, not args.all_memory, branch) for t in texts]
    print(f"\n{OPTIMIZER_SCOPE}, {label}: bytes per parameter")
    print(f"{'kind':44s}" + "".join(f"{n[:14]:>15s}" for n in names))
    kinds = sorted(
      {k for by_kind, _ in parts for k in by_kind}, key=lambda k: -parts[0][0].get(k, 0)
    )
    small = [k for k in kinds if all(p[0].get(k, 0) / args.params < 0.001 for p in parts)]
    for k in kinds:
      if k not in small:
        print(f"{k[:44]:44s}" + "".join(f"{p[0].get(k, 0) / args.params:15.3f}" for p in parts))
    rest = [sum(p[0].get(k, 0) for k in small) / args.params for p in parts]
    print(f"{f'{len(small)} other kinds, each < 0.001':44s}" + "".join(f"{r:15.3f}" for r in rest))
    print(f"{'total':44s}" + "".join(f"{sum(p[0].values()) / args.params:15.3f}" for p in parts))
  print(f"\nthe {args.top} dearest instructions of {names[0]} (bracket missed):")
  for b, trips, inst, op_name in breakdown(texts[0], not args.all_memory, max)[1][: args.top]:
    print(
      f"{b / args.params:8.3f} x{trips:<3d} {inst.opcode:12s} {inst.shape[:60]:60s} {op_name[-60:]}"
    )


if __name__ == "__main__":
  main()
