#!/usr/bin/env bash
# One command: the two GRPO benchmarks of BENCHMARKS.md ("GRPO: rollouts and the whole
# step"), each side run one after the other (never concurrently), then a table with ratios.
#
#   (a) rollouts: tokens/s of 4 prompts x 8 sampled completions x 128 new tokens, our
#       Model::rollouts (benches/src/bin/rollout_bench.rs) vs transformers
#       generate(num_return_sequences=8) (benches/torch/generate_bench.py); both decode the
#       same prompt ids, forced to exactly 128 tokens per row. Target >= 3x.
#   (b) the whole GRPO step (rollouts, scoring, training): `lora-train grpo` vs TRL's
#       GRPOTrainer + PEFT (benches/torch/trl_grpo_bench.py), SmolLM2, r=16, 4 prompts x 8
#       completions x 16 tokens, the numeric evaluator on benches/data/grpo_arith.jsonl.
#       Ours: the mean of time_rollout_s + time_scoring_s + time_training_s in metrics.jsonl
#       over the steps after the first; TRL: the mean wall time of its steps after the first.
#       Target >= 2x (issue 23; it was 3x).
#
#   bash benches/grpo_bench.sh [--model PATH] [--repeats 2] [--steps 2] [--only a|b]
#
# Env: PYTHON (default /root/.venvs/golden/bin/python), OUT (default target/bench-results),
# DTYPE (f32, or bf16: bf16 weights and compute on both sides, LoRA weights f32),
# BASE_QUANT (ours: none = dense weights, as transformers runs the GGUF dequantized; auto =
# the GGUF's blocks kept and dequantized per projection call, `lora-train`'s default).
# The load average is recorded before every side: on a shared machine compare only ratios
# measured at similar load.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=""; REPEATS=2; STEPS=2; ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --model) MODEL=$2; shift 2;; --repeats) REPEATS=$2; shift 2;; --steps) STEPS=$2; shift 2;;
    --only) ONLY=$2; shift 2;;
    *) echo "unknown argument $1" >&2; exit 2;;
  esac
done
[ -n "$MODEL" ] || MODEL=$(bash scripts/fetch_smollm2.sh)
PYTHON=${PYTHON:-/root/.venvs/golden/bin/python}
OUT=${OUT:-target/bench-results}
PROMPTS=benches/data/grpo_arith.jsonl
export DTYPE=${DTYPE:-f32}
export BASE_QUANT=${BASE_QUANT:-none}
mkdir -p "$OUT"
cargo build --release -q -p lora-benches --bin rollout_bench
cargo build --release -q -p lora-train
BIN=${CARGO_TARGET_DIR:-target}/release
load() { cut -d' ' -f1 /proc/loadavg; }

if [ "$ONLY" != b ]; then
  echo "== (a) transformers generate, load $(load)" >&2
  "$PYTHON" benches/torch/generate_bench.py --model "$MODEL" --prompts-jsonl "$PROMPTS" \
    --num-return-sequences 8 --temperature 1.0 --max-new-tokens 128 --repeats "$REPEATS" --dtype "$DTYPE" \
    --dump-ids "$OUT/grpo_prompt_ids.json" 2>/dev/null | tail -n 1 > "$OUT/rollouts_torch.json"
  echo "== (a) lora-train rollouts, load $(load)" >&2
  "$BIN/rollout_bench" --model "$MODEL" --prompt-ids "$OUT/grpo_prompt_ids.json" --group 8 \
    --temperature 1.0 --max-new-tokens 128 --repeats "$REPEATS" --dtype "$DTYPE" --base-quant "$BASE_QUANT" > "$OUT/rollouts_ours.json"
fi

if [ "$ONLY" != a ]; then
  echo "== (b) TRL GRPOTrainer + PEFT, load $(load)" >&2
  "$PYTHON" benches/torch/trl_grpo_bench.py --model "$MODEL" --prompts "$PROMPTS" --steps "$STEPS" --warmup 1 \
    --num-generations 8 --prompts-per-step 4 --max-completion-length 16 --rank 16 --dtype "$DTYPE" \
    2>/dev/null | tail -n 1 > "$OUT/grpo_step_trl.json"
  echo "== (b) lora-train grpo, load $(load)" >&2
  RUN="$OUT/grpo_step_run"; rm -rf "$RUN"
  LOAD_BEFORE=$(load)
  # --batch-size 32: all completions in one micro-batch, as TRL's per_device_train_batch_size 32.
  "$BIN/lora-train" grpo --model "$MODEL" --dataset "$PROMPTS" --output "$RUN" --evaluator numeric \
    --num-generations 8 --prompts-per-step 4 --max-completion-length 16 --lora-rank 16 \
    --batch-size 32 --eval-split 0 --dtype "$DTYPE" --base-quant "$BASE_QUANT" --steps $((STEPS + 1)) --json 2>/dev/null > "$RUN.summary.json"
  "$PYTHON" - "$RUN" "$LOAD_BEFORE" > "$OUT/grpo_step_ours.json" <<'PY'
import json, sys
run, load_before = sys.argv[1], float(sys.argv[2])
rows = [json.loads(l) for l in open(f"{run}/metrics.jsonl") if '"time_rollout_s"' in l]
parts = ("time_rollout_s", "time_scoring_s", "time_training_s")
step = lambda r: sum(r[k] for k in parts)
counted = rows[1:]  # the first step warms caches and allocators, as TRL's first is not counted
mean = lambda k: sum(r[k] for r in counted) / len(counted)
print(json.dumps({
    "bench": "lora-train grpo (metrics.jsonl time split)", "steps": len(counted),
    "step_s": round(sum(step(r) for r in counted) / len(counted), 4),
    "step_s_each": [round(step(r), 4) for r in rows],
    **{k: round(mean(k), 4) for k in parts},
    "reward_each": [r["reward"] for r in rows],
    "completion_length_each": [r["completion_length_mean"] for r in rows],
    "load_average_1m_before": load_before,
}))
PY
fi

"$PYTHON" - "$OUT" "$ONLY" <<'PY'
import json, os, sys
out, only = sys.argv[1], sys.argv[2]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print(f"machine: {cpu}, {os.cpu_count()} logical CPUs, load avg now {os.getloadavg()[0]:.2f}, dtype {os.environ.get('DTYPE', 'f32')}, ours --base-quant {os.environ.get('BASE_QUANT', 'none')}")
print(f"{'benchmark':44s} {'reference':>16s} {'ours':>16s} {'ratio':>7s}  target")
if only != "b":
    t, o = (json.load(open(f"{out}/rollouts_{s}.json")) for s in ("torch", "ours"))
    print(f"{'(a) rollouts 4x8x128, tokens/s':44s} {t['tokens_per_s']:16.1f} {o['tokens_per_s']:16.1f}"
          f" {o['tokens_per_s'] / t['tokens_per_s']:6.2f}x  >= 3x   (load {t['load_average_1m']:.1f} / {o['load_average_1m']:.1f})")
if only != "a":
    t, o = (json.load(open(f"{out}/grpo_step_{s}.json")) for s in ("trl", "ours"))
    print(f"{'(b) GRPO step 4x8x16 r=16, s/step':44s} {t['step_s']:16.2f} {o['step_s']:16.2f}"
          f" {t['step_s'] / o['step_s']:6.2f}x  >= 2x   (load {t['load_average_1m']:.1f} / {o['load_average_1m_before']:.1f})")
    print(f"    ours per step: rollout {o['time_rollout_s']:.2f}s, scoring {o['time_scoring_s']:.4f}s, training {o['time_training_s']:.2f}s;"
          f" TRL steps {t['step_s_each']}, ours {o['step_s_each']} (first of each not counted)")
PY
