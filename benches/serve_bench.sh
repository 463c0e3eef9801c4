#!/usr/bin/env bash
# Throughput and latency of `lora-train serve` at 1, 8 and 32 concurrent streamed chat
# requests (greedy, 64 new tokens) on SmolLM2-135M-Instruct (GGUF), the requests spread
# over the base model and three adapters (continuous batching with mixed adapters).
# Usage: bash benches/serve_bench.sh   (release build; loopback only)
# Env: BIN (default $CARGO_TARGET_DIR or target, release/lora-train), CONCURRENCY (1,8,32),
#      PER_CLIENT (requests each client sends, default 2), MAX_TOKENS (64),
#      SYSTEM_WORDS (a system message of N words shared by every request, default 0),
#      PREFIX_CACHE_MB (serve --prefix-cache-mb, default the server's: 1024; 0 = off),
#      BASE_QUANT (serve --base-quant; default the server's: auto = the GGUF's blocks kept;
#      none = dense weights).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release/lora-train}
GGUF=$(bash scripts/fetch_smollm2.sh)
WORK=$(mktemp -d)
trap 'kill "${PID:-0}" 2>/dev/null || true; rm -rf "$WORK"' EXIT
# Three adapters with random B (r=16 on every projection): a real LoRA's cost, without training.
python3 - "$WORK" <<'PY'
import json, os, struct, sys, random
# A PEFT adapter for SmolLM2-135M (30 layers, hidden 576, intermediate 1536, 9 heads x 64, 3 kv heads).
h, inter, layers, r = 576, 1536, 30, 16
shapes = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
          "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}
for k, name in enumerate("abc"):
    rng = random.Random(k)
    d = os.path.join(sys.argv[1], name)
    os.makedirs(d)
    tensors, offset, header = [], 0, {}
    for l in range(layers):
        for m, (out, inp) in shapes.items():
            block = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            for part, shape in (("lora_A", (r, inp)), ("lora_B", (out, r))):
                n = shape[0] * shape[1]
                data = struct.pack(f"<{n}f", *(rng.uniform(-0.02, 0.02) for _ in range(n)))
                key = f"base_model.model.model.layers.{l}.{block}.{m}.{part}.weight"
                header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
                tensors.append(data)
                offset += len(data)
    hb = json.dumps(header).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    with open(os.path.join(d, "adapter_model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb + b"".join(tensors))
    json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 32, "lora_dropout": 0.0,
               "target_modules": list(shapes), "bias": "none"}, open(os.path.join(d, "adapter_config.json"), "w"))
PY
"$BIN" serve --model "$GGUF" --adapter "a=$WORK/a" --adapter "b=$WORK/b" --adapter "c=$WORK/c" --port 0 --device cpu \
  ${PREFIX_CACHE_MB:+--prefix-cache-mb "$PREFIX_CACHE_MB"} ${BASE_QUANT:+--base-quant "$BASE_QUANT"} 2> "$WORK/serve.log" &
PID=$!
for _ in $(seq 100); do grep -q "listening on" "$WORK/serve.log" && break; sleep 0.2; done
URL=$(sed -n 's/.*listening on //p' "$WORK/serve.log" | head -1)
[ -n "$URL" ] || { cat "$WORK/serve.log" >&2; exit 1; }
echo "serve at $URL ($(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg))" >&2
python3 benches/serve_load.py "$URL" --models "$GGUF,a,b,c" --concurrency "${CONCURRENCY:-1,8,32}" \
  --requests-per-client "${PER_CLIENT:-2}" --max-tokens "${MAX_TOKENS:-64}" --system-words "${SYSTEM_WORDS:-0}"
