#!/usr/bin/env bash
# One command: our LoRA training step vs PyTorch+PEFT on the same model, data shape
# and LoRA config, f32 and bf16, run one after the other (never concurrently), then a
# summary with tokens/s, peak RSS, ratios and MFU against the GEMM ceilings that our
# binary measures in-process, and what machine it ran on (CPU model, AVX2 / AVX-512 /
# AVX512-BF16 / AMX, load average before and after).
#
#   bash benches/run.sh [--model PATH] [--dtypes "f32 bf16"] [--steps 5] [--batch 4] [--seq 256]
#                       [--rank 16] [--ops] [--long] [--long-seqs "1024 2048 4096"] [--isa avx2]
#
# --long adds batch-1 runs at each of --long-seqs tokens (f32 and the --dtypes) after the
# main case. Env: PYTHON (default /root/.venvs/golden/bin/python), OUT (default
# target/bench-results), EXTRA_BIN (optional second train_step binary, run too).
#
# --isa avx2 measures the AVX2 code paths on an AVX-512 host (a proxy for an AVX2-only
# CPU of the same core; Zen 4 runs 512-bit FMAs as two 256-bit halves, so its AVX2 peak
# equals its AVX-512 peak, like Zen 3's): ours is built from a copy of the workspace
# with the `gemm` crate's AVX-512 kernels compiled out (its `x86-v4` feature; its own
# target dir under ~/.cache/lora-train/avx2-proxy) and runs with
# LORA_KERNELS_NO_BF16_DOT=1 LORA_KERNELS_ISA=avx2; PyTorch runs with ATEN_CPU_CAPABILITY=avx2,
# MKL_ENABLE_INSTRUCTIONS=AVX2 and ONEDNN_MAX_CPU_ISA=AVX2.
# Writes every run's JSON and summary.json (machine + all ratios) to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=/root/.cache/lora-train/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
DTYPES="f32 bf16"; STEPS=5; BATCH=4; SEQ=256; RANK=16; OPS=0; LONG=0; LONG_SEQS="1024 2048 4096"; ISA=native
while [ $# -gt 0 ]; do
  case "$1" in
    --model) MODEL=$2; shift 2;; --dtypes) DTYPES=$2; shift 2;; --steps) STEPS=$2; shift 2;;
    --batch) BATCH=$2; shift 2;; --seq) SEQ=$2; shift 2;; --rank) RANK=$2; shift 2;; --ops) OPS=1; shift;;
    --long) LONG=1; shift;; --long-seqs) LONG_SEQS=$2; LONG=1; shift 2;; --isa) ISA=$2; shift 2;;
    *) echo "unknown argument $1" >&2; exit 2;;
  esac
done
PYTHON=${PYTHON:-/root/.venvs/golden/bin/python}
OUT=${OUT:-target/bench-results}
mkdir -p "$OUT"
rm -f "$OUT"/torch_*.json "$OUT"/ours_*.json "$OUT"/extra_*.json "$OUT"/isa.txt
case "$ISA" in
  native)
    cargo build --release -q -p lora-benches --bins
    BIN=${CARGO_TARGET_DIR:-target}/release;;
  avx2)
    PROXY=${AVX2_PROXY_DIR:-$HOME/.cache/lora-train/avx2-proxy}
    rm -rf "$PROXY/src" && mkdir -p "$PROXY/src"
    git ls-files -z -co --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$PROXY/src"
    sed -i 's/^gemm = { version = "\([^"]*\)", features = \["x86-v4"\] }/gemm = { version = "\1" }/' "$PROXY/src/Cargo.toml"
    if grep -q 'x86-v4' "$PROXY/src/Cargo.toml"; then echo "run.sh: could not turn off gemm's x86-v4 feature in the copy" >&2; exit 1; fi
    echo "== building the AVX2 proxy binary in $PROXY (first time: a full release build of candle)" >&2
    (cd "$PROXY/src" && CARGO_TARGET_DIR="$PROXY/target" cargo build --release -q -p lora-benches --bins)
    BIN=$PROXY/target/release
    export LORA_KERNELS_NO_BF16_DOT=1 LORA_KERNELS_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
    echo avx2 > "$OUT/isa.txt";;
  *) echo "--isa takes avx2 (or leave it out for the host's own code paths)" >&2; exit 2;;
esac
uptime | tee "$OUT/uptime_start.txt" >&2
CASES="${BATCH}x${SEQ}"
if [ "$LONG" = 1 ]; then for s in $LONG_SEQS; do CASES="$CASES 1x$s"; done; fi
for case in $CASES; do
  b=${case%x*}; s=${case#*x}
  COMMON=(--model "$MODEL" --batch "$b" --seq "$s" --rank "$RANK" --steps "$STEPS" --warmup 1)
  for dt in $DTYPES; do
    tag="${dt}_$case"
    if [ "$ISA" = avx2 ] && [ "$dt" = bf16 ] && [ -z "${TORCH_BF16_ON_AVX2:-}" ]; then
      # PyTorch's CPU bf16 without AVX512-BF16 runs ~5 tokens/s: minutes per
      # step. On AVX2 our bf16 is held against our own f32; TORCH_BF16_ON_AVX2=1 runs it.
      echo "== $tag: PyTorch+PEFT skipped (bf16 on the AVX2 paths; TORCH_BF16_ON_AVX2=1 runs it)" >&2
    else
      echo "== $tag: PyTorch+PEFT ($(cut -d' ' -f1-3 /proc/loadavg))" >&2
      "$PYTHON" benches/torch/peft_train_bench.py "${COMMON[@]}" --dtype "$dt" | tail -n 1 > "$OUT/torch_$tag.json"
    fi
    echo "== $tag: lora-train ($(cut -d' ' -f1-3 /proc/loadavg))" >&2
    "$BIN/train_step" "${COMMON[@]}" --dtype "$dt" --profile > "$OUT/ours_$tag.json"
    if [ -n "${EXTRA_BIN:-}" ]; then
      echo "== $tag: $EXTRA_BIN" >&2
      "$EXTRA_BIN" "${COMMON[@]}" --dtype "$dt" --profile > "$OUT/extra_$tag.json"
    fi
  done
done
uptime | tee "$OUT/uptime_end.txt" >&2
if [ "$OPS" = 1 ]; then
  for dt in $DTYPES; do "$BIN/ops_bench" --dtype "$dt" > "$OUT/ops_$dt.json"; done
fi
"$PYTHON" benches/summary.py "$OUT" $CASES -- $DTYPES
