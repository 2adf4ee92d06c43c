"""One branch traced per platform (mofo_jax._platform): the branch of the platform guessed while
tracing is the only one traced; another platform's is traced only when lowered for it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import mofo_jax
from mofo_jax import _pallas_selection as ps
from mofo_jax import _platform
from mofo_jax import _selection


def _counted():
  calls = []

  def branch(name, k):
    def run(x):
      calls.append(name)
      return x * k

    return run

  f = lambda x: _platform.platform_dependent(  # noqa: E731
    x, cpu=branch("cpu", 2), tpu=branch("tpu", 3), default=branch("other", 5)
  )
  return f, calls


def test_only_the_guessed_branch_is_traced_and_run():
  f, calls = _counted()
  assert _platform.likely_platform() == "cpu"
  assert int(jax.jit(f)(jnp.int32(7))) == 14
  assert calls == ["cpu"]


@pytest.mark.parametrize("platform, device, k", [("tpu", "tpu", 3), ("cuda", "gpu", 5)])
def test_the_platform_lowered_for_gets_its_branch(platform, device, k):
  f, calls = _counted()
  # Traced for CPU, lowered for another platform: its branch is traced while lowering.
  text = jax.jit(f).trace(jnp.int32(7)).lower(lowering_platforms=(platform,)).as_text()
  assert calls == ["cpu", {"tpu": "tpu", "cuda": "other"}[platform]]
  assert f"dense<{k}>" in text
  # Traced with that platform's default device: only its branch.
  calls.clear()
  with jax.default_device(device):
    traced = jax.jit(f).trace(jax.ShapeDtypeStruct((), jnp.int32))
  text = traced.lower(lowering_platforms=(platform,)).as_text()
  assert len(calls) == 1 and f"dense<{k}>" in text and "dense<2>" not in text


def test_multi_platform_export_runs_the_right_branch():
  f, calls = _counted()
  exp = export.export(jax.jit(f), platforms=("cpu", "tpu", "cuda"))(
    jax.ShapeDtypeStruct((), jnp.int32)
  )
  assert sorted(calls) == ["cpu", "other", "tpu"]
  assert int(exp.call(jnp.int32(7))) == 14


def test_eager_pytrees_and_static_leaves():
  out = _platform.platform_dependent(
    ([jnp.arange(3)], 4),
    cpu=lambda a: {"y": a[0][0] * a[1]},
    default=lambda a: {"y": a[0][0] - a[1]},
  )
  np.testing.assert_array_equal(out["y"], [0, 4, 8])
  with jax.disable_jit():
    f, calls = _counted()
    assert int(f(jnp.int32(7))) == 14


def test_mismatched_branches_and_vmap_fail_clearly():
  f = lambda x: _platform.platform_dependent(  # noqa: E731
    x, cpu=lambda x: x, default=lambda x: x.astype(jnp.float32)
  )
  with pytest.raises(ValueError, match="a branch returns"):
    jax.jit(f).trace(jnp.int32(1)).lower(lowering_platforms=("tpu",))
  with pytest.raises(NotImplementedError, match="vmap"):
    jax.vmap(f)(jnp.arange(3))
  closes = lambda x: _platform.platform_dependent(  # noqa: E731
    (), cpu=lambda _: x, default=lambda _: x + 1
  )
  with pytest.raises(ValueError, match="closes over"):
    jax.jit(closes).trace(jnp.int32(1)).lower(lowering_platforms=("tpu",))
  with pytest.raises(ValueError, match="platforms"):
    _platform.platform_dependent(1, gpu=lambda x: x, default=lambda x: x)


def _tree():
  rng = np.random.default_rng(0)
  return {
    "w": jnp.asarray(rng.normal(size=(64, 128)), jnp.float32),
    "b": jnp.asarray(rng.normal(size=(128,)), jnp.float32),
  }


@pytest.mark.parametrize("selection", ["exact", "approx"])
def test_auto_traces_no_kernel_and_no_count_search_on_cpu(monkeypatch, selection):
  """Under "auto" on one CPU device the step traces neither the Pallas kernel branch nor the
  counting search (the GPU/TPU fallback), and its program has no Mosaic custom call."""
  # The tests run on 8 CPU devices, where "auto" counts; one device picks by platform.
  monkeypatch.setattr(_selection, "resolve_method", lambda method, num_devices=None: "by_platform")
  traced = []
  for owner, name in [
    (ps.PallasSelection, "_with_kernels"),
    (mofo_jax.PallasApproxSelection, "_with_kernels"),
    (_selection, "_count_search"),
    (_selection, "_bracketed_count_search"),
    (mofo_jax.ApproxSelection, "_from_inputs"),
  ]:
    real = getattr(owner, name)

    def spy(*a, real=real, name=name, **k):
      traced.append(name)
      return real(*a, **k)

    monkeypatch.setattr(owner, name, spy)
  params = _tree()
  opt = mofo_jax.mofo(1e-2, 0.1, selection=selection)
  state = opt.init(params)
  step = jax.jit(opt.update)
  text = step.lower(params, state, params).as_text()
  assert traced == [], traced
  assert "tpu_custom_call" not in text and "mosaic" not in text.lower()
  updates, _ = step(params, state, params)
  assert int(jnp.sum(updates["w"] != 0)) > 0
