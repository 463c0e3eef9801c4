# Shared paths for the CUDA scripts (sourced, not run).
# Everything heavy lives OUTSIDE the clone, reused between CI runs.
CUDA_CACHE="${LORA_TRAIN_CACHE:-$HOME/.cache/lora-train}/cuda"
# Debian's CUDA 11.8 toolkit, unpacked by fetch-toolkit.sh (the recipe is written there).
CUDA_TK="$CUDA_CACHE/toolkit-11.8"
# pip wheels (CUDA 12 NVRTC, runtime headers, ptxas), unpacked.
CUDA_PY="$CUDA_CACHE/py-cu12"
# Our own cargo target dir for --features cuda builds (never shared with CPU builds).
CUDA_TARGET_DIR="${LORA_TRAIN_CUDA_TARGET:-${LORA_TRAIN_CACHE:-$HOME/.cache/lora-train}/target-cuda}"
mkdir -p "$CUDA_CACHE"
log() { echo "[cuda $(date +%H:%M:%S)] $*" >&2; }
