#!/usr/bin/env bash
# Train-step MFU for Cerebras-GPT 111M, 590M and 1.3B at sequence 2048 in bf16 on one GPU, with the
# `fused` attention (cuDNN flash attention in half precision).
# Prepared for a lent GPU machine: fits in 10 minutes. Output: one JSON line per size in
# ${OUT:-runs/gpu_bench}/gpu_bench.jsonl (python -m cgpt_jax.bench.report turns it into a table).
#   bash launch/gpu_bench.sh
# Python: $PY if set; else the machine's python3 when its JAX already sees a GPU (a prepared image,
# possibly offline: cgpt_jax runs from this checkout, and a missing ml-collections is installed from
# .whl/ -- fill it beforehand with `python3 -m pip download --no-deps -d .whl ml-collections` and carry
# it); else a .venv-gpu with jax[cuda12] from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu_bench}
mkdir -p "$out"
gpu_jax() { "$1" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; }
if [ -z "${PY:-}" ] && gpu_jax python3; then
  PY=python3
  if ! $PY -c "import ml_collections" 2>/dev/null; then
    if compgen -G ".whl/ml_collections-*.whl" >/dev/null; then
      $PY -m pip install -q --no-index --no-deps --target /tmp/cgpt_site .whl/ml_collections-*.whl
    else
      $PY -m pip install -q --target /tmp/cgpt_site ml-collections
    fi
    export PYTHONPATH="/tmp/cgpt_site${PYTHONPATH:+:$PYTHONPATH}"
  fi
elif [ -z "${PY:-}" ]; then
  if [ ! -x .venv-gpu/bin/python ]; then
    python3 -m venv .venv-gpu
    .venv-gpu/bin/python -m pip install -q --upgrade pip
    .venv-gpu/bin/python -m pip install -q "jax[cuda12]" -e .
  fi
  PY=.venv-gpu/bin/python
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # cgpt_jax from this checkout, installed or not
$PY -c "import jax; assert jax.default_backend() == 'gpu', jax.devices()"
$PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
# size  global_batch  micro_batches  remat  attention
while read -r size batch micro remat attention; do
  timeout 180 $PY -m cgpt_jax.bench --config="experiments/cerebras_gpt.py:size=$size" \
    --config.model.compute_dtype=bfloat16 --config.model.remat="$remat" \
    --config.model.attention="$attention" \
    --config.train.global_batch_size="$batch" --config.train.micro_batches="$micro" --rounds=3 --steps=5 \
    --label="$size" --out="$out/gpu_bench.jsonl" \
    2>>"$out/gpu_bench.stderr" || echo "{\"label\": \"$size\", \"failed\": true}" | tee -a "$out/gpu_bench.failed.jsonl"
done <<'SIZES'
111m 32 1 none fused
590m 16 1 dots_no_batch fused
1.3b 16 2 dots_no_batch fused
SIZES
