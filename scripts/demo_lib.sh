# Shared by the demos (sourced from the repository root): fetch the SmolLM2 GGUF, build
# lora-train in release (or take LORA_TRAIN_BIN), and print greedy answers to `questions`.
# Sets: gguf, bin, t_built.

echo "== 1. fetch SmolLM2-135M-Instruct (GGUF, cached)" >&2
gguf="$(bash scripts/fetch_smollm2.sh)"
echo "   $gguf" >&2

echo "== 2. build (release)" >&2
if [ -n "${LORA_TRAIN_BIN:-}" ]; then
  bin="$LORA_TRAIN_BIN"
else
  cargo build --release -p lora-train
  # Where cargo put it: $CARGO_TARGET_DIR when set (a shared build cache), else ./target.
  bin="${CARGO_TARGET_DIR:-target}/release/lora-train"
fi
t_built=$(date +%s)

show_generations() { # $1 = label, rest = extra args for generate; asks every entry of `questions`
  local label="$1"; shift
  local chat_args=()
  for q in "${questions[@]}"; do chat_args+=(--chat "$q"); done
  "$bin" generate --model "$gguf" "$@" "${chat_args[@]}" --max-new-tokens 40 --device cpu --json 2>/dev/null |
    python3 -c '
import json, sys
label, qs = sys.argv[1], sys.argv[2:]
for q, o in zip(qs, json.load(sys.stdin)["outputs"]):
    print("  [%s] Q: %s\n  [%s] A: %s" % (label, q, label, o["text"].strip()))
' "$label" "${questions[@]}"
}
