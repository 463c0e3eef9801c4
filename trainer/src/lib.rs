//! lora-train: the CLI's library half (recipes, optimizer, checkpoints, reports).
// `x % n == 0` stays: `is_multiple_of` needs Rust 1.87, the workspace MSRV is 1.85.
#![allow(clippy::manual_is_multiple_of)]
pub mod checkpoint;
pub mod compare;
pub mod chat;
pub mod clip;
pub mod commands;
pub mod config;
pub mod config_file;
pub mod dashboard;
pub mod data;
pub mod device;
pub mod engine;
pub mod evaluators;
pub mod jobs;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod model_card;
pub mod pair_data;
pub mod pairs;
pub mod prompts;
pub mod optim;
pub mod output_file;
pub mod parallel;
pub mod placement;
pub mod progress;
pub mod recipes;
pub mod report;
pub mod schedule;
pub mod serve;
pub mod sft_data;
pub mod sides;
pub mod sweep;
pub mod tensorboard;
pub mod training;
pub mod workflow;
