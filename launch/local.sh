#!/usr/bin/env bash
# The main job, offline on CPU: set up, train the CPU scaling ladder (experiments/cpu_ladder.py),
# fit the scaling law and compare it with the published Cerebras-GPT curve.
# Re-running skips finished rungs and resumes an interrupted one from its checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
workdir=${WORKDIR:-runs/cpu_ladder}
bash launch/setup.sh
.venv/bin/python -m cgpt_jax.sweep --config=experiments/cpu_ladder.py --workdir="$workdir"
.venv/bin/python -m cgpt_jax.analyze "$workdir" --reference=cerebras
echo "report: $workdir/report.md   plot: $workdir/scaling.png   fit: $workdir/fit.json"
