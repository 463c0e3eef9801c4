"""Drive `lora-train serve` with the official `openai` Python client.

Starts the server on a free loopback port over a tiny model and its adapter, then
lists the models, asks a chat completion (greedy, with log-probs), streams one, asks
text completions with n > 1, loads and unloads an adapter, and checks the client's
errors for an unknown model and a bad API key. Prints what it saw; the output of a run
is committed beside this file (openai_client.out).

Usage: ~/.venvs/golden/bin/python scripts/serve/openai_client.py [LORA_TRAIN_BINARY]
(default target/debug/lora-train; needs `pip install openai`).
"""
import json
import os
import subprocess
import sys
import urllib.request

import openai

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "debug", "lora-train")
MODEL = os.path.join(ROOT, "tests/golden/models/qwen3-tiny")
ADAPTER = os.path.join(ROOT, "tests/golden/adapters/qwen3-tiny")
KEY = "sk-local-test"


def main():
    server = subprocess.Popen(
        [BIN, "serve", "--model", MODEL, "--adapter", f"tuned={ADAPTER}", "--port", "0", "--device", "cpu", "--api-key", KEY],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "LORA_TRAIN_LOG": "warn"},
    )
    try:
        url = None
        for line in server.stderr:
            if line.startswith("lora-train serve: listening on "):
                url = line.split()[-1]
                break
        assert url, "the server did not start"
        run(url)
    finally:
        server.terminate()
        server.wait()


def run(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY)
    print("openai", openai.__version__)
    print("models:", [m.id.replace(ROOT + "/", "") for m in client.models.list().data])

    chat = client.chat.completions.create(
        model="tuned", messages=[{"role": "user", "content": "What is 2 + 2?"}],
        max_tokens=8, temperature=0, logprobs=True, top_logprobs=2,
    )
    c = chat.choices[0]
    print("chat:", json.dumps(c.message.content), "finish:", c.finish_reason, "usage:", chat.usage.prompt_tokens, chat.usage.completion_tokens)
    print("chat logprobs:", [round(t.logprob, 4) for t in c.logprobs.content], "top:", len(c.logprobs.content[0].top_logprobs))

    stream = client.chat.completions.create(
        model="tuned", messages=[{"role": "user", "content": "What is 2 + 2?"}], max_tokens=8, temperature=0, stream=True,
    )
    pieces = [ch.choices[0].delta.content or "" for ch in stream if ch.choices]
    print("stream chunks:", len(pieces), "same text as non-streamed:", "".join(pieces) == c.message.content)

    comp = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=1.0, seed=3, n=3)
    print("completions n=3:", [json.dumps(ch.text) for ch in comp.choices], [ch.finish_reason for ch in comp.choices])

    # vLLM's adapter routes (not in the OpenAI client): plain HTTP.
    req = urllib.request.Request(
        f"{url}/v1/load_lora_adapter", data=json.dumps({"lora_name": "again", "lora_path": ADAPTER}).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    print("load:", urllib.request.urlopen(req).read().decode())
    again = client.chat.completions.create(model="again", messages=[{"role": "user", "content": "What is 2 + 2?"}], max_tokens=8, temperature=0)
    print("loaded adapter answers like the same adapter:", again.choices[0].message.content == c.message.content)

    try:
        client.chat.completions.create(model="missing", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    except openai.NotFoundError as e:
        print("unknown model:", e.status_code, e.body["code"] if isinstance(e.body, dict) else e.body)
    try:
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    except openai.AuthenticationError as e:
        print("bad key:", e.status_code)
    try:
        client.chat.completions.create(model="tuned", messages=[{"role": "user", "content": "hi"}], max_tokens=100000)
    except openai.BadRequestError as e:
        print("max_tokens over the limit:", e.status_code, e.body["param"] if isinstance(e.body, dict) else e.body)


if __name__ == "__main__":
    main()
