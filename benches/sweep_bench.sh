#!/usr/bin/env bash
# A packed sweep against the same candidates trained one `sft` at a time, on the real
# SmolLM2 GGUF: the default three candidates (r8 lr 1.5e-4, r16 lr 1e-4, r32 lr 5e-5),
# batch 4 x 256 (packed rows), 20 steps each, no evaluation (training only), f32, CPU.
# Prints wall times and peak RSS with the ratios, writes target/bench-results/sweep.json.
# Then the planner's memory model for a 1B Llama on one 80 GB GPU (dry run, packed and
# unpacked), which is what packing buys on a GPU.
#
#   bash benches/sweep_bench.sh [--steps 20]
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=20
while [ $# -gt 0 ]; do
  case "$1" in --steps) STEPS=$2; shift 2;; *) echo "unknown argument $1" >&2; exit 2;; esac
done
OUT=${OUT:-target/bench-results}
mkdir -p "$OUT"
GGUF=${LORA_TRAIN_SMOLLM2_GGUF:-$(bash scripts/fetch_smollm2.sh)}
cargo build --release -q -p lora-train
BIN=target/release/lora-train
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
COMMON=(--model "$GGUF" --dataset examples/json_answers.train.jsonl --eval-split 0 --packing
        --max-sequence-length 256 --batch-size 4 --steps "$STEPS" --device cpu --dtype f32)

# Wall time and peak RSS (ru_maxrss of the child) of one command, as JSON.
measure() {
  python3 - "$@" <<'PY'
import json, resource, subprocess, sys, time
t0 = time.time()
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(json.dumps({"wall_s": time.time() - t0, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
PY
}

echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) CPUs, load $(cut -d' ' -f1 /proc/loadavg)" >&2
for cand in "8 1.5e-4" "16 1e-4" "32 5e-5"; do
  set -- $cand
  echo "== sft rank $1 lr $2" >&2
  measure "$BIN" sft "${COMMON[@]}" --rank "$1" --learning-rate "$2" -o "$WORK/sft-r$1" > "$OUT/sweep_sft_r$1.json"
done
echo "== sweep (default candidates, packed)" >&2
measure "$BIN" sweep "${COMMON[@]}" --devices cpu -o "$WORK/sweep" > "$OUT/sweep_packed.json"
cp "$WORK/sweep/sweep.json" "$OUT/sweep_record.json"

# A 1B Llama (Llama-3.2-1B's shapes) on one simulated 80 GB GPU, bf16, batch 4 x 2048:
# the planner's memory model, six candidates packed vs one process each.
M1B="$WORK/llama-1b-shapes"
mkdir -p "$M1B"
cp tests/golden/models/llama-tiny/tokenizer*.json "$M1B/"
cat > "$M1B/config.json" <<'JSON'
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
 "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
 "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
 "tie_word_embeddings": true, "bos_token_id": 128000, "eos_token_id": 128001}
JSON
GPU=(--model "$M1B" --dataset examples/json_answers.train.jsonl --dtype bf16 --base-dtype bf16 --batch-size 4
     --max-sequence-length 2048 --packing --steps 100 --simulate-devices "cuda:0=80GiB" --dry-run --json
     --grid rank=8,16,32 --grid lr=1e-4,5e-5)
"$BIN" sweep "${GPU[@]}" -o "$WORK/gpu" 2>/dev/null > "$OUT/sweep_gpu_packed.json"
"$BIN" sweep "${GPU[@]}" --pack off -o "$WORK/gpu" 2>/dev/null > "$OUT/sweep_gpu_unpacked.json"

python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
gib = 2 ** 30
sft = [json.load(open(f"{out}/sweep_sft_r{r}.json")) for r in (8, 16, 32)]
packed = json.load(open(f"{out}/sweep_packed.json"))
rec = json.load(open(f"{out}/sweep_record.json"))
worker = max(c.get("group_peak_rss_bytes") or 0 for c in rec["candidates"])
parent = rec.get("parent_peak_rss_bytes") or 0
seq_wall = sum(r["wall_s"] for r in sft)
sum_peak = sum(r["peak_rss_bytes"] for r in sft)
sweep_peak = worker + parent
print("| run | wall s | peak RSS GiB |\n|---|---|---|")
for r, s in zip((8, 16, 32), sft):
    print(f"| sft r{r} | {s['wall_s']:.1f} | {s['peak_rss_bytes']/gib:.2f} |")
print(f"| three sft one after another | {seq_wall:.1f} | sum of peaks {sum_peak/gib:.2f} |")
print(f"| sweep, packed (worker + parent) | {packed['wall_s']:.1f} | {sweep_peak/gib:.2f} ({worker/gib:.2f} + {parent/gib:.2f}) |")
print(f"\nsweep wall / three sft: {packed['wall_s']/seq_wall:.2f}x (target <= 0.85x)")
print(f"sweep peak RSS / sum of three sft peaks: {sweep_peak/sum_peak:.2f}x (target <= 0.8x)")
print(f"sweep peak RSS / one sft (r32): {sweep_peak/sft[2]['peak_rss_bytes']:.2f}x")
print(f"statuses: {[c['status'] for c in rec['candidates']]}")
gp = json.load(open(f"{out}/sweep_gpu_packed.json"))
gu = json.load(open(f"{out}/sweep_gpu_unpacked.json"))
def groups(p): return [(g["candidates"], g["memory_bytes"] / gib) for g in p["plan"]["groups"]]
print("\n1B Llama shapes, bf16, batch 4 x 2048, one 80 GiB GPU (planner's memory model):")
print("packed:", [(len(c), f"{m:.1f} GiB") for c, m in groups(gp)])
print("unpacked:", f"{len(gu['plan']['groups'])} processes of", sorted({f'{m:.1f} GiB' for _, m in groups(gu)}))
per = [c["est_memory_bytes"] / gib for c in gu["candidates"]]
print(f"one candidate alone: {min(per):.1f}-{max(per):.1f} GiB; six packed: {groups(gp)[0][1]:.1f} GiB")
PY
