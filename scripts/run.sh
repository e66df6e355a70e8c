#!/usr/bin/env bash
# The main job: prepare .venv, then serve tiny-chat + xiao-huang on http://127.0.0.1:8000/v1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# Serve settings lorafleet runs with (serve_app/platform.py serve_env); yours win.
export RAY_SERVE_THROUGHPUT_OPTIMIZED=${RAY_SERVE_THROUGHPUT_OPTIMIZED:-1}
export RAY_SERVE_ENABLE_HA_PROXY=${RAY_SERVE_ENABLE_HA_PROXY:-1}
export RAY_SERVE_HAPROXY_BINARY_PATH=${RAY_SERVE_HAPROXY_BINARY_PATH:-$PWD/.venv/bin/lorafleet-haproxy}
# An HAProxy left by an earlier run that was killed (SIGKILL, then `ray stop --force`) holds the ports.
.venv/bin/python -m serve_app.haproxy_guard
cat <<EOF
[lorafleet] starting; the API will answer on http://127.0.0.1:8000/v1 (web chat: /ui). Ctrl-C stops it.
[lorafleet] Ray's dashboard asks for its token: in another shell use
              RAY_AUTH_MODE=token $PWD/.venv/bin/serve status
              RAY_AUTH_MODE=token $PWD/.venv/bin/serve shutdown -y
EOF
exec .venv/bin/serve run serve_config.yaml "$@"
