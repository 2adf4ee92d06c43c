"""``plan``'s compile: the real train step, AOT-compiled for abstract params and batch."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

from mofo_jax.finetune.plan.collective_bytes import Collective, collectives


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
  def peak_without_copy(self) -> int | None:
    """The step alone: what a run with ``--distance-metrics host`` or ``off`` needs."""
    if self.temps is None:
      return None
    return self.arguments + self.outputs - self.aliased + self.temps

  @property
  def peak(self) -> int | None:
    """With ``--distance-metrics device`` (the default): the trainer also keeps the pretrained
    weights on the devices, one more copy of the params outside the step."""
    step = self.peak_without_copy
    return None if step is None else step + self.params


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
  opt = optimizers.make_optimizer(
    opt_cfg, params, stacked_layers=config.scan_layers, shardings=shardings
  )
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
    # The mesh's platform as the default device: "auto" selections trace only its branch.
    with jax.default_device(mesh.devices.flat[0]):
      traced = jitted.trace(params, opt_state, step.abstract_batch(batch, seq_len, batch_sharding))
    compiled = traced.lower().compile()
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
