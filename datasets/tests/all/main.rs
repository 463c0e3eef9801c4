//! All integration tests of this crate in one test binary: every binary links candle
//! and the tokenizers, and one per file once filled the CI disk. Add a module here
//! instead of a new file under tests/.
mod common;
mod fuzz;
mod golden_masks;
mod golden_templates;
mod stats;
mod validation;
