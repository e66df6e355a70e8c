#!/usr/bin/env bash
# The test command: prepare .venv, then run the whole suite (real vLLM on the CPU, real Ray Serve).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest "$@"
