#!/usr/bin/env bash
# The first thing to run on a new GPU machine (one GPU, under 8 minutes after the build):
#   1. `selftest`: every CUDA kernel, forward and backward, against the CPU implementation
#      (LoRA / frozen linear bf16, f16, f32 at ranks 4..256, chunked cross-entropy and its
#      per-row form, flash attention with GQA, segments and KV-cache queries, the SGMV
#      multi-adapter op, RMSNorm, RoPE, softmax, SwiGLU, AdamW) and the kernel timings;
#   2. a 20-step SFT on the SmolLM2-135M GGUF, f32, on the GPU and on the CPU with the
#      same seed and data: the per-step losses must agree (max relative difference
#      <= LOSS_TOL, default 0.02; f32 on both sides, only the summation order differs);
#      the same run in bf16 on the GPU is reported against the CPU curve (looser, BF16_TOL);
#   3. training throughput (bf16, batch 8 x 512, 30 steps; peak GPU memory polled with
#      nvidia-smi, printed next to `plan-memory`'s plan for the run) and decoding throughput (greedy, 8 prompts x 256 new tokens) on the GPU;
#   4. one JSON summary ($OUT/gpu-check.json, also printed) with "passed".
# Exits non-zero when any check fails.
#
#   bash scripts/cuda/gpu-check.sh [--device cuda:0] [--bin PATH] [--out DIR]
#
# Needs a binary built with `--features cuda` (BIN, default target/release/lora-train;
# built with `cargo build --release --features cuda -p lora-train` when missing, which
# needs nvcc: see the README's GPU section) and python3 (for the SmolLM2 download and
# the summary).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
DEVICE=cuda:0
BIN="${BIN:-target/release/lora-train}"
OUT="${OUT:-target/gpu-check}"
LOSS_TOL="${LOSS_TOL:-0.02}"
BF16_TOL="${BF16_TOL:-0.1}"
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2;; --bin) BIN=$2; shift 2;; --out) OUT=$2; shift 2;;
    -h|--help) sed -n 2,22p "$0"; exit 0;;
    *) echo "unknown argument $1" >&2; exit 2;;
  esac
done
log() { echo "[gpu-check $(date +%H:%M:%S)] $*" >&2; }
T0=$SECONDS
if [ ! -x "$BIN" ]; then
  log "no $BIN: building it (cargo build --release --features cuda -p lora-train)"
  cargo build --release --features cuda -p lora-train
fi
rm -rf "$OUT"; mkdir -p "$OUT"
MODEL="$(bash scripts/fetch_smollm2.sh)"
DATA=examples/json_answers.train.jsonl

log "devices"
"$BIN" devices --json > "$OUT/devices.json"

log "1/3 selftest on $DEVICE"
set +e
"$BIN" selftest --device "$DEVICE" --json > "$OUT/selftest.json" 2> "$OUT/selftest.log"
SELFTEST_RC=$?
set -e
log "selftest exit $SELFTEST_RC"

# Same flags on both devices: 20 optimizer steps, no evaluation, fixed seed.
SFT=(sft --model "$MODEL" --dataset "$DATA" --steps 20 --batch-size 4 --max-sequence-length 256
     --eval-split 0 --seed 7 --lr 2e-4 --checkpoint-interval 1000 --json)
log "2/3 SFT 20 steps f32: GPU"
"$BIN" "${SFT[@]}" --dtype f32 --device "$DEVICE" -o "$OUT/sft-gpu-f32" > "$OUT/sft-gpu-f32.json" 2> "$OUT/sft-gpu-f32.log" || echo '{}' > "$OUT/sft-gpu-f32.json"
log "2/3 SFT 20 steps f32: CPU"
"$BIN" "${SFT[@]}" --dtype f32 --device cpu -o "$OUT/sft-cpu-f32" > "$OUT/sft-cpu-f32.json" 2> "$OUT/sft-cpu-f32.log" || echo '{}' > "$OUT/sft-cpu-f32.json"
log "2/3 SFT 20 steps bf16: GPU"
"$BIN" "${SFT[@]}" --dtype bf16 --device "$DEVICE" -o "$OUT/sft-gpu-bf16" > "$OUT/sft-gpu-bf16.json" 2> "$OUT/sft-gpu-bf16.log" || echo '{}' > "$OUT/sft-gpu-bf16.json"

# Peak GPU memory of the training benchmark (for the planner's memory model,
# BENCHMARKS.md), polled with nvidia-smi when it is there.
GPU_INDEX="${DEVICE#cuda:}"; [[ "$GPU_INDEX" =~ ^[0-9]+$ ]] || GPU_INDEX=0
poll_mem() {
  local peak=0 v
  while true; do
    v=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "$GPU_INDEX" 2>/dev/null | head -n 1 | tr -dc 0-9 || true)
    [[ -n "$v" && "$v" -gt "$peak" ]] && { peak=$v; echo "$peak" > "$OUT/bench-train.peak_mib"; }
    sleep 0.5
  done
}
MEM_PID=
if command -v nvidia-smi >/dev/null; then poll_mem & MEM_PID=$!; fi
log "3/3 benchmarks: training (bf16, batch 8 x 512, 30 steps)"
"$BIN" sft --model "$MODEL" --dataset "$DATA" --steps 30 --batch-size 8 --max-sequence-length 512 --packing \
  --eval-split 0 --seed 7 --checkpoint-interval 1000 --dtype bf16 --device "$DEVICE" --json \
  -o "$OUT/bench-train" > "$OUT/bench-train.json" 2> "$OUT/bench-train.log" || echo '{}' > "$OUT/bench-train.json"
if [[ -n "$MEM_PID" ]]; then kill "$MEM_PID" 2>/dev/null || true; wait "$MEM_PID" 2>/dev/null || true; fi
# The memory model's plan for that run (trainer/src/memory.rs), to print next to the peak.
"$BIN" plan-memory --model "$MODEL" --batch-size 8 --max-sequence-length 512 --dtype bf16 --device 80GiB --json \
  > "$OUT/bench-train.plan.json" 2> "$OUT/bench-train.plan.log" || echo '{}' > "$OUT/bench-train.plan.json"
log "3/3 benchmarks: decoding (greedy, 8 prompts x 256 new tokens, bf16)"
PROMPTS=()
for p in "Once upon a time" "The capital of France" "def fibonacci(n):" "In 1905, Einstein" \
         "A recipe for bread:" "The mitochondria is" "Dear customer," "Rust ownership means"; do
  PROMPTS+=(--prompt "$p")
done
"$BIN" generate --model "$MODEL" "${PROMPTS[@]}" --max-new-tokens 256 --temperature 0 --dtype bf16 \
  --device "$DEVICE" --json > "$OUT/bench-decode.json" 2> "$OUT/bench-decode.log" || echo '{}' > "$OUT/bench-decode.json"

python3 - "$OUT" "$LOSS_TOL" "$BF16_TOL" "$SELFTEST_RC" "$((SECONDS - T0))" <<'PY'
import json, os, sys
out, loss_tol, bf16_tol, selftest_rc, wall = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.loads(f.read().strip().splitlines()[-1])
    except Exception:
        return None
def losses(run):
    rows = []
    try:
        with open(os.path.join(out, run, "metrics.jsonl")) as f:
            for line in f:
                r = json.loads(line)
                if r.get("loss") is not None and r.get("step", 0) > 0:
                    rows.append((r["step"], r["loss"], r.get("tokens", 0), r.get("elapsed_s", 0.0)))
    except OSError:
        pass
    return rows
def curve_diff(a, b):
    if not a or len(a) != len(b):
        return None
    return max(abs(x[1] - y[1]) / max(abs(y[1]), 1e-6) for x, y in zip(a, b))
st = load("selftest.json") or {}
gpu, cpu, bf = losses("sft-gpu-f32"), losses("sft-cpu-f32"), losses("sft-gpu-bf16")
d32, d16 = curve_diff(gpu, cpu), curve_diff(bf, cpu)
train = losses("bench-train")
dec = load("bench-decode.json") or {}
try:
    with open(os.path.join(out, "bench-train.peak_mib")) as f:
        peak_mib = int(f.read().strip())
except Exception:
    peak_mib = None
def planned_mib():
    # The run's own configuration: the base as loaded (the first variant), checkpointing
    # off (`auto` leaves it off when the plan fits, as it does on any GPU this runs on).
    try:
        with open(os.path.join(out, "bench-train.plan.json")) as f:
            plans = json.load(f)["plans"]
        return round(next(p["total_bytes"] for p in plans if not p["gradient_checkpointing"]) / 2**20)
    except Exception:
        return None
plan_mib = planned_mib()
def tps(rows):
    if len(rows) < 2:
        return None
    # skip the first step (kernel compilation, allocator warm-up)
    return (rows[-1][2] - rows[0][2]) / max(rows[-1][3] - rows[0][3], 1e-9)
checks = {
    "selftest": selftest_rc == 0 and st.get("passed") is True,
    "sft_f32_gpu_vs_cpu": d32 is not None and len(gpu) == 20 and d32 <= loss_tol,
    "sft_bf16_gpu_vs_cpu_f32": d16 is not None and len(bf) == 20 and d16 <= bf16_tol,
    "train_bench_ran": len(train) >= 2,
    "decode_bench_ran": bool(dec.get("generated_tokens")),
}
summary = {
    "passed": all(checks.values()),
    "checks": checks,
    "wall_s": wall,
    "devices": load("devices.json"),
    "selftest": {"passed": st.get("passed"), "failed": st.get("failed"), "n_checks": len(st.get("checks", [])),
                 "failures": [c for c in st.get("checks", []) if not c.get("pass")], "bench": st.get("bench")},
    "sft_20_steps": {
        "loss_tol": loss_tol, "bf16_tol": bf16_tol,
        "max_rel_diff_f32": d32, "max_rel_diff_bf16": d16,
        "gpu_f32": [x[1] for x in gpu], "cpu_f32": [x[1] for x in cpu], "gpu_bf16": [x[1] for x in bf],
        "tokens_per_s_gpu_f32": tps(gpu), "tokens_per_s_cpu_f32": tps(cpu), "tokens_per_s_gpu_bf16": tps(bf),
    },
    "bench_train_bf16_batch8x512": {"tokens_per_s": tps(train), "steps": len(train), "peak_gpu_memory_mib": peak_mib,
                                    "plan_mib": plan_mib, "plan_over_peak": round(plan_mib / peak_mib, 3) if plan_mib and peak_mib else None},
    "bench_decode_bf16_8x256": {"tokens_per_s": dec.get("tokens_per_s"), "generated_tokens": dec.get("generated_tokens")},
}
with open(os.path.join(out, "gpu-check.json"), "w") as f:
    json.dump(summary, f, indent=1)
print(json.dumps(summary, indent=1))
# Reported, not checked: nvidia-smi's figure includes the CUDA context, which the plan
# counts only as its fixed process overhead.
print(f"memory: peak {peak_mib} MiB (nvidia-smi), plan {plan_mib} MiB (plan-memory)", file=sys.stderr)
for k, v in checks.items():
    print(f"{'pass' if v else 'FAIL'}  {k}", file=sys.stderr)
sys.exit(0 if summary["passed"] else 1)
PY
