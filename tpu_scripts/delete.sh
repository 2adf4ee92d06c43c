#!/usr/bin/env bash
# Deletes a TPU VM slice (billing stops only once it is deleted).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="Usage: ${0##*/} --name NAME --zone ZONE [--yes]

Deletes the TPU VM with gcloud compute tpus tpu-vm delete. Copy your
checkpoints off it first (fetch.sh): its disks go with it.

  --yes   do not ask for confirmation (passes --quiet to gcloud)"
YES=0
FLAGS="$FLAGS yes=YES"
parse_args "$@"
require_tpu
require_gcloud

cmd=(gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GCLOUD_FLAGS[@]}")
if [ "$YES" = 1 ]; then
  cmd+=(--quiet)
fi
run "${cmd[@]}"
