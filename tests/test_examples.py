"""The examples run as a new user would run them (on a tiny checkpoint where a model is needed)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

TINY_DEMO = [
  "--steps",
  "2",
  "--eval-every",
  "1",
  "--difficulty",
  "1",
  "--seq-len",
  "128",
  "--lr",
  "1e-2",
]


def test_quickstart_fits_and_prints_telemetry():
  out = subprocess.run(
    [sys.executable, str(EXAMPLES / "quickstart.py")],
    capture_output=True,
    text=True,
    check=True,
    timeout=300,
    env={**os.environ, "PYTHONPATH": str(EXAMPLES.parent)},
  ).stdout
  losses = [
    float(line.split("loss")[1].split()[0]) for line in out.splitlines() if line.startswith("step")
  ]
  assert losses[-1] < 0.1 * losses[0]
  assert "0.100 of layer 0's kernel" in out


def test_forgetting_demo_writes_table_json_and_figure(tiny_checkpoint, tmp_path):
  import forgetting_demo

  flags = ["--model", str(tiny_checkpoint), "--out-dir", str(tmp_path), "--seeds", "0,1"]
  results = forgetting_demo.main([*flags, *TINY_DEMO])
  assert set(results["runs"]) == {"adamw", "mofo"}
  seeds = results["runs"]["mofo"]["seeds"]
  assert list(seeds) == ["0", "1"]
  assert [r["step"] for r in seeds["1"]["records"]] == [0, 1, 2]
  # Another seed holds out other problems: the baselines differ.
  assert seeds["0"]["records"][0] != seeds["1"]["records"][0]
  table = (tmp_path / "results.md").read_text()
  assert "| metric | pretrained | AdamW | MoFO |" in table and "forgetting" in table
  assert " ± " in table and "over seeds 0, 1" in table and "than AdamW | - | - |" in table
  assert "cloze prompts completed" in table
  assert (tmp_path / "forgetting.png").read_bytes()[:4] == b"\x89PNG"
  for seed in ("0", "1"):
    mofo = results["runs"]["mofo"]["seeds"][seed]["records"][-1]
    adamw = results["runs"]["adamw"]["seeds"][seed]["records"][-1]
    assert mofo["fraction_changed"] < adamw["fraction_changed"]
  # A rerun into the same directory is refused before any work; the results stay.
  with pytest.raises(SystemExit) as e:
    forgetting_demo.main([*flags, *TINY_DEMO])
  assert e.value.code == 2 and (tmp_path / "results.md").read_text() == table


def test_demo_table_of_one_seed_has_no_spread_and_of_three_the_sample_sd():
  import forgetting_demo

  def run(accuracy, pydoc):
    before = {"step": 0, "task_accuracy": 0.0, "task_answer_loss": 2.0, "pydoc_loss": 3.0}
    before |= {"l2_from_pretrained": 0.0, "fraction_changed": 0.0}
    after = {**before, "step": 4, "task_accuracy": accuracy, "pydoc_loss": pydoc}
    return {"records": [before, after], "wall_s": 10.0}

  one = {"runs": {"adamw": {"seeds": {"0": run(0.5, 3.1)}}}}
  assert "| new task: answer accuracy | 0.0% | 50.0% |" in forgetting_demo.table(one)
  three = {
    "runs": {
      "adamw": {"seeds": {s: run(0.5, 3.1) for s in "012"}},
      "mofo": {"seeds": {"0": run(0.2, 3.0), "1": run(0.4, 3.2), "2": run(0.6, 3.05)}},
    }
  }
  text = forgetting_demo.table(three)
  assert "| 50.0% ± 0.0% | 40.0% ± 20.0% |" in text
  assert "| rise of pydoc loss (forgetting) | - | +0.100 ± 0.000 | +0.083 ± 0.104 |" in text
  assert "| seeds forgetting less pydoc than AdamW | - | - | 2 of 3 |" in text


@pytest.mark.slow
def test_ablations_sweep_writes_frontier(tiny_checkpoint, tmp_path):
  import ablations

  results = ablations.main(
    [
      "--model",
      str(tiny_checkpoint),
      "--out-dir",
      str(tmp_path),
      "--groups",
      "baselines",
      "--steps",
      "1",
      "--difficulty",
      "1",
      "--seq-len",
      "128",
      "--task-eval",
      "8",
      "--old-batches",
      "1",
    ]
  )
  assert len(results["runs"]) == 2
  saved = json.loads((tmp_path / "ablations.json").read_text())
  assert set(saved["runs"]) == set(results["runs"])
  assert (tmp_path / "ablations.png").read_bytes()[:4] == b"\x89PNG"
  assert "Half Fine-Tuning" in (tmp_path / "ablations.md").read_text()


@pytest.mark.slow
def test_colab_notebook_runs_top_to_bottom(tiny_checkpoint, tmp_path, monkeypatch):
  import nbclient
  import nbformat

  nb = nbformat.read(EXAMPLES / "colab_demo.ipynb", as_version=4)
  args = " ".join(["--model", str(tiny_checkpoint), "--out-dir", str(tmp_path / "nb"), *TINY_DEMO])
  monkeypatch.setenv("MOFO_DEMO_ARGS", args)
  # The kernel imports this checkout, so its install cell finds mofo_jax and installs nothing:
  # a test must not reinstall the package that other processes are importing. A `pip` that
  # fails, ahead of the real one on the path, makes any install attempt fail the test.
  fake_pip = tmp_path / "no_pip" / "pip"
  fake_pip.mkdir(parents=True)
  (fake_pip / "__init__.py").write_text("")
  (fake_pip / "__main__.py").write_text("raise SystemExit('the notebook tried to pip install')")
  monkeypatch.setenv("PYTHONPATH", f"{fake_pip.parent}{os.pathsep}{EXAMPLES.parent}")
  nbclient.NotebookClient(
    nb, timeout=600, resources={"metadata": {"path": str(EXAMPLES)}}
  ).execute()
  assert (tmp_path / "nb" / "forgetting.png").is_file()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert any("image/png" in o.get("data", {}) for o in outputs)


@pytest.mark.slow
def test_long_runs_train_resume_skip_and_report(tiny_checkpoint, tmp_path, capsys):
  import long_runs

  flags = ["--model", str(tiny_checkpoint), "--out-dir", str(tmp_path), "--runs", "adamw,mofo-0.1"]
  tiny = ["--steps", "2", "--eval-every", "1", "--difficulty", "1", "--seq-len", "128"]
  tiny += ["--lr", "1e-2", "--task-eval", "8", "--old-batches", "1"]
  long_runs.main([*flags, *tiny])
  out = capsys.readouterr().out
  assert "== adamw: starting" in out and "== mofo-0.1: starting" in out
  for name in ("adamw", "mofo-0.1"):
    steps = [r["step"] for r in long_runs.evaluations(tmp_path, name)]
    assert steps == [0, 1, 2]
  # A second invocation skips finished runs and only rewrites the report.
  long_runs.main([*flags, *tiny])
  assert capsys.readouterr().out.count("finished earlier") == 2
  report = (tmp_path / "long_runs.md").read_text()
  assert "| MoFO 0.1 | 2 |" in report and "At equal learning" in report
  assert (tmp_path / "long_runs.png").read_bytes()[:4] == b"\x89PNG"
  # Other settings into the same directory are refused, not skipped into a mixed report.
  with pytest.raises(SystemExit) as e:
    long_runs.main([*flags, *tiny[:-6], "--lr", "3e-2", *tiny[-4:]])
  assert e.value.code == 2
  assert "finished with other settings" in capsys.readouterr().err


def test_long_runs_compare_at_equal_answer_loss(tmp_path):
  import long_runs

  def write(name, points):
    d = tmp_path / name / "results"
    d.mkdir(parents=True)
    base = {"pydoc_loss": 3.0, "bible_loss": 3.5, "cloze_accuracy": 1.0}
    base |= {"task_accuracy": 0.0, "l2_from_pretrained": 0.0, "fraction_changed": 0.0}
    lines = [
      {**base, "kind": "eval", "step": 50 * i, "task_answer_loss": loss, "pydoc_loss": 3.0 + rise}
      for i, (loss, rise) in enumerate(points)
    ]
    lines.insert(1, {"kind": "train", "step": 1, "loss": 9.0})  # train lines are not evaluations
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))

  write("adamw", [(2.0, 0.0), (1.0, 0.2)])
  write("mofo-0.1", [(2.0, 0.0), (1.5, 0.05), (0.5, 0.3)])
  long_runs.main(["--report", "--out-dir", str(tmp_path), "--runs", "adamw,mofo-0.1,hft"])
  report = (tmp_path / "long_runs.md").read_text()
  # At MoFO's loss 1.5 AdamW had risen +0.100 (halfway); at 0.5 AdamW never got there.
  assert "| MoFO 0.1 | 50 | 1.500 | +0.050 | +0.100 |" in report
  assert "| MoFO 0.1 | 100 | 0.500 | +0.300 | - |" in report
  assert "Half Fine-Tuning" not in report  # no evaluation logged: left out
  with pytest.raises(SystemExit) as e:
    long_runs.main(["--report", "--out-dir", str(tmp_path / "empty")])
  assert e.value.code == 2
