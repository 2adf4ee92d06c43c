"""The single-device CPU path users take: ``method="auto"`` with one device uses histograms.

conftest forces 8 simulated devices, where ``"auto"`` counts; this runs a fresh interpreter with
one device, as the quickstart and the demo run.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

import mofo_jax
from mofo_jax import _selection

SCRIPT = textwrap.dedent(
  """
  import json
  import jax, jax.numpy as jnp, numpy as np, optax, mofo_jax
  from tests import reference
  x = jnp.asarray(np.random.default_rng(3).normal(size=(64, 96)), jnp.float32)
  spec = mofo_jax.BlockSpec(split_axes=(0,))
  auto = jax.jit(lambda s: mofo_jax.top_fraction_mask(s, 0.1, partition=spec))
  hlo = auto.lower(x).compile().as_text()
  params = {"w": x, "b": jnp.zeros(3)}
  opt = mofo_jax.mofo(1e-2, 0.1)
  step = jax.jit(opt.update)
  updates, _ = step({"w": x * 2, "b": jnp.ones(3)}, opt.init(params), params)
  print(json.dumps({
    "devices": jax.device_count(),
    "platform": jax.default_backend(),
    "scatter": "scatter" in hlo,
    "mask_ok": bool((np.asarray(auto(x)) == reference.block_mask(np.asarray(x), 0.1, (0,))).all()),
    "step_scatter": "scatter" in step.lower({"w": x, "b": jnp.ones(3)}, opt.init(params),
                                            params).compile().as_text(),
    "kept": int((updates["w"] != 0).sum()),
  }))
  """
)


def test_auto_resolves_by_device_count_in_one_place():
  assert _selection.resolve_method("auto", num_devices=1) == "by_platform"
  assert _selection.resolve_method("auto", num_devices=8) == "count"
  assert _selection.resolve_method("histogram", num_devices=8) == "histogram"
  with pytest.raises(ValueError, match="method="):
    _selection.resolve_method("sort")


def test_one_cpu_device_reaches_the_histogram_search_through_auto():
  root = os.path.dirname(os.path.dirname(os.path.abspath(mofo_jax.__file__)))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  out = subprocess.run(
    [sys.executable, "-c", SCRIPT], env=env, cwd=root, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr[-3000:]
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert got["devices"] == 1 and got["platform"] == "cpu"
  assert got["scatter"] and got["step_scatter"], "auto did not take the histogram search"
  assert got["mask_ok"]
  assert got["kept"] == 614  # floor(0.1 * 6144)
