//! All integration tests of this crate in one test binary: every binary links candle
//! and the tokenizers, and one per file once filled the CI disk. Add a module here
//! instead of a new file under tests/.
mod fallbacks;
mod gguf;
mod gguf_export;
mod golden;
mod quant;
mod checkpointing;
mod continuous;
mod inference;
mod rollout;
mod smollm2;
