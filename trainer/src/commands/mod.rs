//! One module per subcommand: clap `Args` + `run`.
pub mod dpo;
pub mod compare;
pub mod eval;
pub mod generate;
pub mod grpo;
pub mod inspect;
pub mod jobs;
pub mod merge;
pub mod model_args;
pub mod orpo;
pub mod pairs;
pub mod run;
pub mod sft;
pub mod sweep;
pub mod devices;
pub mod selftest;
pub mod serve;
