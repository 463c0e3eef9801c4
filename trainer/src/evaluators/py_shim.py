"""lora-train's shim for `py:FILE.py[:FUNCTION]` evaluators.

Imports FILE, then serves the JSON-lines protocol of `cmd:` evaluators on stdin/stdout by
calling FUNCTION with the hosted service's reward-function convention:

    fn(messages, ground_truth=..., **fields)

where `messages` is the prompt conversation with the completion appended as the last
(assistant) message. FUNCTION may return a number, a dict with "score" (and "reason",
"metrics"), or an object with `.score` (and `.reason`, `.metrics`); None means no score.
An exception becomes a reply with no score and the traceback's last line as the reason.

Usage: python3 -c SHIM FILE FUNCTION [--check]
"""
import importlib.util
import json
import math
import os
import sys
import traceback

PROTOCOL_KEYS = ("id", "messages", "completion", "ground_truth")


def load(path, name):
    directory = os.path.dirname(os.path.abspath(path))
    # Let the evaluator import its neighbours, as `python3 FILE` would.
    sys.path.insert(0, directory)
    module_name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    fn = getattr(module, name, None)
    if fn is None:
        raise AttributeError(f"{path} has no function `{name}`")
    if not callable(fn):
        raise TypeError(f"`{name}` in {path} is not callable")
    return fn


def number(value):
    """A finite float, or None. bool counts as 0/1; numpy and torch scalars convert
    through __float__; strings, dicts and result objects are not numbers."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def field(result, key):
    if isinstance(result, dict):
        return result.get(key)
    return getattr(result, key, None)


def metrics_of(raw):
    """Metric values as floats: numbers, or dicts/objects with a score (MetricResult)."""
    out = {}
    if isinstance(raw, dict):
        for key, value in raw.items():
            x = number(value)
            if x is None:
                x = number(field(value, "score"))
            if x is not None:
                out[str(key)] = x
    return out


def reply_for(result):
    if result is None:
        return {"score": None, "reason": "the function returned None"}
    x = number(result)
    if x is not None:
        return {"score": x}
    if hasattr(result, "__float__") and not hasattr(result, "score"):
        return {"score": None, "reason": f"the function returned {result!r}"}
    score = number(field(result, "score"))
    reply = {"score": score}
    reason = field(result, "reason")
    if score is None:
        reply["reason"] = f"no numeric score in {type(result).__name__} {field(result, 'score')!r}"
    elif reason is not None:
        reply["reason"] = str(reason)
    metrics = metrics_of(field(result, "metrics"))
    if metrics:
        reply["metrics"] = metrics
    return reply


def serve(fn, out):
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            rid = request.get("id")
        except Exception:
            # No id to answer for: an unparsable request cannot be replied to.
            print(f"py shim: unreadable request: {line[:200]!r}", file=sys.stderr)
            continue
        fields = {k: v for k, v in request.items() if k not in PROTOCOL_KEYS}
        messages = list(request.get("messages") or [])
        messages.append({"role": "assistant", "content": request.get("completion", "")})
        try:
            reply = reply_for(fn(messages, ground_truth=request.get("ground_truth"), **fields))
        except Exception as e:
            last = traceback.format_exception_only(type(e), e)[-1].strip()
            reply = {"score": None, "reason": last}
        reply["id"] = rid
        out.write(json.dumps(reply) + "\n")
        out.flush()


def main():
    if len(sys.argv) < 3:
        sys.exit("usage: python3 -c SHIM FILE FUNCTION [--check]")
    path, name = sys.argv[1], sys.argv[2]
    # The protocol owns stdout; a print() in the evaluator goes to stderr instead.
    out = sys.stdout
    sys.stdout = sys.stderr
    try:
        fn = load(path, name)
    except Exception as e:
        print(traceback.format_exception_only(type(e), e)[-1].strip(), file=sys.stderr)
        sys.exit(3)
    if "--check" in sys.argv[3:]:
        return
    serve(fn, out)


main()
