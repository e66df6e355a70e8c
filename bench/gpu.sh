#!/usr/bin/env bash
# The GPU runs of docs/benchmarks.md, on a machine prepared as ENVIRONMENT.md says
# (vLLM 0.25.1 + Ray 2.60 wheels installed into /tmp/site by /tmp/parts/install.sh).
#   bash bench/gpu.sh check OUT [tp_check.py flags]   # serve run per TP size: equality, adapters, affinity
#   bash bench/gpu.sh bench OUT TP [side_by_side.py flags]   # vLLM server vs lorafleet, dummy weights
#   BENCH_DIR=/tmp/lora bash bench/gpu.sh bench OUT 1 --loras 16 ...   # another comparison beside it
#   bash bench/gpu.sh features OUT    # structured outputs and tool calls through `lorafleet deploy` (tiny-chat)
#   bash bench/gpu.sh formats OUT     # GPTQ int4/int8 exports and a converted Qwen(1) checkpoint, served by vLLM
#   bash bench/gpu.sh profile OUT [--configs ...]   # a LoRA decode step's time by distinct adapters (issue 22)
#   bash bench/gpu.sh tune OUT [--ranks 8 16 ...]    # tune vLLM's LoRA kernels: the files of serve_app/assets/lora_kernels
#   bash bench/gpu.sh bgmv OUT [--batch 64]          # a one-program-per-token LoRA kernel against vLLM's (issue 22)
#   bash bench/gpu.sh warmup OUT      # what a fresh machine's first LoRA requests pay to compile kernels
set -euo pipefail
cd "$(dirname "$0")/.."
source /tmp/parts/install.sh
# NVLink multicast stays off (the device README): also for every process Ray and vLLM start.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
shape=/tmp/qwen2.5-7b-instruct
what=$1 out=$2; shift 2
mkdir -p "$out"
case $what in
check)  # tp_check.py flags follow, e.g. --tp 4 1
  python3 -m serve_app.engines.vllm_surface 2>&1 | tail -1 | tee "$out"/vllm_surface.txt
  [ -f $shape/model.safetensors.index.json ] ||
    python3 bench/model_shapes.py qwen2.5-7b-instruct $shape --weights 0 --adapters 2 --rank 16
  exec python3 bench/tp_check.py --model-dir $shape --out /tmp/tp_check --results "$out" "$@"
  ;;
features)
  python3 -m serve_app.engines.vllm_surface 2>&1 | tail -1 | tee "$out"/vllm_surface.txt
  exec python3 bench/feature_check.py --out "$out"/feature_check.json --log "$out"/feature-check-server.log
  ;;
formats)
  python3 -m serve_app.engines.vllm_surface 2>&1 | tail -1 | tee "$out"/vllm_surface.txt
  exec python3 bench/format_check.py --out "$out"/format_check.json
  ;;
profile)
  [ -f $shape/config.json ] || python3 bench/model_shapes.py qwen2.5-7b-instruct $shape
  exec python3 bench/lora_step_profile.py $shape --out "$out"/lora_step_profile.json "$@"
  ;;
tune)
  [ -f $shape/config.json ] || python3 bench/model_shapes.py qwen2.5-7b-instruct $shape
  exec python3 bench/lora_kernel_tune.py $shape --out "$out" "$@"
  ;;
bgmv)  # vLLM's side with the kernel configs lorafleet ships, as its engine replicas run them
  [ -f $shape/config.json ] || python3 bench/model_shapes.py qwen2.5-7b-instruct $shape
  VLLM_TUNED_CONFIG_FOLDER=$PWD/serve_app/assets/lora_kernels \
    exec python3 bench/bgmv_probe.py $shape --out "$out"/bgmv_probe.json "$@"
  ;;
warmup)
  [ -f $shape/config.json ] || python3 bench/model_shapes.py qwen2.5-7b-instruct $shape
  exec python3 bench/lora_warmup_probe.py $shape --out "$out"/lora_warmup_probe.json "$@"
  ;;
bench)
  [ -f $shape/config.json ] || python3 bench/model_shapes.py qwen2.5-7b-instruct $shape
  tp=$1; shift
  runs=${BENCH_DIR:-/tmp/bench-tp$tp}  # one comparison per folder, kept across calls (--keep)
  keep_results() {  # also when `timeout` ends the call: side_by_side.py reports after every workload
    cp "$runs"/{table.md,summary.json,side_by_side.png} "$out"/ 2>/dev/null || true
    for log in lorafleet-server lorafleet-deploy-server; do
      [ -f "$runs/$log.log" ] && tail -c 200000 "$runs/$log.log" > "$out/$log.log"
    done
    return 0
  }
  trap 'keep_results; exit 124' TERM
  python3 bench/side_by_side.py --model-dir $shape --tp "$tp" --load-format dummy --max-model-len 4096 \
    --input-len 512 --output-len 256 --out "$runs" --keep "$@" &
  wait $! || status=$?  # (a wait, so that the TERM trap runs at once)
  keep_results
  exit ${status:-0}
  ;;
esac
