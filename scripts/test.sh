#!/usr/bin/env bash
# Set up from scratch and run every check CI runs: lint, types, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,server
# The web page test drives Debian's Chromium (Playwright's own browser download cannot work offline).
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
. .venv/bin/activate
ruff check src tests benchmarks
ruff format --check src tests benchmarks
mypy src/glmrun
python -m pytest -q "$@"
