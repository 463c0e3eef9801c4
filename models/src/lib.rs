//! Llama / Qwen2 / Qwen3 decoders with LoRA.
