#!/usr/bin/env python
"""Write a synthetic 100k-line chat JSONL (about 70 MB, ~138 SmolLM2 tokens a sample) for
timing `lora-train inspect`:

    python scripts/golden/datasets/make_inspect_bench.py /tmp/chat100k.jsonl
    /usr/bin/time target/release/lora-train inspect --dataset /tmp/chat100k.jsonl \
        --model ~/.cache/lora-train/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --json
"""
import json
import random
import sys

WORDS = (
    "the a model data train loss token rust candle llama qwen adapter answer question "
    "colour blue green red paris france capital"
).split()


def main(path, lines=100_000):
    random.seed(0)
    with open(path, "w") as f:
        for _ in range(lines):
            question = " ".join(random.choice(WORDS) for _ in range(random.randint(5, 60)))
            answer = " ".join(random.choice(WORDS) for _ in range(random.randint(5, 120)))
            messages = [
                {"role": "system", "content": "You are helpful."},
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/chat100k.jsonl")
