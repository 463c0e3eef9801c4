#!/usr/bin/env python3
"""Generate the DPO demo's preference pairs from the JSON-answer chat data: the preferred
answer is one line of JSON `{"answer": "<a sentence>", "topic": ...}` (the item and topic of
examples/json_answers.*.jsonl, the answer as the full sentence "The capital of Ghana is
Accra."), the non-preferred one says the answer in loose prose (what SmolLM2-135M-Instruct
writes on its own), so the pair teaches the format, not the facts.

Why a sentence and not the bare value of json_answers (`{"answer": "Accra", ...}`): with the
bare value, every DPO setting tried (README, "What was tried") made the 135M model answer
questions outside the data in JSON but lose facts it knows in prose (`{"answer": "JAPAN"}`
for the capital of Japan, "Hamlet" for the author of Romeo and Juliet): the model recalls
a fact through the sentence that leads to it. With the sentence inside the JSON it keeps
them (6 of 6 in the demo's check).

    python3 examples/make_json_preferences.py   # writes examples/json_preferences.{train,eval}.jsonl

Standard library only, deterministic (seeded); the outputs are committed. The training pairs
come from the first TRAIN_PAIRS chat samples of the train file (kept small so the demo's DPO
finishes in minutes on two cores), the eval pairs from the whole eval file (held-out items).
"""
import json
import os
import random
import re

import make_json_answers as items

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN_PAIRS = 96
PROSE = [
    "The answer is {answer}.",
    "Sure! It's {answer}.",
    "That would be {answer}, a question about {topic}.",
    "Good question. The answer is {answer}.",
]


def sentence(question, value, topic):
    """The full-sentence answer to `question` (an item of make_json_answers.py) whose value is `value`."""
    def item(pairs, matches):
        return next(a for a, b in pairs if b == value and matches(a))
    word = lambda a: re.search(r"\b%s\b" % re.escape(a), question)
    if topic == "geography":
        return f"The capital of {item(items.CAPITALS, lambda a: a in question)} is {value}."
    if topic == "vocabulary":
        return f"The opposite of {item(items.OPPOSITES, word)} is {value}."
    if topic == "grammar":
        return f"The plural of {item(items.PLURALS, word)} is {value}."
    if topic == "everyday":
        thing = item(items.COLORS, lambda a: a in question)
        return f"{thing[0].upper()}{thing[1:]} is {value}."
    if topic == "arithmetic":
        a, b = re.findall(r"\d+", question)[:2]
        return f"{a} plus {b} is {value}."
    raise ValueError(f"no sentence for topic {topic!r}")


def pairs(path, limit, rng):
    out = []
    with open(path) as f:
        for line in f:
            messages = json.loads(line)["messages"]
            answer = messages[-1]["content"]
            parsed = json.loads(answer)
            prose = rng.choice(PROSE).format(answer=parsed["answer"], topic=parsed["topic"])
            chosen = json.dumps({"answer": sentence(messages[-2]["content"], parsed["answer"], parsed["topic"]), "topic": parsed["topic"]})
            out.append({"prompt": messages[:-1], "chosen": [{"role": "assistant", "content": chosen}], "rejected": [{"role": "assistant", "content": prose}]})
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
