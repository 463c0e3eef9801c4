#!/usr/bin/env bash
# The GPU-less CUDA checks of CI, timed step by step:
#   1. fetch the CUDA 12 pip wheels (NVRTC, ptxas, runtime headers)      [cached]
#   2. NVRTC -> PTX -> ptxas for sm_80 and sm_90 of every kernel source, with
#      registers / spills per kernel (CUDA 12.6 and, when unpacked, 11.8); then the
#      kernels run on the CPU emulator (emulate.sh: attention fwd+bwd, LoRA linear f32
#      and bf16) against naive references
#   3. fetch + unpack Debian's CUDA 11.8 toolkit (apt-get download, dpkg -x) [cached]
#   4. cargo build -p lora-train --features cuda against it (own target dir)
#   5. the built binary starts with only the stub libcuda and fails cleanly:
#      `devices` exits 0 with a "no GPU" line, `selftest` exits non-zero, no panic.
# Everything heavy lives under ${LORA_TRAIN_CACHE:-$HOME/.cache/lora-train}/cuda.
# LORA_TRAIN_SKIP_CUDA_BUILD=1 skips steps 3-5 (the kernel check alone takes < 1 min).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
source "$ROOT/scripts/cuda/common.sh"
declare -a TIMES=()
step() {
  local name="$1"; shift
  local t0=$SECONDS
  log "== $name"
  "$@"
  TIMES+=("$(printf '%-40s %4ds' "$name" $((SECONDS - t0)))")
}
smoke() {
  local bin="$CUDA_TARGET_DIR/debug/lora-train"
  local stubs="$CUDA_TK/usr/lib/x86_64-linux-gnu/stubs:$CUDA_TK/usr/lib/x86_64-linux-gnu"
  # The stub libcuda has SONAME libcuda.so.1 but is installed as libcuda.so only.
  local L="$CUDA_CACHE/stub-libs"; mkdir -p "$L"
  ln -sf "$CUDA_TK/usr/lib/x86_64-linux-gnu/stubs/libcuda.so" "$L/libcuda.so.1"
  local out rc
  out=$(LD_LIBRARY_PATH="$L:$stubs" "$bin" devices 2>&1); rc=$?
  echo "$out"
  [[ $rc -eq 0 ]] || { echo "devices exited $rc" >&2; return 1; }
  grep -qi "no gpu\|no cuda gpu" <<<"$out" || { echo "devices did not say there is no GPU" >&2; return 1; }
  LD_LIBRARY_PATH="$L:$stubs" "$bin" devices --json | python3 -c 'import json,sys; d=json.load(sys.stdin); assert d["cuda_feature"] and d["gpus"]==[] and d["no_gpu_reason"], d; print("devices --json ok")'
  set +e
  out=$(LD_LIBRARY_PATH="$L:$stubs" "$bin" selftest --device cuda:0 2>&1); rc=$?
  set -e
  echo "$out"
  [[ $rc -ne 0 ]] || { echo "selftest without a GPU must exit non-zero" >&2; return 1; }
  ! grep -q "panicked" <<<"$out" || { echo "selftest panicked" >&2; return 1; }
  grep -q "needs a GPU" <<<"$out" || { echo "selftest did not explain" >&2; return 1; }
}
step "fetch cu12 wheels" bash "$ROOT/scripts/cuda/fetch-wheels.sh"
if [[ "${LORA_TRAIN_SKIP_CUDA_BUILD:-0}" != 1 ]]; then
  step "fetch + unpack Debian CUDA 11.8" bash "$ROOT/scripts/cuda/fetch-toolkit.sh"
fi
step "NVRTC+ptxas check sm_80/sm_90" bash "$ROOT/scripts/cuda/check-kernels.sh"
step "kernels on the CPU emulator" bash "$ROOT/scripts/cuda/emulate.sh"
if [[ "${LORA_TRAIN_SKIP_CUDA_BUILD:-0}" != 1 ]]; then
  step "cargo build --features cuda" bash "$ROOT/scripts/cuda/build.sh" --quiet
  step "cuda binary without GPU: clean errors" smoke
fi
log "step times:"
printf '  %s\n' "${TIMES[@]}" >&2
