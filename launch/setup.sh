#!/usr/bin/env bash
# Create .venv (once) and install cgpt_jax into it: `bash launch/setup.sh` (main job) or
# `bash launch/setup.sh test` (adds the test tools and every optional extra: the PyTorch/transformers/PEFT
# reference, lm-eval, qwix, the server and the gs:// / s3:// filesystems) or
# `bash launch/setup.sh cloud` (adds the gs:// / s3:// filesystems, for a run directory in a bucket) or
# `bash launch/setup.sh torch` (adds PyTorch only, for `python -m cgpt_jax.bench --compare=torch`).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
extras=""
if [ "${1:-}" = "test" ]; then extras="[test,torch,eval,quant,serve,cloud]"; fi
if [ "${1:-}" = "torch" ]; then extras="[torch]"; fi
if [ "${1:-}" = "cloud" ]; then extras="[cloud]"; fi
.venv/bin/python -m pip install -q -e ".${extras}"
