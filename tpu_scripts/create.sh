#!/usr/bin/env bash
# Creates a TPU VM (a single host or a multi-host pod slice).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="Usage: ${0##*/} --name NAME --zone ZONE [options]

Creates a Cloud TPU VM slice with gcloud compute tpus tpu-vm create.

  --accelerator-type TYPE  e.g. v4-32, v5litepod-16, v5p-32, v6e-16
                           (default: \$TPU_ACCELERATOR, else v4-32)
  --version RUNTIME        TPU software version (default: \$TPU_RUNTIME, else
                           the JAX image for the TPU generation)
  --spot                   create a Spot TPU (cheaper, can be preempted)
  --preemptible            create a preemptible TPU (the older kind of Spot)"
TPU_ACCELERATOR="${TPU_ACCELERATOR:-v4-32}"
TPU_RUNTIME="${TPU_RUNTIME:-}"
SPOT=0
PREEMPTIBLE=0
OPTIONS="$OPTIONS accelerator-type=TPU_ACCELERATOR version=TPU_RUNTIME"
FLAGS="$FLAGS spot=SPOT preemptible=PREEMPTIBLE"
parse_args "$@"
require_tpu
require_gcloud

# Cloud TPU's recommended software versions for JAX, per generation.
if [ -z "$TPU_RUNTIME" ]; then
  case "$TPU_ACCELERATOR" in
    v2-* | v3-* | v4-*) TPU_RUNTIME=tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) TPU_RUNTIME=v2-alpha-tpuv5-lite ;;
    v5p-*) TPU_RUNTIME=v2-alpha-tpuv5 ;;
    v6e-*) TPU_RUNTIME=v2-alpha-tpuv6e ;;
    *) die "no default --version for accelerator type $TPU_ACCELERATOR; pass --version" ;;
  esac
fi

cmd=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${GCLOUD_FLAGS[@]}"
  "--accelerator-type=$TPU_ACCELERATOR" "--version=$TPU_RUNTIME")
if [ "$SPOT" = 1 ] && [ "$PREEMPTIBLE" = 1 ]; then
  die "--spot and --preemptible exclude each other"
elif [ "$SPOT" = 1 ]; then
  cmd+=(--spot)
elif [ "$PREEMPTIBLE" = 1 ]; then
  cmd+=(--preemptible)
fi
run "${cmd[@]}"
