#!/usr/bin/env bash
# One command: our LoRA training step vs PyTorch+PEFT on the same model, data shape
# and LoRA config, f32 and bf16, run one after the other (never concurrently), then a
# summary with tokens/s, peak RSS, ratios and MFU against the sgemm ceiling that our
# binary measures in-process.
#
#   bash benches/run.sh [--model PATH] [--dtypes "f32 bf16"] [--steps 5] [--batch 4] [--seq 256] [--rank 16] [--ops]
#
# Env: PYTHON (default /root/.venvs/golden/bin/python), OUT (default target/bench-results),
#      EXTRA_BIN (optional second train_step binary, e.g. built from a patched model, run too).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=/root/.cache/lora-train/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
DTYPES="f32 bf16"; STEPS=5; BATCH=4; SEQ=256; RANK=16; OPS=0
while [ $# -gt 0 ]; do
  case "$1" in
    --model) MODEL=$2; shift 2;; --dtypes) DTYPES=$2; shift 2;; --steps) STEPS=$2; shift 2;;
    --batch) BATCH=$2; shift 2;; --seq) SEQ=$2; shift 2;; --rank) RANK=$2; shift 2;; --ops) OPS=1; shift;;
    *) echo "unknown argument $1" >&2; exit 2;;
  esac
done
PYTHON=${PYTHON:-/root/.venvs/golden/bin/python}
OUT=${OUT:-target/bench-results}
mkdir -p "$OUT"
cargo build --release -q -p lora-benches --bins
BIN=target/release
COMMON=(--model "$MODEL" --batch "$BATCH" --seq "$SEQ" --rank "$RANK" --steps "$STEPS" --warmup 1)
for dt in $DTYPES; do
  echo "== $dt: PyTorch+PEFT" >&2
  "$PYTHON" benches/torch/peft_train_bench.py "${COMMON[@]}" --dtype "$dt" | tail -n 1 > "$OUT/torch_$dt.json"
  echo "== $dt: lora-train" >&2
  "$BIN/train_step" "${COMMON[@]}" --dtype "$dt" --profile > "$OUT/ours_$dt.json"
  if [ -n "${EXTRA_BIN:-}" ]; then
    echo "== $dt: $EXTRA_BIN" >&2
    "$EXTRA_BIN" "${COMMON[@]}" --dtype "$dt" --profile > "$OUT/extra_$dt.json"
  else
    rm -f "$OUT/extra_$dt.json"
  fi
done
if [ "$OPS" = 1 ]; then
  for dt in $DTYPES; do "$BIN/ops_bench" --dtype "$dt" > "$OUT/ops_$dt.json"; done
fi
"$PYTHON" - "$OUT" $DTYPES <<'PY'
import json, os, sys
out, dtypes = sys.argv[1], sys.argv[2:]
targets = {"f32": (2.5, 0.5), "bf16": (2.0, None)}
print(f"machine: {os.cpu_count()} logical CPUs, load avg {os.getloadavg()[0]:.2f}")
runs = []
for dt in dtypes:
    runs.append((dt, "lora-train", f"{out}/ours_{dt}.json"))
    if os.path.exists(f"{out}/extra_{dt}.json"):
        runs.append((dt, "lora-train (EXTRA_BIN)", f"{out}/extra_{dt}.json"))
for dt, label, path in runs:
    t = json.load(open(f"{out}/torch_{dt}.json")); o = json.load(open(path))
    sp = o["tokens_per_s"] / t["tokens_per_s"]; rss = o["peak_rss_mb"] / t["peak_rss_mb"]
    print(f"\n[{dt}] {label}: batch {o['batch']}x{o['seq']}, LoRA r={o['rank']} on 7 projections, AdamW")
    print(f"  PyTorch+PEFT : {t['tokens_per_s']:8.1f} tokens/s  step {t['step_s']:.3f}s  peak RSS {t['peak_rss_mb']:8.1f} MB")
    print(f"  ours         : {o['tokens_per_s']:8.1f} tokens/s  step {o['step_s']:.3f}s  peak RSS {o['peak_rss_mb']:8.1f} MB"
          f"  (fwd {o['fwd_s']:.3f}s bwd {o['bwd_s']:.3f}s opt {o['opt_s']:.3f}s)")
    tgt_sp, tgt_rss = targets.get(dt, (None, None))
    print(f"  ratio        : {sp:.2f}x tokens/s" + (f" (target >= {tgt_sp}x)" if tgt_sp else "")
          + f", {rss:.2f}x RSS" + (f" (target <= {tgt_rss}x)" if tgt_rss else ""))
    g = o["gemm_gflops"]
    print(f"  sgemm 2048^3 ceiling {g:.0f} GFLOP/s; step = {o['model_gflop_per_step']:.0f} GFLOP -> floor {o['floor_step_s']:.3f}s;"
          f" ours {o['achieved_gflops']:.0f} GFLOP/s = MFU {o['mfu']*100:.0f}%;"
          f" torch {t['flops_per_step_est']/t['step_s']/1e9:.0f} GFLOP/s (its own count) = {t['flops_per_step_est']/t['step_s']/1e9/g*100:.0f}%")
    if o.get("profile"):
        rows = sorted(o["profile"].items(), key=lambda kv: -kv[1]["s_per_step"])
        print("  where our step goes (s/step):")
        for k, v in rows:
            print(f"    {k:28s} {v['s_per_step']:.3f}  ({v['s_per_step']/o['step_s']*100:4.1f}%, {v['calls_per_step']:.0f} calls)")
        print(f"    {'other (candle ops)':28s} {o['profile_other_s_per_step']:.3f}  ({o['profile_other_s_per_step']/o['step_s']*100:4.1f}%)")
PY
