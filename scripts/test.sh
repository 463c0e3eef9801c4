#!/usr/bin/env bash
# The project's test command (README, CI). Fetches the SmolLM2 GGUF used by the
# real-model tests first (cached outside the clone), runs every test of the workspace,
# and ends with one summary line over all test binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
export LORA_TRAIN_SMOLLM2_GGUF="${LORA_TRAIN_SMOLLM2_GGUF:-$(bash scripts/fetch_smollm2.sh)}"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --all-targets --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
# The kernels' tests again on the code paths of other CPUs (our loops compiled for AVX2 and
# for baseline x86-64, no bf16 dot product): same assertions, other machine code.
for isa in avx2 baseline; do
  echo "== lora-kernels tests with LORA_KERNELS_ISA=$isa LORA_KERNELS_NO_BF16_DOT=1"
  LORA_KERNELS_ISA=$isa LORA_KERNELS_NO_BF16_DOT=1 cargo test -p lora-kernels --test all "$@" 2>&1 | tee -a "$log" || status=$?
done
# cargo prints one "test result:" line per test binary; sum them.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
