#!/usr/bin/env python3
"""Generate the DPO demo's preference pairs from the JSON-answer chat data: the preferred
answer is the one line of JSON `{"answer": ..., "topic": ...}` of
examples/json_answers.*.jsonl, the non-preferred one says the same thing in prose (what
SmolLM2-135M-Instruct writes on its own), so the pair teaches the format, not the facts.

    python3 examples/make_json_preferences.py   # writes examples/json_preferences.{train,eval}.jsonl

Standard library only, deterministic (seeded); the outputs are committed. The training pairs
come from the first TRAIN_PAIRS chat samples of the train file (kept small so the demo's DPO
finishes in minutes on two cores), the eval pairs from the whole eval file (held-out items).
"""
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN_PAIRS = 96
PROSE = [
    "The answer is {answer}.",
    "Sure! It's {answer}.",
    "That would be {answer}, a question about {topic}.",
    "Good question. The answer is {answer}.",
]


def pairs(path, limit, rng):
    out = []
    with open(path) as f:
        for line in f:
            messages = json.loads(line)["messages"]
            answer = messages[-1]["content"]
            parsed = json.loads(answer)
            prose = rng.choice(PROSE).format(answer=parsed["answer"], topic=parsed["topic"])
            out.append({"prompt": messages[:-1], "chosen": [messages[-1]], "rejected": [{"role": "assistant", "content": prose}]})
            if len(out) == limit:
                break
    return out


def main():
    rng = random.Random(7)
    for split, limit in (("train", TRAIN_PAIRS), ("eval", None)):
        rows = pairs(os.path.join(HERE, f"json_answers.{split}.jsonl"), limit, rng)
        with open(os.path.join(HERE, f"json_preferences.{split}.jsonl"), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(f"json_preferences.{split}.jsonl: {len(rows)} pairs")


if __name__ == "__main__":
    main()
