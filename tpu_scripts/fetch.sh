#!/usr/bin/env bash
# Copies checkpoints from a TPU VM (or a Cloud Storage bucket) to this machine.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="Usage: ${0##*/} --name NAME --zone ZONE [options]

Copies the checkpoint directory back with gcloud compute tpus tpu-vm scp
from one worker, or with gcloud storage cp when it is a gs:// URL (the
place to write checkpoints on multi-host slices, where every host writes
its own shards).

  --remote-dir DIR   checkpoint directory on the worker, relative to its
                     home, or gs://BUCKET/PATH (default: checkpoints)
  --local-dir DIR    where to put it here (default: .); created if missing
  --worker N         worker to copy from (default: 0)"
REMOTE_DIR="checkpoints"
LOCAL_DIR="."
WORKER=0
OPTIONS="$OPTIONS remote-dir=REMOTE_DIR local-dir=LOCAL_DIR worker=WORKER"
parse_args "$@"

case "$REMOTE_DIR" in
  gs://*)
    require_gcloud
    run mkdir -p "$LOCAL_DIR"
    run gcloud storage cp --recursive "$REMOTE_DIR" "$LOCAL_DIR"
    ;;
  *)
    require_tpu
    require_gcloud
    run mkdir -p "$LOCAL_DIR"
    run gcloud compute tpus tpu-vm scp --recurse "$TPU_NAME:$REMOTE_DIR" "$LOCAL_DIR" \
      "--worker=$WORKER" "${GCLOUD_FLAGS[@]}"
    ;;
esac
