#!/usr/bin/env bash
# DPO peak memory on SmolLM2 (BENCHMARKS.md, "Memory"): `lora-train dpo` with gradient
# checkpointing off and on against TRL's DPOTrainer + PEFT with the same configuration
# (4 pairs of up to 512 tokens a step, r16 on all projections, f32, STEPS steps), one
# after the other; peak RSS of each whole process (benches/memory/peak_rss.py).
#
#   bash benches/memory/dpo_memory.sh [--steps 6] [--max-length 512]
set -euo pipefail
cd "$(dirname "$0")/../.."
STEPS=6; MAXLEN=512
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) STEPS=$2; shift 2;; --max-length) MAXLEN=$2; shift 2;;
    *) echo "unknown argument $1" >&2; exit 2;;
  esac
done
MODEL=$(bash scripts/fetch_smollm2.sh)
PYTHON=${PYTHON:-$HOME/.venvs/golden/bin/python}
OUT=${OUT:-target/bench-results/memory}
mkdir -p "$OUT"
PAIRS="$OUT/dpo_long_pairs.jsonl"
"$PYTHON" - "$PAIRS" <<'PY'
import json, random, sys
words = ("the model learns from pairs of answers where one is preferred over another and the "
         "gradient moves probability toward the chosen text while the reference keeps it close").split()
rng = random.Random(11)
text = lambda n: " ".join(rng.choice(words) for _ in range(n)).capitalize() + "."
with open(sys.argv[1], "w") as f:
    for i in range(24):
        f.write(json.dumps({"prompt": [{"role": "user", "content": f"Question {i}: " + text(40)}],
                            "chosen": [{"role": "assistant", "content": text(420)}],
                            "rejected": [{"role": "assistant", "content": text(410)}]}) + "\n")
PY
# LORA_TRAIN_BIN: a binary built already (e.g. while a release build is impossible).
if [ -z "${LORA_TRAIN_BIN:-}" ]; then cargo build --release -q -p lora-train; fi
BIN=${LORA_TRAIN_BIN:-${CARGO_TARGET_DIR:-target}/release/lora-train}
RESULTS="$OUT/dpo_memory.jsonl"; : > "$RESULTS"
for ckpt in off on; do
  RUN="$OUT/dpo_memory_$ckpt"; rm -rf "$RUN"
  echo "== lora-train dpo, checkpointing $ckpt, load $(cut -d' ' -f1 /proc/loadavg)" >&2
  PEAK=$("$PYTHON" benches/memory/peak_rss.py -- "$BIN" dpo --model "$MODEL" --dataset "$PAIRS" --output "$RUN" --batch-size 4 \
    --max-length "$MAXLEN" --max-sequence-length "$MAXLEN" --lora-rank 16 --eval-split 0 --steps "$STEPS" --dtype f32 \
    --gradient-checkpointing "$ckpt" --checkpoint-interval 1000 --json)
  PLAN=$("$BIN" plan-memory --model "$MODEL" --method dpo --batch-size 4 --max-sequence-length "$MAXLEN" --rank 16 --dtype f32 --json)
  "$PYTHON" -c '
import json, sys
peak, plan, ckpt = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3] == "on"
planned = next(p["total_bytes"] for p in plan["plans"] if p["gradient_checkpointing"] == ckpt and p["base"] != "nf4")
print(json.dumps({"side": "lora-train", "checkpointing": ckpt, "peak_rss_mb": peak["peak_rss_mb"], "wall_s": peak["wall_s"], "rc": peak["rc"], "plan_mb": round(planned / 2**20, 1)}))' "$PEAK" "$PLAN" "$ckpt" >> "$RESULTS"
done
echo "== TRL DPOTrainer + PEFT, load $(cut -d' ' -f1 /proc/loadavg)" >&2
PEAK=$("$PYTHON" benches/memory/peak_rss.py -- "$PYTHON" benches/torch/trl_dpo_bench.py --model "$MODEL" --pairs "$PAIRS" \
  --steps $((STEPS - 1)) --warmup 1 --batch-size 4 --max-length "$MAXLEN" --rank 16)
"$PYTHON" -c 'import json, sys; p = json.loads(sys.argv[1]); print(json.dumps({"side": "trl", "checkpointing": False, "peak_rss_mb": p["peak_rss_mb"], "wall_s": p["wall_s"], "rc": p["rc"]}))' "$PEAK" >> "$RESULTS"
"$PYTHON" - "$RESULTS" <<'PY'
import json, os, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
trl = next(r for r in rows if r["side"] == "trl")
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print(f"machine: {cpu}, {os.cpu_count()} logical CPUs, load avg {os.getloadavg()[0]:.2f}")
print("| side | checkpointing | peak RSS | vs TRL | plan | wall s |")
print("| --- | --- | ---: | ---: | ---: | ---: |")
for r in rows:
    plan = f"{r['plan_mb'] / 1024:.2f} GiB" if r.get("plan_mb") else ""
    print(f"| {r['side']} | {'on' if r['checkpointing'] else 'off'} | {r['peak_rss_mb'] / 1024:.2f} GiB | "
          f"{r['peak_rss_mb'] / trl['peak_rss_mb']:.2f}x | {plan} | {r['wall_s']:.0f} |")
PY
