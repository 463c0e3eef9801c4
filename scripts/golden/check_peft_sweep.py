#!/usr/bin/env python3
"""Check that PEFT loads every completed candidate adapter of a `lora-train sweep` and computes
the same eval loss with it as `lora-train eval`.

    python scripts/golden/check_peft_sweep.py SWEEP_DIR --dataset FILE.jsonl --lora-train BIN [--tol 1e-5]

For each candidate of SWEEP_DIR/sweep.json with status `completed`: load its base model
(`config.model`) in transformers (f32, eager), apply the candidate directory with
`peft.PeftModel.from_pretrained`, and compute the mean loss per loss token over FILE with the
loss mask of peft_eval.py; run `BIN eval --model M --adapter DIR --dataset FILE --json`; compare.
Prints one JSON line per candidate and a summary line; exits 1 when a relative difference is
above --tol (or a candidate is missing), 2 when PEFT cannot load an adapter.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from peft_eval import CHATML, evaluate  # noqa: E402

import torch  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_dir")
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--lora-train", required=True, help="path of the lora-train binary")
    ap.add_argument("--tol", type=float, default=1e-5)
    args = ap.parse_args()
    torch.set_num_threads(2)
    from peft import PeftModel

    record = json.load(open(os.path.join(args.sweep_dir, "sweep.json")))
    done = [c for c in record["candidates"] if c["status"] == "completed"]
    if not done:
        print("error: no completed candidate", file=sys.stderr)
        sys.exit(1)
    worst, results = 0.0, []
    for c in done:
        base, tok, _ = common.load_model_and_tokenizer(c["config"]["model"], dtype=torch.float32, attn_implementation="eager")
        if tok.chat_template is None:
            tok.chat_template = CHATML
        try:
            model = PeftModel.from_pretrained(base, c["output"]).eval()
        except Exception as e:  # noqa: BLE001 - report which adapter PEFT refused
            print(json.dumps({"candidate": c["name"], "error": f"PEFT could not load {c['output']}: {e}"}))
            sys.exit(2)
        total, count, _, _ = evaluate(model, tok, args.dataset)
        peft_loss = total / count
        ours = json.loads(subprocess.run(
            [args.lora_train, "eval", "--model", c["config"]["model"], "--adapter", c["output"], "--dataset", args.dataset,
             "--device", "cpu", "--json"], check=True, capture_output=True, text=True).stdout)
        rel = abs(ours["eval_loss"] - peft_loss) / abs(peft_loss)
        worst = max(worst, rel)
        results.append({"candidate": c["name"], "peft_eval_loss": peft_loss, "lora_train_eval_loss": ours["eval_loss"],
                        "rel_err": rel, "loss_tokens": count})
        print(json.dumps(results[-1]))
    print(json.dumps({"candidates": len(results), "max_rel_err": worst, "tol": args.tol, "ok": worst <= args.tol}))
    sys.exit(0 if worst <= args.tol else 1)


if __name__ == "__main__":
    main()
