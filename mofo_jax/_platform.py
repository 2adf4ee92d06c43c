"""Per-platform code that traces one branch: :func:`platform_dependent`.

``jax.lax.platform_dependent`` traces every branch into the program (a Pallas TPU kernel path
and its XLA fallback both), and only drops the unused ones when lowering; the tracing of both,
and the constants of both (passed into the conditional as operands), are paid on every compile.

Here one branch is traced, inline, for the platform the program will most likely be lowered for
(:func:`likely_platform`); its results go through a primitive whose lowering passes them on
unchanged on that platform and, on any other, lowers the other branch there, traced only then
from the explicit ``operands``. So the guessed branch may close over traced values, but every
other branch must read traced values only through ``operands`` (one that closes over a traced
value fails to lower, with an error saying so).

A wrong guess costs compile time, never results: both branches are traced, and the guessed
one's HLO is lowered too and dropped as dead by XLA. Lowering ahead of time for another
platform (a TPU topology from a CPU host), trace under ``jax.default_device(target_device)``
or with Explicit mesh axes of the target's devices, as ``benchmarks/step_time.py
--tpu-topology`` and ``mofo-finetune plan`` do.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import batching
from jax.interpreters import mlir

PLATFORMS = ("cpu", "tpu", "cuda", "rocm")
_override_p = Primitive("mofo_platform_dependent")
_override_p.multiple_results = True


def platform_dependent(operands: Any, *, default: Callable, **per_platform: Callable) -> Any:
  """``branch(operands)`` for the branch of the platform the program is lowered for, tracing
  only one branch when the platform is guessed right (see module).

  Args:
    operands: a pytree; its array leaves are the traced inputs of the branches, other leaves
      are passed through as they are.
    default: the branch of every platform not named in ``per_platform``.
    **per_platform: branches by platform name (``cpu``, ``tpu``, ``cuda``, ``rocm``).

  Returns:
    The chosen branch's result; every branch must return the same pytree of shapes and dtypes.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> f = jax.jit(lambda x: platform_dependent(x, cpu=lambda x: x + 1, default=lambda x: x - 1))
    >>> int(f(jnp.int32(1))) if jax.default_backend() == "cpu" else 2
    2
  """
  if set(per_platform) - set(PLATFORMS):
    raise ValueError(f"platform_dependent: platforms {list(per_platform)} not all in {PLATFORMS}.")
  flat, treedef = jax.tree.flatten(operands)
  is_dyn = [isinstance(x, (jax.Array, np.ndarray, np.generic)) for x in flat]
  dyn = [x for x, d in zip(flat, is_dyn) if d]
  guess = likely_platform(dyn)
  chosen = per_platform.get(guess, default)
  out = chosen(operands)
  outs, out_tree = jax.tree.flatten(out)
  if all(b is chosen for b in (default, *per_platform.values())):
    return out

  def flat_branch(branch):
    def run(*args):
      it = iter(args)
      rebuilt = jax.tree.unflatten(treedef, [next(it) if d else x for x, d in zip(flat, is_dyn)])
      res, tree = jax.tree.flatten(branch(rebuilt))
      if tree != out_tree:
        raise ValueError(f"platform_dependent: branches return {tree} and {out_tree}.")
      return res

    return run

  others = {p: flat_branch(b) for p, b in per_platform.items() if b is not chosen}
  results = _override_p.bind(
    *outs,
    *dyn,
    num_out=len(outs),
    others=_Frozen(others),
    default=None if default is chosen else flat_branch(default),
    chosen=tuple(p for p, b in per_platform.items() if b is chosen),
  )
  return jax.tree.unflatten(out_tree, results)


def likely_platform(operands: list[Any] = ()) -> str:
  """The platform a program being traced will most likely be lowered for: that of
  ``jax.default_device`` when set, else of the mesh in context or in an operand's type (Explicit
  mesh axes), else ``jax.default_backend()``; ``"cuda"`` or ``"rocm"`` for a GPU."""
  device = jax.config.jax_default_device
  if isinstance(device, str):
    return _canonical(device, None)
  if device is not None:
    return _canonical(device.platform, device)
  meshes = [jax.sharding.get_abstract_mesh()]
  meshes += [getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None) for x in operands]
  for mesh in meshes:
    abstract = getattr(mesh, "abstract_device", None)
    if abstract is not None:
      return _canonical(abstract.platform, None)
  return _canonical(jax.default_backend(), None)


def _canonical(platform: str, device: Any) -> str:
  """``platform_dependent``'s name for a device platform (a GPU is ``cuda`` or ``rocm``)."""
  platform = platform.lower()
  if platform != "gpu":
    return platform
  try:
    device = device or jax.devices("gpu")[0]
    version = device.client.platform_version.lower()
  except (RuntimeError, AttributeError):
    return "cuda"
  return "rocm" if "rocm" in version else "cuda"


class _Frozen:
  """A dict of branches as a primitive parameter (hashed by identity)."""

  def __init__(self, branches: dict[str, Callable]):
    self.branches = branches


def _abstract_eval(*avals, num_out, **_):
  return avals[:num_out]


def _lowering(platform, ctx, *args, num_out, others, default, chosen):
  """On ``platform`` (None: one with no branch of its own), the inline results when its branch
  was the one traced, else its branch lowered from the operands."""
  branch = others.branches.get(platform)
  if branch is None and platform not in chosen:
    branch = default
  if branch is None:
    return args[:num_out]
  avals_out = ctx.avals_out

  def checked(*xs):
    res = branch(*xs)
    got = [(tuple(jax.typeof(r).shape), jax.typeof(r).dtype) for r in res]
    want = [(tuple(a.shape), a.dtype) for a in avals_out]
    if got != want:
      raise ValueError(f"platform_dependent: a branch returns {got}, another {want}.")
    return res

  sub = ctx.replace(avals_in=ctx.avals_in[num_out:])
  try:
    return mlir.lower_fun(checked, multiple_results=True)(sub, *args[num_out:])
  except (jax.errors.UnexpectedTracerError, TypeError) as e:
    # A traced value of the finished trace: escaped, or taken for a constant.
    if "Tracer" not in str(e):
      raise
    raise ValueError(
      f"platform_dependent: the {platform or 'default'} branch reads a traced value it closes "
      "over; pass it in operands."
    ) from e


def _impl(*args, **params):
  # Outside jit: compiled for the operands' platform, like any primitive (jit kept on under
  # jax.disable_jit, which would otherwise come back here).
  with jax.disable_jit(False):
    return jax.jit(lambda *xs: _override_p.bind(*xs, **params))(*args)


def _batching(args, dims, **_):
  del args, dims
  raise NotImplementedError("mofo_jax's per-platform selection does not support jax.vmap.")


_override_p.def_impl(_impl)
_override_p.def_abstract_eval(_abstract_eval)
mlir.register_lowering(_override_p, functools.partial(_lowering, None))
for _p in PLATFORMS:
  mlir.register_lowering(_override_p, functools.partial(_lowering, _p), platform=_p)
batching.primitive_batchers[_override_p] = _batching
