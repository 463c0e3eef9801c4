#!/usr/bin/env bash
# The project's test command (README, CI). Fetches the SmolLM2 GGUF used by the
# real-model tests first (cached outside the clone).
set -euo pipefail
cd "$(dirname "$0")/.."
export LORA_TRAIN_SMOLLM2_GGUF="${LORA_TRAIN_SMOLLM2_GGUF:-$(bash scripts/fetch_smollm2.sh)}"
cargo test --workspace --no-fail-fast "$@"
