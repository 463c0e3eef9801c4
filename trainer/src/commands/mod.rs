//! One module per subcommand: clap `Args` + `run`; `cli.rs` puts them together.
mod cli;
pub use cli::{command, parse_command_line, run, Cli, Command};

pub mod dpo;
pub mod compare;
pub mod dashboard;
pub mod eval;
pub mod export;
pub mod generate;
pub mod grpo;
pub mod inspect;
pub mod jobs;
pub mod merge;
pub mod model_args;
pub mod orpo;
pub mod pairs;
pub mod plan_memory;
pub mod run;
pub mod sft;
pub mod sweep;
pub mod devices;
pub mod selftest;
pub mod serve;
