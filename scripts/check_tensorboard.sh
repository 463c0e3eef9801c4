#!/usr/bin/env bash
# `--report-to tensorboard` read back by TensorBoard's own reader (EventAccumulator, the
# `tensorboard` package pinned in scripts/golden/requirements.txt): an `sft`, a `dpo` and a
# `grpo` run on the tiny test model, then every number of every metrics.jsonl row must be in
# the event file at its step under transformers' / TRL's tag, and the configuration
# must be there as text; a run killed (SIGKILL) and resumed shows each step once. Not in
# CI (it needs the Python venv); the Rust test trainer/tests/all/report_to_e2e.rs checks
# the same records with our own reader.
#   bash scripts/check_tensorboard.sh        (PYTHON=..., LORA_TRAIN_BIN=... to override)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$HOME/.venvs/golden/bin/python}"
"$PY" -c "import tensorboard" 2>/dev/null || { echo "check_tensorboard: $PY cannot import tensorboard (pip install -r scripts/golden/requirements.txt)" >&2; exit 2; }
BIN="${LORA_TRAIN_BIN:-${CARGO_TARGET_DIR:-target}/debug/lora-train}"
if [[ ! -x "$BIN" ]]; then
  cargo build -p lora-train --bin lora-train
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$PY" scripts/check_tensorboard.py --write-data "$tmp"
export LORA_TRAIN_HOME="$tmp/home" LORA_TRAIN_LOG=warn
model=tests/golden/models/llama-tiny
"$BIN" sft --model "$model" --dataset "$tmp/train.jsonl" -o "$tmp/sft" --device cpu --steps 8 --eval-interval 2 --report-to tensorboard --json >/dev/null
"$BIN" dpo --model "$model" --dataset "$tmp/pairs.jsonl" -o "$tmp/dpo" --device cpu --steps 4 --eval-interval 2 --report-to tensorboard --json >/dev/null
"$BIN" grpo --model "$model" --dataset "$tmp/prompts.jsonl" -o "$tmp/grpo" --device cpu --steps 3 --evaluator numeric --evaluator length:1-5 \
  --num-generations 4 --prompts-per-step 2 --max-completion-length 6 --report-to tensorboard --json >/dev/null
# Killed with SIGKILL between checkpoints, then resumed: the steps after the checkpoint are
# written twice, and TensorBoard must keep only the resumed run's (elapsed_s differs).
resumed=(sft --model "$model" --dataset "$tmp/train.jsonl" -o "$tmp/resumed" --device cpu --steps 1500 --checkpoint-interval 100 --eval-interval 50 --report-to tensorboard)
"$BIN" "${resumed[@]}" >/dev/null 2>&1 &
pid=$!
while (( $(cat "$tmp/resumed/metrics.jsonl" 2>/dev/null | wc -l) < 250 )); do
  kill -0 "$pid" 2>/dev/null || { echo "check_tensorboard: the run to kill ended first" >&2; exit 1; }
  sleep 0.1
done
kill -9 "$pid"
wait "$pid" 2>/dev/null || true
"$BIN" "${resumed[@]}" --resume >/dev/null
"$PY" scripts/check_tensorboard.py "$tmp/sft" "$tmp/dpo" "$tmp/grpo" "$tmp/resumed"
