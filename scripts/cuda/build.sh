#!/usr/bin/env bash
# CI check (b): `cargo build --features cuda` of the trainer against Debian's CUDA 11.8,
# unpacked into the cache (fetch-toolkit.sh), with our own target dir. Extra cargo
# arguments are passed through (e.g. --release). Prints the binary path on success.
set -euo pipefail
source "$(dirname "$0")/common.sh"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
bash "$ROOT/scripts/cuda/fetch-toolkit.sh"
C="$CUDA_TK"
export PATH="$C/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
export NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:--allow-unsupported-compiler}"
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$C/usr/lib/x86_64-linux-gnu/stubs -L native=$C/usr/lib/x86_64-linux-gnu"
export CARGO_TARGET_DIR="$CUDA_TARGET_DIR"
cd "$ROOT"
log "cargo build -p lora-train --features cuda (target $CARGO_TARGET_DIR, sm_$CUDA_COMPUTE_CAP)"
cargo build -p lora-train --features cuda "$@"
