#!/usr/bin/env python3
"""Generate the demo dataset: short questions whose answers are ONE line of JSON,
`{"answer": ..., "topic": ...}` - a fixed answer format SmolLM2-135M-Instruct does not use
on its own (it answers in prose).

    python3 examples/make_json_answers.py   # writes examples/json_answers.{train,eval}.jsonl

Standard library only, deterministic (seeded); the outputs are committed, so the demo does
not need to run this. Eval items (held-out countries, words, sums) never appear in train.
"""
import json
import os
import random

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"), ("Russia", "Moscow"), ("Canada", "Ottawa"),
    ("Mexico", "Mexico City"), ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"), ("Chile", "Santiago"),
    ("Peru", "Lima"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Nigeria", "Abuja"), ("Ghana", "Accra"),
    ("Morocco", "Rabat"), ("Greece", "Athens"), ("Turkey", "Ankara"), ("Poland", "Warsaw"), ("Austria", "Vienna"),
    ("Hungary", "Budapest"), ("Sweden", "Stockholm"), ("Norway", "Oslo"), ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"), ("Ireland", "Dublin"), ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"),
    ("Switzerland", "Bern"), ("Czechia", "Prague"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
    ("South Korea", "Seoul"), ("Indonesia", "Jakarta"), ("Australia", "Canberra"), ("New Zealand", "Wellington"),
    ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Saudi Arabia", "Riyadh"), ("Pakistan", "Islamabad"),
    ("Bangladesh", "Dhaka"), ("Philippines", "Manila"), ("Colombia", "Bogota"), ("Venezuela", "Caracas"),
    ("Cuba", "Havana"), ("Ukraine", "Kyiv"), ("Romania", "Bucharest"), ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"),
    ("Croatia", "Zagreb"), ("Ethiopia", "Addis Ababa"), ("Tanzania", "Dodoma"), ("Iceland", "Reykjavik"),
    ("Malaysia", "Kuala Lumpur"), ("Singapore", "Singapore"), ("United Kingdom", "London"),
]
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"), ("up", "down"),
    ("open", "closed"), ("early", "late"), ("full", "empty"), ("hard", "soft"), ("high", "low"), ("young", "old"),
    ("rich", "poor"), ("strong", "weak"), ("wet", "dry"), ("loud", "quiet"), ("thick", "thin"), ("long", "short"),
    ("clean", "dirty"), ("day", "night"), ("win", "lose"), ("buy", "sell"), ("push", "pull"), ("true", "false"),
    ("inside", "outside"), ("begin", "end"), ("heavy", "light"), ("near", "far"), ("left", "right"),
    ("cheap", "expensive"), ("safe", "dangerous"), ("sweet", "sour"), ("friend", "enemy"), ("first", "last"),
    ("question", "answer"), ("north", "south"), ("east", "west"), ("love", "hate"), ("arrive", "leave"),
    ("remember", "forget"),
]
PLURALS = [
    ("cat", "cats"), ("box", "boxes"), ("child", "children"), ("mouse", "mice"), ("tooth", "teeth"),
    ("foot", "feet"), ("city", "cities"), ("knife", "knives"), ("leaf", "leaves"), ("man", "men"),
    ("woman", "women"), ("person", "people"), ("goose", "geese"), ("baby", "babies"), ("bus", "buses"),
    ("tomato", "tomatoes"), ("potato", "potatoes"), ("wolf", "wolves"), ("sheep", "sheep"), ("fish", "fish"),
    ("church", "churches"), ("party", "parties"), ("story", "stories"), ("glass", "glasses"), ("wife", "wives"),
    ("ox", "oxen"), ("cactus", "cacti"), ("dish", "dishes"), ("key", "keys"), ("toy", "toys"),
]
COLORS = [
    ("a banana", "yellow"), ("grass", "green"), ("the sky on a clear day", "blue"), ("snow", "white"),
    ("coal", "black"), ("a ripe tomato", "red"), ("an orange", "orange"), ("a lemon", "yellow"),
    ("a carrot", "orange"), ("milk", "white"), ("a strawberry", "red"), ("a lime", "green"),
    ("an eggplant", "purple"), ("chocolate", "brown"), ("a flamingo", "pink"), ("the sun in a drawing", "yellow"),
    ("a fire truck", "red"), ("a polar bear", "white"), ("a crow", "black"), ("a frog", "green"),
]

CAPITAL_Q = ["What is the capital of {x}?", "Which city is the capital of {x}?", "Name the capital city of {x}.",
             "Tell me the capital of {x}.", "{x}: what is its capital?"]
OPPOSITE_Q = ["What is the opposite of \"{x}\"?", "Give me the antonym of {x}.", "What word means the opposite of {x}?",
              "Opposite of {x}?"]
PLURAL_Q = ["What is the plural of \"{x}\"?", "How do you say more than one {x}?", "Plural form of {x}?",
            "Give the plural of the word {x}."]
COLOR_Q = ["What color is {x}?", "What colour is {x} usually?", "Tell me the color of {x}."]
SUM_Q = ["What is {a} plus {b}?", "Add {a} and {b}.", "How much is {a} + {b}?", "Compute the sum of {a} and {b}."]


def answer(value, topic):
    return json.dumps({"answer": value, "topic": topic})


def sample(question, value, topic):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer(value, topic)}]}


def build(rng, items, questions, topic, per_item, key=lambda it: it[0], value=lambda it: it[1]):
    out = []
    for it in items:
        for q in rng.sample(questions, min(per_item, len(questions))):
            out.append(sample(q.format(x=key(it)), value(it), topic))
    return out


def main():
    rng = random.Random(20241122)
    here = os.path.dirname(os.path.abspath(__file__))
    held = lambda items, k: (items[:-k], items[-k:])
    cap_tr, cap_ev = held(CAPITALS, 8)
    opp_tr, opp_ev = held(OPPOSITES, 6)
    plu_tr, plu_ev = held(PLURALS, 5)
    col_tr, col_ev = held(COLORS, 3)
    sums = [(a, b) for a in range(1, 21) for b in range(1, 21)]
    rng.shuffle(sums)
    sum_tr, sum_ev = sums[:60], sums[60:70]

    def sum_samples(pairs, per):
        out = []
        for a, b in pairs:
            for q in rng.sample(SUM_Q, per):
                out.append(sample(q.format(a=a, b=b), a + b, "arithmetic"))
        return out

    train = (build(rng, cap_tr, CAPITAL_Q, "geography", 2) + build(rng, opp_tr, OPPOSITE_Q, "vocabulary", 2)
             + build(rng, plu_tr, PLURAL_Q, "grammar", 2) + build(rng, col_tr, COLOR_Q, "everyday", 2)
             + sum_samples(sum_tr, 1))
    evals = (build(rng, cap_ev, CAPITAL_Q, "geography", 1) + build(rng, opp_ev, OPPOSITE_Q, "vocabulary", 1)
             + build(rng, plu_ev, PLURAL_Q, "grammar", 1) + build(rng, col_ev, COLOR_Q, "everyday", 1)
             + sum_samples(sum_ev, 1))
    rng.shuffle(train)
    rng.shuffle(evals)
    for name, rows in (("json_answers.train.jsonl", train), ("json_answers.eval.jsonl", evals)):
        with open(os.path.join(here, name), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(f"{name}: {len(rows)} samples")


if __name__ == "__main__":
    main()
