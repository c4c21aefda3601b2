#!/usr/bin/env bash
# The scaling experiments, offline on CPU: set up, run the sweep, fit and report (docs/scaling.md).
#   bash launch/local.sh              the main job: the ladder (experiments/cpu_ladder.py), L(C) with the
#                                     published Cerebras-GPT curve beside it
#   bash launch/local.sh isoflop      the compute-optimal frontier (experiments/cpu_isoflop.py)
#   bash launch/local.sh mup_vs_sp    muP against SP, learning rates tuned (experiments/mup_vs_sp.py)
# WORKDIR overrides where it runs (default runs/cpu_ladder, runs/cpu_isoflop, runs/mup_vs_sp).
# Re-running skips finished runs and resumes an interrupted one from its checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
experiment=${1:-ladder}
case "$experiment" in
  ladder) config=experiments/cpu_ladder.py; workdir=${WORKDIR:-runs/cpu_ladder} ;;
  isoflop) config=experiments/cpu_isoflop.py; workdir=${WORKDIR:-runs/cpu_isoflop} ;;
  mup_vs_sp) config=experiments/mup_vs_sp.py; workdir=${WORKDIR:-runs/mup_vs_sp} ;;
  *) echo "error: unknown experiment '$experiment'; choose ladder, isoflop or mup_vs_sp" >&2; exit 2 ;;
esac
bash launch/setup.sh
.venv/bin/python -m cgpt_jax.sweep --config="$config" --workdir="$workdir"
case "$experiment" in
  ladder) .venv/bin/python -m cgpt_jax.analyze "$workdir" --reference=cerebras ;;
  isoflop) .venv/bin/python -m cgpt_jax.analyze "$workdir" --params=total ;;
  mup_vs_sp) .venv/bin/python -m cgpt_jax.scaling.mup_vs_sp "$workdir" ;;
esac
echo "report: $workdir/report.md   plot: $workdir/scaling.png   fit: $workdir/fit.json"
