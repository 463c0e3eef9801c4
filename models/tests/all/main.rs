//! All integration tests of this crate in one test binary: every binary links candle
//! and the tokenizers, and one per file filled the CI disk (stop 17). Add a module here
//! instead of a new file under tests/.
mod fallbacks;
mod gguf;
mod golden;
mod quant;
mod checkpointing;
mod continuous;
mod inference;
mod rollout;
mod smollm2;
