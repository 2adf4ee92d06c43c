"""Counts past 2**31 entries (issue 10): exact in int32 limbs, with x64 off and on.

Nothing here allocates a large array: the limb arithmetic is tested on injected counts, and the
two-stage reduction on a broadcast constant that XLA never materialises.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mofo_jax
from mofo_jax import _counts

x64 = pytest.mark.parametrize("x64", [False, True], ids=["x32", "x64"])


def _value(c):
  return mofo_jax.count_value(np.stack([np.asarray(c.hi), np.asarray(c.lo)], -1))


@x64
def test_sums_of_counts_carry_past_2_31(x64):
  with jax.enable_x64(x64):
    near = jnp.asarray([2**31 - 1, 2**31 - 1, 5], jnp.int32)
    got = jax.jit(lambda c: _counts.sum_counts(_counts.split(c)))(near)
    assert got.hi.dtype == jnp.int32
    assert _value(got) == 2**32 + 3
    big = _counts.add(_counts.constant(2**40 + 7), _counts.constant(2**40 - 7))
    assert _value(big) == 2**41


@x64
@pytest.mark.parametrize("a,b", [(2**31, 2**31 - 1), (2**32 + 1, 2**32), (5, 5), (2**45, 65535)])
def test_comparison_at_the_boundary(x64, a, b):
  with jax.enable_x64(x64):
    assert bool(_counts.greater_equal(_counts.constant(a), _counts.constant(b)))
    assert bool(_counts.greater_equal(_counts.constant(b), _counts.constant(a))) == (a == b)


@x64
def test_two_stage_count_of_2_32_entries_without_allocating_them(x64):
  with jax.enable_x64(x64):
    # 4 x 2**30 True entries: int32 would wrap to 0.
    f = jax.jit(lambda: _counts.count_true(jnp.ones((4, 2**30), bool), (0, 1), keepdims=False))
    assert _value(f()) == 2**32
    with pytest.raises(ValueError, match="2\\*\\*15"):
      jax.eval_shape(lambda: _counts.count_true(jnp.ones((2**16, 2**16), bool), (0, 1)))


@x64
@pytest.mark.parametrize("n", [2**31 + 3, 3 * 2**31, 2**40 + 12345])
def test_k_is_exact_past_2_31(x64, n):
  with jax.enable_x64(x64):
    assert _value(_counts.num_to_select(0.5, n)) == n // 2
    assert _value(_counts.num_to_select(0.1, n)) == int(0.1 * n)
    traced = jax.jit(lambda f: _counts.num_to_select(f, n))(jnp.float32(0.5))
    want = int(np.floor(np.float32(0.5) * np.float32(n)))  # float32 product: stated limit
    assert _value(traced) == want


def test_telemetry_reports_counts_past_2_31():
  params = {"w": jnp.ones((4, 4))}
  opt = mofo_jax.mofo(1e-2, 0.25)
  tel = opt.init(params)[0].telemetry
  big = lambda n: jnp.asarray([n >> 16, n & 0xFFFF], jnp.int32)  # noqa: E731
  injected = tel._replace(num_updated={"w": big(3 * 2**31)}, num_entries={"w": big(6 * 2**31)})
  summary = mofo_jax.telemetry_summary(injected)
  assert summary["fraction_updated"] == 0.5


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
@x64
@pytest.mark.parametrize("max_value", [2**31 - 1, 2**40], ids=["one-int32", "stacked-limbs"])
def test_psum_over_a_mesh_is_exact_in_one_all_reduce(x64, max_value):
  """Per-device counts summed over a 2x4 mesh: the exact total (past 2**31 with the limbs
  stacked, each limb near its bound), in one all-reduce of one operand."""
  rng = np.random.default_rng(0)
  bound = max_value // 8
  per_device = rng.integers(bound - 2**17, bound, size=(8, 5), dtype=np.int64)
  per_device[0, 0] = 0
  mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  spec = jax.sharding.PartitionSpec(("a", "b"))
  split = jax.sharding.NamedSharding(mesh, spec)

  def total(hi, lo):
    c = _counts.psum(_counts.Count(hi[0], lo[0]), ("a", "b"), max_value)
    return c.hi[None], c.lo[None]

  with jax.enable_x64(x64):
    limbs = [
      jax.device_put(np.asarray(a, np.int32), split)
      for a in (per_device >> 16, per_device & 0xFFFF)
    ]
    fn = jax.jit(jax.shard_map(total, mesh=mesh, in_specs=(spec, spec), out_specs=(spec, spec)))
    hi, lo = fn(*limbs)
    text = fn.lower(*limbs).compile().as_text()
  want = per_device.sum(axis=0)
  for d in range(8):
    assert _value(_counts.Count(hi[d], lo[d])).tolist() == want.tolist()
  assert max(want) >= 2**31 or max_value < 2**31
  reduces = [line for line in text.splitlines() if " all-reduce(" in line]
  assert len(reduces) == 1, reduces
  assert ("s32[2,5]" if max_value >= 2**31 else "s32[5]") in reduces[0]
