#!/usr/bin/env bash
# CI check (a): every lora-kernels CUDA source compiles with NVRTC for sm_80 and sm_90
# and assembles with ptxas; prints registers / spills per kernel. No GPU needed.
# Runs twice: with CUDA 12.6 (pip wheels) and with CUDA 11.8 NVRTC (Debian, what
# `--features cuda` links against) when that toolkit is unpacked.
set -euo pipefail
source "$(dirname "$0")/common.sh"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
bash "$ROOT/scripts/cuda/fetch-wheels.sh"
export CARGO_TARGET_DIR="$CUDA_CACHE/target-cuda-check"
( cd "$ROOT/tools/cuda-check" && cargo build --quiet --locked 2>&1 )
BIN="$CARGO_TARGET_DIR/debug/lora-cuda-check"
OUT="$CUDA_CACHE/check-out"; rm -rf "$OUT"; mkdir -p "$OUT"
P="$CUDA_PY/nvidia"
log "NVRTC 12 (pip) + ptxas 12"
LD_LIBRARY_PATH="$P/cuda_nvrtc/lib" "$BIN" --ptxas "$P/cuda_nvcc/bin/ptxas" --out "$OUT/cu12" \
  --json "$OUT/cu12.json" --max-spill-bytes "${CUDA_MAX_SPILL_BYTES:-0}"
if [[ -f "$CUDA_TK/.complete" ]]; then
  log "NVRTC 11.8 (Debian) + ptxas 11.8"
  L="$OUT/nvrtc11"; mkdir -p "$L"
  ln -sf "$CUDA_TK/usr/lib/x86_64-linux-gnu/libnvrtc.so.11.2" "$L/libnvrtc.so"
  LD_LIBRARY_PATH="$L:$CUDA_TK/usr/lib/x86_64-linux-gnu" "$BIN" --ptxas "$CUDA_TK/usr/bin/ptxas" \
    --out "$OUT/cu118" --json "$OUT/cu118.json" --max-spill-bytes "${CUDA_MAX_SPILL_BYTES:-0}" | tail -n 3
fi
