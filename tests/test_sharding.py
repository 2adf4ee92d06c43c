"""MoFO on 8 simulated CPU devices: exact equality with one device, shardings, communication."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import mofo_jax
from tests import reference
from tests import sharded_model as sm

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

FRACTION = 0.1


def _opt(partition, selection="exact"):
  return mofo_jax.mofo(1e-2, FRACTION, weight_decay=0.01, partition=partition, selection=selection)


_unsharded = {}


def _unsharded_run(partition_name):
  if partition_name not in _unsharded:
    _unsharded[partition_name] = sm.run_unsharded(_opt(sm.PARTITIONS[partition_name][0]))
  return _unsharded[partition_name]


def _run_sharded(layout, axis_type, opt, steps=3):
  """Init on abstract params, then ``steps`` jitted steps; returns params, state, shardings."""
  mesh = sm.mesh(layout, axis_type)
  shards = sm.shardings(layout, mesh)
  abstract = sm.abstract(shards)
  state_sh = mofo_jax.state_shardings(opt, abstract)
  put = lambda tree: jax.tree.map(jax.device_put, tree, shards)
  with jax.set_mesh(mesh):
    p = put(sm.params())
    if axis_type == AxisType.Explicit:
      # Shardings are types: jit needs no annotations, and the types must not drift.
      init, step = jax.jit(opt.init), jax.jit(sm.step_fn(opt))
    else:
      init = jax.jit(opt.init, out_shardings=state_sh)
      step = jax.jit(
        sm.step_fn(opt), in_shardings=(shards, state_sh, shards), out_shardings=(shards, state_sh)
      )
    state = init(p)
    types = jax.tree.map(jax.typeof, state)
    for i in range(steps):
      p, state = step(p, state, put(sm.grads(i)))
  # Under Explicit axes shardings are types: the state's must not drift (nor force retracing).
  assert jax.tree.map(jax.typeof, state) == types
  return p, state, shards, state_sh


def _assert_same_shardings(tree, shardings):
  def check(x, s):
    assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)

  jax.tree.map(check, tree, shardings)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
@pytest.mark.parametrize(
  "layout,partition",
  [
    ("fsdp", "slices"),
    ("tp", "slices"),
    ("2d", "slices"),
    ("2d", "leaf"),
    ("2d", "global"),
    ("fsdp", "callable"),
  ],
)
def test_sharded_steps_equal_unsharded_exactly(layout, partition, axis_type):
  p, state, shards, state_sh = _run_sharded(layout, axis_type, _opt(sm.PARTITIONS[partition][0]))
  p_ref, state_ref = _unsharded_run(partition)
  jax.tree.map(np.testing.assert_array_equal, p, p_ref)
  jax.tree.map(np.testing.assert_array_equal, state, state_ref)
  _assert_same_shardings(p, shards)
  _assert_same_shardings(state, state_sh)
  assert state[0].mu["stack"].sharding.is_equivalent_to(shards["stack"], 3)


def test_state_shardings_follow_the_params():
  mesh = sm.mesh("2d")
  shards = sm.shardings("2d", mesh)
  st = mofo_jax.state_shardings(_opt(sm.PARTITIONS["slices"][0]), sm.abstract(shards))[0]
  assert st.mu == shards and st.nu == shards
  assert st.count.spec == P()
  # Per-layer thresholds of a stack sharded along d_in are per layer, hence replicated; per-row
  # thresholds of an embedding sharded along rows stay with their rows.
  assert st.telemetry.threshold["stack"].spec == P(None, None, None)
  assert st.telemetry.threshold["embed"].spec == P("fsdp", None)
  assert st.telemetry.threshold["proj"].spec == P()  # reshaped blocks: replicated
  fsdp = sm.shardings("fsdp", sm.mesh("fsdp"))
  st = mofo_jax.state_shardings(_opt(sm.PARTITIONS["slices"][0]), sm.abstract(fsdp))[0]
  assert st.telemetry.threshold["stack"].spec == P("fsdp", None, None)


def _keep_top_fraction_masks(layout, partition, selection="exact", axis_type=AxisType.Auto):
  """The masks keep_top_fraction picks on sharded scores (all entries are non-zero)."""
  opt = mofo_jax.keep_top_fraction(FRACTION, partition=partition, selection=selection)
  mesh = sm.mesh(layout, axis_type)
  shards = sm.shardings(layout, mesh)
  scores = sm.grads(7)
  with jax.set_mesh(mesh):
    x = jax.tree.map(jax.device_put, scores, shards)
    out, state = jax.jit(lambda x: opt.update(x, opt.init(x)))(x)
  return scores, out, state


@pytest.mark.parametrize("layout", ["fsdp", "2d"])
@pytest.mark.parametrize("partition", ["leaf", "slices", "callable"])
def test_sharded_partitions_match_numpy_reference(layout, partition):
  arg, blocks = sm.PARTITIONS[partition]
  scores, out, _ = _keep_top_fraction_masks(layout, arg)
  for k, s in scores.items():
    axes, reshape = blocks.get(k, ((), None))
    want = (
      reference.block_mask(s, FRACTION, axes, reshape) if s.ndim >= 2 else np.ones_like(s, bool)
    )
    np.testing.assert_array_equal(np.asarray(out[k]) != 0, want, err_msg=k)


def test_sharded_global_block_matches_numpy_reference():
  scores, out, _ = _keep_top_fraction_masks("2d", "global")
  names = [k for k in scores if scores[k].ndim >= 2]
  flat = reference.top_fraction_mask(np.concatenate([scores[k].ravel() for k in names]), FRACTION)
  got = np.concatenate([np.asarray(out[k]).ravel() != 0 for k in names])
  np.testing.assert_array_equal(got, flat)


def _compiled_step(scale, partition=None, selection="exact", layout="2d"):
  """HLO of one sharded MoFO step on the model with its matrices' rows ``scale`` times longer."""
  mesh = sm.mesh(layout)
  shards = sm.shardings(layout, mesh)
  abstract = {
    k: jax.ShapeDtypeStruct(
      (s[0] * scale,) + s[1:] if len(s) == 2 else s, jnp.float32, sharding=shards[k]
    )
    for k, s in sm.SHAPES.items()
  }
  opt = _opt(partition, selection=selection(mesh) if callable(selection) else selection)
  state_sh = mofo_jax.state_shardings(opt, abstract)
  step = jax.jit(
    sm.step_fn(opt),
    in_shardings=(shards, state_sh, shards),
    out_shardings=(shards, state_sh),
    donate_argnums=(0, 1),
  )
  return step.lower(abstract, jax.eval_shape(opt.init, abstract), abstract).compile().as_text()


def _assert_no_gathers(c):
  assert c["all-gather"] == c["all-to-all"] == c["collective-permute"] == 0, c
  assert c["reduce-scatter"] == 0, c


def test_exact_selection_bytes_do_not_grow_with_leaf_size():
  small = sm.collectives(_compiled_step(1))
  large = sm.collectives(_compiled_step(8))
  for c in (small, large):
    _assert_no_gathers(c)
    # Per pass and block: 15 int32 counts, all-reduced (XLA may combine several leaves' counts).
    assert 0 < c["largest_all_reduce_bytes"] <= 15 * 4 * 4, c
  assert small["all_reduce_bytes"] == large["all_reduce_bytes"], (small, large)
  print(
    f"\nexact MoFO, 2x4 mesh, 4 filtered leaves: {small['all_reduce_bytes']} bytes "
    f"all-reduced per step in {small['all-reduce']} all-reduce ops"
  )


def test_exact_selection_per_row_and_layer_blocks_send_only_counts():
  # Rows of a row-sharded embedding and layers of a stack sharded along d_in: 64 + 8 blocks.
  partition = {**sm.PARTITIONS["slices"][0], "proj": mofo_jax.BlockSpec()}
  c = sm.collectives(_compiled_step(1, partition))
  _assert_no_gathers(c)
  # Rows are local to their fsdp shard: each device all-reduces (over tp) the counts of its 32
  # rows, of the 8 layers and of the two whole-leaf blocks, 15 int32 each, in one combined op.
  assert c["largest_all_reduce_bytes"] <= (64 // 2 + 8 + 1 + 1) * 15 * 4, c


def test_per_head_thresholds_are_the_only_gather():
  c = sm.collectives(_compiled_step(1, sm.PARTITIONS["slices"][0]))
  # state_shardings replicates the thresholds of reshaped blocks: one float per head.
  assert c["all-gather"] <= 1 and c["all-to-all"] == c["collective-permute"] == 0, c


# ----------------------------------------------------------------------------------------------
# Per-shard selection.


def _per_shard_reference(scores, arr, axes):
  """tests/reference.py's block mask applied to every device's shard of the scores."""
  want = np.zeros(scores.shape, bool)
  for shard in arr.addressable_shards:
    want[shard.index] = reference.block_mask(scores[shard.index], FRACTION, axes)
  return want


@pytest.mark.parametrize("layout", ["fsdp", "2d"])
def test_local_selection_equals_per_shard_reference(layout):
  specs = sm.LAYOUTS[layout][2]
  partition = {**sm.PARTITIONS["slices"][0], "proj": mofo_jax.BlockSpec()}
  scores, out, state = _keep_top_fraction_masks(
    layout, partition, selection=mofo_jax.local_selection(sm.mesh(layout), specs)
  )
  blocks = {"embed": (0,), "stack": (0,)}
  for k, s in scores.items():
    want = (
      _per_shard_reference(s, out[k], blocks.get(k, ())) if s.ndim >= 2 else np.ones_like(s, bool)
    )
    np.testing.assert_array_equal(np.asarray(out[k]) != 0, want, err_msg=k)
  # One threshold per shard: the kernel is split 2 x 4 on the 2d mesh, 8 x 1 on fsdp.
  n_shards = sm.LAYOUTS[layout][0]
  assert state.telemetry.threshold["kernel"].shape == (n_shards if layout == "2d" else (8, 1))
  kept = mofo_jax.count_value(state.telemetry.num_updated["kernel"])
  assert kept == int((np.asarray(out["kernel"]) != 0).sum())


def test_local_selection_reads_explicit_types_and_matches_local_selection():
  specs = sm.LAYOUTS["2d"][2]
  _, auto, _ = _keep_top_fraction_masks(
    "2d", None, selection=mofo_jax.local_selection(sm.mesh("2d"), specs)
  )
  _, explicit, _ = _keep_top_fraction_masks(
    "2d", None, selection="local", axis_type=AxisType.Explicit
  )
  jax.tree.map(np.testing.assert_array_equal, auto, explicit)


def test_local_selection_differs_from_exact_and_has_no_collectives():
  local = sm.collectives(
    _compiled_step(1, selection=lambda m: mofo_jax.local_selection(m, sm.LAYOUTS["2d"][2]))
  )
  _assert_no_gathers(local)
  # What is left is the telemetry: one int32 count of kept entries per filtered leaf, summed
  # over each of the two mesh axes.
  assert local["largest_all_reduce_bytes"] <= 4 * 4, local
  assert local["all_reduce_bytes"] <= 2 * 4 * 4, local
  _, exact, _ = _keep_top_fraction_masks("2d", None)
  _, per_shard, _ = _keep_top_fraction_masks(
    "2d", None, selection=mofo_jax.local_selection(sm.mesh("2d"), sm.LAYOUTS["2d"][2])
  )
  assert not np.array_equal(np.asarray(exact["kernel"]), np.asarray(per_shard["kernel"]))


def test_local_selection_errors_are_clear():
  with pytest.raises(ValueError, match="Explicit"):
    _keep_top_fraction_masks("2d", None, selection="local")
  with pytest.raises(ValueError, match="reshape"):
    _keep_top_fraction_masks(
      "2d",
      sm.PARTITIONS["slices"][0],
      selection=mofo_jax.local_selection(sm.mesh("2d"), sm.LAYOUTS["2d"][2]),
    )
  with pytest.raises(ValueError, match="global"):
    _keep_top_fraction_masks(
      "2d", "global", selection=mofo_jax.local_selection(sm.mesh("2d"), sm.LAYOUTS["2d"][2])
    )
  with pytest.raises(ValueError, match="specs for"):
    mofo_jax.keep_top_fraction(selection=mofo_jax.local_selection(sm.mesh("2d"), [P()])).init(
      sm.params()
    )


# ----------------------------------------------------------------------------------------------
# state_shardings under optax's wrappers, and for params without a mesh.

MATRICES = {k: len(s) >= 2 for k, s in sm.SHAPES.items()}


def _mofo():
  return mofo_jax.mofo(1e-2, FRACTION, weight_decay=0.01)


# Each wraps a masked or partitioned inner optimizer (optax.MaskedNode in its state) in one of
# the wrappers the README names, as the fine-tuning `hft` optimizer does.
WRAPPED = {
  "masked": lambda: optax.masked(_mofo(), MATRICES),
  "masked_callable": lambda: optax.masked(
    optax.adamw(1e-2), lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)
  ),
  "partition": lambda: optax.partition(
    {"mofo": _mofo(), "adam": optax.adamw(1e-2)},
    {k: "mofo" if m else "adam" for k, m in MATRICES.items()},
  ),
  "multisteps": lambda: optax.MultiSteps(optax.masked(_mofo(), MATRICES), 2),
  "inject_hyperparams": lambda: optax.masked(
    optax.inject_hyperparams(mofo_jax.mofo)(learning_rate=1e-2, fraction=FRACTION), MATRICES
  ),
  "chain_clip": lambda: optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.masked(_mofo(), MATRICES),
    optax.masked(optax.adamw(1e-2), {k: not m for k, m in MATRICES.items()}),
  ),
}


@pytest.mark.parametrize("layout", ["fsdp", "2d"])
@pytest.mark.parametrize("wrapper", sorted(WRAPPED))
def test_state_shardings_lay_out_moments_like_params_under_wrappers(wrapper, layout):
  opt = WRAPPED[wrapper]()
  shards = sm.shardings(layout, sm.mesh(layout))
  abstract = sm.abstract(shards)
  state_sh = mofo_jax.state_shardings(opt, abstract)
  # Same structure as the state: masked-out entries stay MaskedNode, with no sharding.
  assert jax.tree.structure(state_sh) == jax.tree.structure(jax.eval_shape(opt.init, abstract))
  per_param = 0
  for path, s in jax.tree_util.tree_leaves_with_path(state_sh):
    name = path[-1].key if isinstance(path[-1], jax.tree_util.DictKey) else None
    text = jax.tree_util.keystr(path)
    if name in sm.SHAPES and any(f in text for f in (".mu[", ".nu[", ".acc_grads[")):
      assert s == shards[name], (text, s.spec, shards[name].spec)
      per_param += 1
    elif "telemetry" not in text:
      assert s.spec == P(), (text, s.spec)  # counts, hyperparameters
  assert per_param >= 2 * sum(MATRICES.values()), per_param


@pytest.mark.parametrize("wrapper", ["masked", "multisteps", "chain_clip"])
def test_state_shardings_under_wrappers_compile_and_match_unsharded(wrapper):
  opt = WRAPPED[wrapper]()
  mesh = sm.mesh("2d")
  shards = sm.shardings("2d", mesh)
  state_sh = mofo_jax.state_shardings(opt, sm.abstract(shards))
  with jax.set_mesh(mesh):
    p = jax.tree.map(jax.device_put, sm.params(), shards)
    state = jax.jit(opt.init, out_shardings=state_sh)(p)
    step = jax.jit(
      sm.step_fn(opt), in_shardings=(shards, state_sh, shards), out_shardings=(shards, state_sh)
    )
    for i in range(2):
      p, state = step(p, state, jax.tree.map(jax.device_put, sm.grads(i), shards))
  p_ref, _ = sm.run_unsharded(opt, steps=2)
  # Equal up to the order of summation of the global norm that clip_by_global_norm takes; an
  # entry the update nearly cancels carries that ~1-ulp difference as a large relative one.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8), p, p_ref)
  mu = jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "mu"))
  moments = [x.mu for x in mu if hasattr(x, "mu")]
  assert moments
  for m in moments:
    for k in (k for k in MATRICES if not isinstance(m[k], optax.MaskedNode)):
      assert m[k].sharding.is_equivalent_to(shards[k], m[k].ndim), (k, m[k].sharding)


def test_state_shardings_without_a_mesh():
  opt = _mofo()
  numpy_params = sm.params()
  # NumPy params carry no placement: every entry is None, which jit reads as "you choose".
  shardings = mofo_jax.state_shardings(opt, numpy_params)
  assert jax.tree.leaves(shardings, is_leaf=lambda x: x is None) == [None] * len(
    jax.tree.leaves(jax.eval_shape(opt.init, numpy_params))
  )
  state = jax.jit(opt.init, out_shardings=shardings)(numpy_params)
  assert state[0].mu["kernel"].shape == sm.SHAPES["kernel"]
  # Arrays on one device, as a single-device user has them: that device, everywhere.
  device = jax.devices()[0]
  on_device = jax.device_put(numpy_params, device)
  shardings = mofo_jax.state_shardings(opt, on_device)
  assert {s for s in jax.tree.leaves(shardings)} == {jax.sharding.SingleDeviceSharding(device)}
  assert jax.jit(opt.init, out_shardings=shardings)(on_device)[0].nu["embed"].devices() == {device}


def test_state_shardings_rejects_params_partly_on_a_mesh():
  shards = sm.shardings("fsdp", sm.mesh("fsdp"))
  mixed = {**sm.abstract(shards), "bias": np.zeros(sm.SHAPES["bias"], np.float32)}
  with pytest.raises(TypeError, match=r"params\['bias'\] \(ndarray\) has no NamedSharding"):
    mofo_jax.state_shardings(_mofo(), mixed)


def test_state_shardings_replicate_counts_shaped_like_a_sharded_vector():
  # Telemetry counts are int32[2] limbs; a vector param sharded over a mesh axis of size 2 must
  # not lend them its sharding (only float per-block thresholds follow their param).
  mesh = sm.mesh("2d")
  shards = {**sm.shardings("2d", mesh), "bias": NamedSharding(mesh, P("fsdp"))}
  opt = mofo_jax.mofo(1e-2, FRACTION, filter_mask={k: k in ("bias", "kernel") for k in sm.SHAPES})
  telemetry = mofo_jax.state_shardings(opt, sm.abstract(shards))[0].telemetry
  assert telemetry.num_updated["bias"].spec == telemetry.num_entries["bias"].spec == P()
  assert telemetry.threshold["bias"].spec == P(None)
