#!/usr/bin/env python
"""Regenerate the golden files the `lora-datasets` tests compare against.

Run with the golden venv (transformers, tokenizers, gguf):

    /root/.venvs/golden/bin/python scripts/golden/datasets/make_golden.py

It writes, under tests/golden/datasets/:
  templates/smollm2.jinja   the chat template stored in the SmolLM2-135M-Instruct GGUF
  smollm2-tokenizer.json    SmolLM2's tokenizer (from the GGUF, with its digit-split
                            pre-tokenizer restored: transformers' GGUF loader drops it)
  renders.json              transformers' `render_jinja_template` output (what
                            `apply_chat_template(..., tokenize=False)` returns) for every
                            template x conversation x add_generation_prompt x tools case
  masks.json                token ids + loss masks from the Python reference of the mask
                            rule in ARCHITECTURE.md (`reference_mask` below)

CI has no Python: the Rust tests only read these committed files.
"""
import json
import os
import sys
from datetime import datetime as real_datetime
from pathlib import Path

import gguf
import tokenizers
from tokenizers import AddedToken, Tokenizer, pre_tokenizers
from transformers.utils import chat_template_utils
from transformers.utils.chat_template_utils import render_jinja_template

ROOT = Path(__file__).resolve().parents[3]
OUT = ROOT / "tests" / "golden" / "datasets"
TEMPLATES = OUT / "templates"
GGUF = Path(
    os.environ.get(
        "SMOLLM2_GGUF", "/root/.cache/lora-train/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    )
)

# strftime_now() must be reproducible: the Rust tests pin the same instant
# (2024-07-26 12:00:00 UTC = 1721995200) through ChatTemplate::with_fixed_now.
FIXED_NOW = real_datetime(2024, 7, 26, 12, 0, 0)
FIXED_NOW_UNIX = 1721995200


class _FixedDatetime(real_datetime):
    @classmethod
    def now(cls, tz=None):
        return FIXED_NOW


chat_template_utils.datetime = _FixedDatetime

# Special tokens a Llama-3 tokenizer has; added to the SmolLM2 tokenizer (in this order,
# so they get ids 49152..) to tokenize the Llama-3 style renders. The Rust test adds them
# the same way.
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

TEMPLATE_TOKENS = {
    # template name -> (bos_token, eos_token) passed to the template, as a tokenizer would
    "smollm2": ("<|im_start|>", "<|im_end|>"),
    "qwen2.5": (None, "<|im_end|>"),
    "qwen3": (None, "<|im_end|>"),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>"),
    "chatml": (None, None),
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city, with \"quotes\" & <tags>.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Zürich"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}

CONVERSATIONS = {
    "single_turn": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ],
    "system_multi_turn": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Now say goodbye."},
        {"role": "assistant", "content": "Goodbye!"},
    ],
    "weight_zero_turn": [
        {"role": "user", "content": "Write a bad answer first."},
        {"role": "assistant", "content": "This one is excluded.", "weight": 0},
        {"role": "user", "content": "Now a good one."},
        {"role": "assistant", "content": "This one is learned.", "weight": 1},
    ],
    "unicode_and_spaces": [
        {"role": "system", "content": "  Réponds en français, s'il te plaît.  \n"},
        {"role": "user", "content": "Ça va ? 你好 🙂"},
        {"role": "assistant", "content": "  Très bien, merci ! 🙂\n"},
    ],
    "short_answer": [
        {"role": "user", "content": "Pick a letter: a or b?"},
        {"role": "assistant", "content": "a"},
    ],
    "json_like_content": [
        {"role": "user", "content": "Quote this: {\"k\": [1, 2]} and a backslash \\ ok?"},
        {"role": "assistant", "content": "{\"k\": [1, 2]} \\ done\nsecond line\ttab"},
    ],
    "prompt_only": [
        {"role": "system", "content": "Answer with one word."},
        {"role": "user", "content": "Colour of the sky?"},
    ],
    "tool_call": [
        {"role": "user", "content": "What's the weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
                }
            ],
        },
        {"role": "tool", "content": "{\"temperature\": 21}", "tool_call_id": "call_1"},
        {"role": "assistant", "content": "It is 21 degrees in Paris."},
    ],
    "tool_call_with_content": [
        {"role": "system", "content": "Use tools when they help."},
        {"role": "user", "content": "Weather in Oslo, in fahrenheit?"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {
                    "id": "call_7",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "fahrenheit"}},
                }
            ],
        },
        {"role": "tool", "content": "{\"temperature\": 41}", "tool_call_id": "call_7"},
        {"role": "assistant", "content": "41 degrees Fahrenheit."},
    ],
    "thinking": [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "<think>\nTwo plus two.\n</think>\n\nIt is 4."},
    ],
    "thinking_multi_turn": [
        {"role": "system", "content": "Think first."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "<think>\nTwo plus two.\n</think>\n\nIt is 4."},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "<think>\nThree plus three.\n</think>\n\nIt is 6."},
    ],
}
THINKING = ("thinking", "thinking_multi_turn")
TOOL_CONVERSATIONS = ("tool_call", "tool_call_with_content")

# (template, conversation, add_generation_prompt, with_tools[, extra template context]) cases for renders.json
RENDER_CASES = []
for template in ["smollm2", "qwen2.5", "llama3", "chatml", "qwen3"]:
    for name in CONVERSATIONS:
        if name in TOOL_CONVERSATIONS or (name in THINKING and template != "qwen3"):
            continue
        RENDER_CASES.append((template, name, False, False))
    RENDER_CASES.append((template, "prompt_only", True, False))
    RENDER_CASES.append((template, "single_turn", True, False))
RENDER_CASES.append(("qwen3", "prompt_only", True, False, {"enable_thinking": False}))
for template in ["qwen2.5", "llama3", "qwen3"]:
    RENDER_CASES.append((template, "tool_call", False, True))
    RENDER_CASES.append((template, "tool_call_with_content", False, True))
    RENDER_CASES.append((template, "prompt_only", True, True))
    RENDER_CASES.append((template, "single_turn", False, True))

# (template, conversation) cases tokenized for masks.json (conversations with an assistant turn)
MASK_CASES = [
    (template, name)
    for template in ["smollm2", "qwen2.5", "llama3", "qwen3"]
    for name in CONVERSATIONS
    if name not in ("prompt_only",)
    and not (template == "smollm2" and name in TOOL_CONVERSATIONS)
    and (name not in THINKING or template == "qwen3")
]


def template_messages(messages):
    """What the Rust side hands the template: the message fields except `weight`
    (a training annotation, not part of the conversation)."""
    return [{k: v for k, v in m.items() if k != "weight"} for m in messages]


def render(template_name, messages, add_generation_prompt, tools, context=None):
    source = (TEMPLATES / f"{template_name}.jinja").read_text()
    bos, eos = TEMPLATE_TOKENS[template_name]
    kwargs = dict(context or {})
    if bos is not None:
        kwargs["bos_token"] = bos
    if eos is not None:
        kwargs["eos_token"] = eos
    rendered, _ = render_jinja_template(
        conversations=[template_messages(messages)],
        tools=tools,
        chat_template=source,
        add_generation_prompt=add_generation_prompt,
        **kwargs,
    )
    return rendered[0]


SPAN_OPEN, SPAN_CLOSE = "\ue000", "\ue001"


def trainable(message):
    return message["role"] == "assistant" and message.get("weight", 1) != 0 and bool(message.get("content"))


def learns_tool_calls(message):
    return message["role"] == "assistant" and message.get("weight", 1) != 0 and bool(message.get("tool_calls"))


def tool_call_spans(template_name, messages, tools, rendered):
    """Character spans of the rendered tool calls of each assistant turn that learns them:
    where `rendered` differs from the same conversation rendered with that turn's
    `tool_calls` removed (longest common suffix, then prefix, stripped)."""
    spans = []
    for i, m in enumerate(messages):
        if not learns_tool_calls(m):
            continue
        without = [dict(x) for x in messages]
        del without[i]["tool_calls"]
        other = render(template_name, without, False, tools)
        # The common suffix first: the tool calls render right before the end-of-turn
        # token, and often start with the same character (`<tool_call>` before `<|im_end|>`),
        # so a greedy common prefix would swallow it.
        suffix = 0
        while suffix < min(len(rendered), len(other)) and rendered[-1 - suffix] == other[-1 - suffix]:
            suffix += 1
        start = 0
        while start < min(len(rendered), len(other)) - suffix and rendered[start] == other[start]:
            start += 1
        if start == len(rendered) - suffix:
            raise ValueError(f"the template does not render the tool calls of message {i}")
        spans.append((start, len(rendered) - suffix))
    return spans


def content_spans(template_name, messages, rendered, tools=None):
    """Character spans of the trainable assistant contents inside `rendered`.

    Each trainable assistant content is wrapped in two private-use sentinels and the
    conversation rendered again; if removing the sentinels gives back exactly the
    plain render, the sentinels mark the spans (robust even for a one-letter answer
    that also occurs inside a header). Otherwise fall back to searching each message's
    content (or its stripped form) left to right."""
    marked = [dict(m) for m in messages]
    for m in marked:
        if trainable(m):
            m["content"] = SPAN_OPEN + m["content"] + SPAN_CLOSE
    marked_render = render(template_name, marked, False, tools)
    plain = marked_render.replace(SPAN_OPEN, "").replace(SPAN_CLOSE, "")
    wanted = sum(1 for m in messages if trainable(m))
    if plain == rendered and marked_render.count(SPAN_OPEN) == wanted == marked_render.count(SPAN_CLOSE):
        spans, removed, start = [], 0, None
        for i, ch in enumerate(marked_render):
            if ch == SPAN_OPEN:
                start = i - removed
                removed += 1
            elif ch == SPAN_CLOSE:
                spans.append((start, i - removed))
                removed += 1
        return spans
    spans, cursor = [], 0
    for m in messages:
        content = m.get("content") or ""
        found = None
        for candidate in (content, content.strip()):
            if candidate:
                pos = rendered.find(candidate, cursor)
                if pos >= 0:
                    found = (pos, pos + len(candidate))
                    break
        if found is None:
            found = thinking_span(content, rendered, cursor)
        if found is None:
            # Some templates (Llama 3.1) drop the content of a turn that calls tools.
            if trainable(m) and not learns_tool_calls(m):
                raise ValueError(f"assistant content not found in the render: {content!r}")
            continue
        cursor = found[1]
        if trainable(m):
            spans.append(found)
    return spans


def thinking_span(content, rendered, cursor):
    """Reasoning templates (Qwen3) rewrite `<think>R</think>A`: they re-space the
    reasoning, or drop it from earlier turns. The span then runs from the `<think>` tag
    written for this turn (when it comes before the answer) to the end of the answer."""
    if "</think>" not in content:
        return None
    answer = content.split("</think>")[-1].strip()
    if not answer:
        return None
    a = rendered.find(answer, cursor)
    if a < 0:
        return None
    t = rendered.find("<think>", cursor)
    start = t if 0 <= t < a else a
    return (start, a + len(answer))


def reference_mask(tokenizer, template_name, messages, tools=None):
    """ARCHITECTURE.md (Loss mask): tokenize the whole render once without special tokens; a token is a
    loss token when its first character lies inside a trainable assistant content or the
    rendered tool calls of an assistant turn, plus the end-of-turn token that closes that
    span (the first non-whitespace token at or after the span's end, when it is a special
    token)."""
    rendered = render(template_name, messages, False, tools)
    enc = tokenizer.encode(rendered, add_special_tokens=False)
    special_ids = {
        i for i, tok in tokenizer.get_added_tokens_decoder().items() if tok.special
    }
    mask = [0] * len(enc.ids)
    spans = content_spans(template_name, messages, rendered, tools)
    spans += tool_call_spans(template_name, messages, tools, rendered)
    for start, end in spans:
        for t, (a, b) in enumerate(enc.offsets):
            if start <= a < end and b > a:
                mask[t] = 1
        for t, (a, b) in enumerate(enc.offsets):
            if a < end:
                continue
            if rendered[a:b].strip() == "" and b > a:
                continue  # whitespace between content and the end-of-turn token
            if enc.ids[t] in special_ids:
                mask[t] = 1
            break
    if not any(mask):
        raise ValueError("no loss token")
    return rendered, enc.ids, mask


def smollm2_template_from_gguf():
    reader = gguf.GGUFReader(str(GGUF))
    field = reader.fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def smollm2_tokenizer_from_gguf():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    backend = tok.backend_tokenizer
    # The GGUF says pre-tokenizer `smollm`: digits one by one, then ByteLevel.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    return backend


def main():
    TEMPLATES.mkdir(parents=True, exist_ok=True)
    (TEMPLATES / "smollm2.jinja").write_text(smollm2_template_from_gguf())
    chatml_src = (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    (TEMPLATES / "chatml.jinja").write_text(chatml_src)

    tokenizer_path = OUT / "smollm2-tokenizer.json"
    if not tokenizer_path.exists() or "--tokenizer" in sys.argv:
        smollm2_tokenizer_from_gguf().save(str(tokenizer_path), pretty=False)

    renders = []
    for template, name, add_generation_prompt, with_tools, *rest in RENDER_CASES:
        context = rest[0] if rest else {}
        messages = CONVERSATIONS[name]
        tools = [WEATHER_TOOL] if with_tools else None
        renders.append(
            {
                "template": template,
                "conversation": name,
                "messages": messages,
                "add_generation_prompt": add_generation_prompt,
                "tools": tools,
                "bos_token": TEMPLATE_TOKENS[template][0],
                "eos_token": TEMPLATE_TOKENS[template][1],
                "context": context,
                "expected": render(template, messages, add_generation_prompt, tools, context),
            }
        )

    base = Tokenizer.from_file(str(tokenizer_path))
    llama_tok = Tokenizer.from_file(str(tokenizer_path))
    llama_tok.add_special_tokens([AddedToken(t, special=True) for t in LLAMA3_SPECIALS])
    masks = []
    for template, name in MASK_CASES:
        tok = llama_tok if template == "llama3" else base
        # Tool conversations render with the tool schema offered, as real agent data does.
        tools = [WEATHER_TOOL] if name in TOOL_CONVERSATIONS else None
        rendered, ids, mask = reference_mask(tok, template, CONVERSATIONS[name], tools)
        masks.append(
            {
                "template": template,
                "conversation": name,
                "messages": CONVERSATIONS[name],
                "tools": tools,
                "bos_token": TEMPLATE_TOKENS[template][0],
                "eos_token": TEMPLATE_TOKENS[template][1],
                "rendered": rendered,
                "input_ids": ids,
                "loss_mask": mask,
            }
        )

    meta = {
        "generator": "scripts/golden/datasets/make_golden.py",
        "transformers": __import__("transformers").__version__,
        "tokenizers": tokenizers.__version__,
        "fixed_now_unix": FIXED_NOW_UNIX,
        "llama3_special_tokens": LLAMA3_SPECIALS,
    }
    (OUT / "renders.json").write_text(
        json.dumps({"meta": meta, "cases": renders}, ensure_ascii=False, indent=1) + "\n"
    )
    (OUT / "masks.json").write_text(
        json.dumps({"meta": meta, "cases": masks}, ensure_ascii=False, indent=1) + "\n"
    )
    print(f"{len(renders)} renders, {len(masks)} masks -> {OUT}")


if __name__ == "__main__":
    main()
