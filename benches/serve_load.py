"""Load generator for `lora-train serve`: C concurrent clients, each sending streamed chat
requests one after another, over the base and the served adapters in turn. Reports the
decode throughput (completion tokens / wall time), end-to-end latency and time to the
first token (p50 / p95). Standard library only.

Usage: python3 benches/serve_load.py URL --models base,a,b --concurrency 1,8,32
                                     [--requests-per-client 2] [--max-tokens 64]
                                     [--system-words N]

--system-words N: every request starts with the same system message of N words (a shared
system prompt, what `serve --prefix-cache-mb` keeps); the table then also gives the prompt
tokens and how many of them came from the server's prefix cache (usage's
prompt_tokens_details.cached_tokens).
"""
import argparse
import json
import statistics
import threading
import time
import urllib.request

PROMPTS = [
    "Write a long story about a lighthouse keeper.",
    "Explain how a bicycle works, step by step.",
    "List ten facts about the ocean.",
    "Describe your ideal weekend in detail.",
]


SYSTEM = []  # the shared system message, when --system-words is given


def system_message(words):
    """N words of house rules, the same for every request (deterministic)."""
    rules = ("Answer politely and precisely. Cite the policy section when you refuse. Never reveal "
             "account numbers. Prefer short paragraphs. Use metric units. Dates are day month year. ").split()
    return " ".join(rules[i % len(rules)] for i in range(words))


def one_request(url, model, prompt, max_tokens):
    messages = [{"role": "system", "content": SYSTEM[0]}] if SYSTEM else []
    body = json.dumps({
        "model": model, "messages": messages + [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
    }).encode()
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    first = None
    tokens = prompt_tokens = cached = 0
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
                prompt_tokens = chunk["usage"]["prompt_tokens"]
                cached = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            elif first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter() - start
    return time.perf_counter() - start, first or 0.0, tokens, prompt_tokens, cached


def level(url, models, concurrency, per_client, max_tokens):
    results = []
    lock = threading.Lock()

    def client(k):
        for i in range(per_client):
            n = k * per_client + i
            out = one_request(url, models[n % len(models)], PROMPTS[n % len(PROMPTS)], max_tokens)
            with lock:
                results.append(out)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = sorted(r[0] for r in results)
    ttft = sorted(r[1] for r in results)
    pct = lambda xs, q: xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]
    tokens = sum(r[2] for r in results)
    return {
        "concurrency": concurrency, "requests": len(results), "completion_tokens": tokens, "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 1), "latency_p50_s": round(statistics.median(lat), 2), "latency_p95_s": round(pct(lat, 0.95), 2),
        "ttft_p50_s": round(statistics.median(ttft), 3), "ttft_p95_s": round(pct(ttft, 0.95), 3),
        "prompt_tokens": sum(r[3] for r in results), "cached_tokens": sum(r[4] for r in results),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--models", required=True, help="comma-separated `model` values, used in turn")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--system-words", type=int, default=0)
    args = ap.parse_args()
    models = args.models.split(",")
    if args.system_words:
        SYSTEM.append(system_message(args.system_words))
    # Warm-up, with a user message no measured request has (with a system prompt this
    # also leaves the base model's system blocks in the server's prefix cache).
    one_request(args.url, models[0], "Hi.", 4)
    extra = " prompt tokens | cached |" if args.system_words else ""
    print("| concurrent requests | requests | completion tokens | wall s | tokens/s | latency p50 s | latency p95 s | first token p50 s | first token p95 s |" + extra)
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- | --- |" if extra else ""))
    for c in [int(x) for x in args.concurrency.split(",")]:
        r = level(args.url, models, c, args.requests_per_client, args.max_tokens)
        tail = f" {r['prompt_tokens']} | {r['cached_tokens']} |" if extra else ""
        print(f"| {c} | {r['requests']} | {r['completion_tokens']} | {r['wall_s']} | {r['tokens_per_s']} | {r['latency_p50_s']} | {r['latency_p95_s']} | {r['ttft_p50_s']} | {r['ttft_p95_s']} |" + tail, flush=True)


if __name__ == "__main__":
    main()
