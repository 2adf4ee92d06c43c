#!/usr/bin/env bash
# Runs mofo-finetune on every worker of a TPU VM slice at once.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="Usage: ${0##*/} --name NAME --zone ZONE [options] -- [mofo-finetune args]

Starts 'mofo-finetune --distributed ARGS' on all workers (one process per host;
the CLI calls jax.distributed.initialize() itself). Everything after -- is
passed to mofo-finetune unchanged.

  --workdir DIR         directory on the workers to run in, relative to the home
                        directory or absolute (default: home)
  --detach              keep running after this command returns; output goes to
                        the --log file on each worker
  --log FILE            log file for --detach (default: mofo-finetune.log)
  --prepare CMD         a shell command each worker runs first, in a subshell in
                        the home directory (before --workdir), e.g. copying the
                        model from Cloud Storage when it is not there yet; the
                        run starts only if it succeeds
  --until-done          run in the foreground and relaunch with --resume until
                        the run finishes (any other failure ends this script
                        with the run's exit status): after mofo-finetune exits with status
                        75 (SIGTERM: every process saved the same step), and
                        after the slice itself was preempted (its state
                        PREEMPTED or TERMINATED: it is deleted, created again
                        with the same type, version and Spot or preemptible
                        setting, and installed again with install.sh; its
                        network, service account and labels are gcloud's
                        defaults). Needs mofo-finetune's --checkpoint-dir on
                        gs://, since the slice's disks go with it
  --max-relaunches N    give up after N relaunches (default: 20)
  --package SPEC        with --until-done: what install.sh installs on a
                        recreated slice (default: this checkout's HEAD)"
WORKDIR=""
LOG_FILE="mofo-finetune.log"
DETACH=0
UNTIL_DONE=0
MAX_RELAUNCHES=20
PACKAGE=""
PREPARE=""
OPTIONS="$OPTIONS workdir=WORKDIR log=LOG_FILE max-relaunches=MAX_RELAUNCHES package=PACKAGE"
OPTIONS="$OPTIONS prepare=PREPARE"
FLAGS="$FLAGS detach=DETACH until-done=UNTIL_DONE"
ACCEPTS_PASSTHROUGH=1
parse_args "$@"
require_tpu
require_gcloud
if [ "$UNTIL_DONE" = 1 ] && [ "$DETACH" = 1 ]; then
  die "--until-done waits for the run to relaunch it: drop --detach (run this script itself in tmux or under nohup)"
fi
[[ "$MAX_RELAUNCHES" =~ ^[0-9]+$ ]] || die "--max-relaunches '$MAX_RELAUNCHES' is not a number"

# Prints the value of mofo-finetune's --checkpoint-dir among the words after --, if any.
checkpoint_dir() {
  local word take=0
  for word in ${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"}; do
    if [ "$take" = 1 ]; then
      printf '%s' "$word"
      return
    fi
    case "$word" in
      --checkpoint-dir=*) printf '%s' "${word#*=}" && return ;;
      --checkpoint-dir) take=1 ;;
    esac
  done
}

if [ "$UNTIL_DONE" = 1 ]; then
  # A preempted slice is deleted and made again, and its disks with it: a relaunch can only
  # resume from checkpoints kept off the slice.
  ckpt="$(checkpoint_dir)"
  case "$ckpt" in
    gs://*) ;;
    "") die "--until-done relaunches with --resume: pass mofo-finetune a --checkpoint-dir gs://BUCKET/PATH after --" ;;
    *) die "--until-done: --checkpoint-dir '$ckpt' is on the slice's own disk, which is lost when a preempted slice is made again: use a gs:// directory" ;;
  esac
fi

# What mofo-finetune exits with after saving the step all processes agreed on after a SIGTERM.
EXIT_PREEMPTED=75

# Stops the loop with the run's own exit status, saying why.
stop() {
  printf '%s: %s\n' "${0##*/}" "$2" >&2
  exit "$1"
}

# Prints the remote shell command that runs mofo-finetune --distributed with the words given.
remote_command() {
  local program remote
  program="$(quote_words mofo-finetune --distributed "$@")"
  # pip --user puts the entry point in ~/.local/bin, which non-login ssh
  # sessions may not have on PATH.
  remote="export PATH=\"\$HOME/.local/bin:\$PATH\""
  if [ -n "$PREPARE" ]; then
    # The user's own shell command, as written; a subshell, so that its cd or exit stays there.
    remote="$remote; ( $PREPARE ) || exit 1"
  fi
  # ssh starts in the home directory; a leading ~/ (quoted, so not expanded
  # here) means the same.
  if [ -n "$WORKDIR" ]; then
    # A failed cd stops the worker here instead of running the program in the home directory.
    remote="$remote; cd $(quote "${WORKDIR#\~/}") || exit 1"
  fi
  if [ "$DETACH" = 1 ]; then
    remote="$remote; nohup $program > $(quote "$LOG_FILE") 2>&1 < /dev/null &"
  else
    remote="$remote; $program"
  fi
  printf '%s' "$remote"
}

launch() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${GCLOUD_FLAGS[@]}" \
    "--command=$(remote_command "$@")"
}

args=(${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"})
if [ "$UNTIL_DONE" != 1 ]; then
  launch ${args[@]+"${args[@]}"}
  exit
fi
if [ "$DRY_RUN" = 1 ]; then
  launch ${args[@]+"${args[@]}"}
  echo "(--until-done: later commands depend on how this one ends)" >&2
  exit 0
fi

here="$(dirname "${BASH_SOURCE[0]}")"
export TPU_NAME TPU_ZONE TPU_PROJECT
relaunches=0
while :; do
  status=0
  launch ${args[@]+"${args[@]}"} || status=$?
  [ "$status" = 0 ] && exit 0
  if [ "$status" != "$EXIT_PREEMPTED" ]; then
    # The slice may be gone (a preempted Spot slice): then make it again, like it was.
    slice="$(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${GCLOUD_FLAGS[@]}" \
      '--format=csv[no-heading](state,acceleratorType,runtimeVersion,schedulingConfig.spot,schedulingConfig.preemptible)')" ||
      stop "$status" "mofo-finetune ended with status $status and the slice cannot be described; stopping"
    # Commas, not tabs: read would merge the tabs around an empty field.
    IFS=, read -r state accelerator runtime spot preemptible <<<"$slice"
    case "$state" in
      PREEMPTED | TERMINATED) ;;
      *) stop "$status" "mofo-finetune ended with status $status on a slice in state ${state:-unknown}: not a preemption; stopping" ;;
    esac
  fi
  if [ "$relaunches" -ge "$MAX_RELAUNCHES" ]; then
    stop "$status" "stopping after $relaunches relaunches (--max-relaunches)"
  fi
  relaunches=$((relaunches + 1))
  if [ "$status" != "$EXIT_PREEMPTED" ]; then
    printf '%s: the slice was %s: making it again\n' "${0##*/}" "$state" >&2
    bash "$here/delete.sh" --yes
    create=(--accelerator-type "$accelerator" --version "$runtime")
    if [ "$spot" = True ]; then
      create+=(--spot)
    elif [ "$preemptible" = True ]; then
      create+=(--preemptible)
    fi
    bash "$here/create.sh" "${create[@]}"
    if [ -n "$PACKAGE" ]; then
      bash "$here/install.sh" --package "$PACKAGE"
    else
      bash "$here/install.sh"
    fi
  fi
  case " ${args[*]-} " in
    *" --resume "*) ;;
    *) args+=(--resume) ;;
  esac
  printf '%s: relaunch %s of at most %s, with --resume\n' "${0##*/}" "$relaunches" "$MAX_RELAUNCHES" >&2
done
