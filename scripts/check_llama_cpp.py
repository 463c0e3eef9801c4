"""llama.cpp (llama-cpp-python) against `lora-train generate --json --logits` output.

Run by scripts/check_llama_cpp.sh, which exports the GGUF files and writes --ours (one
JSON object per prompt: prompt, prompt_ids, tokens, finish_reason, last_logits). For each
llama.cpp setup the same prompt ids are evaluated, the logits at the last prompt position
compared (max |diff| / max |ours|), and greedy tokens decoded as many as ours (plus the
end-of-sequence token when ours stopped on one). Prints one JSON object; exits 1 when a
setup that must match does not.
"""
import argparse
import json
import sys

import numpy as np
from llama_cpp import Llama

REL_TOL = 1e-3
GGML_TYPE_F32 = 0


def last_logits(llm):
    return np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)


def run_llama(model_path, lora_path, rows):
    # logits_all: llama-cpp-python 0.3.x fills `scores` only then. type_k/type_v = GGML_TYPE_F32:
    # llama.cpp's KV cache is f16 by default, which alone moves the logits by ~1e-3.
    llm = Llama(model_path=model_path, lora_path=lora_path, n_ctx=512, n_batch=512, n_threads=2, seed=0, verbose=False,
                logits_all=True, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    eos = llm.token_eos()
    out = []
    for row in rows:
        llm.reset()
        llm.eval(row["prompt_ids"])
        first = last_logits(llm)
        logits, tokens = first, []
        n = len(row["tokens"]) + (1 if row["finish_reason"] == "stop" else 0)
        for _ in range(n):
            t = int(np.argmax(logits))
            if t == eos:
                break
            tokens.append(t)
            llm.eval([t])
            logits = last_logits(llm)
        ours = np.array(row["last_logits"], dtype=np.float64)
        rel = float(np.max(np.abs(first - ours)) / np.max(np.abs(ours)))
        agree = next((i for i, (a, b) in enumerate(zip(tokens, row["tokens"])) if a != b), min(len(tokens), len(row["tokens"])))
        llama_ids = llm.tokenize(row["prompt"].encode(), add_bos=False, special=False)
        out.append({
            "prompt": row["prompt"],
            "tokens_equal": tokens == row["tokens"],
            "leading_tokens_agreeing": agree,
            "tokens_compared": len(row["tokens"]),
            "logits_rel_diff": rel,
            "llama_cpp_tokenizes_prompt_the_same": llama_ids == row["prompt_ids"],
        })
    del llm
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", required=True)
    ap.add_argument("--base", required=True, help="our f32 GGUF of the base")
    ap.add_argument("--lora", required=True, help="our GGUF LoRA")
    ap.add_argument("--merged", required=True, help="our merged f32 GGUF")
    ap.add_argument("--original", required=True, help="the Q4_1 GGUF the adapter was trained on")
    args = ap.parse_args()
    rows = [json.loads(line) for line in open(args.ours) if line.strip()]
    setups = {
        "f32 base + GGUF LoRA": (args.base, args.lora, True),
        "merged f32": (args.merged, None, True),
        "original Q4_1 + GGUF LoRA": (args.original, args.lora, False),
    }
    report, ok = {}, True
    for name, (model, lora, must_match) in setups.items():
        res = run_llama(model, lora, rows)
        passed = all(r["tokens_equal"] and r["logits_rel_diff"] <= REL_TOL for r in res)
        report[name] = {
            "must_match": must_match,
            "passed": passed,
            "greedy_tokens_agreeing": f'{sum(r["leading_tokens_agreeing"] for r in res)}/{sum(r["tokens_compared"] for r in res)}',
            "max_logits_rel_diff": max(r["logits_rel_diff"] for r in res),
            "prompts": res,
        }
        ok &= passed or not must_match
    import llama_cpp
    print(json.dumps({"llama_cpp_python": llama_cpp.__version__, "rel_tol": REL_TOL, "passed": ok, "setups": report}, indent=1))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
