"""Where ``plan`` compiles for: TPU slices by topology or accelerator type, the chips' HBM, the
mesh over the target's devices, and the device lists (libtpu's topology, or simulated CPUs)."""

from __future__ import annotations

import dataclasses
import math
import os
import re

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


def check_mesh(config, sizes: dict[str, int], devices: int) -> None:
  """Raises ``PlanError`` when the mesh does not span the target or cannot shard this model.

  Which model dimensions each axis must divide comes from the model's sharding rules, through
  the check the trainer's loader runs (``checkpoints_hf.check_mesh``).

  Example:
    >>> from mofo_jax.finetune.plan.presets import model_config
    >>> check_mesh(model_config("llama-3.1-8b"), {"data": 1, "fsdp": 4, "tensor": 16}, 64)
    Traceback (most recent call last):
    ...
    mofo_jax.finetune.plan.targets.PlanError: --mesh data=1,fsdp=4,tensor=16: mesh axis 'tensor' of size 16 does not divide num_key_value_heads=8 (logical axis 'kv_heads')
  """
  import jax

  from mofo_jax.finetune.checkpoints_hf import check_mesh as check_rules

  if math.prod(sizes.values()) != devices:
    raise PlanError(
      f"--mesh {mesh_str(sizes)} has {math.prod(sizes.values())} devices; the target has {devices}"
    )
  try:
    check_rules(config, jax.sharding.AbstractMesh(tuple(sizes.values()), tuple(sizes)))
  except ValueError as e:
    raise PlanError(f"--mesh {mesh_str(sizes)}: {e}") from None


def mesh_str(sizes: dict[str, int]) -> str:
  """``data=1,fsdp=4,tensor=2``: the mesh as ``--mesh`` writes it."""
  return ",".join(f"{k}={v}" for k, v in sizes.items())


def resolve_mesh(spec: str, devices: int) -> dict[str, int]:
  """The axis sizes ``--mesh`` gives for ``devices``, its one ``-1`` axis filled in."""
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


def tpu_devices(topology: str):
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
  try:
    return topologies.get_topology_desc(platform="tpu", topology_name=topology, **kwargs).devices
  except RuntimeError as e:  # a layout libtpu does not build (JaxRuntimeError: INVALID_ARGUMENT)
    raise PlanError(f"--topology {topology}: libtpu: {str(e).splitlines()[0]}") from None


def cpu_devices(n: int):
  """``n`` simulated CPU devices (``PlanError`` when JAX already started with fewer)."""
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


def make_mesh(devices, sizes: dict[str, int]):
  """A (data, fsdp, tensor) mesh of ``sizes`` over ``devices``, laid out as the trainer lays
  out its own (:func:`mofo_jax.finetune.train.device_grid`)."""
  import jax

  from mofo_jax.finetune import train

  grid = train.device_grid(devices, tuple(sizes.values()))
  return jax.sharding.Mesh(grid, tuple(sizes), axis_types=(jax.sharding.AxisType.Auto,) * 3)
