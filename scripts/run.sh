#!/usr/bin/env bash
# The main job: prepare .venv, then chat with the embedded tiny-chat model in the terminal.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/lorafleet infer "$@"
