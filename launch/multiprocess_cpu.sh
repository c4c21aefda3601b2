#!/usr/bin/env bash
# N local processes × M fake CPU devices each, talking through jax.distributed on localhost: the
# multi-host code path on one machine.
#   bash launch/multiprocess_cpu.sh 2 4 --config=experiments/cerebras_gpt.py:size=tiny --workdir=runs/mp
set -euo pipefail
cd "$(dirname "$0")/.."
n_processes=$1; devices_per_process=$2; shift 2
port=${PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < n_processes; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$devices_per_process" JAX_PLATFORMS=cpu \
    .venv/bin/python -m cgpt_jax.train "$@" --coordinator_address="localhost:$port" \
    --num_processes="$n_processes" --process_id="$i" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
