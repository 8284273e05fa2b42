#!/usr/bin/env bash
# Set up from scratch and run every check CI runs: lint, types, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,server
. .venv/bin/activate
ruff check src tests benchmarks
ruff format --check src tests benchmarks
mypy src/glmrun
python -m pytest -q "$@"
