#!/usr/bin/env bash
# Download the CUDA 12 pip wheels used by the GPU-less compile check and unpack them
# into $CUDA_PY: NVRTC (libnvrtc.so.12 + builtins), ptxas (from the nvcc wheel) and the
# runtime headers. Idempotent: a finished unpack is marked by $CUDA_PY/.complete.
set -euo pipefail
source "$(dirname "$0")/common.sh"
# A CUDA 12 minor line (each wheel has its own patch numbers inside it).
CU12_VERSION="${CU12_VERSION:-12.6}"
if [[ -f "$CUDA_PY/.complete" ]] && [[ "$(cat "$CUDA_PY/.complete")" == "$CU12_VERSION" ]]; then
  log "cu12 wheels cached at $CUDA_PY"; exit 0
fi
W="$CUDA_CACHE/wheels"; mkdir -p "$W"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
  --python-version 3.11 -d "$W" \
  "nvidia-cuda-nvrtc-cu12==$CU12_VERSION.*" "nvidia-cuda-runtime-cu12==$CU12_VERSION.*" \
  "nvidia-cuda-nvcc-cu12==$CU12_VERSION.*"
rm -rf "$CUDA_PY.tmp"; mkdir -p "$CUDA_PY.tmp"
for w in "$W"/nvidia_cuda_{nvrtc,runtime,nvcc}_cu12-"$CU12_VERSION".*.whl; do
  "$PY" -m zipfile -e "$w" "$CUDA_PY.tmp"
done
chmod +x "$CUDA_PY.tmp"/nvidia/cuda_nvcc/bin/* 2>/dev/null || true
# cudarc looks for libnvrtc.so (unversioned) too; give it one.
( cd "$CUDA_PY.tmp/nvidia/cuda_nvrtc/lib" && ln -sf libnvrtc.so.12 libnvrtc.so )
rm -rf "$CUDA_PY"; mv "$CUDA_PY.tmp" "$CUDA_PY"
echo "$CU12_VERSION" > "$CUDA_PY/.complete"
log "cu12 wheels unpacked: $(du -sh "$CUDA_PY" | cut -f1) at $CUDA_PY"
