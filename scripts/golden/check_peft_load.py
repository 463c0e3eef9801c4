#!/usr/bin/env python3
"""Check that PEFT loads an adapter directory (written by our Rust code) and reproduces the golden
LoRA logits.

    python scripts/golden/check_peft_load.py ADAPTER_DIR MODEL_NAME [--tol 1e-4] [--golden-dir tests/golden]

MODEL_NAME is one of llama-tiny, qwen2-tiny, qwen3-tiny. Loads tests/golden/models/MODEL_NAME
(f32, eager attention), applies ADAPTER_DIR with `peft.PeftModel.from_pretrained`, runs the
golden `input_ids` / `attention_mask` and compares with the golden `lora_logits` at the
unpadded positions (attention_mask == 1). Our Rust test saves the golden A/B back out through
its own PEFT writer, so the logits must match. Prints one JSON line with the max abs error and
the max relative error (max |a - b| / max |b|); exits 1 when the relative error is above --tol,
2 when the adapter cannot be loaded or does not match the model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402,F401

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from peft import PeftModel  # noqa: E402

torch.set_num_threads(1)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("adapter_dir")
    ap.add_argument("model_name")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--golden-dir", default=os.path.normpath(os.path.join(here, "..", "..", "tests", "golden")))
    args = ap.parse_args()

    model_dir = os.path.join(args.golden_dir, "models", args.model_name)
    golden_path = os.path.join(args.golden_dir, f"{args.model_name}.safetensors")
    for p in (model_dir, golden_path, os.path.join(args.adapter_dir, "adapter_config.json"),
              os.path.join(args.adapter_dir, "adapter_model.safetensors")):
        if not os.path.exists(p):
            print(f"error: missing {p}", file=sys.stderr)
            sys.exit(2)
    g = load_file(golden_path)
    ids, mask, want = g["input_ids"], g["attention_mask"], g["lora_logits"]

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    try:
        # Unexpected / missing adapter keys must fail loudly, not load silently as zeros.
        model = PeftModel.from_pretrained(base, args.adapter_dir).eval()
    except Exception as e:  # noqa: BLE001
        print(f"error: PeftModel.from_pretrained failed: {e}", file=sys.stderr)
        sys.exit(2)

    # Every adapter tensor must have been consumed: compare the file's keys with the model's LoRA params.
    saved = load_file(os.path.join(args.adapter_dir, "adapter_model.safetensors"))
    lora_params = {n.replace(".default.", "."): p for n, p in model.named_parameters()
                   if "lora_A" in n or "lora_B" in n}
    missing = sorted(set(lora_params) - set(saved))
    unexpected = sorted(set(saved) - set(lora_params))
    if missing or unexpected:
        print(f"error: adapter keys do not match the model: missing {missing[:5]} unexpected {unexpected[:5]}",
              file=sys.stderr)
        sys.exit(2)
    for k, v in saved.items():
        if tuple(v.shape) != tuple(lora_params[k].shape):
            print(f"error: {k} has shape {tuple(v.shape)}, model expects {tuple(lora_params[k].shape)}",
                  file=sys.stderr)
            sys.exit(2)

    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits.float()
    sel = mask.bool()
    a, b = got[sel], want[sel]
    abs_err = float((a - b).abs().max())
    rel_err = abs_err / float(b.abs().max())
    cfg = model.peft_config["default"]
    result = {
        "model": args.model_name,
        "adapter_dir": args.adapter_dir,
        "r": cfg.r, "lora_alpha": cfg.lora_alpha, "use_rslora": cfg.use_rslora,
        "target_modules": sorted(cfg.target_modules),
        "adapter_tensors": len(saved),
        "compared_positions": int(sel.sum()),
        "max_abs_err": abs_err,
        "max_rel_err": rel_err,
        "tol": args.tol,
        "ok": rel_err <= args.tol,
    }
    print(json.dumps(result))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
