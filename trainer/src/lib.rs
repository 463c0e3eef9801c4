//! lora-train: the CLI's library half (recipes, optimizer, checkpoints, reports).
pub mod commands;
pub mod logging;
