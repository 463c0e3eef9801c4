#!/usr/bin/env python3
"""TRL `DPOTrainer` + PEFT: the reference of the DPO step of `lora-train dpo`.

    python benches/torch/trl_dpo_bench.py --model GGUF --pairs F [--steps 3] [--warmup 1]
        [--batch-size 4] [--max-length 256] [--rank 16] [--threads N]

One step is what `lora-train dpo` does in one optimizer step: the policy (base + LoRA) and
the reference (the same base with the adapter disabled: TRL's PEFT path, no second model)
log-probs of --batch-size pairs (chosen and rejected), the sigmoid loss at beta 0.1, one
AdamW step. Reference pass inside the step (precompute_ref_log_probs=False, as ours without
--precompute-ref-logps). f32 (bf16=False), no gradient checkpointing unless
--gradient-checkpointing (the memory comparison, benches/memory/trl_memory.sh), LoRA r=--rank, alpha
2r, dropout 0 on q,k,v,o,gate,up,down, as ours. The model is the GGUF dequantized to f32 with
the smollm pre-tokenizer restored (scripts/golden/common.py).

A TrainerCallback records wall time from on_step_begin to on_step_end; the first --warmup
steps are not counted. Prints ONE JSON line: step_s (mean of the counted steps),
step_s_each, tokens (prompt + completion tokens of both sides per step), the configuration
and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
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


def cpu_name():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--pairs", required=True, help='{"prompt", "chosen", "rejected"} message lists per line')
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--learning-rate", type=float, default=2e-4)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="TRL 1.16's default (non-reentrant); off unless given, to match our default")
    ap.add_argument("--output-dir", default="/tmp/trl_dpo_bench")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(l) for l in open(args.pairs) if l.strip()]
    ds = Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows])
    model, tok, _info = common.load_model_and_tokenizer(args.model, dtype=torch.float32, attn_implementation="sdpa")
    # The GGUF is dequantized to f32 but still flagged as quantized, which Trainer refuses.
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

    total = args.warmup + args.steps
    cfg = DPOConfig(
        output_dir=args.output_dir, max_steps=total, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, learning_rate=args.learning_rate, beta=0.1, loss_type="sigmoid",
        max_length=args.max_length, precompute_ref_log_probs=False,
        use_cpu=True, bf16=False, gradient_checkpointing=args.gradient_checkpointing, logging_steps=1, report_to="none",
        save_strategy="no", seed=42, dataloader_num_workers=0,
    )
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=lora, callbacks=[StepTimer()])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    counted = times[args.warmup:]
    # Tokens of one step as TRL tokenized them (prompt + completion, both sides, no padding).
    sample = trainer.train_dataset[0]
    per_pair = sum(len(sample.get(k, [])) for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"))
    print(json.dumps({
        "bench": "TRL DPOTrainer + PEFT (reference = adapter disabled, f32)",
        "gradient_checkpointing": args.gradient_checkpointing,
        "model": args.model, "batch_size": args.batch_size, "max_length": args.max_length, "rank": args.rank,
        "warmup": args.warmup, "steps": len(counted), "step_s": round(sum(counted) / max(len(counted), 1), 4),
        "step_s_each": [round(t, 4) for t in times], "first_pair_tokens": per_pair,
        "loss_each": [h.get("loss") for h in logs],
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "trl": __import__("trl").__version__, "peft": __import__("peft").__version__,
        "cpu": cpu_name(), "logical_cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
