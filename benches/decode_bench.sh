#!/usr/bin/env bash
# Decode throughput at R rows: `Model::rollouts` of one prompt x R completions (SmolLM2-135M,
# temperature 1, stop tokens off so every row makes --max-new-tokens), with the many-row
# decode path (default: up to 256 rows on AVX-512 hosts) and with it capped at 8 rows
# (LORA_KERNELS_DECODE_ROWS=8: the general GEMMs past 8 rows, as before it), side by side
# per R; then the projection shapes alone (gemm_bench --decode 1).
#
#     bash benches/decode_bench.sh [ROWS...]       (default 1 8 32 64 128)
#
# Needs the prompt ids of benches/data/grpo_arith.jsonl's first prompt in $IDS (JSON list of
# lists; generate_bench.py --dump-ids writes them, and grpo_bench.sh leaves them in
# $OUT/grpo_prompt_ids.json: the first list is that prompt); prints one JSON line per run.
# BASE_QUANT (default none: dense weights, so the projections are what is measured; auto:
# the GGUF's blocks kept and dequantized per call, `lora-train`'s default for a .gguf).
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=("$@")
[ ${#ROWS[@]} -gt 0 ] || ROWS=(1 8 32 64 128)
MODEL=${MODEL:-$(bash scripts/fetch_smollm2.sh)}
IDS=${IDS:?set IDS to a prompt-ids JSON file}
NEW=${NEW:-32}
REPEATS=${REPEATS:-2}
BASE_QUANT=${BASE_QUANT:-none}
cargo build --release -q -p lora-benches --bin rollout_bench --bin gemm_bench
BIN=${CARGO_TARGET_DIR:-target}/release
for dtype in f32 bf16; do
  for r in "${ROWS[@]}"; do
    for cap in 256 8; do
      echo "== $dtype rows $r decode-rows cap $cap, load $(cut -d' ' -f1 /proc/loadavg)" >&2
      LORA_KERNELS_DECODE_ROWS=$cap "$BIN/rollout_bench" --model "$MODEL" --prompt-ids "$IDS" --group "$r" \
        --max-new-tokens "$NEW" --repeats "$REPEATS" --dtype "$dtype" --base-quant "$BASE_QUANT" | sed "s/^{/{\"decode_rows_cap\": $cap, /"
    done
  done
done
"$BIN/gemm_bench" --decode 1 --reps 3
