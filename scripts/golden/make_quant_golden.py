"""Goldens of the quantized frozen base (models/src/quant.rs) from bitsandbytes' own code
on CPU (bitsandbytes==0.50.2, pinned in requirements.txt):

- NF4 with double quantization exactly as `bnb.functional.quantize_4bit(A,
  quant_type="nf4", blocksize=64, compress_statistics=True)` stores it (what
  `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
  bnb_4bit_use_double_quant=True)` does to every Linear): packed codes, the 8-bit
  absmax codes, their per-256 scales, the offset, the dynamic map, and the dequantized
  weight (`dequantize_4bit`);
- int8 as `bnb.functional.int8_vectorwise_quant` of the f16 weight (`load_in_8bit`);
- the mean loss of llama-tiny + its PEFT adapter on an NF4 base through transformers +
  PEFT + bitsandbytes on CPU (compute dtype f32).

Writes tests/golden/quant/{nf4.safetensors, quant.json}.
"""
import json
import os
import sys

import torch
import bitsandbytes as bnb
import bitsandbytes.functional as F
from safetensors.torch import save_file

here = os.path.dirname(os.path.abspath(__file__))
root = os.path.abspath(os.path.join(here, "..", ".."))
out_dir = os.path.join(root, "tests", "golden", "quant")
os.makedirs(out_dir, exist_ok=True)

torch.manual_seed(1234)
cases = {
    # 640 blocks of 64: 3 absmax blocks of 256, the last one partial.
    "normal": torch.randn(128, 320) * 0.02,
    # bf16 weights (what most checkpoints hold), widened as bitsandbytes does.
    "bf16": (torch.randn(64, 192) * 0.05).to(torch.bfloat16).float(),
    # A block of zeros and a block with one large outlier.
    "edges": torch.cat([torch.zeros(1, 64), torch.randn(3, 64) * 0.01, torch.tensor([[5.0] + [0.001] * 63])]).reshape(5, 64),
    # Wide range of magnitudes across blocks.
    "ranges": torch.randn(16, 256) * torch.logspace(-4, 1, 16).unsqueeze(1),
}

tensors = {}
meta = {"bitsandbytes": bnb.__version__, "torch": torch.__version__, "cases": {}}
for name, w in cases.items():
    w = w.contiguous()
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    deq = F.dequantize_4bit(packed, state)
    tensors[f"{name}.input"] = w.float()
    tensors[f"{name}.packed"] = packed.reshape(-1).contiguous()
    tensors[f"{name}.qabsmax"] = state.absmax.reshape(-1).contiguous()
    tensors[f"{name}.absmax_scale"] = state.state2.absmax.reshape(-1).float().contiguous()
    tensors[f"{name}.offset"] = state.offset.reshape(1).float()
    tensors[f"{name}.dequantized"] = deq.float().contiguous()
    code = state.state2.code.float().contiguous()
    tensors["dynamic_map"] = code
    cb, scb, _ = F.int8_vectorwise_quant(w.half())
    tensors[f"{name}.int8_codes"] = cb.float().contiguous()  # candle reads no int8 safetensors
    tensors[f"{name}.int8_absmax"] = scb.float().contiguous()
    meta["cases"][name] = list(w.shape)

save_file(tensors, os.path.join(out_dir, "nf4.safetensors"))

# transformers + PEFT + bitsandbytes on CPU: llama-tiny and its PEFT adapter on an NF4 base.
try:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from peft import PeftModel

    model_dir = os.path.join(root, "tests", "golden", "models", "llama-tiny")
    adapter_dir = os.path.join(root, "tests", "golden", "adapters", "llama-tiny")
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=qcfg, device_map="cpu", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, base.config.vocab_size, (2, 24), generator=g)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        base_model = base  # the adapter disabled
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits.float()
            base_loss = torch.nn.functional.cross_entropy(base_logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    meta["nf4_llama_tiny"] = {
        "input_ids": ids.tolist(),
        "mean_loss_with_adapter": loss.item(),
        "mean_loss_base": base_loss.item(),
        "transformers": __import__("transformers").__version__,
        "peft": __import__("peft").__version__,
    }
except Exception as e:  # noqa: BLE001 - recorded, and the Rust test then skips that part
    print(f"transformers + bitsandbytes 4-bit on CPU failed: {e!r}", file=sys.stderr)
    meta["nf4_llama_tiny_error"] = repr(e)

with open(os.path.join(out_dir, "quant.json"), "w") as f:
    json.dump(meta, f, indent=1)
print("wrote", out_dir)
