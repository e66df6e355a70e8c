#!/usr/bin/env bash
# The test command: prepare .venv, then run the whole suite (real vLLM on the CPU, real Ray Serve).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# The browser tests drive Debian's Chromium (Playwright's own browser download is not used).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq chromium >/dev/null
fi
# The registry's tests start a real PostgreSQL server (tests/postgres_server.py) from Debian's package.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq postgresql >/dev/null
fi
# OpenMP threads that wait sleep instead of spinning: the two test processes, their engines and Ray's
# processes share the cores, and a spinning thread holds a core another engine needs (two tiny-chat
# engines generating at once: 1.8 s each spinning, 0.75 s sleeping; one alone: 0.7 and 0.8 s).
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
# Two processes: the tests that need Ray in one, the rest beside them (tests/conftest.py).
exec .venv/bin/python -m pytest -n 2 "$@"
