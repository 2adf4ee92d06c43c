"""The table ``plan`` prints, and the figures it writes with ``--json``."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

from mofo_jax.finetune.plan.aot import PlanResult
from mofo_jax.finetune.plan.collective_bytes import COLLECTIVE_KINDS, Collective

GIB = 1024**3


def _gib(x: int | None) -> str:
  return "-" if x is None else f"{x / GIB:.2f}"


def _mb(x: float) -> str:
  return f"{x / 1e6:,.1f}"


def _coll_total(colls: Sequence[Collective], kind: str | None = None, optimizer=None) -> int:
  return sum(
    c.bytes * c.times
    for c in colls
    if (kind is None or c.kind == kind) and (optimizer is None or c.optimizer == optimizer)
  )


def format_report(header: list[str], results: list[PlanResult], hbm: float | None) -> str:
  """The table ``plan`` prints: one column per optimizer."""
  names = [r.optimizer for r in results]
  rows: list[tuple[str, list[str]]] = [
    ("parameters (GiB)", [_gib(r.params) for r in results]),
    ("optimizer state (GiB)", [_gib(r.opt_state) for r in results]),
    ("compiled arguments (GiB)", [_gib(r.arguments) for r in results]),
    (
      "compiled outputs, not aliased (GiB)",
      [_gib(r.outputs and r.outputs - r.aliased) for r in results],
    ),
    ("compiled temporaries (GiB)", [_gib(r.temps) for r in results]),
    ("peak, metrics host/off = args+outs+temps", [_gib(r.peak_without_copy) for r in results]),
    ("pretrained copy, metrics device (GiB)", [_gib(r.params) for r in results]),
    ("peak, metrics device = the above + copy", [_gib(r.peak) for r in results]),
  ]
  for kind in COLLECTIVE_KINDS:
    if any(c.kind == kind for r in results for c in r.collectives):
      rows.append(
        (f"{kind} per step (MB)", [_mb(_coll_total(r.collectives, kind)) for r in results])
      )
  rows.append(("collectives per step (MB)", [_mb(_coll_total(r.collectives)) for r in results]))
  rows.append(
    (
      "  of which optimizer update (kB)",
      [f"{_coll_total(r.collectives, optimizer=True) / 1e3:,.1f}" for r in results],
    )
  )
  rows.append(
    (
      "  optimizer all-gathers/all-to-alls",
      [
        str(sum(c.optimizer and c.kind in ("all-gather", "all-to-all") for c in r.collectives))
        for r in results
      ],
    )
  )
  rows.append(("compile time (s)", [f"{r.compile_s:.0f}" for r in results]))
  fits = f"fits in {hbm:g} GiB" if hbm else "fits"
  rows.append((f"{fits}, metrics host/off / device", [_verdict(r, hbm) for r in results]))
  width = max(len(k) for k, _ in rows) + 2
  col = max(12, *(len(n) + 2 for n in names))
  lines = list(header)
  lines.append("per device".ljust(width) + "".join(n.rjust(col) for n in names))
  for k, vals in rows:
    lines.append(k.ljust(width) + "".join(v.rjust(col) for v in vals))
  for r in results:
    if r.refused:
      lines.append(f"{r.optimizer}: the compiler refused: {r.refused[:400]}")
  return "\n".join(lines)


def _verdict(r: PlanResult, hbm: float | None) -> str:
  """Whether the step fits without the pretrained copy on the devices / with it."""
  if r.refused:
    return "NO (compiler)"
  if hbm is None:
    return "?"
  return " / ".join("yes" if x <= hbm * GIB else "NO" for x in (r.peak_without_copy, r.peak))


def figures_json(header: list[str], results: list[PlanResult], hbm: float | None) -> str:
  """The figures ``--json`` writes: the header, the HBM, and each optimizer's bytes."""
  return json.dumps(
    {
      "header": header,
      "hbm_gib": hbm,
      "results": [
        {
          **{k: v for k, v in dataclasses.asdict(r).items() if k != "collectives"},
          "peak": r.peak,
          "peak_without_copy": r.peak_without_copy,
          "collective_bytes": _coll_total(r.collectives),
          "optimizer_collective_bytes": _coll_total(r.collectives, optimizer=True),
        }
        for r in results
      ],
    },
    indent=1,
  )
