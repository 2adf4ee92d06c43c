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

Run ``python -m mofo_jax.finetune.plan --help``. The modules: ``targets`` (slices, HBM, mesh,
devices), ``presets`` (model configs), ``aot`` (the compile), ``collective_bytes`` (the
collectives, read through ``mofo_jax.finetune.hlo``), ``report`` (the table, the JSON) and
``command`` (the flags and the run).
"""

from mofo_jax.finetune.plan.aot import PlanResult, compile_step
from mofo_jax.finetune.plan.collective_bytes import (
  COLLECTIVE_KINDS,
  Collective,
  collectives,
  global_batch_gathers,
)
from mofo_jax.finetune.plan.command import build_parser, main, run_plan
from mofo_jax.finetune.plan.presets import PRESETS, model_config
from mofo_jax.finetune.plan.report import GIB, figures_json, format_report
from mofo_jax.finetune.plan.targets import (
  HBM_GIB,
  PlanError,
  Target,
  check_mesh,
  cpu_devices,
  make_mesh,
  parse_target,
  resolve_mesh,
)

__all__ = [
  "COLLECTIVE_KINDS",
  "GIB",
  "HBM_GIB",
  "PRESETS",
  "Collective",
  "PlanError",
  "PlanResult",
  "Target",
  "build_parser",
  "check_mesh",
  "collectives",
  "compile_step",
  "cpu_devices",
  "figures_json",
  "format_report",
  "global_batch_gathers",
  "main",
  "make_mesh",
  "model_config",
  "parse_target",
  "resolve_mesh",
  "run_plan",
]
