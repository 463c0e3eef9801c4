#!/usr/bin/env bash
# The memory benchmarks of BENCHMARKS.md ("Memory: checkpointing and a quantized base"):
# `lora-train sft` on a synthetic checkpoint with Qwen2.5-1.5B's published shapes (random
# bf16 weights made by make_synthetic_model.py; nothing downloaded), LoRA r16 on all seven
# projections, 1 row x SEQ tokens (packed), f32 compute, for {bf16 base, NF4 base} x
# {checkpointing off, on}: peak RSS, step time and the memory plan (`plan-memory`); then
# PyTorch + PEFT + bitsandbytes NF4 with gradient_checkpointing_enable() on the same model,
# shape and CPU (benches/torch/peft_train_bench.py), one after the other.
#
#   bash benches/memory/run.sh                  # Qwen2.5-1.5B shapes, 1 x 2048
#   MODEL_KIND=llama-3.1-8b CONFIGS="nf4:on" TORCH=0 bash benches/memory/run.sh
#
# Env: SEQ (2048), STEPS (2: the second step is timed), CONFIGS ("bf16:off bf16:on nf4:off
# nf4:on"), DTYPE (compute dtype, f32; bf16 keeps the 8B's embeddings and activations at
# half the bytes), TORCH (1), PYTHON (~/.venvs/golden/bin/python), OUT
# (target/bench-results/memory).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-$HOME/.venvs/golden/bin/python}
CACHE=${LORA_TRAIN_CACHE:-$HOME/.cache/lora-train}
OUT=${OUT:-target/bench-results/memory}
SEQ=${SEQ:-2048}; STEPS=${STEPS:-2}; TORCH=${TORCH:-1}; DTYPE=${DTYPE:-f32}
KIND=${MODEL_KIND:-qwen2.5-1.5b}
CONFIGS=${CONFIGS:-"bf16:off bf16:on nf4:off nf4:on"}
MODEL="$CACHE/synthetic/$KIND"
mkdir -p "$OUT"
[ -f "$MODEL/model.safetensors.index.json" ] || "$PYTHON" benches/memory/make_synthetic_model.py "$KIND" "$MODEL" >&2
# LORA_TRAIN_BIN: a binary built already (e.g. while a release build is impossible).
if [ -z "${LORA_TRAIN_BIN:-}" ]; then cargo build --release -q -p lora-train; fi
BIN=${LORA_TRAIN_BIN:-${CARGO_TARGET_DIR:-target}/release/lora-train}
DATA="$OUT/long_chat.jsonl"
"$PYTHON" - "$DATA" <<'PY'
import json, random, sys
rng = random.Random(3)
words = "memory is the wall that every fine tuning run meets first on a workstation card".split()
with open(sys.argv[1], "w") as f:
    for i in range(24):
        f.write(json.dumps({"messages": [{"role": "user", "content": f"Write part {i}."},
                                         {"role": "assistant", "content": " ".join(rng.choice(words) for _ in range(1500))}]}) + "\n")
PY
RESULTS="$OUT/results-$KIND-$SEQ.jsonl"; : > "$RESULTS"
for cfg in $CONFIGS; do
  base=${cfg%%:*}; ckpt=${cfg##*:}
  case $base in
    bf16) quant=(--base-dtype bf16 --base-quant none);;
    nf4) quant=(--base-quant nf4);;
    *) echo "unknown base $base" >&2; exit 2;;
  esac
  RUN="$OUT/run-$KIND-$base-$ckpt"; rm -rf "$RUN"
  echo "== lora-train sft, $base base, checkpointing $ckpt, load $(cut -d' ' -f1 /proc/loadavg)" >&2
  PEAK=$("$PYTHON" benches/memory/peak_rss.py -- "$BIN" sft --model "$MODEL" --dataset "$DATA" -o "$RUN" --steps "$STEPS" \
    --batch-size 1 --max-sequence-length "$SEQ" --packing --eval-split 0 --rank 16 --dtype "$DTYPE" "${quant[@]}" \
    --gradient-checkpointing "$ckpt" --checkpoint-interval 1000 --json)
  PLAN=$("$BIN" plan-memory --model "$MODEL" --batch-size 1 --max-sequence-length "$SEQ" --rank 16 --dtype "$DTYPE" "${quant[@]}" --json)
  "$PYTHON" - "$RUN" "$base" "$ckpt" "$PEAK" "$PLAN" >> "$RESULTS" <<'PY'
import json, sys
run, base, ckpt, peak, plan = sys.argv[1], sys.argv[2], sys.argv[3] == "on", json.loads(sys.argv[4]), json.loads(sys.argv[5])
rows = [json.loads(l) for l in open(f"{run}/metrics.jsonl")] if peak["rc"] == 0 else []
steps = sorted((r for r in rows if r.get("step", 0) >= 1 and "loss" in r), key=lambda r: r["step"])
step_s = steps[-1]["elapsed_s"] - steps[-2]["elapsed_s"] if len(steps) >= 2 else None
planned = next(p["total_bytes"] for p in plan["plans"] if p["gradient_checkpointing"] == ckpt and p["base"] == ("nf4" if base == "nf4" else "bf16"))
print(json.dumps({"side": "lora-train", "base": base, "checkpointing": ckpt, "peak_rss_mb": peak["peak_rss_mb"], "rc": peak["rc"],
                  "step_s": step_s, "tokens": steps[-1].get("loss_tokens") if steps else None, "plan_mb": round(planned / 2**20, 1)}))
PY
done
if [ "$TORCH" = 1 ]; then
  echo "== PyTorch + PEFT + bitsandbytes NF4, gradient checkpointing, load $(cut -d' ' -f1 /proc/loadavg)" >&2
  "$PYTHON" benches/torch/peft_train_bench.py --model "$MODEL" --dtype "$DTYPE" --batch 1 --seq "$SEQ" --rank 16 --steps 1 --warmup 1 \
    --load-in-4bit --gradient-checkpointing 2>/dev/null | tail -n 1 | "$PYTHON" -c '
import json, sys
r = json.loads(sys.stdin.read())
print(json.dumps({"side": "pytorch+peft+bnb", "base": "nf4", "checkpointing": True, "peak_rss_mb": r["peak_rss_mb"], "step_s": r["step_s"]}))' >> "$RESULTS"
fi
"$PYTHON" - "$RESULTS" <<'PY'
import json, os, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print(f"machine: {cpu}, {os.cpu_count()} logical CPUs, load avg {os.getloadavg()[0]:.2f}")
print("| side | base | checkpointing | peak RSS | plan | plan / peak | step s |")
print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
for r in rows:
    plan = r.get("plan_mb")
    ratio = f"{plan / r['peak_rss_mb']:.2f}" if plan else ""
    step = f"{r['step_s']:.1f}" if r.get("step_s") else "failed" if r.get("rc") else ""
    print(f"| {r['side']} | {r['base']} | {'on' if r['checkpointing'] else 'off'} | {r['peak_rss_mb'] / 1024:.2f} GiB | "
          f"{(plan or 0) / 1024:.2f} GiB | {ratio} | {step} |")
PY
