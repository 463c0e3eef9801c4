#!/usr/bin/env python3
"""transformers `generate` throughput: the reference for our decoding tokens/s.

    python benches/torch/generate_bench.py --model DIR_OR_GGUF [--prompt TEXT]... [--prompts-file F]
        [--chat] [--max-new-tokens 64] [--dtype f32|bf16] [--threads N] [--repeats 3] [--attn sdpa]
    python benches/torch/generate_bench.py --model GGUF --prompts-jsonl F --num-return-sequences 8
        [--temperature 1.0] [--max-new-tokens 128] [--dump-ids IDS.json]

Greedy decoding (do_sample=False), KV cache on, batch 1, each prompt in turn; every run is
forced to exactly --max-new-tokens new tokens (min_new_tokens = max_new_tokens) so that runs
compare equal work. --chat wraps each prompt as one user message with the model's chat
template and the generation prompt. Time per prompt includes its prefill. Each prompt is run
--repeats times after one short warm-up; the best time counts. Prints ONE JSON line:
tokens_per_s = (new tokens over all prompts) / (sum of best times), per-prompt details,
torch_threads and the machine. Default prompt: "What is the capital of France?" with --chat.

--num-return-sequences G (the rollout benchmark, the reference of our `Model::rollouts`):
all prompts in ONE left-padded batch, `generate(do_sample=True, temperature, top_k=0,
top_p=1.0, num_return_sequences=G)` (pure sampling, as our rollouts with top-k/top-p off;
top_k=0 overrides the generation config's default of 50), again forced to exactly
--max-new-tokens per row; tokens_per_s = prompts x G x max_new_tokens / best time.
--prompts-jsonl reads a prompts file ({"messages": [...]} per line, rendered with the chat
template and the generation prompt); --dump-ids writes the rendered prompts' token ids
(a JSON list of lists) so that benches/src/bin/rollout_bench.rs decodes from the same ids.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.normpath(os.path.join(HERE, "..", "..", "scripts", "golden")))
import common  # noqa: E402  (env defaults, GGUF loading with the restored pre-tokenizer)

import torch  # noqa: E402


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt", action="append", default=[])
    ap.add_argument("--prompts-file", help="one prompt per line")
    ap.add_argument("--chat", action="store_true", help="render each prompt as a user message with the chat template")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--prompts-jsonl", help='prompts file: {"messages": [...]} per line, rendered with the chat template')
    ap.add_argument("--num-return-sequences", type=int, default=1,
                    help="> 1: sampled completions per prompt, all prompts in one batch (the rollout benchmark)")
    ap.add_argument("--temperature", type=float, default=1.0, help="with --num-return-sequences > 1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dump-ids", help="write the rendered prompts' token ids (JSON list of lists) here")
    args = ap.parse_args()
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += [l.rstrip("\n") for l in open(args.prompts_file) if l.strip()]
    conversations = []
    if args.prompts_jsonl:
        conversations = [json.loads(l)["messages"] for l in open(args.prompts_jsonl) if l.strip()]
    if not prompts and not conversations:
        prompts = ["What is the capital of France?"]
        args.chat = True

    torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.dtype == "f32" else torch.bfloat16
    model, tok, _info = common.load_model_and_tokenizer(args.model, dtype=dtype, attn_implementation=args.attn)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    n = args.max_new_tokens
    render = lambda text: (tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                    add_generation_prompt=True) if args.chat else text)
    rendered = [render(t) for t in prompts] + [
        tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in conversations]
    prompt_ids = [tok(r, add_special_tokens=False)["input_ids"] for r in rendered]
    if args.dump_ids:
        with open(args.dump_ids, "w") as f:
            json.dump(prompt_ids, f)
    if args.num_return_sequences > 1:
        return sampled_batch(args, model, tok, pad, prompts + [m[-1]["content"] for m in conversations], prompt_ids)
    per_prompt = []
    with torch.no_grad():
        for text, one in zip(prompts + [m[-1]["content"] for m in conversations], prompt_ids):
            ids = torch.tensor([one])
            am = torch.ones_like(ids)
            model.generate(ids, attention_mask=am, do_sample=False, max_new_tokens=2, pad_token_id=pad)  # warm-up
            times = []
            out = None
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                out = model.generate(ids, attention_mask=am, do_sample=False, max_new_tokens=n,
                                     min_new_tokens=n, pad_token_id=pad)
                times.append(time.perf_counter() - t0)
            new = out[0, ids.shape[1]:].tolist()
            assert len(new) == n
            per_prompt.append({
                "prompt": text, "prompt_tokens": int(ids.shape[1]), "new_tokens": n,
                "seconds_each": [round(t, 4) for t in times], "best_s": round(min(times), 4),
                "tokens_per_s": round(n / min(times), 2),
                "completion": tok.decode(new, skip_special_tokens=True),
            })
    total_s = sum(p["best_s"] for p in per_prompt)
    print(json.dumps({
        "bench": "transformers generate (greedy, batch 1, KV cache)",
        "model": args.model, "dtype": args.dtype, "attn_implementation": args.attn, "chat": args.chat,
        "max_new_tokens": n, "repeats": args.repeats,
        "tokens_per_s": round(n * len(per_prompt) / total_s, 2),
        "per_prompt": per_prompt,
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "cpu": cpu_name(), "logical_cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
    }, ensure_ascii=False))


def sampled_batch(args, model, tok, pad, texts, prompt_ids):
    """G sampled completions of every prompt, all prompts in one left-padded batch."""
    n, g = args.max_new_tokens, args.num_return_sequences
    longest = max(len(p) for p in prompt_ids)
    ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompt_ids])
    am = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompt_ids])
    kw = dict(attention_mask=am, do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0,
              num_return_sequences=g, pad_token_id=pad)
    times, out = [], None
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, **kw)  # warm-up
        for r in range(args.repeats):
            torch.manual_seed(args.seed + r)
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
            times.append(time.perf_counter() - t0)
    assert out.shape == (len(prompt_ids) * g, longest + n), out.shape
    best = min(times)
    tokens = len(prompt_ids) * g * n
    print(json.dumps({
        "bench": f"transformers generate (sampling, {len(prompt_ids)} prompts in one batch, num_return_sequences={g}, KV cache)",
        "model": args.model, "dtype": args.dtype, "attn_implementation": args.attn,
        "prompts": len(prompt_ids), "group": g, "prompt_tokens": [len(p) for p in prompt_ids],
        "max_new_tokens": n, "temperature": args.temperature, "repeats": args.repeats, "new_tokens": tokens,
        "seconds_each": [round(t, 4) for t in times], "best_s": round(best, 4),
        "tokens_per_s": round(tokens / best, 2),
        "sample_completion": tok.decode(out[0, longest:].tolist(), skip_special_tokens=True),
        "prompts_text": texts,
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "cpu": cpu_name(), "logical_cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
    }, ensure_ascii=False))


if __name__ == "__main__":
    main()
