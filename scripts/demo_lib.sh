# Shared by the demos (sourced from the repository root): fetch the SmolLM2 GGUF, build
# lora-train in release (or take LORA_TRAIN_BIN), and print greedy answers to `questions`.
# Sets: gguf, bin, t_built.

echo "== 1. fetch SmolLM2-135M-Instruct (GGUF, cached)" >&2
gguf="$(bash scripts/fetch_smollm2.sh)"
echo "   $gguf" >&2

if [ -n "${LORA_TRAIN_BIN:-}" ]; then
  bin="$LORA_TRAIN_BIN"
  echo "== 2. build: skipped, LORA_TRAIN_BIN=$bin" >&2
else
  echo "== 2. build (release)" >&2
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

compare_answers() { # $1 = adapter dir; asks every entry of `checks` ("question|regex")
  # greedily with and without the adapter, and prints both answers and whether the adapter
  # kept what the base got right (the regex: what a right answer contains).
  local adapter="$1" chat_args=()
  for c in "${checks[@]}"; do chat_args+=(--chat "${c%%|*}"); done
  "$bin" generate --model "$gguf" "${chat_args[@]}" --max-new-tokens 40 --device cpu --json 2>/dev/null >"$adapter/answers_base.json"
  "$bin" generate --model "$gguf" --adapter "$adapter" "${chat_args[@]}" --max-new-tokens 40 --device cpu --json 2>/dev/null >"$adapter/answers_adapter.json"
  python3 - "$adapter/answers_base.json" "$adapter/answers_adapter.json" "${checks[@]}" <<'PY'
import json, re, sys
base, tuned = (json.load(open(p))["outputs"] for p in sys.argv[1:3])
kept = lost = gained = 0
for check, b, t in zip(sys.argv[3:], base, tuned):
    q, want = check.split("|", 1)
    b_ok, t_ok = (bool(re.search(want, o["text"], re.I)) for o in (b, t))
    verdict = {(True, True): "kept", (True, False): "LOST", (False, True): "fixed", (False, False): "wrong before and after"}[(b_ok, t_ok)]
    kept, lost, gained = kept + (b_ok and t_ok), lost + (b_ok and not t_ok), gained + (t_ok and not b_ok)
    print("  Q: %s   (right answer: /%s/)\n    base:    %s\n    adapter: %s\n    -> %s" % (q, want, b["text"].strip().replace("\n", " "), t["text"].strip().replace("\n", " "), verdict))
print("  answers the base got right that the adapter kept: %d of %d (fixed %d)" % (kept, kept + lost, gained))
PY
}

print_story() { # $1 = run dir: the report's path and its one-line story (the method's own metric)
  echo "report: $1/report.md"
  echo "story:  $(sed -n 's/^> //p' "$1/report.md" | head -1)"
}
