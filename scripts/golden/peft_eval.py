#!/usr/bin/env python3
"""Reference `eval`: mean loss per loss token of a (base + PEFT adapter) model over a chat JSONL.

    python scripts/golden/peft_eval.py --model DIR_OR_GGUF [--adapter DIR] --dataset FILE.jsonl
                                       [--max-sequence-length N] [--limit K]

Prints exactly one JSON object on stdout: {"eval_loss": .., "perplexity": .., "loss_tokens": ..}
(details go to stderr). This is the number `lora-train eval --json` must reproduce.

Loss mask (ARCHITECTURE.md, common.chat_loss_mask): each sample's `messages` are rendered
with the model's chat template (apply_chat_template, add_generation_prompt=False; a message's
`weight` key is dropped before rendering) and tokenized once without adding special tokens.
A token is a loss token when its first character lies inside the content of an assistant
message without `"weight": 0`, or when it is the end-of-turn token (`<|im_end|>` / eos)
directly after such a content. With --max-sequence-length N the token sequence is cut to
its first N tokens before the loss. Token i (i >= 1) that is a loss token contributes
-log p(ids[i] | ids[:i]); eval_loss = (sum over all samples) / (number of loss tokens);
perplexity = exp(eval_loss). Samples are run one at a time (no padding), f32, CPU.
A `.gguf` model is loaded through transformers (dequantized to f32) with the original
pre-tokenizer restored for `smollm` files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import torch  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model directory or .gguf file")
    ap.add_argument("--adapter", help="PEFT adapter directory (omit for the base model)")
    ap.add_argument("--dataset", required=True, help="chat JSONL: {\"messages\": [...]} per line")
    ap.add_argument("--max-sequence-length", type=int, default=None)
    ap.add_argument("--limit", type=int, default=None, help="only the first K samples")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, tok, info = common.load_model_and_tokenizer(args.model, dtype=torch.float32, attn_implementation="eager")
    if tok.chat_template is None:
        tok.chat_template = CHATML
        print("note: the model has no chat template; using ChatML", file=sys.stderr)
    if args.adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, args.adapter).eval()

    total, count, samples, skipped = evaluate(model, tok, args.dataset, args.max_sequence_length, args.limit)
    if count == 0:
        print("error: no loss tokens in the dataset", file=sys.stderr)
        sys.exit(1)
    loss = total / count
    print(json.dumps({"samples": samples, "skipped": skipped, "model": args.model, "adapter": args.adapter,
                      "max_sequence_length": args.max_sequence_length, **{k: v for k, v in info.items()
                                                                          if k != "model_ref"}}), file=sys.stderr)
    print(json.dumps({"eval_loss": loss, "perplexity": math.exp(loss), "loss_tokens": count}))


def evaluate(model, tok, dataset, max_sequence_length=None, limit=None):
    """Returns (sum of loss-token NLL, loss tokens, samples used, samples skipped)."""
    total, count, samples, skipped = 0.0, 0, 0, 0
    with open(dataset) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and samples + skipped >= limit:
                break
            obj = json.loads(line)
            messages = obj.get("messages")
            if not isinstance(messages, list):
                print(f"{dataset}:{lineno}: no messages list; skipped", file=sys.stderr)
                skipped += 1
                continue
            _text, ids, _offsets, mask = common.chat_loss_mask(tok, messages, max_sequence_length)
            n = sum(mask[1:])
            if n == 0:
                skipped += 1
                continue
            x = torch.tensor([ids])
            with torch.no_grad():
                logits = model(input_ids=x).logits[0, :-1].float()
            lp = torch.log_softmax(logits, dim=-1)
            nll = -lp.gather(-1, x[0, 1:].unsqueeze(-1)).squeeze(-1)
            m = torch.tensor(mask[1:], dtype=torch.float64)
            total += float((nll.double() * m).sum())
            count += int(n)
            samples += 1
    return total, count, samples, skipped


CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


if __name__ == "__main__":
    main()
