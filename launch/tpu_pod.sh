#!/usr/bin/env bash
# Run lees_jax on a Cloud TPU VM pod slice: the same command on every worker.
#
#   launch/tpu_pod.sh create                 # create the TPU VM slice (skipped if it exists)
#   launch/tpu_pod.sh setup                  # copy this checkout to all workers, install deps
#   launch/tpu_pod.sh run <lees_jax.main flags>   # run on all workers (--worker=all)
#   launch/tpu_pod.sh delete                 # delete the slice
#
# Configuration (environment variables):
#   TPU_NAME          name of the TPU VM                 (default: lees-pod)
#   ZONE              GCP zone                           (default: us-central2-b)
#   PROJECT           GCP project                        (default: gcloud's current project)
#   ACCELERATOR_TYPE  slice type, e.g. v4-32, v5litepod-16 (default: v4-32)
#   RUNTIME_VERSION   TPU VM image                       (default: tpu-ubuntu2204-base)
#   SPOT=1            create a spot (preemptible) slice; runs resume from their checkpoints
#   REMOTE_DIR        checkout location on the workers   (default: lees_jax, in $HOME)
#
# The workdir must be on GCS (every worker sees it; orbax writes checkpoints there,
# process 0 writes summaries and gates.json), e.g.
#   launch/tpu_pod.sh run --config=configs/cifar10.py --config.mode=pretrain \
#       --workdir=gs://MY_BUCKET/lees/pretrain --config.data.data_dir=gs://MY_BUCKET/tensorflow_datasets
#   launch/tpu_pod.sh run --config=configs/cifar10.py --config.mode=train_gates \
#       --config.backbone=gs://MY_BUCKET/lees/pretrain --workdir=gs://MY_BUCKET/lees/gates
#   launch/tpu_pod.sh run --config=configs/cifar10.py --config.mode=experiment \
#       --config.backbone=gs://MY_BUCKET/lees/pretrain --workdir=gs://MY_BUCKET/lees/study \
#       --config.data.data_dir=gs://MY_BUCKET/tensorflow_datasets --config.experiment.robustness=False
# (every mode but `latents` runs on all workers; process 0 alone writes results, the others
# wait at barriers where a run reads back its own files; CIFAR-10-C robustness is one-host only.)
# LEES_MULTIHOST=1 makes lees_jax.main call jax.distributed.initialize() (TPU pods are
# auto-detected). A preempted or killed run resumes from its latest checkpoint when the
# same command is run again.
set -euo pipefail

TPU_NAME=${TPU_NAME:-lees-pod}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
REMOTE_DIR=${REMOTE_DIR:-lees_jax}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

GCLOUD_ARGS=(--zone="$ZONE")
if [[ -n "${PROJECT:-}" ]]; then GCLOUD_ARGS+=(--project="$PROJECT"); fi

q() { printf '%q ' "$@"; }   # shell-quote arguments for the remote command line

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_ARGS[@]}" --worker=all --command="$1"
}

cmd=${1:-}
shift || true
case "$cmd" in
  create)
    if gcloud compute tpus tpu-vm describe "$TPU_NAME" "${GCLOUD_ARGS[@]}" >/dev/null 2>&1; then
      echo "TPU VM $TPU_NAME already exists in $ZONE; using it."
    else
      extra=()
      if [[ "${SPOT:-0}" == 1 ]]; then extra+=(--spot); fi
      gcloud compute tpus tpu-vm create "$TPU_NAME" "${GCLOUD_ARGS[@]}" \
        --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${extra[@]}"
    fi
    ;;
  setup)
    tarball=$(mktemp -d)/lees_jax.tar.gz
    # The tracked files of this checkout (plus uncommitted changes to them).
    (cd "$REPO_ROOT" && git ls-files -z | tar --null -czf "$tarball" -T -)
    gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME":lees_jax.tar.gz "${GCLOUD_ARGS[@]}" --worker=all
    # Training needs neither torch nor diffusers (test oracles only).
    on_all_workers "set -e; mkdir -p $(q "$REMOTE_DIR") && tar -xzf lees_jax.tar.gz -C $(q "$REMOTE_DIR") && \
      cd $(q "$REMOTE_DIR") && python3 -m venv .venv && \
      grep -v -E '^(torch|diffusers|safetensors|huggingface_hub|pytest)' requirements.txt > /tmp/req.txt && \
      .venv/bin/pip install -q -r /tmp/req.txt 'jax[tpu]==0.10.2' && \
      .venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), \"local devices\")'"
    ;;
  run)
    if [[ $# -eq 0 ]]; then echo "usage: $0 run --config=... --workdir=gs://... [--config.x=y ...]" >&2; exit 2; fi
    for a in "$@"; do
      if [[ "$a" == --workdir=* && "$a" != --workdir=gs://* ]]; then
        echo "warning: $a is not on gs://; every worker needs the same workdir" >&2
      fi
    done
    on_all_workers "cd $(q "$REMOTE_DIR") && LEES_MULTIHOST=1 TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python -m lees_jax.main $(q "$@")"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GCLOUD_ARGS[@]}" --quiet
    ;;
  *)
    sed -n '2,31p' "$0"
    exit 2
    ;;
esac
