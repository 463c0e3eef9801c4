"""Helpers shared by the golden scripts and the PyTorch benchmarks.

- `load_model_and_tokenizer`: a Hugging Face directory or a `.gguf` file (weights dequantized
  by transformers' GGUF loader; tokenizer rebuilt from the GGUF metadata with the `smollm`
  pre-tokenizer restored, see `restore_gguf_pretokenizer`).
- `chat_loss_mask`: the loss-mask rule of ARCHITECTURE.md (Loss mask), written once so that
  `peft_eval.py` and the tokenizer goldens agree.
"""

from __future__ import annotations

import os
import sys

# Quiet, CPU-only, deterministic defaults before torch/transformers are imported.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import gguf  # noqa: E402

# The pre-tokenizer of the original SmolLM2 (StarCoder lineage) tokenizer.json: digits are
# split one by one, then GPT-2 byte-level with its regex. llama.cpp calls this `smollm`.
SMOLLM_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}

# GGUF `tokenizer.ggml.pre` values whose pre-tokenizer transformers does not rebuild, mapped
# to the tokenizers JSON that the original tokenizer.json carries.
GGUF_PRE_TOKENIZER_FIXES = {
    "smollm": SMOLLM_PRE_TOKENIZER,
}


def gguf_metadata(path: str) -> dict:
    """The scalar / string metadata of a GGUF file (token lists left out)."""
    reader = gguf.GGUFReader(path)
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.split(".")[-1] in ("tokens", "token_type", "scores", "merges"):
            continue
        try:
            out[key] = field.contents()
        except Exception:  # pragma: no cover - exotic field types
            pass
    return out


def restore_gguf_pretokenizer(tokenizer, gguf_path: str) -> str | None:
    """Replace the pre-tokenizer transformers built from a GGUF with the original one.

    Returns the GGUF `tokenizer.ggml.pre` value when a fix was applied, else None.
    """
    import json

    pre = gguf_metadata(gguf_path).get("tokenizer.ggml.pre")
    fix = GGUF_PRE_TOKENIZER_FIXES.get(pre)
    if fix is None:
        return None
    tokenizer.backend_tokenizer.pre_tokenizer = _pretokenizer_from_json(json.dumps(fix))
    return pre


def _pretokenizer_from_json(text: str):
    """Build a `tokenizers` pre-tokenizer from its JSON (via a throwaway Tokenizer)."""
    import json
    from tokenizers import Tokenizer

    doc = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": json.loads(text),
        "post_processor": None,
        "decoder": None,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": {}, "merges": []},
    }
    return Tokenizer.from_str(json.dumps(doc)).pre_tokenizer


def load_model_and_tokenizer(model_ref: str, dtype=None, attn_implementation: str = "eager"):
    """Load (model, tokenizer, info) from a HF directory or a `.gguf` file, on CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or torch.float32
    info = {"model_ref": model_ref}
    if model_ref.endswith(".gguf") and os.path.isfile(model_ref):
        d, f = os.path.split(os.path.abspath(model_ref))
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype, attn_implementation=attn_implementation)
        fixed = restore_gguf_pretokenizer(tok, model_ref)
        info["gguf"] = True
        info["pre_tokenizer_restored"] = fixed
    else:
        tok = AutoTokenizer.from_pretrained(model_ref)
        model = AutoModelForCausalLM.from_pretrained(model_ref, dtype=dtype, attn_implementation=attn_implementation)
        info["gguf"] = False
    model.eval()
    return model, tok, info


SPAN_OPEN, SPAN_CLOSE = "\ue000", "\ue001"  # private-use sentinels marking assistant contents


def trainable(message) -> bool:
    return message.get("role") == "assistant" and message.get("weight", 1) != 0 and bool(message.get("content"))


def chat_loss_mask(tokenizer, messages, max_length: int | None = None):
    """Tokenize a chat sample and build its loss mask (ARCHITECTURE.md, Loss mask).

    The same rule as the datasets crate (datasets/src/mask.rs) and its Python reference
    (scripts/golden/datasets/make_golden.py `reference_mask`): the conversation is rendered once
    with the tokenizer's chat template (`add_generation_prompt=False`, `weight` keys dropped)
    and tokenized once without adding special tokens. A token is a loss token when its first
    character lies inside the content of a trainable assistant message (role assistant,
    `weight` != 0, non-empty), or when it is the end-of-turn token closing that content: the
    first non-whitespace token at or after the content's end, counted when it is a special
    token (`<|im_end|>` for ChatML). Content spans come from re-rendering with sentinel
    characters around each trainable content (falling back to a left-to-right search of the
    content, or its stripped form). Returns (text, ids, offsets, mask); mask[i] == 1 when
    token i is a target of the loss (predicted from position i - 1). max_length cuts all four
    token lists to their first max_length entries.
    """
    text = render_chat(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    special_ids = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    mask = [0] * len(ids)
    for start, end in content_spans(tokenizer, messages, text):
        for t, (a, b) in enumerate(offsets):
            if start <= a < end and b > a:
                mask[t] = 1
        for t, (a, b) in enumerate(offsets):
            if a < end:
                continue
            if b > a and text[a:b].strip() == "":
                continue  # whitespace between the content and the end-of-turn token
            if ids[t] in special_ids:
                mask[t] = 1
            break
    if max_length is not None:
        ids, offsets, mask = ids[:max_length], offsets[:max_length], mask[:max_length]
    return text, ids, offsets, mask


def render_chat(tokenizer, messages) -> str:
    clean = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
    return tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=False)


def content_spans(tokenizer, messages, rendered: str):
    """Character spans of the trainable assistant contents inside `rendered`."""
    marked = [dict(m) for m in messages]
    for m in marked:
        if trainable(m):
            m["content"] = SPAN_OPEN + m["content"] + SPAN_CLOSE
    marked_render = render_chat(tokenizer, marked)
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
            if trainable(m):
                print(f"warning: assistant content not found in the render: {content[:40]!r}", file=sys.stderr)
            continue
        cursor = found[1]
        if trainable(m):
            spans.append(found)
    return spans
