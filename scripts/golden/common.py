"""Helpers shared by the golden scripts and the PyTorch benchmarks.

- `load_model_and_tokenizer`: a Hugging Face directory or a `.gguf` file (weights dequantized
  by transformers' GGUF loader; tokenizer rebuilt from the GGUF metadata with the `smollm`
  pre-tokenizer restored, see `restore_gguf_pretokenizer`).
- `chat_loss_mask`: the loss-mask rule of DESIGN.md section 3, written once so that
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


END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>")


def chat_loss_mask(tokenizer, messages, max_length: int | None = None):
    """Tokenize a chat sample and build its loss mask (DESIGN.md section 3).

    The conversation is rendered once with the tokenizer's chat template
    (`add_generation_prompt=False`), tokenized once without adding special tokens, and each
    token is assigned to a message by its offsets: a token belongs to a message when its
    first character lies inside the message's content. Loss tokens are the tokens of every
    assistant message's content (unless the message has `"weight": 0`) plus the first token
    after that content when it is the end-of-turn token (`<|im_end|>` for ChatML, or the
    tokenizer's eos token). Returns (text, ids, offsets, mask) with mask[i] == 1 when token i
    is a target of the loss (predicted from position i - 1).
    """
    text = render_chat(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    spans = content_spans(text, messages)
    eot = set(END_OF_TURN_TOKENS)
    if tokenizer.eos_token:
        eot.add(tokenizer.eos_token)
    mask = [0] * len(ids)
    for msg, (start, end) in zip(messages, spans):
        if msg.get("role") != "assistant" or msg.get("weight", 1) == 0 or start is None:
            continue
        after = None
        for i, (s, _e) in enumerate(offsets):
            if start <= s < end:
                mask[i] = 1
            elif s >= end and after is None:
                after = i
        if after is not None and tokenizer.convert_ids_to_tokens(ids[after]) in eot:
            mask[after] = 1
    if max_length is not None:
        ids, offsets, mask = ids[:max_length], offsets[:max_length], mask[:max_length]
    return text, ids, offsets, mask


def render_chat(tokenizer, messages) -> str:
    clean = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
    return tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=False)


def content_spans(text: str, messages):
    """Character span of each message's content in the rendered text, found left to right."""
    spans = []
    cursor = 0
    for m in messages:
        content = m.get("content") or ""
        if not content:
            spans.append((None, None))
            continue
        i = text.find(content, cursor)
        if i < 0:  # a template may strip the content
            stripped = content.strip()
            i = text.find(stripped, cursor) if stripped else -1
            content = stripped
        if i < 0:
            print(f"warning: message content not found in the rendered chat: {content[:40]!r}", file=sys.stderr)
            spans.append((None, None))
            continue
        spans.append((i, i + len(content)))
        cursor = i + len(content)
    return spans
