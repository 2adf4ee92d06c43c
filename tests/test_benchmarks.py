"""The benchmark scripts: the HLO byte count with loop trips, step_time.py and device_suite.py."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from benchmarks import device_suite, hlo_bytes, step_time
from mofo_jax.finetune import hlo

N = 1 << 18


def _compiled(f, *shapes):
  return jax.jit(f).lower(*(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes)).compile()


def _counting_loop(trips):
  """A loop that reads all of ``x`` on every trip, as the counting search does."""

  def f(x):
    def body(i, c):
      return c + jnp.sum(x > i.astype(jnp.float32) * 0.1, dtype=jnp.int32)

    return jax.lax.fori_loop(0, trips, body, jnp.int32(0)), x * 2

  return f


def test_hlo_bytes_counts_every_trip_of_a_loop():
  report = {}
  for trips in (3, 7):
    c = _compiled(_counting_loop(trips), (N,))
    report[trips] = hlo_bytes.every_pass(c)
    (loop,) = report[trips]["loops"]
    assert loop["trips"] == trips
    # Every trip reads x once (4 bytes per entry), whatever XLA materialises besides.
    assert loop["bytes_per_trip"] >= 4 * N
    # Read with each body once, the HLO gives cost_analysis()'s own figure.
    assert report[trips]["parsed_bytes_loops_once"] == pytest.approx(
      report[trips]["cost_analysis_bytes"], rel=0.02
    )
    assert report[trips]["every_pass_bytes"] == pytest.approx(
      report[trips]["cost_analysis_bytes"] + (trips - 1) * loop["bytes_per_trip"]
    )
  # cost_analysis() alone bills both programs alike; with every trip the difference is 4 trips.
  assert report[3]["cost_analysis_bytes"] == pytest.approx(report[7]["cost_analysis_bytes"])
  per_trip = report[7]["loops"][0]["bytes_per_trip"]
  assert report[7]["every_pass_bytes"] - report[3]["every_pass_bytes"] == pytest.approx(
    4 * per_trip
  )


def test_hlo_bytes_multiplies_nested_loops_and_scans():
  def f(x):
    def outer(c, _):
      return jax.lax.fori_loop(0, 5, lambda i, c: c + jnp.sum(x * i), c), None

    return jax.lax.scan(outer, jnp.float32(0), None, length=4)[0]

  c = _compiled(f, (N,))
  once, loops = hlo_bytes.bytes_accessed(c.as_text(), trips=False)
  every, _ = hlo_bytes.bytes_accessed(c.as_text(), trips=True)
  assert sorted(loop["trips"] for loop in loops) == [4, 5]
  assert every >= 4 * 5 * 4 * N > once


def test_hlo_bytes_bills_a_conditional_its_dearest_or_cheapest_branch():
  """A conditional between a 3-pass and a 7-pass search: the default bill is the 7-pass branch,
  the ``_min`` bill the 3-pass one, 4 passes apart."""

  def f(x, p):
    short, long = _counting_loop(3), _counting_loop(7)
    return jax.lax.cond(p[0] > 0, lambda: short(x)[0], lambda: long(x)[0])

  c = _compiled(f, (N,), (1,))
  report = hlo_bytes.every_pass(c)
  (cond,) = report["conditionals"]
  assert len(cond["branch_bytes"]) == 2
  assert sorted(loop["trips"] for loop in report["loops"]) == [3, 7]
  per_trip = report["loops"][0]["bytes_per_trip"]
  assert per_trip >= 4 * N
  assert report["every_pass_bytes"] - report["every_pass_bytes_min"] == pytest.approx(
    4 * per_trip, rel=0.01
  )


def test_instructions_add_up_and_the_breakdown_bills_the_optimizer_scope():
  """The per-instruction bills add up to bytes_accessed in either branch; the breakdown keeps
  the instructions under the optimizer's scope, a 7-trip loop billed 7 reads of x."""
  from benchmarks import hlo_breakdown
  from mofo_jax.finetune.step import OPTIMIZER_SCOPE

  def f(x, p):
    with jax.named_scope(OPTIMIZER_SCOPE):
      short, long = _counting_loop(3), _counting_loop(7)
      y = jax.lax.cond(p[0] > 0, lambda: short(x)[0], lambda: long(x)[0])
    return y, x + 1

  text = _compiled(f, (N,), (1,)).as_text()
  for branch in (max, min):
    bills = hlo_bytes.instructions(text, branch=branch)
    assert sum(b for b, _, _ in bills) == hlo_bytes.bytes_accessed(text, branch=branch)[0]
  by_kind, found = hlo_breakdown.breakdown(text, False, max)
  assert sum(by_kind.values()) == sum(b for b, *_ in found)
  assert max(t for _, t, *_ in found) == 7
  assert 7 * 4 * N <= sum(by_kind.values()) < hlo_bytes.bytes_accessed(text)[0]


def test_hlo_bytes_without_loops_is_cost_analysis():
  c = _compiled(lambda x, y: x * y + 1, (N,), (N,))
  report = hlo_bytes.every_pass(c)
  assert report["loops"] == []
  assert report["every_pass_bytes"] == report["cost_analysis_bytes"]
  assert report["parsed_bytes_loops_once"] == pytest.approx(3 * 4 * N, rel=0.01)


def _run_script(*args, env=None):
  return subprocess.run(
    [sys.executable, *args],
    check=False,
    capture_output=True,
    text=True,
    timeout=600,
    env={**os.environ, "PYTHONPATH": os.getcwd(), **(env or {})},
  )


def test_step_time_reports_ratios_fractions_compile_times_and_memory(tmp_path):
  out = tmp_path / "r.json"
  step_time.main(
    ["--preset", "micro", "--steps", "1", "--warmup", "0", "--modes", "exact,topk"]
    + ["--out", str(out)]
  )
  result = json.loads(out.read_text())
  rows = {r["mode"]: r for r in result["results"]}
  assert list(rows) == ["exact", "topk", "adamw"]  # adamw added, measured last
  assert rows["adamw"]["ratio"] == 1.0
  for r in rows.values():
    assert r["ms"] > 0 and r["compile_s"] > 0 and r["temp_bytes"] is not None
  assert rows["adamw"]["fraction"] == 1.0
  # Exact selection and lax.top_k both keep the k largest per matrix (no ties here).
  for mode in ("exact", "topk"):
    assert rows[mode]["fraction"] == pytest.approx(result["target_fraction"], abs=1e-3)
  # --out never replaces a file unasked.
  with pytest.raises(SystemExit) as e:
    step_time.main(["--preset", "micro", "--out", str(out)])
  assert e.value.code == 2


def test_step_time_compile_only_allocates_nothing(tmp_path):
  out = tmp_path / "c.json"
  step_time.main(["--preset", "1b", "--compile-only", "--modes", "adamw", "--out", str(out)])
  (row,) = json.loads(out.read_text())["results"]
  assert row["compile_s"] > 0
  # Donated params and state (3 x 1.24e9 float32) plus gradients, never allocated here.
  assert row["argument_bytes"] == 4 * 4 * 1_235_814_400 + 4


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is not None, reason="libtpu is installed")
def test_step_time_tpu_topology_without_libtpu_is_a_clean_error():
  r = _run_script("benchmarks/step_time.py", "--tpu-topology", "v6e:1x1", "--preset", "micro")
  assert r.returncode == 2, r.stderr
  assert r.stderr.strip().splitlines() == [
    line for line in r.stderr.strip().splitlines() if line.startswith("error: --tpu-topology")
  ]


def test_device_suite_writes_every_mode_and_survives_failures(tmp_path):
  env = {"OUT": str(tmp_path)}
  r = _run_script(
    "benchmarks/device_suite.py",
    "--preset=micro",
    "--modes=adamw,nosuch",
    "--steps=1",
    "--warmup=0",
    env=env,
  )
  assert r.returncode == 0, r.stderr
  summary = json.loads((tmp_path / "device_suite.json").read_text())
  assert list(summary["modes"]) == ["adamw", "nosuch"]
  adamw = summary["modes"]["adamw"]
  assert adamw["ratio"] == 1.0 and adamw["adamw_ms_same_process"] == adamw["ms"] > 0
  assert adamw["compile_s"] > 0 and "temp_bytes" in adamw and "peak_bytes" in adamw
  assert summary["modes"]["nosuch"]["error"].startswith("exit status 2: ")
  assert (tmp_path / "step_nosuch.log").exists()
  # A second run refuses to replace the first one's files.
  again = _run_script("benchmarks/device_suite.py", "--preset=micro", "--modes=adamw", env=env)
  assert again.returncode == 2 and "--overwrite" in again.stderr


def test_device_suite_default_modes_are_step_time_modes():
  """The XLA and kernel modes the suite times by default all build (a typo would only show as an
  error entry on the lent device)."""
  assert device_suite.default_modes() == device_suite.MODES["cpu"]
  assert "kernel-gpu" in device_suite.MODES["gpu"] and "kernel" in device_suite.MODES["tpu"]
  modes = set(",".join(device_suite.MODES.values()).split(","))
  assert {
    "exact-xla",
    "approx-xla",
    "kernel",
    "kernel-full",
    "approx-kernel",
    "kernel-gpu",
  } == modes
  for m in modes:
    step_time.make_optimizer(m)


def test_device_suite_records_timeouts_and_the_spent_budget(tmp_path, monkeypatch):
  monkeypatch.setenv("OUT", str(tmp_path))
  # adamw gets its share of the budget, half of 1 s (under --timeout); after it less than the
  # 0.6 s floor is left.
  device_suite.main(["--preset=micro", "--modes=adamw,topk", "--timeout=0.6", "--budget=1"])
  modes = json.loads((tmp_path / "device_suite.json").read_text())["modes"]
  assert modes["adamw"]["error"] == "timed out after 0.5 s"
  assert modes["topk"]["error"].startswith("skipped")


def test_hlo_bytes_counts_a_loop_with_a_run_time_trip_count_once():
  def f(x, n):
    trips = jnp.where(n[0] >= 0, 1, 0).astype(jnp.int32)
    return jax.lax.fori_loop(0, trips, lambda i, c: c * 2 + 1, x)

  c = _compiled(f, (N,), (1,))
  report = hlo_bytes.every_pass(c)
  assert [loop["trips"] for loop in report["loops"]] == [None]
  assert report["every_pass_bytes"] == report["cost_analysis_bytes"]


def test_hlo_bytes_device_memory_leaves_out_on_chip_buffers():
  tuple_shape = "(f32[1024,8]{1,0:T(8,128)}, u32[256]{0:T(256)S(1)}, s32[])"
  assert hlo.shape_bytes(tuple_shape) == 4 * 8192 + 4 * 256 + 4
  assert hlo.shape_bytes(tuple_shape, device_memory_only=True) == 4 * 8192 + 4
  # CPU programs have no on-chip memory space: every byte is device memory.
  c = _compiled(_counting_loop(5), (N,))
  assert hlo_bytes.every_pass(c)["device_memory_bytes"] == hlo_bytes.bytes_accessed(c.as_text())[0]
