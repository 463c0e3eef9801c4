#!/usr/bin/env bash
# Recreate every committed golden under tests/golden/ (see scripts/golden/README.md).
#
#   scripts/golden/make_all.sh            # tiny models + goldens, eval goldens, SmolLM2 goldens
#   SKIP_SMOLLM2=1 scripts/golden/make_all.sh   # no GGUF needed (tiny models + eval only)
#   NO_BENCH=1 scripts/golden/make_all.sh       # keep the committed generate timing in smollm2.json
#
# Python: $GOLDEN_PYTHON if set, else the venv $GOLDEN_VENV (default ~/.venvs/golden), created
# from scripts/golden/requirements.txt when it does not exist.
set -euo pipefail
cd "$(dirname "$0")/../.."
here=scripts/golden

if [ -n "${GOLDEN_PYTHON:-}" ]; then
  py="$GOLDEN_PYTHON"
else
  venv="${GOLDEN_VENV:-$HOME/.venvs/golden}"
  if [ ! -x "$venv/bin/python" ]; then
    echo "creating $venv from $here/requirements.txt" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    "$venv/bin/pip" install -q -r "$here/requirements.txt"
  fi
  py="$venv/bin/python"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" TOKENIZERS_PARALLELISM=false

echo "== tiny models, PEFT goldens, tokenizer goldens" >&2
"$py" "$here/make_tiny_models.py"

if [ -z "${SKIP_SMOLLM2:-}" ]; then
  export LORA_TRAIN_SMOLLM2_GGUF="${LORA_TRAIN_SMOLLM2_GGUF:-$(bash scripts/fetch_smollm2.sh)}"
  echo "== SmolLM2 goldens ($LORA_TRAIN_SMOLLM2_GGUF)" >&2
  "$py" "$here/make_smollm2_golden.py" --gguf "$LORA_TRAIN_SMOLLM2_GGUF" ${NO_BENCH:+--no-bench}
fi

echo "== eval goldens" >&2
"$py" "$here/make_eval_golden.py"
"$py" "$here/make_grpo_golden.py"
"$py" "$here/make_preference_golden.py"
"$py" "$here/make_quant_golden.py"

echo "== PEFT reloads the golden adapters" >&2
for m in llama-tiny qwen2-tiny qwen3-tiny; do
  "$py" "$here/check_peft_load.py" "tests/golden/adapters/$m" "$m"
done
echo "== PEFT loads every candidate of a sweep and gets our eval loss" >&2
cargo build -q -p lora-train
sweep_dir="$(mktemp -d)"
python3 - "$sweep_dir/train.jsonl" <<'PY'
import json, sys
words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]
with open(sys.argv[1], "w") as f:
    for i in range(24):
        w = words[i % 6]
        f.write(json.dumps({"messages": [{"role": "user", "content": f"Say the code word number {i}."},
                                         {"role": "assistant", "content": f"The code word is {w} {w} {w}."}]}) + "\n")
PY
target/debug/lora-train sweep --model tests/golden/models/qwen2-tiny --dataset "$sweep_dir/train.jsonl" -o "$sweep_dir/sweep" \
  --steps 8 --lr 1e-3 --device cpu --candidate rank=4 --candidate rank=8,use_rslora=true --candidate rank=16,target_modules=q+v --json >/dev/null
"$py" "$here/check_peft_sweep.py" "$sweep_dir/sweep" --dataset "$sweep_dir/train.jsonl" --lora-train target/debug/lora-train \
  | tee tests/golden/peft_sweep_check.jsonl
rm -rf "$sweep_dir"
du -sh tests/golden/models/* tests/golden/adapters >&2
