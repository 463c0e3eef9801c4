#!/usr/bin/env bash
# Peak memory of `lora-train dpo` / `lora-train grpo` on SmolLM2 against TRL's DPOTrainer /
# GRPOTrainer + PEFT with the same configuration (BENCHMARKS.md, "Memory"): ours with
# gradient checkpointing off and on, TRL without and with it (TRL 1.16 turns it on by
# default), one process after the other; peak RSS of each whole process
# (benches/memory/peak_rss.py) next to `plan-memory`'s plan for ours.
#   dpo:  4 pairs of up to --max-length tokens a step, r16 on all projections, f32.
#   grpo: 4 prompts x 8 completions of up to --completion tokens (numeric evaluator on
#         benches/data/grpo_arith.jsonl), all 32 rows in one micro-batch, r16, f32.
#
#   bash benches/memory/trl_memory.sh [--method dpo|grpo] [--steps 6] [--max-length 512]
#        [--completion 64] [--sides "off on trl trl-ckpt"]
set -euo pipefail
cd "$(dirname "$0")/../.."
METHOD=dpo; STEPS=6; MAXLEN=512; COMPLETION=64; SIDES="off on trl trl-ckpt"
while [ $# -gt 0 ]; do
  case "$1" in
    --method) METHOD=$2; shift 2;; --steps) STEPS=$2; shift 2;; --max-length) MAXLEN=$2; shift 2;;
    --completion) COMPLETION=$2; shift 2;; --sides) SIDES=$2; shift 2;;
    *) echo "unknown argument $1" >&2; exit 2;;
  esac
done
MODEL=$(bash scripts/fetch_smollm2.sh)
PYTHON=${PYTHON:-$HOME/.venvs/golden/bin/python}
OUT=${OUT:-target/bench-results/memory}
mkdir -p "$OUT"
case $METHOD in
  dpo)
    DATA="$OUT/dpo_long_pairs.jsonl"
    "$PYTHON" benches/data/make_dpo_pairs.py "$DATA" --seed 11 --rows 24 --words 40 420 410
    OURS=(dpo --batch-size 4 --max-length "$MAXLEN" --max-sequence-length "$MAXLEN")
    PLAN_ARGS=(--method dpo --batch-size 4 --max-sequence-length "$MAXLEN")
    TRL=(benches/torch/trl_dpo_bench.py --pairs "$DATA" --steps $((STEPS - 1)) --warmup 1 --batch-size 4 --max-length "$MAXLEN");;
  grpo)
    DATA=benches/data/grpo_arith.jsonl
    # --batch-size 32: all completions in one micro-batch, as TRL's per_device_train_batch_size 32.
    OURS=(grpo --evaluator numeric --num-generations 8 --prompts-per-step 4 --max-completion-length "$COMPLETION" --batch-size 32)
    # Rows of prompt (the chat template and a question: under 64 tokens) + completion.
    PLAN_ARGS=(--method grpo --batch-size 4 --num-generations 8 --max-sequence-length $((COMPLETION + 64)))
    TRL=(benches/torch/trl_grpo_bench.py --prompts "$DATA" --steps $((STEPS - 1)) --warmup 1 --num-generations 8
         --prompts-per-step 4 --max-completion-length "$COMPLETION");;
  *) echo "unknown --method $METHOD" >&2; exit 2;;
esac
# LORA_TRAIN_BIN: a binary built already (e.g. while a release build is impossible).
if [ -z "${LORA_TRAIN_BIN:-}" ]; then cargo build --release -q -p lora-train; fi
BIN=${LORA_TRAIN_BIN:-${CARGO_TARGET_DIR:-target}/release/lora-train}
RESULTS="$OUT/${METHOD}_memory.jsonl"; : > "$RESULTS"
for side in $SIDES; do
  LOAD=$(cut -d' ' -f1 /proc/loadavg)
  echo "== $METHOD $side, load $LOAD" >&2
  case $side in
    off|on)
      RUN="$OUT/${METHOD}_memory_$side"; rm -rf "$RUN"
      PEAK=$("$PYTHON" benches/memory/peak_rss.py -- "$BIN" "${OURS[@]}" --model "$MODEL" --dataset "$DATA" --output "$RUN" \
        --lora-rank 16 --eval-split 0 --steps "$STEPS" --dtype f32 --gradient-checkpointing "$side" --checkpoint-interval 1000 --json)
      PLAN=$("$BIN" plan-memory --model "$MODEL" "${PLAN_ARGS[@]}" --rank 16 --dtype f32 --json);;
    trl|trl-ckpt)
      CKPT=(); [ "$side" = trl-ckpt ] && CKPT=(--gradient-checkpointing)
      PEAK=$("$PYTHON" benches/memory/peak_rss.py --stdout "$OUT/${METHOD}_memory_$side.json" -- "$PYTHON" "${TRL[@]}" \
        --model "$MODEL" --rank 16 "${CKPT[@]}")
      PLAN='{"plans": []}';;
    *) echo "unknown side $side" >&2; exit 2;;
  esac
  "$PYTHON" -c '
import json, sys
side, peak, plan, load = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), float(sys.argv[4])
ckpt = side in ("on", "trl-ckpt")
planned = next((p["total_bytes"] for p in plan["plans"] if p["gradient_checkpointing"] == ckpt and p["base"] != "nf4"), None)
print(json.dumps({"side": "trl" if side.startswith("trl") else "lora-train", "checkpointing": ckpt, "load_before": load,
                  "peak_rss_mb": peak["peak_rss_mb"], "wall_s": peak["wall_s"], "rc": peak["rc"],
                  "plan_mb": round(planned / 2**20, 1) if planned else None}))' "$side" "$PEAK" "$PLAN" "$LOAD" >> "$RESULTS"
done
"$PYTHON" - "$RESULTS" <<'PY'
import json, os, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
trl = next((r for r in rows if r["side"] == "trl" and not r["checkpointing"]), None)
trl_ckpt = next((r for r in rows if r["side"] == "trl" and r["checkpointing"]), None)
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print(f"machine: {cpu}, {os.cpu_count()} logical CPUs, load avg {os.getloadavg()[0]:.2f}")
print("| side | checkpointing | peak RSS | plan | plan / peak | vs TRL | vs TRL (ckpt) | wall s | load before |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for r in rows:
    gib = lambda mb: f"{mb / 1024:.2f} GiB"
    vs = lambda ref: f"{r['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x" if ref and ref["rc"] == 0 else ""
    plan = gib(r["plan_mb"]) if r.get("plan_mb") else ""
    ratio = f"{r['plan_mb'] / r['peak_rss_mb']:.2f}" if r.get("plan_mb") else ""
    status = "" if r["rc"] == 0 else f" (exit {r['rc']})"
    print(f"| {r['side']} | {'on' if r['checkpointing'] else 'off'} | {gib(r['peak_rss_mb'])}{status} | {plan} | {ratio} | "
          f"{vs(trl)} | {vs(trl_ckpt)} | {r['wall_s']:.0f} | {r['load_before']:.2f} |")
PY
