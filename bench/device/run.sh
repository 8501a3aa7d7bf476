#!/usr/bin/env bash
# The whole GPU check and benchmark in one go, on the GPU machine (nothing is built there).
# usage: bench/device/run.sh [BIN] [MODELS_DIR] [GOLDEN_DIR]
#   BIN         the retrowave binary built on the development machine (default .carry/retrowave)
#   MODELS_DIR  folder with smollm2-135m.gguf / qwen2.5-coder-0.5b.gguf / qwen2.5-coder-1.5b.gguf
#               (optional: parity and real-model runs are skipped without it)
#   GOLDEN_DIR  folder with the golden JSON files of ../shared/golden (optional, for parity)
# Logs and JSON lines go to $OUT (default /tmp/retrowave-device); a short table is printed last.
# The machine has no network: models travel in pieces of < 64 MiB (see README, "CUDA backend").
set -uo pipefail
BIN=${1:-.carry/retrowave}; MODELS=${2:-}; GOLDEN=${3:-}
OUT=${OUT:-/tmp/retrowave-device}; mkdir -p "$OUT"
export RETROWAVE_KERNEL_CACHE=${RETROWAVE_KERNEL_CACHE:-/tmp/retrowave-kernels} NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
# Kernel checks, ceilings, attention kernels, random-weight Llama-3-8B decode vs roofline.
"$BIN" bench gpu --out "$OUT/gpu.jsonl" ${GPU_ARGS:-} 2>&1 | tee "$OUT/gpu.log"
# The baseline, same card, same run.
PYTHONUNBUFFERED=1 python3 bench/device/sdpa_baseline.py --out "$OUT/sdpa.jsonl" 2>&1 | tail -3 | tee "$OUT/sdpa.log"
if [ -n "$MODELS" ]; then
  for m in smollm2-135m qwen2.5-coder-0.5b qwen2.5-coder-1.5b; do
    [ -f "$MODELS/$m.gguf" ] && [ -n "$GOLDEN" ] || continue
    "$BIN" bench parity -m "$MODELS/$m.gguf" --golden "$GOLDEN/$m.json" --out "$OUT/parity.jsonl" 2>&1 | tee -a "$OUT/parity.log"
  done
  # Real models with and without CUDA graphs.
  for g in 1 0; do
    [ -f "$MODELS/qwen2.5-coder-1.5b.gguf" ] && RETROWAVE_CUDA_GRAPHS=$g "$BIN" bench gpu-model \
      -m "$MODELS/qwen2.5-coder-1.5b.gguf" --context 32768 --decode-tokens 128 --out "$OUT/gpu.jsonl" 2>&1 | tee -a "$OUT/model.log"
    [ -f "$MODELS/smollm2-135m.gguf" ] && RETROWAVE_CUDA_GRAPHS=$g "$BIN" bench gpu-model \
      -m "$MODELS/smollm2-135m.gguf" --context 4096 --prefill-chunk 4096 --decode-tokens 256 --out "$OUT/gpu.jsonl" 2>&1 | tee -a "$OUT/model.log"
  done
fi
"$BIN" bench gpu-model --random-weights configs/models/llama-3-8b.toml --context 32768 --decode-tokens 64 --out "$OUT/gpu.jsonl" 2>&1 | tee -a "$OUT/model.log"
python3 bench/device/summary.py "$OUT/gpu.jsonl" "$OUT/sdpa.jsonl" "$OUT/parity.jsonl" --json "$OUT/summary.json"
