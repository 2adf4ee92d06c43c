"""Sharded MoFO state through orbax: save, restore onto the same or another mesh, continue."""

import jax
import numpy as np
import pytest
from jax.sharding import AxisType

import mofo_jax
from tests import sharded_model as sm

ocp = pytest.importorskip("orbax.checkpoint")
pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


def _steps(opt, layout, p, state, first, last):
  """Steps ``first..last-1`` on ``layout``'s mesh, from host or restored arrays."""
  mesh = sm.mesh(layout)
  shards = sm.shardings(layout, mesh)
  state_sh = mofo_jax.state_shardings(opt, sm.abstract(shards))
  step = jax.jit(
    sm.step_fn(opt), in_shardings=(shards, state_sh, shards), out_shardings=(shards, state_sh)
  )
  for i in range(first, last):
    p, state = step(p, state, jax.tree.map(jax.device_put, sm.grads(i), shards))
  return p, state


@pytest.mark.parametrize("restore_layout", ["2d", "fsdp"], ids=["same_mesh", "other_mesh"])
def test_restore_and_continue_matches_uninterrupted_run(tmp_path, restore_layout):
  opt = sm.opt()
  mesh = sm.mesh("2d", AxisType.Auto)
  shards = sm.shardings("2d", mesh)
  p = jax.tree.map(jax.device_put, sm.params(), shards)
  state = jax.jit(opt.init, out_shardings=mofo_jax.state_shardings(opt, sm.abstract(shards)))(p)
  p, state = _steps(opt, "2d", p, state, 0, 2)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "ckpt", {"params": p, "opt_state": state})

  # Restore straight into the target mesh's shardings: each device reads only its slices.
  new_shards = sm.shardings(restore_layout, sm.mesh(restore_layout))
  abstract_p = sm.abstract(new_shards)
  target = {
    "params": abstract_p,
    "opt_state": jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      jax.eval_shape(opt.init, abstract_p),
      mofo_jax.state_shardings(opt, abstract_p),
    ),
  }
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(tmp_path / "ckpt", target)
  p2, state2 = restored["params"], restored["opt_state"]
  assert jax.tree.structure(state2) == jax.tree.structure(state)
  assert p2["stack"].sharding.is_equivalent_to(new_shards["stack"], 3)
  assert state2[0].mu["stack"].sharding.is_equivalent_to(new_shards["stack"], 3)
  p2, state2 = _steps(opt, restore_layout, p2, state2, 2, 4)

  p_ref, state_ref = sm.run_unsharded(opt, steps=4)
  jax.tree.map(np.testing.assert_array_equal, p2, p_ref)
  jax.tree.map(np.testing.assert_array_equal, state2, state_ref)
