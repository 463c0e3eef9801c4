"""A small agent server for `lora-train grpo --agent-url`: it answers arithmetic word
problems with a calculator tool, calling the policy the trainer serves.

Protocol (what the trainer expects of any agent):
  POST /init    {"rollout_id", "model", "model_base_url", "messages", "tools",
                 "metadata": {"run_id", "row_id", "rollout_id", "step"}}
                -> 200 at once; the rollout runs in the background
  GET  /status?rollout_id=ID
                -> {"terminated": false} while it runs, then
                   {"terminated": true, "messages": [...the whole conversation...]}
                   (add "reward": R to score it yourself; "error": "..." drops it)

The rollout: the model sees the problem and may ask the calculator by writing
`CALC: <expression>` (or a `<tool_call>{"name": "calculator", "arguments":
{"expression": ...}}</tool_call>` block); the agent evaluates the expression and answers
with a tool message `RESULT: <value>`, for at most --max-turns model calls. The final
assistant message is the answer the trainer's evaluator scores.

The model is called with the `openai` client when it is installed, else with the
standard library (the same HTTP request), so the example runs on a bare Python too.

Usage: python3 examples/agent/agent.py [--port 0] [--max-turns 3]
It prints `agent listening on http://127.0.0.1:PORT` once it accepts connections.
"""
import argparse
import ast
import json
import operator
import re
import threading
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

try:
    import openai
except ImportError:  # the standard-library client below does the same request
    openai = None

SYSTEM = (
    "You solve arithmetic word problems. To compute, write CALC: followed by an expression "
    "(numbers, + - * / and parentheses); you will get RESULT: value. End with the final number."
)
CALC = re.compile(r"CALC:\s*([0-9+\-*/(). ]+)")
TOOL_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)
OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv, ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculate(expression):
    """Evaluate + - * / over numbers only (no names, no calls): safe on model output."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in OPS:
            return OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in OPS:
            return OPS[type(node.op)](ev(node.operand))
        raise ValueError("unsupported expression")
    value = ev(ast.parse(expression.strip(), mode="eval"))
    return int(value) if float(value).is_integer() else round(value, 6)


def tool_request(text):
    """The expression the model asked the calculator for, if any."""
    m = TOOL_CALL.search(text)
    if m:
        try:
            call = json.loads(m.group(1))
            if call.get("name") == "calculator":
                return str(call.get("arguments", {}).get("expression", ""))
        except (ValueError, AttributeError):
            pass
    m = CALC.search(text)
    return m.group(1) if m else None


def chat(base_url, model, messages, max_tokens):
    """One chat completion; the assistant's text."""
    if openai is not None:
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens)
        return reply.choices[0].message.content or ""
    body = json.dumps({"model": model, "messages": messages, "max_tokens": max_tokens}).encode()
    req = urllib.request.Request(f"{base_url}/chat/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)["choices"][0]["message"]["content"] or ""


class Rollouts:
    def __init__(self, max_turns, max_tokens, min_turns=1, fail_every=0, hang_every=0):
        self.max_turns, self.max_tokens, self.min_turns = max_turns, max_tokens, min_turns
        self.fail_every, self.hang_every = fail_every, hang_every
        self.count = 0
        self.lock = threading.Lock()
        self.state = {}

    def start(self, req):
        rid = req["rollout_id"]
        with self.lock:
            self.state[rid] = {"terminated": False}
            self.count += 1
            n = self.count
        if self.hang_every and n % self.hang_every == 0:
            return  # never terminates: the trainer's --agent-timeout drops it
        if self.fail_every and n % self.fail_every == 0:
            with self.lock:
                self.state[rid] = {"terminated": True, "error": "injected failure (--fail-every)"}
            return
        threading.Thread(target=self.run, args=(rid, req), daemon=True).start()

    def run(self, rid, req):
        messages = list(req.get("messages") or [])
        if not any(m.get("role") == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": SYSTEM})
        try:
            for turn in range(self.max_turns):
                text = chat(req["model_base_url"], req["model"], messages, self.max_tokens)
                messages.append({"role": "assistant", "content": text})
                expression = tool_request(text)
                if expression is None:
                    if turn + 1 >= self.min_turns:
                        break
                    messages.append({"role": "user", "content": "Continue. Use CALC: if you need to compute."})
                    continue
                try:
                    result = f"RESULT: {calculate(expression)}"
                except (ValueError, SyntaxError, ZeroDivisionError, RecursionError) as e:
                    result = f"RESULT: error ({e.__class__.__name__})"
                messages.append({"role": "tool", "content": result})
            done = {"terminated": True, "messages": messages}
        except Exception as e:  # report, never hang: the trainer drops the rollout
            done = {"terminated": True, "error": f"{e.__class__.__name__}: {e}"}
        with self.lock:
            self.state[rid] = done

    def status(self, rid):
        with self.lock:
            return self.state.get(rid)


def serve(port, rollouts):
    class Handler(BaseHTTPRequestHandler):
        def reply(self, code, obj):
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            if self.path != "/init":
                return self.reply(404, {"error": f"no route {self.path}"})
            try:
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                for key in ("rollout_id", "model", "model_base_url"):
                    if not isinstance(req.get(key), str):
                        raise ValueError(f"missing {key}")
            except ValueError as e:
                return self.reply(400, {"error": str(e)})
            rollouts.start(req)
            self.reply(200, {"ok": True})

        def do_GET(self):
            url = urllib.parse.urlparse(self.path)
            if url.path != "/status":
                return self.reply(404, {"error": f"no route {url.path}"})
            rid = urllib.parse.parse_qs(url.query).get("rollout_id", [""])[0]
            state = rollouts.status(rid)
            if state is None:
                return self.reply(404, {"error": f"unknown rollout {rid}"})
            self.reply(200, state)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print(f"agent listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--max-turns", type=int, default=3, help="model calls per rollout at most")
    ap.add_argument("--max-tokens", type=int, default=256, help="max_tokens of each model call")
    # For tests of the trainer: more turns from a model that never calls the tool, and
    # rollouts that fail or never end.
    ap.add_argument("--min-turns", type=int, default=1, help="keep asking until this many model calls")
    ap.add_argument("--fail-every", type=int, default=0, help="every Nth rollout reports an error")
    ap.add_argument("--hang-every", type=int, default=0, help="every Nth rollout never terminates")
    args = ap.parse_args()
    serve(args.port, Rollouts(args.max_turns, args.max_tokens, args.min_turns, args.fail_every, args.hang_every))


if __name__ == "__main__":
    main()
