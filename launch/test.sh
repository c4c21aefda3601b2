#!/usr/bin/env bash
# Set up and run the whole test suite on CPU (8 fake devices are configured in tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh test
exec .venv/bin/python -m pytest -q -n 2 --dist=loadfile tests "$@"
