#!/usr/bin/env bash
# llama.cpp, through llama-cpp-python (a client nobody here wrote), against lora-train on
# SmolLM2-135M: our f32 GGUF of the base + our GGUF LoRA, and our merged f32 GGUF, must give
# the greedy tokens (32, raw prompts) and last-position logits (within 1e-3 relative) of
# `lora-train generate --adapter`; on the original Q4_1 GGUF (llama.cpp quantizes the
# activations there) the number of agreeing greedy tokens is reported. Exit 1 on a mismatch.
#
# Needs llama-cpp-python in $PYTHON's environment (it compiles llama.cpp: ~20 min on 2 cores):
#   ~/.venvs/golden/bin/pip install llama-cpp-python==0.3.36
# Env: PYTHON (default ~/.venvs/golden/bin/python), LORA_TRAIN_BIN (default: cargo build),
#      ADAPTER (a SmolLM2 adapter dir; default: train one for a few steps), WORK (scratch dir).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$HOME/.venvs/golden/bin/python}
if ! "$PYTHON" -c "import llama_cpp" 2>/dev/null; then
  echo "check_llama_cpp: llama_cpp is not importable by $PYTHON; install it with: $PYTHON -m pip install llama-cpp-python==0.3.36" >&2
  exit 2
fi
BIN=${LORA_TRAIN_BIN:-}
if [ -z "$BIN" ]; then
  cargo build -q -p lora-train --bin lora-train
  BIN=${CARGO_TARGET_DIR:-target}/debug/lora-train
fi
GGUF=$(bash scripts/fetch_smollm2.sh)
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$WORK"
ADAPTER=${ADAPTER:-}
if [ -z "$ADAPTER" ]; then
  ADAPTER=$WORK/adapter
  if [ ! -s "$ADAPTER/adapter_model.safetensors" ]; then
    # A few steps at a high learning rate: an adapter that visibly moves the outputs.
    "$BIN" sft --model "$GGUF" --dataset examples/json_answers.train.jsonl --eval-split 0 --max-train-samples 32 \
      --steps 8 --batch-size 2 --learning-rate 3e-3 --rank 8 --device cpu --output "$ADAPTER" >&2
  fi
fi
"$BIN" export --model "$GGUF" --format gguf --quant f32 -o "$WORK/base.f32.gguf"
"$BIN" export --model "$GGUF" --adapter "$ADAPTER" --format gguf-lora -o "$WORK/lora.f32.gguf"
"$BIN" export --model "$GGUF" --adapter "$ADAPTER" --format gguf --quant f32 -o "$WORK/merged.f32.gguf"
PROMPTS=("The capital of France is" "def fibonacci(n):" "Once upon a time, in a small village," '{"name": "Alice", "age":')
: > "$WORK/ours.jsonl"
for p in "${PROMPTS[@]}"; do
  # One prompt per call: the greedy tokens of an unbatched decode, as llama.cpp runs them.
  "$BIN" generate --model "$GGUF" --adapter "$ADAPTER" --device cpu --prompt "$p" --max-new-tokens 32 --temperature 0 --json --logits \
    | "$PYTHON" -c 'import json,sys; o=json.load(sys.stdin); r=o["outputs"][0]; r["prompt"]=sys.argv[1]; print(json.dumps(r))' "$p" >> "$WORK/ours.jsonl"
done
"$PYTHON" scripts/check_llama_cpp.py --ours "$WORK/ours.jsonl" --base "$WORK/base.f32.gguf" --lora "$WORK/lora.f32.gguf" \
  --merged "$WORK/merged.f32.gguf" --original "$GGUF"
