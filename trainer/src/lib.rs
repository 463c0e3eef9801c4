//! lora-train: the CLI's library half (recipes, optimizer, checkpoints, reports).
pub mod checkpoint;
pub mod chat;
pub mod clip;
pub mod commands;
pub mod config;
pub mod data;
pub mod device;
pub mod logging;
pub mod metrics;
pub mod optim;
pub mod progress;
pub mod recipes;
pub mod report;
pub mod schedule;
pub mod training;
