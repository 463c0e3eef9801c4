#!/usr/bin/env python3
"""Tiny random Llama / Qwen2 / Qwen3 checkpoints and their golden values.

Writes (relative to the repository root):

  tests/golden/models/{llama,qwen2,qwen3}-tiny/    HF model directories (< 2 MB each)
  tests/golden/{name}.safetensors + {name}.json     goldens: input_ids, attention_mask, logits,
                                                    lora_logits, loss, grad.<peft key> ...
  tests/golden/adapters/{name}/                     the PEFT adapter the goldens used
                                                    (save_pretrained: adapter_config.json +
                                                    adapter_model.safetensors)
  tests/golden/tiny_tokenizer.json                  tokenizer / chat-template / loss-mask goldens

Deterministic: fixed seeds, one torch thread, no wall-clock data in any file; re-running
produces byte-identical files (the script checks the tokenizer training is stable too).

    python scripts/golden/make_tiny_models.py [--out tests/golden]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (sets env defaults before torch is imported)

import torch  # noqa: E402
import transformers  # noqa: E402
import peft  # noqa: E402
import tokenizers  # noqa: E402
from safetensors.torch import save_file, load_file  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
BOS, EOS, PAD = "<|endoftext|>", "<|im_end|>", "<|endoftext|>"
VOCAB_SIZE = 512

# ChatML, as Qwen2 / SmolLM2 write it (no default system message).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_R, LORA_ALPHA, LORA_INIT_STD = 4, 8, 0.05

# A small English corpus written for this script (no external data). Digits, punctuation,
# chat words and a little non-ASCII so that byte-level merges and the alphabet are exercised.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model can still learn a lot.
Paris is the capital of France, and Berlin is the capital of Germany.
Rome is the capital of Italy; Madrid is the capital of Spain.
The river flows through the old town, past the market and the stone bridge.
In 1969, two astronauts walked on the Moon for about 21 hours.
The train leaves at 8:45 and arrives at 12:30, a trip of 3 hours and 45 minutes.
She bought 12 apples, 7 pears and 3 lemons for 4.50 euros.
What is the capital of France? The capital of France is Paris.
How many legs does a spider have? A spider has 8 legs.
Please answer the question in one short sentence.
The user asks a question and the assistant gives a helpful answer.
You are a helpful assistant. Answer clearly and briefly.
Water boils at 100 degrees Celsius at sea level and freezes at 0 degrees.
The library opens at nine in the morning and closes at six in the evening.
A good answer is short, correct and polite. Thank you for your question!
Machine learning models are trained on data; they learn patterns from examples.
Fine-tuning adapts a pretrained model to a new task with a small dataset.
Low-rank adapters add two small matrices to each projection of the attention and the MLP.
The gradient tells the optimizer which way to move each weight.
Cats sleep for many hours every day, and dogs like to play in the park.
The weather today is sunny with a light breeze from the west.
He wrote 3 letters, read 2 books and walked 10 kilometers on Sunday.
Numbers like 42, 3.14 and 2048 appear in many examples.
The meeting is on Monday, March 3rd, at 10 o'clock in room 204.
Café, naïve and résumé are words that English borrowed from French.
Open the window, turn off the light and close the door behind you.
The children built a castle of sand near the sea and watched the waves.
If you mix red and blue you get purple; yellow and blue make green.
There are 7 days in a week, 12 months in a year and 365 days in most years.
Good morning! How are you today? I am fine, thank you. And you?
The assistant said: "I do not know, but I can help you find out."
Write a poem about the sea. The sea is wide and deep and blue.
Translate "good night" into French. In French, "good night" is "bonne nuit".
A triangle has 3 sides, a square has 4 sides and a hexagon has 6 sides.
The scientist measured the temperature every 15 minutes for 2 days.
Keep your answers short: one sentence is usually enough.
"""


# --------------------------------------------------------------------------- tokenizer

# The Qwen2 pre-tokenizer regex (transformers' Qwen2Tokenizer.PRETOKENIZE_REGEX, also in Qwen2's
# tokenizer.json). transformers 5 rebuilds the pipeline of a `qwen2`/`qwen3` model's tokenizer
# from vocab + merges with exactly this pipeline and ignores tokenizer.json's own one, so the
# tiny tokenizer uses it too: then transformers and a plain tokenizer.json reader agree for all
# three models (checked in check_tokenizer_consistency).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def train_tokenizer() -> Tokenizer:
    from tokenizers import Regex, normalizers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in CORPUS.splitlines() if line.strip()]
    # Repeat the corpus so that frequencies (and therefore merge order) are well separated.
    tok.train_from_iterator(lines * 3, trainer=trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok


def tokenizer_json(tok: Tokenizer) -> str:
    # Stable serialisation: re-dump through json with sorted-free but fixed formatting.
    return json.dumps(json.loads(tok.to_str()), indent=2, ensure_ascii=False) + "\n"


def added_tokens_decoder() -> dict:
    return {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, t in enumerate(SPECIAL_TOKENS)
    }


def write_tokenizer(dir_: str, tok_json: str, template_in_jinja: bool, tokenizer_class: str):
    with open(os.path.join(dir_, "tokenizer.json"), "w") as f:
        f.write(tok_json)
    cfg = {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": added_tokens_decoder(),
        "bos_token": BOS,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "model_max_length": 2048,
        "pad_token": PAD,
        "tokenizer_class": tokenizer_class,
        "unk_token": None,
    }
    jinja = os.path.join(dir_, "chat_template.jinja")
    if template_in_jinja:
        with open(jinja, "w") as f:
            f.write(CHAT_TEMPLATE)
    else:
        cfg["chat_template"] = CHAT_TEMPLATE
        if os.path.exists(jinja):
            os.remove(jinja)
    with open(os.path.join(dir_, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
        f.write("\n")


# --------------------------------------------------------------------------- models

MODELS = {
    # name: (config class, model class, config kwargs, on-disk dtype, shard size, rope dialect)
    "llama-tiny": dict(
        cfg_cls=LlamaConfig, model_cls=LlamaForCausalLM,
        cfg=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False,
                 max_position_embeddings=256, attention_bias=False, mlp_bias=False),
        rope_theta=50000.0, dtype=torch.float32, max_shard_size=None, rope_dialect="top_level",
        seed=1001, rslora=False, tokenizer_class="PreTrainedTokenizerFast",
    ),
    "qwen2-tiny": dict(
        cfg_cls=Qwen2Config, model_cls=Qwen2ForCausalLM,
        cfg=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=True,
                 max_position_embeddings=256, use_sliding_window=False),
        rope_theta=1000000.0, dtype=torch.float32, max_shard_size="300KB", rope_dialect="top_level",
        seed=2002, rslora=True, tokenizer_class="Qwen2Tokenizer",
    ),
    "qwen3-tiny": dict(
        cfg_cls=Qwen3Config, model_cls=Qwen3ForCausalLM,
        cfg=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-3, tie_word_embeddings=False,
                 max_position_embeddings=256, use_sliding_window=False, attention_bias=False),
        rope_theta=500000.0, dtype=torch.bfloat16, max_shard_size=None, rope_dialect="rope_parameters",
        seed=3003, rslora=False, tokenizer_class="Qwen2Tokenizer",
    ),
}


def randomize(model, gen: torch.Generator):
    """Every weight random and O(1) in effect: norms in [0.5, 1.5], biases non-zero."""
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5, generator=gen)
            elif "embed_tokens" in name:
                p.normal_(0.0, 0.35, generator=gen)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.3, generator=gen)
            elif p.dim() == 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]), generator=gen)
            else:
                raise RuntimeError(f"unhandled parameter {name} {tuple(p.shape)}")


def fix_config_dialect(dir_: str, spec: dict):
    path = os.path.join(dir_, "config.json")
    cfg = json.load(open(path))
    if spec["rope_dialect"] == "top_level":
        cfg.pop("rope_parameters", None)
        cfg.pop("rope_scaling", None)
        cfg["rope_theta"] = spec["rope_theta"]
    else:
        cfg.pop("rope_theta", None)
        cfg["rope_parameters"] = {"rope_theta": spec["rope_theta"], "rope_type": "default"}
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    return cfg


def build_model(name: str, spec: dict, out_models: str, tok_json: str):
    d = os.path.join(out_models, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    cfg = spec["cfg_cls"](
        vocab_size=VOCAB_SIZE, bos_token_id=0, eos_token_id=2, pad_token_id=0,
        rope_parameters={"rope_theta": spec["rope_theta"], "rope_type": "default"}, **spec["cfg"],
    )
    torch.manual_seed(spec["seed"])
    model = spec["model_cls"](cfg).eval()
    gen = torch.Generator().manual_seed(spec["seed"])
    randomize(model, gen)
    model = model.to(spec["dtype"])
    kw = {}
    if spec["max_shard_size"]:
        kw["max_shard_size"] = spec["max_shard_size"]
    model.save_pretrained(d, **kw)
    # generation_config.json is optional (the Rust side does not read it); keep a fixed, minimal one.
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0}, f, indent=2)
        f.write("\n")
    fix_config_dialect(d, spec)
    write_tokenizer(d, tok_json, template_in_jinja=(spec["rope_dialect"] == "rope_parameters"),
                    tokenizer_class=spec["tokenizer_class"])
    check_tokenizer_consistency(d)
    return d, model


# --------------------------------------------------------------------------- goldens

ROW0_TEXT = "The quick brown fox jumps over the lazy dog near the river in Paris."
ROW1_TEXT = "How many legs does a spider have?"
SEQ, PAD_TAIL = 12, 4

LOSS_DEFINITION = (
    "logits = lora_model(input_ids, attention_mask).logits (f32); for b in 0..2, t in 0..11: "
    "position (b,t) counts when attention_mask[b,t]==1 and attention_mask[b,t+1]==1, target "
    "input_ids[b,t+1]; loss = sum over counted positions of -log_softmax(logits[b,t])[target] "
    "divided by the number of counted positions (loss_mask [2,11] marks them)"
)


def make_inputs(tok: Tokenizer):
    a = tok.encode(ROW0_TEXT, add_special_tokens=False).ids
    b = tok.encode(ROW1_TEXT, add_special_tokens=False).ids
    assert len(a) >= SEQ and len(b) >= SEQ - PAD_TAIL, (len(a), len(b))
    pad = tok.token_to_id(PAD)
    ids = torch.tensor([a[:SEQ], b[: SEQ - PAD_TAIL] + [pad] * PAD_TAIL], dtype=torch.int64)
    mask = torch.ones_like(ids)
    mask[1, SEQ - PAD_TAIL:] = 0
    return ids, mask


def masked_loss(logits, ids, mask):
    lm = (mask[:, :-1] * mask[:, 1:]).to(torch.int64)
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -lp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (nll * lm).sum() / lm.sum(), lm


def set_lora_random(model, seed: int):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * LORA_INIT_STD)


def peft_key(param_name: str) -> str:
    return param_name.replace(".default.", ".")


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def make_goldens(name: str, spec: dict, model_dir: str, mem_model, tok: Tokenizer, out: str, rel_model_dir: str):
    ids, mask = make_inputs(tok)
    # 1) reload from disk (what the Rust tests read), upcast to f32, eager attention.
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    assert base.config.rope_parameters["rope_theta"] == spec["rope_theta"], base.config.rope_parameters
    assert abs(base.config.rms_norm_eps - spec["cfg"]["rms_norm_eps"]) < 1e-12
    if spec["cfg"].get("head_dim"):
        assert base.config.head_dim == spec["cfg"]["head_dim"]
    with torch.no_grad():
        logits = base(input_ids=ids, attention_mask=mask).logits.float()
        # The in-memory weights (already rounded to the on-disk dtype) in a fresh f32 model: a plain
        # `.float()` of a bf16 model would keep a bf16-rounded RoPE inv_freq buffer.
        mem_cfg = mem_model.config
        mem_cfg._attn_implementation = "eager"
        fresh = spec["model_cls"](mem_cfg).eval()
        fresh.load_state_dict({k: v.float() for k, v in mem_model.state_dict().items()})
        mem_logits = fresh(input_ids=ids, attention_mask=mask).logits.float()
    reload_err = rel_err(mem_logits, logits)
    assert reload_err < 1e-6, f"{name}: reloaded model differs from the in-memory one: {reload_err}"
    base_loss, loss_mask = masked_loss(logits, ids, mask)

    # 2) PEFT LoRA with non-zero A and B.
    lcfg = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=LORA_TARGETS, lora_dropout=0.0,
                      bias="none", use_rslora=spec["rslora"], task_type="CAUSAL_LM")
    lora = get_peft_model(base, lcfg)
    set_lora_random(lora, spec["seed"] + 7)
    lora.eval()
    out_logits = lora(input_ids=ids, attention_mask=mask).logits.float()
    loss, _ = masked_loss(out_logits, ids, mask)
    lora.zero_grad()
    loss.backward()
    grads = {}
    n_lora = 0
    for pname, p in sorted(lora.named_parameters(), key=lambda kv: kv[0]):
        if p.requires_grad:
            assert "lora_A" in pname or "lora_B" in pname, pname
            assert p.grad is not None and p.grad.abs().max() > 0, f"zero grad {pname}"
            grads["grad." + peft_key(pname)] = p.grad.detach().clone().contiguous()
            n_lora += 1
        else:
            assert p.grad is None, f"base weight got a gradient: {pname}"
    lora_logits = out_logits.detach()
    assert rel_err(lora_logits, logits) > 1e-3, "LoRA had no visible effect"

    # 3) save the adapter exactly as PEFT does.
    adir = os.path.join(out, "adapters", name)
    if os.path.isdir(adir):
        shutil.rmtree(adir)
    lora.peft_config["default"].base_model_name_or_path = rel_model_dir
    lora.save_pretrained(adir)
    readme = os.path.join(adir, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    # PEFT stores target_modules from a set (order depends on PYTHONHASHSEED): sort it.
    acfg_path = os.path.join(adir, "adapter_config.json")
    acfg = json.load(open(acfg_path))
    acfg["target_modules"] = sorted(acfg["target_modules"])
    with open(acfg_path, "w") as f:
        json.dump(acfg, f, indent=2, sort_keys=True)
        f.write("\n")
    saved = load_file(os.path.join(adir, "adapter_model.safetensors"))
    assert sorted("grad." + k for k in saved) == sorted(grads), "grad keys != adapter keys"

    # 4) PEFT reload of the saved adapter reproduces lora_logits.
    base2 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    reloaded = PeftModel.from_pretrained(base2, adir).eval()
    with torch.no_grad():
        rl = reloaded(input_ids=ids, attention_mask=mask).logits.float()
    peft_reload_err = rel_err(rl, lora_logits)
    assert peft_reload_err < 1e-6, peft_reload_err

    tensors = {
        "input_ids": ids.contiguous(),
        "attention_mask": mask.contiguous(),
        "loss_mask": loss_mask.contiguous(),
        "logits": logits.contiguous(),
        "lora_logits": lora_logits.contiguous(),
        "loss": loss.detach().reshape(()).contiguous(),
        "base_loss": base_loss.detach().reshape(()).contiguous(),
    }
    tensors.update(grads)
    save_file(tensors, os.path.join(out, f"{name}.safetensors"), metadata={"format": "pt"})

    c = base.config
    scale = LORA_ALPHA / math.sqrt(LORA_R) if spec["rslora"] else LORA_ALPHA / LORA_R
    info = {
        "name": name,
        "model_dir": rel_model_dir,
        "adapter_dir": f"tests/golden/adapters/{name}",
        "golden_file": f"tests/golden/{name}.safetensors",
        "architecture": c.architectures[0] if c.architectures else spec["model_cls"].__name__,
        "model_type": c.model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": getattr(c, "head_dim", c.hidden_size // c.num_attention_heads),
        "rope_theta": spec["rope_theta"],
        "rope_config_dialect": "top-level rope_theta" if spec["rope_dialect"] == "top_level"
        else "rope_parameters: {rope_theta, rope_type: default}",
        "rms_norm_eps": spec["cfg"]["rms_norm_eps"],
        "tie_word_embeddings": spec["cfg"]["tie_word_embeddings"],
        "qkv_bias": name.startswith("qwen2"),
        "weights_on_disk": {
            "dtype": str(spec["dtype"]).replace("torch.", ""),
            "files": sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors") or f.endswith(".index.json")),
        },
        "chat_template_location": "chat_template.jinja" if spec["rope_dialect"] == "rope_parameters"
        else "tokenizer_config.json",
        "compute": (
            "weights loaded from disk with AutoModelForCausalLM.from_pretrained(dtype=float32, "
            "attn_implementation='eager'), i.e. "
            + ("bf16 weights upcast to f32; all math in f32" if spec["dtype"] == torch.bfloat16 else "f32 weights, f32 math")
            + "; CPU, 1 torch thread"
        ),
        "inputs": {
            "input_ids": "[2,12] int64: row 0 = first 12 tokens of row0_text; row 1 = first 8 tokens of "
                         "row1_text followed by 4 pad tokens (right padding)",
            "attention_mask": "[2,12] int64, row 1 ends with 4 zeros",
            "position_ids": "default (0..11 for both rows)",
            "row0_text": ROW0_TEXT,
            "row1_text": ROW1_TEXT,
            "pad_token_id": tok.token_to_id(PAD),
            "note": "logits at padded positions (row 1, t >= 8) are whatever transformers computes "
                    "(pad queries attend to the 8 real keys); compare only positions with attention_mask==1",
        },
        "lora": {
            "peft_type": "LORA", "r": LORA_R, "lora_alpha": LORA_ALPHA, "use_rslora": spec["rslora"],
            "scale": scale, "target_modules": LORA_TARGETS, "lora_dropout": 0.0, "bias": "none",
            "weights": f"every lora_A and lora_B = randn * {LORA_INIT_STD} (torch.Generator seed "
                       f"{spec['seed'] + 7}, parameters in sorted name order); stored in adapter_dir",
            "num_tensors": n_lora,
        },
        "loss_definition": LOSS_DEFINITION,
        "loss": float(loss.detach()),
        "base_loss": float(base_loss),
        "loss_tokens": int(loss_mask.sum()),
        "tensors": {
            "input_ids": "[2,12] int64", "attention_mask": "[2,12] int64", "loss_mask": "[2,11] int64",
            "logits": f"[2,12,{c.vocab_size}] f32, base model", "lora_logits": f"[2,12,{c.vocab_size}] f32, base + LoRA",
            "loss": "[] f32", "base_loss": "[] f32 (same definition, base model)",
            "grad.<key>": "d loss / d <key> for every adapter tensor, <key> exactly as in adapter_model.safetensors",
        },
        "checks_done_by_script": {
            "reload_vs_in_memory_max_rel_err": reload_err,
            "peft_reload_of_saved_adapter_max_rel_err": peft_reload_err,
            "lora_vs_base_logits_max_rel_diff": rel_err(lora_logits, logits),
            "every_lora_tensor_has_nonzero_grad": True,
            "no_base_weight_has_grad": True,
        },
        "logits_abs_max": float(logits.abs().max()),
        "versions": versions(),
    }
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    return info


def versions():
    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "tokenizers": tokenizers.__version__}


# --------------------------------------------------------------------------- tokenizer goldens

TOKENIZER_STRINGS = [
    "Hello world",
    "The capital of France is Paris.",
    " leading space and  two spaces",
    "Numbers: 12345 and 3.14, year 2024!",
    "Café naïve résumé",
    "line one\nline two\n\nend",
    "<|im_start|>user\nHi<|im_end|>\n",
    "emoji \U0001F600 ok",
    "decomposed Cafe\u0301 becomes NFC",
]

CHAT_SAMPLE = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris.", "weight": 0},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome is the capital of Italy."},
]


def tokenizer_goldens(model_dir: str, out: str):
    hf = AutoTokenizer.from_pretrained(model_dir)
    strings = []
    for s in TOKENIZER_STRINGS:
        enc = hf(s, add_special_tokens=False, return_offsets_mapping=True)
        strings.append({"text": s, "ids": list(enc["input_ids"]),
                        "offsets": [list(o) for o in enc["offset_mapping"]],
                        "decoded": hf.decode(enc["input_ids"])})
    text, ids, offsets, mask = common.chat_loss_mask(hf, CHAT_SAMPLE)
    gen_prompt = hf.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        tokenize=False, add_generation_prompt=True)
    info = {
        "tokenizer": "tests/golden/models/*/tokenizer.json (identical in the three tiny models)",
        "vocab_size": VOCAB_SIZE,
        "pipeline": "Qwen2-style byte-level BPE: normalizer NFC; pre_tokenizer Sequence[Split(Qwen2 regex, "
                    "isolated), ByteLevel(add_prefix_space=false, use_regex=false)]; post_processor "
                    "ByteLevel(trim_offsets=false); decoder ByteLevel; trained by this script (tokenizers BpeTrainer)",
        "tokenizer_class_in_tokenizer_config": {n: s["tokenizer_class"] for n, s in MODELS.items()},
        "special_tokens": {t: i for i, t in enumerate(SPECIAL_TOKENS)},
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        "chat_template": CHAT_TEMPLATE,
        "encode": strings,
        "encode_note": "tokenizer(text, add_special_tokens=False); offsets are character (not byte) offsets",
        "chat": {
            "messages": CHAT_SAMPLE,
            "rendered": text,
            "ids": ids,
            "offsets": [list(o) for o in offsets],
            "loss_mask": mask,
            "loss_mask_rule": "ARCHITECTURE.md (Loss mask): rendered with apply_chat_template(add_generation_prompt=False) "
                              "('weight' keys dropped), tokenized once without special tokens; loss_mask[i]=1 when "
                              "token i's first character lies inside an assistant content with weight != 0, or "
                              "token i is the <|im_end|> right after such a content",
            "generation_prompt_render": gen_prompt,
            "generation_prompt_ids": hf(gen_prompt, add_special_tokens=False)["input_ids"],
        },
        "versions": versions(),
    }
    with open(os.path.join(out, "tiny_tokenizer.json"), "w") as f:
        json.dump(info, f, indent=2, ensure_ascii=False)
        f.write("\n")


# --------------------------------------------------------------------------- main

def check_tokenizer_consistency(model_dir: str):
    """transformers' AutoTokenizer and a plain tokenizer.json reader give the same ids and offsets."""
    hf = AutoTokenizer.from_pretrained(model_dir)
    raw = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    chat = hf.apply_chat_template([{k: v for k, v in m.items() if k != "weight"} for m in CHAT_SAMPLE],
                                  tokenize=False)
    for s in TOKENIZER_STRINGS + [chat, CORPUS]:
        a = hf(s, add_special_tokens=False, return_offsets_mapping=True)
        b = raw.encode(s, add_special_tokens=False)
        assert list(a["input_ids"]) == b.ids, (model_dir, s[:40], type(hf).__name__)
        assert [tuple(o) for o in a["offset_mapping"]] == [tuple(o) for o in b.offsets], (model_dir, s[:40])
    assert hf.eos_token == EOS and hf.pad_token == PAD and hf.bos_token == BOS, (hf.eos_token, hf.pad_token)
    assert hf.chat_template == CHAT_TEMPLATE


def dir_size(d: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "golden"))
    args = ap.parse_args()
    out = os.path.normpath(args.out)
    out_models = os.path.join(out, "models")
    os.makedirs(out_models, exist_ok=True)

    tok = train_tokenizer()
    tok_json = tokenizer_json(tok)
    again = tokenizer_json(train_tokenizer())
    assert again == tok_json, "tokenizer training is not deterministic"

    summary = {}
    for name, spec in MODELS.items():
        d, mem = build_model(name, spec, out_models, tok_json)
        info = make_goldens(name, spec, d, mem, tok, out, f"tests/golden/models/{name}")
        size = dir_size(d)
        assert size < 2 * 1024 * 1024, f"{d} is {size} bytes"
        summary[name] = {"model_dir_bytes": size, "loss": info["loss"],
                         "files": info["weights_on_disk"]["files"], **info["checks_done_by_script"]}
    tokenizer_goldens(os.path.join(out_models, "llama-tiny"), out)

    digest = hashlib.sha256()
    for r, _, fs in sorted(os.walk(out)):
        for f in sorted(fs):
            p = os.path.join(r, f)
            if ("models" in p or "adapters" in p or f.endswith("tiny.safetensors") or f.endswith("tiny.json")
                    or f == "tiny_tokenizer.json"):
                digest.update(p.encode())
                digest.update(open(p, "rb").read())
    summary["sha256_of_outputs"] = digest.hexdigest()
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
