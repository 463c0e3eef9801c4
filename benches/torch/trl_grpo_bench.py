#!/usr/bin/env python3
"""TRL `GRPOTrainer` + PEFT: the reference of the whole GRPO step of `lora-train grpo`.

    python benches/torch/trl_grpo_bench.py --model GGUF --prompts F [--steps 3] [--warmup 1]
        [--num-generations 8] [--prompts-per-step 4] [--max-completion-length 16] [--rank 16]
        [--threads N] [--dtype f32|bf16]

One step is what `lora-train grpo` does in one optimizer step: sample G completions for each
of P prompts with the current adapter (TRL's transformers `generate`, no vLLM), score them
with a Python copy of our `numeric` evaluator (the last number of the answer against
`ground_truth`, relative tolerance 1e-6, absolute below 1), compute the advantages and take
one AdamW step of the dapo loss on all P x G completions as ONE micro-batch
(per_device_train_batch_size = P x G, gradient_accumulation_steps = 1,
steps_per_generation = 1). TRL's defaults otherwise (beta 0, epsilon 0.2, temperature 1,
top_k 0, top_p 1, scale_rewards group), with two deliberate exceptions that make the
configuration ours: f32 (bf16=False; TRL would pick bf16 on a bf16-capable host) and no
gradient checkpointing unless --gradient-checkpointing (TRL 1.16 turns it on by default;
for step time we do not checkpoint, and recomputing the forward would only slow TRL down;
the memory comparison, benches/memory/trl_memory.sh, runs both). `--dtype bf16` loads the
model in bfloat16 and sets `bf16=True` (autocast); PEFT keeps the LoRA weights in f32
(`autocast_adapter_dtype`), as ours keeps them with `--dtype bf16`. LoRA r=--rank, alpha 2r, dropout 0 on
q,k,v,o,gate,up,down, as ours. The model is the GGUF dequantized to f32 with the smollm
pre-tokenizer restored (scripts/golden/common.py).

A TrainerCallback records wall time from on_step_begin to on_step_end (generation, scoring
and training all run inside the step); the first --warmup steps are not counted. Prints ONE
JSON line: step_s (mean of the counted steps), step_s_each, the configuration, the mean
reward and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.normpath(os.path.join(HERE, "..", "..", "scripts", "golden")))
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
import common  # noqa: E402

import torch  # noqa: E402

NUMBER = re.compile(r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|\.\d+")


def last_number(text: str):
    """trainer/src/evaluators/builtin.rs `last_number`, line for line."""
    matches = list(NUMBER.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    try:
        value = float(m.group(0).replace(",", ""))
    except ValueError:
        return None
    before = text[: m.start()][::-1]
    negative = before[:1] in ("-", "\u2212") and not (len(before) > 1 and before[1].isalnum())
    return -value if negative else value


def numeric_reward(completions, ground_truth, **_):
    """Our `numeric` evaluator: 1.0 when the answer's last number matches, else 0.0."""
    out = []
    for c, truth in zip(completions, ground_truth):
        text = c[-1]["content"] if isinstance(c, list) else c
        got, want = last_number(text), last_number(str(truth))
        out.append(float(got is not None and want is not None and abs(got - want) <= 1e-6 * max(abs(want), 1.0)))
    return out


def cpu_name():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True, help='{"messages": [...], "ground_truth": ...} per line')
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--num-generations", type=int, default=8)
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--max-completion-length", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--learning-rate", type=float, default=2e-4)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="TRL 1.16's default (non-reentrant); off unless given, to match our default")
    ap.add_argument("--output-dir", default="/tmp/trl_grpo_bench")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rows = [json.loads(l) for l in open(args.prompts) if l.strip()]
    ds = Dataset.from_list([{"prompt": r["messages"], "ground_truth": str(r["ground_truth"])} for r in rows])
    model, tok, _info = common.load_model_and_tokenizer(args.model, dtype=torch.float32 if args.dtype == "f32" else torch.bfloat16, attn_implementation="sdpa")
    # transformers has dequantized the GGUF to plain f32 tensors but still flags the model as
    # GGUF-quantized, which Trainer refuses to train; the flag describes the file, not the weights.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    times = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    batch = args.prompts_per_step * args.num_generations
    total = args.warmup + args.steps
    cfg = GRPOConfig(
        output_dir=args.output_dir, max_steps=total, per_device_train_batch_size=batch,
        gradient_accumulation_steps=1, steps_per_generation=1, num_generations=args.num_generations,
        max_completion_length=args.max_completion_length, learning_rate=args.learning_rate,
        use_cpu=True, bf16=args.dtype == "bf16", gradient_checkpointing=args.gradient_checkpointing, logging_steps=1, report_to="none",
        save_strategy="no", seed=42, dataloader_num_workers=0,
    )
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    trainer = GRPOTrainer(model=model, reward_funcs=numeric_reward, args=cfg, train_dataset=ds,
                          processing_class=tok, peft_config=lora, callbacks=[StepTimer()])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    counted = times[args.warmup:]
    print(json.dumps({
        "bench": "TRL GRPOTrainer + PEFT (transformers generate, f32)",
        "gradient_checkpointing": args.gradient_checkpointing, "dtype": args.dtype,
        "model": args.model, "prompts_per_step": args.prompts_per_step, "num_generations": args.num_generations,
        "max_completion_length": args.max_completion_length, "rank": args.rank, "warmup": args.warmup,
        "steps": len(counted), "step_s": round(sum(counted) / max(len(counted), 1), 4),
        "step_s_each": [round(t, 4) for t in times],
        "reward_each": [h.get("reward") for h in logs],
        "completion_length_each": [h.get("completions/mean_length") for h in logs],
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "trl": __import__("trl").__version__, "peft": __import__("peft").__version__,
        "cpu": cpu_name(), "logical_cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
