#!/usr/bin/env python3
"""Generate the classification demo: short customer-support messages labelled with one
of four intents (billing, bug, account, feature_request), as chat lines whose final
assistant message is the label, for `lora-train run classify`.

    python3 examples/make_ticket_labels.py   # writes examples/ticket_labels.jsonl

Standard library only, deterministic (seeded); the output is committed, so the demo does
not need to run this. `run classify` holds out 20% (stratified) for its benchmark.
"""
import json
import os
import random

SYSTEM = ("Classify the customer message into exactly one intent: billing, bug, account or "
          "feature_request. Answer with the intent only.")

PARTS = {
    "billing": (
        ["I was charged {n} times for", "Why did you bill me for", "I need a refund for", "My invoice shows the wrong amount for",
         "Can you explain the charge for", "The card payment failed for", "Please cancel the renewal of"],
        ["my {plan} plan", "last month's subscription", "the {plan} upgrade", "order #{num}", "the annual license", "two seats I never used"],
    ),
    "bug": (
        ["The app crashes when I open", "I get an error 500 on", "Nothing happens when I click", "The page freezes while loading",
         "Since the update, I cannot use", "The export button breaks", "Images do not load in"],
        ["the dashboard", "the settings page", "the {plan} reports", "the mobile app", "the search results", "the calendar view"],
    ),
    "account": (
        ["I forgot the password for", "How do I change the email of", "Please delete", "I am locked out of", "Can I transfer",
         "Two-factor login stopped working for", "How do I rename"],
        ["my account", "my team's workspace", "the admin user", "my profile", "the account of a colleague who left", "my {plan} login"],
    ),
    "feature_request": (
        ["It would be great to have", "Could you add", "Please consider supporting", "I would love an option for", "Are you planning",
         "We really need", "Any chance of getting"],
        ["dark mode", "an export to CSV", "keyboard shortcuts", "a Linux desktop app", "recurring reminders", "more chart types in {plan}"],
    ),
}
OPENERS = ["", "Hi, ", "Hello team, ", "Urgent: ", "Quick question: ", "Hey, "]
CLOSERS = ["", " Thanks.", " Please help.", " Thank you!", " Regards, Sam.", " Any update?"]
PLANS = ["Pro", "Basic", "Team", "Enterprise", "Starter"]


def message(rng, intent):
    heads, tails = PARTS[intent]
    text = rng.choice(OPENERS) + rng.choice(heads) + " " + rng.choice(tails) + "." + rng.choice(CLOSERS)
    return text.format(n=rng.choice(["two", "three", "several"]), plan=rng.choice(PLANS), num=rng.randint(1000, 9999))


def main():
    rng = random.Random(13)
    # Unequal classes on purpose (imbalance ratio 2.0), well under the default threshold.
    counts = {"billing": 100, "bug": 90, "account": 70, "feature_request": 50}
    rows = []
    for intent, n in counts.items():
        seen = set()
        while len([r for r in rows if r[1] == intent]) < n:
            text = message(rng, intent)
            if text in seen:
                continue
            seen.add(text)
            rows.append((text, intent))
    rng.shuffle(rows)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ticket_labels.jsonl")
    with open(path, "w") as f:
        for text, intent in rows:
            line = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text},
                                 {"role": "assistant", "content": intent}]}
            f.write(json.dumps(line) + "\n")
    print(f"{path}: {len(rows)} lines")


if __name__ == "__main__":
    main()
