//! `lora-datasets`: users' JSONL files -> validated samples -> token batches with loss
//! masks. No tensors here; the trainer converts `Batch`es.
//!
//! - `sample`: the data model (`Format`, `Message`, `Sample`, `Dataset`)
//! - `load` (+ `format`, `parse`, `problems`): reading, format detection, validation that
//!   reports every problem as `FILE:LINE: message`
//! - `template` (+ `pyjson`, `strftime`): chat templates rendered as transformers does
//! - `mask`: tokenization and the loss-mask rule (ARCHITECTURE.md)
//! - `pairs`: preference pairs as tokens, TRL's truncation, pair batches
//! - `batch`: truncation, padding, length grouping, packing, resumable batch order
//! - `split`: held-out splits, subsampling, stratified splits
//! - `stats`: what `lora-train inspect` prints
pub mod batch;
mod format;
pub mod load;
pub mod mask;
pub mod pairs;
mod parse;
pub mod problems;
mod pyjson;
mod rng;
pub mod sample;
pub mod split;
pub mod stats;
mod strftime;
pub mod template;
pub mod trajectory;

pub use batch::{pack_best_fit_decreasing, prepare_samples, Batch, BatchConfig, DataLoader, Prepared};
pub use load::{load_dataset, parse_jsonl};
pub use mask::{tokenize_chat, tokenize_chat_with_tools, tokenize_preference, tokenize_prompt, MaskError, TokenizedSample};
pub use pairs::{fit_pairs, pair_stats, PairBatch, PairLimits, PairLoader, PairStats, PairTruncation, TokenizedPair};
pub use problems::{DatasetError, Problem};
pub use sample::{ChatSample, Dataset, Format, Message, PreferenceSample, PromptSample, Role, Sample};
pub use split::{
    labels_are_categorical, split_eval, stratified_split, subsample, Split, DEFAULT_EVAL_FRACTION, SWEEP_SEED,
    SWEEP_SUBSAMPLE,
};
pub use stats::{compute_stats, DatasetStats, LabelStats, StatsOptions, TokenStats};
pub use template::{ChatTemplate, CHATML_TEMPLATE};
pub use trajectory::{load_trajectories, parse_trajectories, TrajectoryCounts, TrajectoryFilter};
/// UTC time formatting, also for file names the trainer stamps with the time.
pub use strftime::{strftime, unix_now};
