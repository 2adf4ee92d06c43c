#!/usr/bin/env bash
# Runs mofo-finetune on every worker of a TPU VM slice at once.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="Usage: ${0##*/} --name NAME --zone ZONE [options] -- [mofo-finetune args]

Starts 'mofo-finetune --distributed ARGS' on all workers (one process per host;
the CLI calls jax.distributed.initialize() itself). Everything after -- is
passed to mofo-finetune unchanged.

  --workdir DIR   directory on the workers to run in, relative to the home
                  directory or absolute (default: home)
  --detach        keep running after this command returns; output goes to
                  the --log file on each worker
  --log FILE      log file for --detach (default: mofo-finetune.log)"
WORKDIR=""
LOG_FILE="mofo-finetune.log"
DETACH=0
OPTIONS="$OPTIONS workdir=WORKDIR log=LOG_FILE"
FLAGS="$FLAGS detach=DETACH"
ACCEPTS_PASSTHROUGH=1
parse_args "$@"
require_tpu
require_gcloud

program="$(quote_words mofo-finetune --distributed ${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"})"
# pip --user puts the entry point in ~/.local/bin, which non-login ssh
# sessions may not have on PATH.
remote="export PATH=\"\$HOME/.local/bin:\$PATH\""
# ssh starts in the home directory; a leading ~/ (quoted, so not expanded
# here) means the same.
WORKDIR="${WORKDIR#\~/}"
if [ -n "$WORKDIR" ]; then
  # A failed cd stops the worker here instead of running the program in the home directory.
  remote="$remote; cd $(quote "$WORKDIR") || exit 1"
fi
if [ "$DETACH" = 1 ]; then
  remote="$remote; nohup $program > $(quote "$LOG_FILE") 2>&1 < /dev/null &"
else
  remote="$remote; $program"
fi
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${GCLOUD_FLAGS[@]}" \
  "--command=$remote"
