"""Two processes, 4 CPU devices each, one 2x4 mesh: MoFO equals the single-process result."""

import numpy as np

from tests import sharded_model as sm
from tests.processes import run_workers


def test_two_processes_match_one(tmp_path):
  out = tmp_path / "result.npz"
  run_workers("tests.multihost_worker", out, timeout=90)

  p_ref, state_ref = sm.run_unsharded(sm.opt())
  got = np.load(out)
  for group, tree in (("p", p_ref), ("mu", state_ref[0].mu), ("nu", state_ref[0].nu)):
    for k, v in tree.items():
      np.testing.assert_array_equal(got[f"{group}/{k}"], np.asarray(v), err_msg=f"{group}/{k}")
