#!/usr/bin/env python3
"""Arithmetic word prompts with numeric ground truths for the GRPO demo.

    python3 examples/make_arithmetic_prompts.py   # writes examples/arithmetic.{train,eval}.jsonl

Each line is a prompts-only sample: {"messages": [{"role": "user", "content": ...}],
"ground_truth": "<number>"}; the `numeric` evaluator compares the last number of the answer
with it. Small additions and subtractions, so SmolLM2-135M gets some right before training
(GRPO needs groups with different rewards to learn anything). Deterministic (seeded).
"""
import json
import os
import random

TEMPLATES = [
    ("What is {a} + {b}?", lambda a, b: a + b),
    ("What is {a} - {b}?", lambda a, b: a - b),
    ("Tom has {a} apples and buys {b} more. How many apples does he have?", lambda a, b: a + b),
    ("A box holds {a} pens. {b} are taken out. How many pens are left?", lambda a, b: a - b),
]
SUFFIX = " Answer with the number only."


def make(rng: random.Random, n: int):
    out = []
    for _ in range(n):
        text, fn = rng.choice(TEMPLATES)
        a, b = rng.randint(2, 20), rng.randint(1, 9)
        if fn(a, b) < 0:
            a, b = b, a
        out.append({"messages": [{"role": "user", "content": text.format(a=a, b=b) + SUFFIX}], "ground_truth": str(fn(a, b))})
    return out


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    rng = random.Random(7)
    for name, n in (("train", 96), ("eval", 32)):
        with open(os.path.join(here, f"arithmetic.{name}.jsonl"), "w") as f:
            for s in make(rng, n):
                f.write(json.dumps(s) + "\n")


if __name__ == "__main__":
    main()
