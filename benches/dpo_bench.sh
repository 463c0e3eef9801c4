#!/usr/bin/env bash
# The DPO step of BENCHMARKS.md ("DPO step vs TRL"): `lora-train dpo` against TRL's
# DPOTrainer + PEFT on the same model, pairs and batch, the reference pass inside every step
# on both sides, run one after the other (never concurrently), then a table with the ratio.
#
#   bash benches/dpo_bench.sh [--model PATH] [--steps 3] [--batch-size 4] [--max-length 256]
#
# Pairs: 32 synthetic pairs written here (seeded): a ~40-token prompt, chosen and rejected
# of ~200 tokens each, so every side fills most of --max-length (the shape of the SFT
# benchmark's 4 x 256). Ours: the mean step time from metrics.jsonl (elapsed_s between
# steps) after the first step; TRL: the mean of its steps after the first.
# Env: PYTHON (default /root/.venvs/golden/bin/python), OUT (default target/bench-results).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=""; STEPS=3; BATCH=4; MAXLEN=256
while [ $# -gt 0 ]; do
  case "$1" in
    --model) MODEL=$2; shift 2;; --steps) STEPS=$2; shift 2;; --batch-size) BATCH=$2; shift 2;;
    --max-length) MAXLEN=$2; shift 2;;
    *) echo "unknown argument $1" >&2; exit 2;;
  esac
done
[ -n "$MODEL" ] || MODEL=$(bash scripts/fetch_smollm2.sh)
PYTHON=${PYTHON:-/root/.venvs/golden/bin/python}
OUT=${OUT:-target/bench-results}
mkdir -p "$OUT"
PAIRS="$OUT/dpo_bench_pairs.jsonl"
"$PYTHON" benches/data/make_dpo_pairs.py "$PAIRS" --seed 7 --rows 32 --words 28 170 165 --long-vocab
cargo build --release -q -p lora-train
BIN=${CARGO_TARGET_DIR:-target}/release
load() { cut -d' ' -f1 /proc/loadavg; }

echo "== TRL DPOTrainer + PEFT, load $(load)" >&2
"$PYTHON" benches/torch/trl_dpo_bench.py --model "$MODEL" --pairs "$PAIRS" --steps "$STEPS" --warmup 1 \
  --batch-size "$BATCH" --max-length "$MAXLEN" --rank 16 2>/dev/null | tail -n 1 > "$OUT/dpo_step_trl.json"
echo "== lora-train dpo, load $(load)" >&2
RUN="$OUT/dpo_step_run"; rm -rf "$RUN"
LOAD_BEFORE=$(load)
"$BIN/lora-train" dpo --model "$MODEL" --dataset "$PAIRS" --output "$RUN" --batch-size "$BATCH" \
  --max-length "$MAXLEN" --max-sequence-length "$MAXLEN" --lora-rank 16 --eval-split 0 \
  --steps $((STEPS + 1)) --checkpoint-interval 1000 --json 2>/dev/null > "$RUN.summary.json"
"$PYTHON" - "$RUN" "$LOAD_BEFORE" "$OUT/dpo_step_trl.json" <<'PY'
import json, os, sys
run, load_before, trl_file = sys.argv[1], float(sys.argv[2]), sys.argv[3]
rows = sorted((json.loads(l) for l in open(f"{run}/metrics.jsonl")), key=lambda r: r["step"])
steps = [r for r in rows if r["step"] >= 1 and "loss" in r and not any(k.startswith("eval_") for k in r)]
times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(steps, steps[1:])]
ours = sum(times) / len(times)
trl = json.load(open(trl_file))
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print(f"machine: {cpu}, {os.cpu_count()} logical CPUs, load avg now {os.getloadavg()[0]:.2f}")
print(f"{'benchmark':44s} {'TRL':>10s} {'ours':>10s} {'ratio':>7s}")
print(f"{'DPO step, SmolLM2 f32 r=16, s/step':44s} {trl['step_s']:10.2f} {ours:10.2f} {trl['step_s'] / ours:6.2f}x"
      f"   (load {trl['load_average_1m']:.1f} / {load_before:.1f}; TRL steps {trl['step_s_each']}, ours {[round(t, 3) for t in times]}; first step of each not counted)")
PY
