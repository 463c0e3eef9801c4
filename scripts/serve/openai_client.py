"""Drive `lora-train serve` with the official `openai` Python client.

Starts the server on a free loopback port over a tiny model and its adapter, then
lists the models, asks a chat completion (greedy, with log-probs), streams one, asks
text completions with n > 1, with a list of prompts and with a one-token prompt, asks a
chat with tools (whole and streamed; the server reads calls with --tool-call-parser
hermes), loads and unloads an adapter, and checks the client's errors for an unknown
model, a bad API key and an unsupported field. Prints what it saw; the output of a run
is committed beside this file (openai_client.out).

Usage: ~/.venvs/golden/bin/python scripts/serve/openai_client.py [LORA_TRAIN_BINARY]
(default target/debug/lora-train; needs the `openai` package pinned in
scripts/golden/requirements.txt).
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
        [BIN, "serve", "--model", MODEL, "--adapter", f"tuned={ADAPTER}", "--port", "0", "--device", "cpu", "--api-key", KEY,
         "--tool-call-parser", "hermes"],
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

    listed = client.completions.create(model=MODEL, prompt=["Once upon a time", "The sky is"], max_tokens=4, temperature=0, n=2)
    print("completions, 2 prompts x n=2:", [(ch.index, json.dumps(ch.text)) for ch in listed.choices])
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=4, temperature=0).choices[0].text for p in ["Once upon a time", "The sky is"]]
    print("each listed prompt answers as alone:", [ch.text for ch in listed.choices] == [alone[0], alone[0], alone[1], alone[1]])
    short = client.completions.create(model=MODEL, prompt="Once", max_tokens=4, temperature=0, echo=True)
    print("one-token prompt, echoed:", json.dumps(short.choices[0].text), short.choices[0].finish_reason)

    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    with_tools = client.chat.completions.create(model="tuned", messages=ask, tools=tools, tool_choice="auto", max_tokens=8, temperature=0)
    m = with_tools.choices[0]
    print("chat with tools:", json.dumps(m.message.content), "tool_calls:", m.message.tool_calls, "finish:", m.finish_reason)
    streamed = client.chat.completions.create(model="tuned", messages=ask, tools=tools, max_tokens=8, temperature=0, stream=True)
    text, calls, finish = "", [], None
    for ch in streamed:
        for part in ch.choices:
            text += part.delta.content or ""
            calls += part.delta.tool_calls or []
            finish = part.finish_reason or finish
    print("streamed chat with tools: same text:", text == (m.message.content or ""), "tool_calls:", len(calls), "finish:", finish)
    # A conversation that went through a tool call and its result.
    follow = client.chat.completions.create(model="tuned", max_tokens=6, temperature=0, tools=tools, messages=ask + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call-1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call-1", "content": "sunny, 21 C"},
    ])
    print("after a tool result:", follow.choices[0].finish_reason)

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
    try:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2, extra_body={"min_p": 0.1})
    except openai.BadRequestError as e:
        print("unsupported field:", e.status_code, e.body["param"] if isinstance(e.body, dict) else e.body)


if __name__ == "__main__":
    main()
