#!/usr/bin/env bash
# Run the CUDA kernels on the CPU emulator (tools/cuda-emu) against naive references:
# flash attention forward (CUDA-core and tensor-core) + backward (GQA, segments, KV-cache
# views, f32 and bf16), the prefix forward over shared prompt + own planes (rollouts), the
# fused LoRA linear f32 (rank chunks), TF32 and bf16 (emulated mma), SGMV, cross-entropy
# rows. No GPU, no CUDA toolkit:
# g++ >= 12 (C++20). Small shapes only (one std::thread per CUDA thread). ~1-3 min.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
OUT="${TMPDIR:-/tmp}/lora-cuda-emu"
g++ -std=c++20 -O1 -pthread -Wno-unused-variable -o "$OUT" "$ROOT/tools/cuda-emu/emulate.cpp"
"$OUT"
