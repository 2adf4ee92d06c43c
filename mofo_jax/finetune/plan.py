"""``mofo-finetune plan``: will this fine-tuning step fit on that slice? Asked of the compiler.

``plan`` builds the real train step (``step.make_train_step``: the model, the chunked loss, the
optimizer ``optimizers.make_optimizer`` builds) for a model config, and AOT-compiles it with
abstract arguments (``jax.ShapeDtypeStruct`` with ``NamedSharding``: no weight is allocated) for

- a TPU slice through libtpu's topology description, when libtpu is installed
  (``pip install 'mofo-jax[tpu-plan]'``): the TPU compiler's own memory figures, and its own
  refusal when the step does not fit;
- otherwise the same number of simulated CPU devices: XLA:CPU's figures, an estimate (its
  fusion and scheduling differ from the TPU compiler's), compared with the chip's HBM.

It prints, per device: parameter and optimizer-state bytes (from the shapes and shardings),
the compiled argument, output and temporary bytes (``memory_analysis()``), the bytes each
step's collectives move (read from the optimized HLO, loop bodies counted once per trip; those
of the optimizer update, where MoFO's selection runs, apart), and whether it fits.

Run ``python -m mofo_jax.finetune.plan --help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

GIB = 1024**3

# Published configs (Hugging Face config.json) of the presets, as LlamaConfig fields.
_LLAMA3_ROPE = {
  "low_freq_factor": 1.0,
  "high_freq_factor": 4.0,
  "original_max_position_embeddings": 8192,
}
_LLAMA = {
  "vocab_size": 128256,
  "rope_theta": 500000.0,
  "rms_norm_eps": 1e-5,
  "max_position_embeddings": 131072,
}
PRESETS: dict[str, dict[str, Any]] = {
  "llama-3.2-1b": dict(
    _LLAMA,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    tie_word_embeddings=True,
    rope_scaling=dict(factor=32.0, **_LLAMA3_ROPE),
  ),
  "llama-3.2-3b": dict(
    _LLAMA,
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=28,
    num_attention_heads=24,
    num_key_value_heads=8,
    head_dim=128,
    tie_word_embeddings=True,
    rope_scaling=dict(factor=32.0, **_LLAMA3_ROPE),
  ),
  "llama-3.1-8b": dict(
    _LLAMA,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    rope_scaling=dict(factor=8.0, **_LLAMA3_ROPE),
  ),
  "llama-3.1-70b": dict(
    _LLAMA,
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    rope_scaling=dict(factor=8.0, **_LLAMA3_ROPE),
  ),
  "qwen2.5-7b": {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 32768,
    "attention_bias": True,
    "model_type": "qwen2",
  },
}

# HBM per JAX device (a chip; v4 and v5p run their two cores as one megacore device), GiB.
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32, "h100": 80, "h200": 141}
# Accelerator-type prefixes (gcloud) -> generation, and how many of the type's count make a
# chip (v4-32 and v5p-64 count TensorCores, two per chip; v5e and v6e count chips).
_ACCELERATOR = {
  "v4": ("v4", 2),
  "v5p": ("v5p", 2),
  "v5litepod": ("v5e", 1),
  "v5e": ("v5e", 1),
  "v6e": ("v6e", 1),
}
# Chip layouts Cloud TPU slices use, by chip count (2-D for v5e/v6e, 3-D for v4/v5p).
_SHAPES_2D = {
  1: "1x1",
  4: "2x2",
  8: "2x4",
  16: "4x4",
  32: "4x8",
  64: "8x8",
  128: "8x16",
  256: "16x16",
}
_SHAPES_3D = {
  4: "2x2x1",
  8: "2x2x2",
  16: "2x2x4",
  32: "2x4x4",
  64: "4x4x4",
  128: "4x4x8",
  256: "4x8x8",
  512: "8x8x8",
}
COLLECTIVE_KINDS = (
  "all-gather",
  "all-reduce",
  "reduce-scatter",
  "all-to-all",
  "collective-permute",
)


class PlanError(ValueError):
  """A user error: printed as one line, exit status 2."""


@dataclasses.dataclass(frozen=True)
class Target:
  """Where the step is compiled for.

  Attributes:
    generation: ``v4``, ``v5e``, ``v5p``, ``v6e``, ``h100``, ``h200`` or ``None`` (unknown HBM).
    devices: JAX devices (chips).
    topology: libtpu topology name (``v5e:4x4``) or ``None``.
  """

  generation: str | None
  devices: int
  topology: str | None


def parse_target(topology: str | None, devices: int | None, chip: str | None) -> Target:
  """Reads ``--topology`` (``v5e:4x4`` or an accelerator type ``v5litepod-16``) or ``--devices``.

  Args:
    topology: the slice, or ``None``.
    devices: a device count (with ``chip`` for the HBM), used without ``topology``.
    chip: generation for the HBM of a ``devices`` target.

  Returns:
    The target.

  Example:
    >>> parse_target("v4-32", None, None)
    Target(generation='v4', devices=16, topology='v4:2x2x4')
    >>> parse_target("v5e:4x4", None, None).devices
    16
  """
  if chip is not None and chip not in HBM_GIB:
    raise PlanError(f"--chip {chip!r}: known chips are {', '.join(HBM_GIB)}")
  if topology is None:
    if devices is None or devices < 1:
      raise PlanError("give --topology (e.g. v5e:4x4, v4-32) or --devices N (with --chip)")
    return Target(chip, devices, None)
  m = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})", topology)
  if m:
    gen, dims = m.group(1), [int(x) for x in m.group(2).split("x")]
    if len(dims) != (3 if gen in ("v4", "v5p") else 2):
      raise PlanError(
        f"--topology {topology!r}: {gen} slices are {'AxBxC' if len(dims) == 2 else 'AxB'}"
      )
    return Target(gen, math.prod(dims), topology)
  m = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", topology)
  if m:
    gen, per_chip = _ACCELERATOR[m.group(1)]
    chips = int(m.group(2)) // per_chip
    shapes = _SHAPES_3D if gen in ("v4", "v5p") else _SHAPES_2D
    if chips not in shapes:
      raise PlanError(
        f"--topology {topology!r}: no known {gen} slice of {chips} chips; "
        f"give the shape instead, e.g. {gen}:{next(iter(shapes.values()))}"
      )
    return Target(gen, chips, f"{gen}:{shapes[chips]}")
  raise PlanError(
    f"--topology {topology!r}: expected GEN:SHAPE (v5e:4x4, v4:2x2x4, v5p:2x4x4, v6e:4x4) "
    "or an accelerator type (v4-32, v5litepod-16, v5p-64, v6e-16)"
  )


def model_config(model: str, **fields: Any):
  """The ``LlamaConfig`` of a preset name or of a Hugging Face ``config.json`` path.

  Args:
    model: a preset (``PRESETS``) or a path to ``config.json`` (or its directory).
    **fields: ``LlamaConfig`` fields to set (dtypes, remat, scan_layers).

  Returns:
    The config.

  Example:
    >>> model_config("llama-3.1-8b").num_hidden_layers
    32
  """
  from mofo_jax.finetune.checkpoints_hf import config_from_hf
  from mofo_jax.finetune.model import LlamaConfig

  if model.lower() in PRESETS:
    return LlamaConfig(**{**PRESETS[model.lower()], **fields})
  path = Path(model)
  if path.is_dir():
    path = path / "config.json"
  if not path.is_file():
    raise PlanError(
      f"--model {model!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json file"
    )
  try:
    return config_from_hf(json.loads(path.read_text()), **fields)
  except (ValueError, OSError) as e:
    raise PlanError(f"--model {path}: {e}") from None


def check_mesh(config, sizes: dict[str, int], devices: int, batch: int) -> None:
  """Raises ``PlanError`` naming the axis when the mesh cannot shard this model and batch.

  Example:
    >>> check_mesh(model_config("llama-3.1-8b"), {"data": 1, "fsdp": 4, "tensor": 16}, 64, 4)
    Traceback (most recent call last):
    ...
    mofo_jax.finetune.plan.PlanError: --mesh: tensor=16 does not divide num_key_value_heads=8
  """
  if math.prod(sizes.values()) != devices:
    raise PlanError(
      f"--mesh {_mesh_str(sizes)} has {math.prod(sizes.values())} devices; the target has {devices}"
    )
  needs = {
    "tensor": {
      "num_attention_heads": config.num_attention_heads,
      "num_key_value_heads": config.num_key_value_heads,
      "vocab_size": config.vocab_size,
      "intermediate_size": config.intermediate_size,
    },
    "fsdp": {"hidden_size": config.hidden_size},
  }
  for axis, dims in needs.items():
    for name, size in dims.items():
      if size % sizes[axis]:
        raise PlanError(f"--mesh: {axis}={sizes[axis]} does not divide {name}={size}")
  shards = sizes["data"] * sizes["fsdp"]
  if batch % shards:
    raise PlanError(f"--batch-size {batch} is not a multiple of data x fsdp = {shards}")


def _mesh_str(sizes: dict[str, int]) -> str:
  return ",".join(f"{k}={v}" for k, v in sizes.items())


def _resolve_mesh(spec: str, devices: int) -> dict[str, int]:
  from mofo_jax.finetune.train import parse_mesh

  try:
    sizes = parse_mesh(spec)
  except ValueError as e:
    raise PlanError(str(e)) from None
  free = [k for k, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise PlanError(f"--mesh {spec!r}: at most one axis may be -1")
  if any(v < 1 for k, v in sizes.items() if k not in free):
    raise PlanError(f"--mesh {spec!r}: sizes must be positive (or one -1)")
  if free:
    known = math.prod(v for k, v in sizes.items() if k not in free)
    if devices % known:
      raise PlanError(f"--mesh {spec!r}: {known} does not divide the {devices} devices")
    sizes[free[0]] = devices // known
  return sizes


def _tpu_devices(topology: str):
  """libtpu's devices for ``topology``, or ``None`` when libtpu is not installed."""
  import importlib.util

  if importlib.util.find_spec("libtpu") is None:
    return None
  # Several planners may share a machine; they only compile, so libtpu's one-process lock
  # has nothing to protect. No TPU is needed: the topology is a description.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  from jax.experimental import topologies

  kwargs = {"chip_config_name": "megacore"} if topology.startswith(("v4", "v5p")) else {}
  return topologies.get_topology_desc(platform="tpu", topology_name=topology, **kwargs).devices


def _cpu_devices(n: int):
  import jax

  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError:
    pass  # the backend is already up: use what it has, if enough
  devices = jax.devices("cpu")
  if len(devices) < n:
    raise PlanError(
      f"{n} simulated CPU devices are needed but JAX already started with {len(devices)}: run "
      f"plan in a fresh process, or set XLA_FLAGS=--xla_force_host_platform_device_count={n}"
    )
  return devices[:n]


def _make_mesh(devices, sizes: dict[str, int]):
  import jax
  import numpy as np
  from jax.experimental import mesh_utils

  shape = tuple(sizes.values())
  try:
    arr = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    arr = np.asarray(devices).reshape(shape)
  return jax.sharding.Mesh(arr, tuple(sizes), axis_types=(jax.sharding.AxisType.Auto,) * 3)


# HLO analysis ------------------------------------------------------------------------------

_GROUPS_LIST_RE = re.compile(r"replica_groups=\{\{([^}]*)\}")
_GROUPS_MESH_RE = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_GROUPS_IOTA_RE = re.compile(r"replica_groups=\[\d+,(\d+)\]<=")
_OPNAME_RE = re.compile(r'op_name="([^"]*)"')


def _group_size(attrs: str) -> int | None:
  """Devices per replica group of a collective (``None``: not stated)."""
  m = _GROUPS_LIST_RE.search(attrs)
  if m:
    return len(m.group(1).split(","))
  m = _GROUPS_MESH_RE.search(attrs)
  if m:
    sizes = dict(re.findall(r"'?([\w]+)'?=(\d+)", m.group(1)))
    chosen = re.findall(r"'?([\w]+)'?", m.group(2))
    return math.prod(int(sizes[a]) for a in chosen if a in sizes)
  m = _GROUPS_IOTA_RE.search(attrs)
  return int(m.group(1)) if m else None


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
  from mofo_jax.finetune import hlo
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
      if _group_size(inst.attrs) == 1:
        continue  # groups of one device move nothing
      name_m = _OPNAME_RE.search(inst.attrs)
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
          optimizer=bool(name_m and OPTIMIZER_SCOPE in name_m.group(1)),
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


# Planning ----------------------------------------------------------------------------------


@dataclasses.dataclass
class PlanResult:
  """What one compile of the step says, per device (bytes)."""

  optimizer: str
  params: int
  opt_state: int
  arguments: int | None = None
  outputs: int | None = None
  aliased: int | None = None
  temps: int | None = None
  collectives: list[Collective] = dataclasses.field(default_factory=list)
  refused: str | None = None
  compile_s: float = 0.0

  @property
  def peak(self) -> int | None:
    if self.temps is None:
      return None
    # The trainer also keeps the pretrained weights on the devices (distance and changed-entry
    # metrics), one more copy of the params outside the step.
    return self.arguments + self.outputs - self.aliased + self.temps + self.params


def _per_device_bytes(tree) -> int:
  import jax

  total = 0
  for x in jax.tree.leaves(tree):
    shard = x.sharding.shard_shape(x.shape)
    total += math.prod(shard) * x.dtype.itemsize
  return total


def compile_step(
  config,
  mesh,
  optimizer_name: str,
  batch: int,
  seq_len: int,
  *,
  fraction: float = 0.1,
  grad_accum: int = 1,
  loss_chunk: int | None = None,
) -> tuple[PlanResult, Any]:
  """AOT-compiles the train step for abstract params and batch on ``mesh``.

  Args:
    config: the model's ``LlamaConfig``.
    mesh: a (data, fsdp, tensor) mesh over the target's devices.
    optimizer_name: an ``optimizers.OPTIMIZERS`` name.
    batch: global batch rows.
    seq_len: tokens per row.
    fraction: MoFO's fraction.
    grad_accum: micro-batches per step.
    loss_chunk: positions per loss chunk (default ``step.LOSS_CHUNK``).

  Returns:
    ``(result, compiled)``; ``compiled`` is ``None`` when the compiler refused (``result.refused``
    holds its message).
  """
  import jax
  from flax import nnx
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import mofo_jax
  from mofo_jax.finetune import model as model_lib
  from mofo_jax.finetune import optimizers, step

  abstract_model = nnx.eval_shape(lambda: model_lib.LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(abstract_model, nnx.Param, ...)
  shardings = model_lib.param_shardings(abstract_model, mesh)
  params = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings
  )
  opt_cfg = optimizers.OptimizerConfig(name=optimizer_name, fraction=fraction)
  opt = optimizers.make_optimizer(opt_cfg, params, stacked_layers=config.scan_layers)
  opt_shardings = mofo_jax.state_shardings(opt, params)
  opt_state = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    jax.eval_shape(opt.init, params),
    opt_shardings,
  )
  batch_sharding = NamedSharding(mesh, P(model_lib.ACTIVATION_BATCH_AXES))
  fn = step.make_train_step(
    graphdef,
    rest,
    opt,
    grad_accum=grad_accum,
    mesh=mesh,
    loss_chunk=loss_chunk or step.LOSS_CHUNK,
  )
  param_out = jax.tree.map(lambda x: x.sharding, params)
  jitted = jax.jit(fn, donate_argnums=(0, 1), out_shardings=(param_out, opt_shardings, None))
  result = PlanResult(optimizer_name, _per_device_bytes(params), _per_device_bytes(opt_state))
  start = time.perf_counter()
  try:
    compiled = jitted.lower(params, opt_state, step.abstract_batch(batch, seq_len, batch_sharding))
    compiled = compiled.compile()
  except Exception as e:  # the TPU compiler's refusal is an XlaRuntimeError
    msg = str(e)
    if "RESOURCE_EXHAUSTED" not in msg and "exceeds" not in msg:
      raise
    result.refused = " ".join(msg.split())
    result.compile_s = time.perf_counter() - start
    return result, None
  result.compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  result.arguments = mem.argument_size_in_bytes
  result.outputs = mem.output_size_in_bytes
  result.aliased = mem.alias_size_in_bytes
  result.temps = mem.temp_size_in_bytes
  result.collectives = collectives(compiled.as_text())
  return result, compiled


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
    ("trainer's pretrained copy (GiB)", [_gib(r.params) for r in results]),
    ("peak = arguments + outputs + temps + copy", [_gib(r.peak) for r in results]),
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
  verdicts = []
  for r in results:
    if r.refused:
      verdicts.append("NO (compiler)")
    elif hbm is None:
      verdicts.append("?")
    else:
      verdicts.append("yes" if r.peak <= hbm * GIB else "NO")
  rows.append(("compile time (s)", [f"{r.compile_s:.0f}" for r in results]))
  rows.append((f"fits in {hbm:g} GiB" if hbm else "fits", verdicts))
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


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="mofo-finetune plan",
    description="AOT-compile the fine-tuning step for a TPU slice (or N devices) and report "
    "its memory and collectives per device, without allocating weights.",
  )
  p.add_argument(
    "--model",
    required=True,
    help=f"a preset ({', '.join(PRESETS)}) or a Hugging Face config.json (or its directory)",
  )
  p.add_argument(
    "--topology",
    help="TPU slice: GEN:SHAPE (v5e:4x4, v4:2x2x4, v5p:2x4x4, v6e:4x4) or an accelerator "
    "type (v4-32, v5litepod-16, v5p-64, v6e-16)",
  )
  p.add_argument("--devices", type=int, help="a device count instead of --topology")
  p.add_argument("--chip", help=f"with --devices: the chip, for its HBM ({', '.join(HBM_GIB)})")
  p.add_argument(
    "--mesh", default="fsdp=-1", help="data=..,fsdp=..,tensor=.. (one may be -1; default fsdp=-1)"
  )
  p.add_argument(
    "--batch-size",
    type=int,
    default=None,
    help="rows per optimizer step, all devices and accumulation included (default: data x fsdp)",
  )
  p.add_argument("--seq-len", type=int, default=2048, help="tokens per row (default: 2048)")
  p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default: 1)")
  dtypes = ("float32", "bfloat16")
  p.add_argument("--dtype", choices=dtypes, help="parameter and compute dtype at once")
  p.add_argument(
    "--param-dtype", choices=dtypes, help="weights, the master copy (default: float32)"
  )
  p.add_argument("--compute-dtype", choices=dtypes, help="matmuls (default: bfloat16)")
  p.add_argument(
    "--remat", choices=("full", "none"), default="full", help="recompute layers (default: full)"
  )
  p.add_argument(
    "--no-scan-layers", action="store_true", help="separate layers (slow to compile at 8B+)"
  )
  p.add_argument(
    "--optimizer",
    default="mofo,adamw",
    help="comma-separated optimizers to compile side by side (default: mofo,adamw)",
  )
  p.add_argument("--fraction", type=float, default=0.1, help="MoFO's fraction (default: 0.1)")
  p.add_argument(
    "--loss-chunk", type=int, default=None, help="positions per loss chunk (default: 512)"
  )
  p.add_argument(
    "--platform",
    choices=("auto", "tpu", "cpu"),
    default="auto",
    help="auto: the TPU compiler when libtpu is installed and --topology names a TPU, "
    "else simulated CPU devices",
  )
  p.add_argument(
    "--layers", type=int, default=None, help="override num_hidden_layers (quick looks, tests)"
  )
  p.add_argument("--json", metavar="FILE", help="also write the figures to FILE (a new file)")
  p.add_argument(
    "--save-hlo", metavar="DIR", help="write each optimizer's optimized HLO into DIR (new files)"
  )
  return p


def run_plan(args: argparse.Namespace) -> tuple[str, list[PlanResult]]:
  """Compiles what ``args`` describe; returns the printed report and the results."""
  from mofo_jax.finetune.optimizers import OPTIMIZERS

  target = parse_target(args.topology, args.devices, args.chip)
  sizes = _resolve_mesh(args.mesh, target.devices)
  batch = args.batch_size if args.batch_size is not None else sizes["data"] * sizes["fsdp"]
  names = [n.strip() for n in args.optimizer.split(",") if n.strip()]
  for n in names:
    if n not in OPTIMIZERS:
      raise PlanError(f"--optimizer {n!r}: known optimizers are {', '.join(OPTIMIZERS)}")
  if "hft" in names and not args.no_scan_layers:
    raise PlanError("--optimizer hft needs --no-scan-layers")
  if args.seq_len < 1 or batch < 1 or args.grad_accum < 1:
    raise PlanError("--batch-size, --seq-len and --grad-accum must be positive")
  if batch % (args.grad_accum * sizes["data"] * sizes["fsdp"]):
    raise PlanError(
      f"--batch-size {batch} is not a multiple of grad_accum x data x fsdp = "
      f"{args.grad_accum * sizes['data'] * sizes['fsdp']}"
    )
  if args.json and Path(args.json).exists():
    raise PlanError(f"--json {args.json}: the file exists; give a new name")
  param_dtype = args.param_dtype or args.dtype or "float32"
  compute_dtype = args.compute_dtype or args.dtype or "bfloat16"
  overrides = {} if args.layers is None else {"num_hidden_layers": args.layers}
  if args.layers is not None and args.layers < 1:
    raise PlanError("--layers must be positive")
  config = model_config(
    args.model,
    **overrides,
    dtype=compute_dtype,
    param_dtype=param_dtype,
    remat=args.remat == "full",
    scan_layers=not args.no_scan_layers,
  )
  check_mesh(config, sizes, target.devices, batch)
  devices = None
  if args.platform != "cpu" and target.topology is not None:
    devices = _tpu_devices(target.topology)
    if devices is None and args.platform == "tpu":
      raise PlanError("--platform tpu needs libtpu: pip install 'mofo-jax[tpu-plan]'")
  if args.platform == "tpu" and target.topology is None:
    raise PlanError("--platform tpu needs --topology")
  on_tpu = devices is not None
  if not on_tpu:
    devices = _cpu_devices(target.devices)
  mesh = _make_mesh(devices, sizes)
  hbm = HBM_GIB.get(target.generation) if target.generation else None
  if on_tpu:
    import jax

    how = f"TPU compiler (libtpu, jax {jax.__version__}), {devices[0].device_kind}"
  else:
    how = "simulated CPU devices (XLA:CPU's figures: an estimate; TPU compilers differ)"
  header = [
    f"plan: {args.model} on {target.topology or f'{target.devices} devices'}: {how}",
    f"mesh {_mesh_str(sizes)}; batch {batch} x {args.seq_len} tokens"
    + (f" in {args.grad_accum} micro-batches" if args.grad_accum > 1 else "")
    + f"; params {param_dtype}, compute {compute_dtype}, moments float32; remat {args.remat}; "
    + ("separate layers" if args.no_scan_layers else "scanned layers"),
  ]
  hlo_dir = Path(args.save_hlo) if args.save_hlo else None
  if hlo_dir is not None:
    clash = [hlo_dir / f"{n}.hlo.txt" for n in names if (hlo_dir / f"{n}.hlo.txt").exists()]
    if clash:
      raise PlanError(f"--save-hlo: {clash[0]} exists; give a new directory")
  results = []
  for n in names:
    result, compiled = compile_step(
      config,
      mesh,
      n,
      batch,
      args.seq_len,
      fraction=args.fraction,
      grad_accum=args.grad_accum,
      loss_chunk=args.loss_chunk,
    )
    results.append(result)
    if hlo_dir is not None and compiled is not None:
      hlo_dir.mkdir(parents=True, exist_ok=True)
      (hlo_dir / f"{n}.hlo.txt").write_text(compiled.as_text())
  seqs = [args.seq_len, min(args.seq_len, args.loss_chunk or 512)]
  for r in results:
    bad = global_batch_gathers(r.collectives, batch // args.grad_accum, seqs)
    if bad and batch // args.grad_accum > 1 and sizes["data"] * sizes["fsdp"] > 1:
      header.append(
        f"warning: {r.optimizer}: {len(bad)} all-gathers assemble the global batch, e.g. "
        f"{bad[0].shapes}"
      )
  if hbm is not None and not on_tpu:
    header.append(f"HBM per device assumed: {hbm} GiB ({target.generation})")
  report = format_report(header, results, hbm)
  if args.json:
    Path(args.json).write_text(
      json.dumps(
        {
          "header": header,
          "hbm_gib": hbm,
          "results": [
            {
              **{k: v for k, v in dataclasses.asdict(r).items() if k != "collectives"},
              "peak": r.peak,
              "collective_bytes": _coll_total(r.collectives),
              "optimizer_collective_bytes": _coll_total(r.collectives, optimizer=True),
            }
            for r in results
          ],
        },
        indent=1,
      )
    )
  return report, results


def main(argv: Sequence[str] | None = None) -> int:
  """``mofo-finetune plan``: prints the plan; user errors are one line with exit status 2."""
  args = build_parser().parse_args(argv)
  try:
    report, _ = run_plan(args)
  except PlanError as e:
    print(f"mofo-finetune plan: error: {e}", file=sys.stderr)
    return 2
  print(report)
  return 0


if __name__ == "__main__":
  sys.exit(main())
