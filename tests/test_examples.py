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

  results = forgetting_demo.main(
    ["--model", str(tiny_checkpoint), "--out-dir", str(tmp_path), *TINY_DEMO]
  )
  assert set(results["runs"]) == {"adamw", "mofo"}
  assert [r["step"] for r in results["runs"]["mofo"]["records"]] == [0, 1, 2]
  table = (tmp_path / "results.md").read_text()
  assert "| metric | pretrained | AdamW | MoFO |" in table and "forgetting" in table
  assert (tmp_path / "forgetting.png").read_bytes()[:4] == b"\x89PNG"
  mofo = results["runs"]["mofo"]["records"][-1]
  adamw = results["runs"]["adamw"]["records"][-1]
  assert mofo["fraction_changed"] < adamw["fraction_changed"]
  # A rerun into the same directory is refused before any work; the results stay.
  with pytest.raises(SystemExit) as e:
    forgetting_demo.main(["--model", str(tiny_checkpoint), "--out-dir", str(tmp_path), *TINY_DEMO])
  assert e.value.code == 2 and (tmp_path / "results.md").read_text() == table


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


def test_colab_notebook_runs_top_to_bottom(tiny_checkpoint, tmp_path):
  import nbclient
  import nbformat

  nb = nbformat.read(EXAMPLES / "colab_demo.ipynb", as_version=4)
  args = " ".join(["--model", str(tiny_checkpoint), "--out-dir", str(tmp_path / "nb"), *TINY_DEMO])
  os.environ["MOFO_DEMO_ARGS"] = args
  try:
    nbclient.NotebookClient(
      nb, timeout=600, resources={"metadata": {"path": str(EXAMPLES)}}
    ).execute()
  finally:
    del os.environ["MOFO_DEMO_ARGS"]
  assert (tmp_path / "nb" / "forgetting.png").is_file()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert any("image/png" in o.get("data", {}) for o in outputs)
