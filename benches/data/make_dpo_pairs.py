"""Synthetic DPO pairs for the benchmarks (benches/dpo_bench.sh, benches/memory/trl_memory.sh):
ROWS lines of {"prompt", "chosen", "rejected"} message lists, random words of a fixed
vocabulary, so every run and both sides (ours, TRL) read the same text.

    python benches/data/make_dpo_pairs.py OUT --seed 7 --rows 32 --words 28 170 165 [--long-vocab]
"""
import argparse
import json
import random

SHORT = ("the model learns from pairs of answers where one is preferred over another and the "
         "gradient moves probability toward the chosen text while the reference keeps it close")
LONG = SHORT + (" to where it started so that fluent language survives small data sets with clear signal "
                "about format tone length and facts in every domain users care about")

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--seed", type=int, required=True)
ap.add_argument("--rows", type=int, required=True)
ap.add_argument("--words", type=int, nargs=3, required=True, metavar=("PROMPT", "CHOSEN", "REJECTED"))
ap.add_argument("--long-vocab", action="store_true")
args = ap.parse_args()
words = (LONG if args.long_vocab else SHORT).split()
rng = random.Random(args.seed)
text = lambda n: " ".join(rng.choice(words) for _ in range(n)).capitalize() + "."
prompt, chosen, rejected = args.words
with open(args.out, "w") as f:
    for i in range(args.rows):
        f.write(json.dumps({"prompt": [{"role": "user", "content": f"Question {i}: " + text(prompt)}],
                            "chosen": [{"role": "assistant", "content": text(chosen)}],
                            "rejected": [{"role": "assistant", "content": text(rejected)}]}) + "\n")
