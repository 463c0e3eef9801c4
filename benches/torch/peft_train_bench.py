#!/usr/bin/env python3
"""PyTorch + PEFT LoRA training-step benchmark: the reference side of our side-by-side ratios.

    python benches/torch/peft_train_bench.py --model DIR_OR_GGUF [--dtype f32|bf16] [--batch 4]
        [--seq 256] [--rank 16] [--alpha 32] [--steps 5] [--warmup 1] [--threads N] [--lr 1e-4]
        [--seed 0] [--attn sdpa|eager] [--load-in-4bit] [--gradient-checkpointing]

What one step is: a batch of random token ids [batch, seq] (torch.Generator(seed), a fresh batch
every step), `model(input_ids, labels=input_ids).loss` (the full causal-LM loss over all
positions), backward, AdamW(lr, PEFT LoRA parameters only) step, zero_grad. LoRA r=--rank,
alpha=--alpha, dropout 0, on q,k,v,o,gate,up,down; base weights frozen. --dtype bf16 loads the
base weights in bf16; PEFT keeps the adapter weights (and so AdamW state) in f32
(autocast_adapter_dtype=True, its default). A `.gguf` model is dequantized by transformers.

Prints ONE JSON line on stdout: tokens_per_s (batch*seq / mean measured step time), step_s,
step_s_each, peak_rss_mb (resource.getrusage ru_maxrss: the whole process, model loading
included; a GGUF's dequantization peak can dominate it), peak_rss_train_mb (the kernel's VmHWM
reset after loading via /proc/self/clear_refs, so the peak during the warm-up and timed steps),
torch_threads, and the configuration. The first --warmup steps are not timed. On a
shared machine also look at cpu_share (process CPU time / (wall time x threads) over the timed
steps; 1.0 = it had its threads' cores to itself) and tokens_per_cpu_s.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.normpath(os.path.join(HERE, "..", "..", "scripts", "golden")))
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_model(ref: str, dtype, attn: str, load_in_4bit: bool = False):
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=dtype, attn_implementation=attn)
    if load_in_4bit:
        # QLoRA as its users configure it: NF4, double-quantized absmax, compute in --dtype.
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = "cpu"
    if ref.endswith(".gguf") and os.path.isfile(ref):
        d, f = os.path.split(os.path.abspath(ref))
        return AutoModelForCausalLM.from_pretrained(d, gguf_file=f, **kwargs)
    return AutoModelForCausalLM.from_pretrained(ref, **kwargs)


def vm_kb(field: str) -> float:
    """A kB field of /proc/self/status (VmRSS, VmHWM); 0 when unavailable."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so that it covers only the training steps."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=None, help="default 2 * rank")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attn", default="sdpa", help="transformers attn_implementation (sdpa is its default)")
    ap.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes NF4 base with double quantization (QLoRA)")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="model.gradient_checkpointing_enable() (non-reentrant)")
    args = ap.parse_args()
    if args.steps < 1:
        ap.error("--steps must be >= 1")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dtype = torch.float32 if args.dtype == "f32" else torch.bfloat16

    from peft import LoraConfig, get_peft_model

    t0 = time.perf_counter()
    model = load_model(args.model, dtype, args.attn, args.load_in_4bit)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    alpha = args.alpha if args.alpha is not None else 2 * args.rank
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=alpha, lora_dropout=0.0,
                                             target_modules=TARGETS, bias="none", task_type="CAUSAL_LM"))
    model.train()
    load_s = time.perf_counter() - t0
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in model.parameters())
    lora_dtype = str(trainable[0].dtype).replace("torch.", "")
    opt = torch.optim.AdamW(trainable, lr=args.lr)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(args.seed)

    # Matmul parameters the step multiplies with (all linear layers incl. lm_head).
    matmul_params = sum(m.weight.numel() for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and "lora_" not in n)
    cfg = model.config
    tokens = args.batch * args.seq
    attn_flops = (12 * args.batch * args.seq * args.seq * cfg.num_attention_heads
                  * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads) * cfg.num_hidden_layers)
    flops_est = 4 * matmul_params * tokens + attn_flops

    gc.collect()
    rss_after_load_mb = vm_kb("VmRSS") / 1024.0
    hwm_reset = reset_peak_rss()
    times, losses = [], []
    cpu_timed = 0.0
    for step in range(args.warmup + args.steps):
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen)
        s = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - s
        losses.append(float(out.loss.detach()))
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        if step >= args.warmup:
            times.append(dt)
            cpu_timed += (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)

    step_s = statistics.mean(times)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    peak_rss_train_mb = vm_kb("VmHWM") / 1024.0 if hwm_reset else None
    result = {
        "bench": "pytorch+peft lora train step",
        "model": args.model,
        "dtype": args.dtype,
        "lora_dtype": lora_dtype,
        "batch": args.batch,
        "seq": args.seq,
        "rank": args.rank,
        "alpha": alpha,
        "targets": TARGETS,
        "optimizer": f"AdamW(lr={args.lr}) over LoRA parameters",
        "loss": "full causal LM loss (labels = input_ids), random tokens",
        "attn_implementation": args.attn,
        "load_in_4bit": args.load_in_4bit,
        "gradient_checkpointing": args.gradient_checkpointing,
        "steps": args.steps,
        "warmup": args.warmup,
        "tokens_per_s": tokens / step_s,
        "step_s": step_s,
        "step_s_min": min(times),
        "step_s_each": [round(t, 4) for t in times],
        "peak_rss_mb": round(peak_rss_mb, 1),
        "peak_rss_train_mb": round(peak_rss_train_mb, 1) if peak_rss_train_mb else None,
        "rss_after_load_mb": round(rss_after_load_mb, 1),
        "cpu_s_per_step": round(cpu_timed / len(times), 3),
        "cpu_share": round(cpu_timed / sum(times) / torch.get_num_threads(), 3),
        "tokens_per_cpu_s": tokens / (cpu_timed / len(times)),
        "torch_threads": torch.get_num_threads(),
        "trainable_params": n_trainable,
        "total_params": n_total,
        "matmul_params": matmul_params,
        "flops_per_step_est": flops_est,
        "flops_formula": "4 * matmul_params * tokens + 12 * batch * seq^2 * heads * head_dim * layers",
        "achieved_gflops": flops_est / step_s / 1e9,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "load_s": round(load_s, 2),
        "torch": torch.__version__,
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
