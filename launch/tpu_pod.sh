#!/usr/bin/env bash
# Run one training command on every worker of an existing Cloud TPU VM slice (nothing is created).
#   bash launch/tpu_pod.sh TPU_NAME ZONE --config=experiments/cerebras_gpt.py:size=1.3b --workdir=gs://bucket/run
# Copies this checkout to each worker, installs it, and starts the same command everywhere; JAX finds
# its peers on the pod by itself (cgpt_jax.parallel.distributed.initialize).
# The workdir must be a bucket every worker can write (the TPU VM's service account): docs/cluster_storage.md.
set -euo pipefail
cd "$(dirname "$0")/.."
tpu=$1; zone=$2; shift 2
archive=$(mktemp -d)/cgpt_jax.tar.gz
git archive --format=tar.gz -o "$archive" HEAD
gcloud compute tpus tpu-vm scp "$archive" "$tpu":~/cgpt_jax.tar.gz --zone="$zone" --worker=all
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  set -e; mkdir -p ~/cgpt_jax && tar -xzf ~/cgpt_jax.tar.gz -C ~/cgpt_jax && cd ~/cgpt_jax &&
  python3 -m venv .venv && .venv/bin/pip install -q 'jax[tpu]' -e '.[cloud]' &&
  .venv/bin/python -m cgpt_jax.train $(printf '%q ' "$@")"
