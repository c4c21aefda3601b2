#!/usr/bin/env bash
# The CPU performance table of docs/performance.md: every size of experiments/cpu_bench.py, cgpt_jax and
# PyTorch eager taking turns in one process per size. Results: ${OUT:-runs/cpu_bench}/bench.jsonl and
# the markdown table ${OUT:-runs/cpu_bench}/table.md. About 10 minutes on 2 cores; run it on a quiet machine.
#   bash launch/cpu_bench.sh [size ...]        (ROUNDS=9 for more rounds per size than the default 5)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/cpu_bench}
mkdir -p "$out"
bash launch/setup.sh torch
sizes=("$@")
if [ ${#sizes[@]} -eq 0 ]; then
  mapfile -t sizes < <(.venv/bin/python -c "from experiments.cpu_bench import SIZES; print('\n'.join(SIZES))")
fi
for size in "${sizes[@]}"; do
  .venv/bin/python -m cgpt_jax.bench --config="experiments/cpu_bench.py:size=$size" --compare=torch \
    --rounds="${ROUNDS:-5}" --label="$size" --out="$out/bench.jsonl" 2>>"$out/bench.stderr" >/dev/null
  tail -n 1 "$out/bench.jsonl" | .venv/bin/python -c "import json, sys; r = json.load(sys.stdin); \
print(r['label'], {k: v['tokens_per_sec'] for k, v in r['frameworks'].items()}, 'ratio', r['ratio_tokens_per_sec'])"
done
.venv/bin/python -m cgpt_jax.bench.report "$out/bench.jsonl" | tee "$out/table.md"
