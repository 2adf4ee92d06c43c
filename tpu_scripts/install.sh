#!/usr/bin/env bash
# Installs JAX for TPU and mofo-jax on every worker of a TPU VM slice.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

USAGE="Usage: ${0##*/} --name NAME --zone ZONE [options]

Installs jax[tpu] and mofo-jax[finetune] on all workers. By default the
committed HEAD of this checkout is archived, copied to every worker and
installed from there, so all hosts run the same code.

  --package SPEC   install this pip requirement instead of the local checkout,
                   e.g. 'mofo-jax[finetune]==0.1.0' or a git URL
  --jax SPEC       pip requirement for JAX (default: jax[tpu])"
PACKAGE=""
JAX_SPEC="jax[tpu]"
OPTIONS="$OPTIONS package=PACKAGE jax=JAX_SPEC"
parse_args "$@"
require_tpu
require_gcloud

pip="python3 -m pip install --user --upgrade"
remote="set -e; $pip pip; $pip $(quote "$JAX_SPEC")"
if [ -z "$PACKAGE" ]; then
  repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  # A fresh file in TMPDIR (the name cannot steer it elsewhere), removed on exit.
  if [ "$DRY_RUN" = 1 ]; then
    archive="${TMPDIR:-/tmp}/mofo_jax_src.XXXXXX"
  else
    archive="$(mktemp "${TMPDIR:-/tmp}/mofo_jax_src.XXXXXX")"
    trap 'rm -f "$archive"' EXIT
  fi
  # git archive ships exactly the committed tree: no local build outputs.
  run git -C "$repo" archive --format=tar.gz --prefix=mofo_jax_src/ -o "$archive" HEAD
  run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:mofo_jax_src.tar.gz" \
    --worker=all "${GCLOUD_FLAGS[@]}"
  remote="$remote; rm -rf ~/mofo_jax_src; tar xzf ~/mofo_jax_src.tar.gz -C ~"
  remote="$remote; $pip \"\$HOME/mofo_jax_src[finetune]\""
else
  remote="$remote; $pip $(quote "$PACKAGE")"
fi
# A quick check that every host sees its TPU chips.
remote="$remote; python3 -c 'import jax; print(jax.process_index(), jax.local_device_count())'"
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${GCLOUD_FLAGS[@]}" \
  "--command=$remote"
