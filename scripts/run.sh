#!/usr/bin/env bash
# The main job: prepare .venv, then serve tiny-chat + xiao-huang on http://127.0.0.1:8000/v1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# Serve settings lorafleet runs with (serve_app/platform.py SERVE_ENV); yours win.
export RAY_SERVE_THROUGHPUT_OPTIMIZED=${RAY_SERVE_THROUGHPUT_OPTIMIZED:-1}
export RAY_SERVE_ENABLE_HA_PROXY=${RAY_SERVE_ENABLE_HA_PROXY:-1}
exec .venv/bin/serve run serve_config.yaml "$@"
