"""``plan``: argument errors, the HLO collective accounting, and the compiled large step."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from mofo_jax.finetune import plan, train
from tests.finetune.conftest import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _error(capsys, argv):
  assert plan.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  return err


def test_unknown_preset_lists_the_known_ones(capsys):
  err = _error(capsys, ["--model", "llama-9b", "--devices", "8"])
  assert "llama-9b" in err and all(p in err for p in plan.PRESETS)


def test_mofo_finetune_plan_dispatches_to_plan(capsys):
  from mofo_jax.finetune import cli

  assert cli.main(["plan", "--model", "llama-9b", "--devices", "8"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("mofo-finetune plan: error:") and "llama-3.1-8b" in err


@pytest.mark.parametrize(
  "argv, needle",
  [
    (["--mesh", "fsdp=1,tensor=16"], "'tensor' of size 16 does not divide num_key_value_heads=8"),
    (["--mesh", "fsdp=3,tensor=-1"], "3 does not divide the 16 devices"),
    (["--mesh", "fsdp=8"], "has 8 devices; the target has 16"),
    (["--batch-size", "8"], "--batch-size 8 is not a multiple of grad_accum x data x fsdp = 16"),
    (["--optimizer", "sgd"], "known optimizers are mofo"),
  ],
)
def test_bad_mesh_and_batch_name_the_problem(capsys, argv, needle):
  err = _error(capsys, ["--model", "llama-3.1-8b", "--topology", "v5e:4x4", *argv])
  assert needle in err, err


@pytest.mark.parametrize(
  "flag, where, needle",
  [("--json", "missing/plan.json", "does not exist"), ("--save-hlo", "a-file", "not a directory")],
)
def test_unwritable_outputs_stop_before_compiling(capsys, tmp_path, flag, where, needle):
  (tmp_path / "a-file").write_text("mine")
  err = _error(
    capsys,
    ["--model", "llama-3.2-1b", "--devices", "8", "--layers", "1", flag, str(tmp_path / where)],
  )
  assert needle in err, err
  assert (tmp_path / "a-file").read_text() == "mine"


def test_topology_libtpu_refuses_is_one_line(capsys):
  pytest.importorskip("libtpu")  # CI's third step, the tpu-plan venv
  err = _error(capsys, ["--model", "llama-3.2-1b", "--topology", "v5e:1x32", "--layers", "1"])
  assert "--topology v5e:1x32: libtpu:" in err, err


def test_libtpu_slice_is_laid_out_alike_by_plan_and_the_trainer():
  """Both follow the chips' links, so plan compiles the collectives a run makes."""
  pytest.importorskip("libtpu")  # CI's third step, the tpu-plan venv
  from jax.experimental import topologies

  devices = topologies.get_topology_desc(
    platform="tpu", topology_name="v5e:4x4", chips_per_host_bounds=(2, 2, 1)
  ).devices
  sizes = {"data": 2, "fsdp": 4, "tensor": 2}
  ids = lambda mesh: [d.id for d in mesh.devices.flat]
  ours = ids(train.make_mesh(sizes, devices))
  assert ours == ids(plan.make_mesh(devices, sizes))
  assert ours != [d.id for d in devices]  # laid out by the torus, not in listing order


def test_mesh_that_does_not_divide_hidden_names_fsdp(capsys):
  err = _error(capsys, ["--model", "qwen2.5-7b", "--devices", "6", "--mesh", "fsdp=-1"])
  assert "'fsdp' of size 6 does not divide hidden_size=3584" in err, err


@pytest.mark.parametrize(
  "topology, expected",
  [
    ("v5e:4x4", ("v5e", 16, "v5e:4x4")),
    ("v5litepod-16", ("v5e", 16, "v5e:4x4")),
    ("v4-8", ("v4", 4, "v4:2x2x1")),
    ("v5p-64", ("v5p", 32, "v5p:2x4x4")),
    ("v6e:2x2", ("v6e", 4, "v6e:2x2")),
  ],
)
def test_topologies(topology, expected):
  t = plan.parse_target(topology, None, None)
  assert (t.generation, t.devices, t.topology) == expected


@pytest.mark.parametrize("topology", ["v5e:4x4x4", "v4:4x4", "tpu-16", "v5p-12"])
def test_bad_topologies(topology):
  with pytest.raises(plan.PlanError, match="--topology"):
    plan.parse_target(topology, None, None)


_HLO = textwrap.dedent("""\
  HloModule m

  %add (a: f32[], b: f32[]) -> f32[] {
    %a = f32[] parameter(0)
    %b = f32[] parameter(1)
    ROOT %s = f32[] add(%a, %b)
  }

  %cond (p: (s32[], f32[8])) -> pred[] {
    %p = (s32[], f32[8]) parameter(0)
    %i = s32[] get-tuple-element(%p), index=0
    %n = s32[] constant(5)
    ROOT %lt = pred[] compare(%i, %n), direction=LT
  }

  %body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
    %p = (s32[], f32[8]) parameter(0)
    %x = f32[8] get-tuple-element(%p), index=1
    %ag = f32[64]{0} all-gather(%x), replica_groups=[1,8]<=[8], dimensions={0}, metadata={op_name="jit(f)/while/body/dot"}
    %ar = f32[8]{0} all-reduce(%x), replica_groups={{0},{1},{2},{3}}, to_apply=%add
    ROOT %t = (s32[], f32[8]) tuple(%i, %x)
  }

  ENTRY %main (x: f32[8]) -> f32[8] {
    %x = f32[8] parameter(0)
    %rs = bf16[4,2]{1,0} reduce-scatter(bf16[32,2]{1,0} %x), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}, to_apply=%add, metadata={op_name="jit(f)/optimizer_update/mul"}
    %st = (f32[8], f32[8], u32[], u32[]) collective-permute-start(%x), source_target_pairs={{0,1},{1,0}}
    %dn = f32[8] collective-permute-done(%st)
    %w = (s32[], f32[8]) while(%t0), condition=%cond, body=%body
    %w2 = (s32[], f32[8]) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
    ROOT %r = f32[8] all-reduce(%x), replica_groups=mesh['a'=2,'b'=4] {'b'}, to_apply=%add
  }
""")


def test_collectives_count_loop_trips_and_skip_groups_of_one():
  got = sorted((c.kind, c.bytes, c.times, c.optimizer) for c in plan.collectives(_HLO))
  assert got == [
    # the body's all-gather runs 5 times in the first loop and 3 in the second: 8 in all;
    # its all-reduce over groups of one device moves nothing and is left out
    ("all-gather", 256, 8, False),
    ("all-reduce", 32, 1, False),
    ("collective-permute", 32, 1, False),
    # a reduce-scatter moves its (larger) input; it sits in the optimizer's scope
    ("reduce-scatter", 128, 1, True),
  ]


def test_global_batch_gathers_are_found():
  def gather(dtype, dims, kind="all-gather"):
    return plan.Collective(kind, 0, [(dtype, dims)], 1, False)

  hidden, chunk_logits = gather("bf16", (16, 2048, 4096)), gather("f32", (4, 16, 512, 1000))
  colls = [
    hidden,
    chunk_logits,
    gather("s32", (16, 2048)),  # token ids: not an activation
    gather("bf16", (16, 1, 2048, 256)),  # one row, hidden split 16 ways
    gather("f32", (4096, 16)),
    gather("f32", (16, 2048, 4096), "all-reduce"),
  ]
  assert plan.global_batch_gathers(colls, 16, [2048, 512]) == [hidden, chunk_logits]


def test_plan_of_a_config_json_on_cpu_devices(tmp_path, capsys):
  from mofo_jax.finetune.model import LlamaConfig

  path = tmp_path / "config.json"
  path.write_text(
    json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"], **TINY})
  )
  argv = ["--model", str(tmp_path), "--devices", "8", "--chip", "v5e", "--batch-size", "8"]
  argv += ["--seq-len", "32", "--optimizer", "mofo", "--json", str(tmp_path / "plan.json")]
  assert plan.main(argv) == 0
  out = capsys.readouterr().out
  assert "simulated CPU devices" in out and "fits in 16 GiB" in out, out
  figures = json.loads((tmp_path / "plan.json").read_text())["results"][0]
  assert figures["optimizer"] == "mofo" and figures["temps"] > 0
  assert figures["peak"] - figures["peak_without_copy"] == figures["params"] > 0
  # parameters: float32, sharded 8 ways along the embedding dimension (norm scales replicated)
  n = sum(x.size for x in __import__("jax").tree.leaves(_abstract_params(LlamaConfig(**TINY))))
  assert n * 4 / 8 <= figures["params"] < n * 4 / 8 + 4 * 64 * 8
  # an existing --json file is not overwritten
  assert plan.main(argv) == 2


def _abstract_params(config):
  from flax import nnx

  from mofo_jax.finetune.model import LlamaForCausalLM

  return nnx.state(nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0))), nnx.Param)


_LARGE_STEP = textwrap.dedent("""
    import json
    from mofo_jax.finetune import plan, train
    # Llama-3.2-1B shapes (2 of its 16 layers, to compile in CI), scanned and rematerialised,
    # float32 masters, bfloat16 compute, 16 simulated devices, 2 rows of 256 tokens each.
    config = plan.model_config("llama-3.2-1b", num_hidden_layers=2, dtype="bfloat16",
                               remat=True, scan_layers=True)
    mesh = plan.make_mesh(plan.cpu_devices(16), {"data": 1, "fsdp": 16, "tensor": 1})
    out = {}
    for name in ("mofo", "adamw"):
      r, _ = plan.compile_step(config, mesh, name, 32, 256)
      out[name] = {
        "total": sum(c.bytes * c.times for c in r.collectives),
        "optimizer": sum(c.bytes * c.times for c in r.collectives if c.optimizer),
        "optimizer_gathers": [c.shapes for c in r.collectives
                              if c.optimizer and c.kind in ("all-gather", "all-to-all")],
        "global_batch": [c.shapes for c in plan.global_batch_gathers(r.collectives, 32, [256])],
        "temps": r.temps,
      }
    print("RESULT", json.dumps(out))
""")


def test_compiled_large_step_keeps_batch_sharded_and_mofo_cheap():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=16"
  proc = subprocess.run(
    [sys.executable, "-c", _LARGE_STEP],
    check=False,
    env=env,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=900,
  )
  line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
  assert line, proc.stderr[-3000:]
  res = json.loads(line[0][len("RESULT ") :])
  mofo, adamw = res["mofo"], res["adamw"]
  # no all-gather / all-to-all of a MoFO operand: its selection only all-reduces counts
  assert mofo["optimizer_gathers"] == [], mofo["optimizer_gathers"]
  assert 0 < mofo["optimizer"] - adamw["optimizer"] < 1e6
  assert mofo["total"] - adamw["total"] < 1e6
  # no activation (hidden states, logits) is assembled over the global batch of 32 rows
  assert mofo["global_batch"] == [] and adamw["global_batch"] == []


def test_peak_counts_the_trainers_pretrained_copy_only_on_the_devices():
  # --distance-metrics device keeps the pretrained params on the devices beside the step's
  # arguments; host and off do not.
  r = plan.PlanResult("mofo", params=10, opt_state=20, arguments=30, outputs=5, aliased=5, temps=7)
  assert r.peak == 30 + 7 + 10 and r.peak_without_copy == 30 + 7
  gib = 1024**3
  big = plan.PlanResult(
    "mofo", 2 * gib, 4 * gib, arguments=6 * gib, outputs=0, aliased=0, temps=9 * gib
  )
  report = plan.format_report([], [big], 16)
  assert "fits in 16 GiB, metrics host/off / device" in report
  assert report.splitlines()[-1].split()[-3:] == ["yes", "/", "NO"]
  assert "15.00" in report and "17.00" in report
