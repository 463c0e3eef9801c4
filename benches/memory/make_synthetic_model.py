"""A synthetic checkpoint with the published shapes of a real model and random weights
(nothing downloaded): config.json, bf16 safetensors shards written one tensor at a time
(the 8B never sits in memory), and the tiny test tokenizer (token ids stay below every
vocabulary). For the memory benchmarks (benches/memory/run.sh).

    python benches/memory/make_synthetic_model.py qwen2.5-1.5b OUT_DIR
    python benches/memory/make_synthetic_model.py llama-3.1-8b OUT_DIR
    python benches/memory/make_synthetic_model.py qwen2.5-14b OUT_DIR --config-only
"""
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

SHAPES = {
    # Qwen/Qwen2.5-1.5B-Instruct config.json
    "qwen2.5-1.5b": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=151936, hidden_size=1536,
                         intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=32768,
                         attention_bias=True),
    # meta-llama/Llama-3.2-1B-Instruct config.json
    "llama-3.2-1b": dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=2048,
                         intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=131072,
                         rope_scaling=dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192, rope_type="llama3")),
    # Qwen/Qwen2.5-14B-Instruct config.json
    "qwen2.5-14b": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=152064, hidden_size=5120,
                        intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
                        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=32768,
                        attention_bias=True),
    # meta-llama/Llama-3.1-8B-Instruct config.json
    "llama-3.1-8b": dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096,
                         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=131072,
                         rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192, rope_type="llama3")),
}


def tensors(c):
    h, i, l = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    hd = h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    yield "model.embed_tokens.weight", (c["vocab_size"], h)
    for n in range(l):
        p = f"model.layers.{n}"
        yield f"{p}.input_layernorm.weight", (h,)
        yield f"{p}.post_attention_layernorm.weight", (h,)
        for name, shape in [("q_proj", (q, h)), ("k_proj", (kv, h)), ("v_proj", (kv, h)), ("o_proj", (h, q))]:
            yield f"{p}.self_attn.{name}.weight", shape
            if c.get("attention_bias") and name != "o_proj":
                yield f"{p}.self_attn.{name}.bias", (shape[0],)
        for name, shape in [("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))]:
            yield f"{p}.mlp.{name}.weight", shape
    yield "model.norm.weight", (h,)
    if not c["tie_word_embeddings"]:
        yield "lm_head.weight", (c["vocab_size"], h)


def write_config(c, out):
    cfg = dict(c, torch_dtype="bfloat16", bos_token_id=0, eos_token_id=2, hidden_act="silu", head_dim=c["hidden_size"] // c["num_attention_heads"])
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)


def main():
    kind, out = sys.argv[1], sys.argv[2]
    c = SHAPES[kind]
    os.makedirs(out, exist_ok=True)
    if "--config-only" in sys.argv:
        # Enough for `lora-train plan-memory`, which reads only the configuration.
        write_config(c, out)
        print(out)
        return
    g = torch.Generator().manual_seed(0)
    shard, shard_bytes, index, n_shard = {}, 0, {}, 0
    limit = 2 << 30

    def flush():
        nonlocal shard, shard_bytes, n_shard
        if not shard:
            return
        n_shard += 1
        name = f"model-{n_shard:05d}.safetensors"
        save_file(shard, os.path.join(out, name), metadata={"format": "pt"})
        for k in shard:
            index[k] = name
        shard, shard_bytes = {}, 0

    for name, shape in tensors(c):
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16) if name.endswith("norm.weight") else torch.zeros(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=g, dtype=torch.float32) * 0.02).to(torch.bfloat16)
        shard[name] = t
        shard_bytes += t.numel() * 2
        if shard_bytes >= limit:
            flush()
    flush()
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": index}, f)
    write_config(c, out)
    tiny = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "golden", "models", "llama-tiny")
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(os.path.join(tiny, f), os.path.join(out, f))
    print(out)


if __name__ == "__main__":
    main()
