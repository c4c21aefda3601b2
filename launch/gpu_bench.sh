#!/usr/bin/env bash
# Train-step MFU for Cerebras-GPT 111M, 590M and 1.3B at sequence 2048 in bf16 on one GPU, with the
# `fused` attention (cuDNN flash attention in half precision).
# Prepared for a lent GPU machine: fits in 10 minutes. Output: one JSON line per size in
# ${OUT:-runs/gpu_bench}/gpu_bench.jsonl (python -m cgpt_jax.bench.report turns it into a table).
#   bash launch/gpu_bench.sh            (installs jax[cuda12] into .venv-gpu if jax sees no GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu_bench}
mkdir -p "$out"
if [ ! -x .venv-gpu/bin/python ]; then
  python3 -m venv .venv-gpu
  .venv-gpu/bin/python -m pip install -q --upgrade pip
  .venv-gpu/bin/python -m pip install -q "jax[cuda12]" -e .
fi
PY=.venv-gpu/bin/python
$PY -c "import jax; assert jax.devices()[0].platform == 'gpu', jax.devices()"
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
