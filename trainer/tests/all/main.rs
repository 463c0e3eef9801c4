//! All integration tests of this crate in one test binary: every binary links candle
//! and the tokenizers, and one per file once filled the CI disk. Add a module here
//! instead of a new file under tests/.
mod agent_e2e;
mod cli_errors;
mod cli_flags;
mod common;
mod dashboard_e2e;
mod data_parallel;
mod devices_cli;
mod dpo_e2e;
mod eval_golden;
mod evaluators;
mod export_cli;
mod grpo_e2e;
mod grpo_golden;
mod jobs_e2e;
mod layers;
mod pairs_compare;
mod preference_golden;
mod report_charts;
mod report_to_e2e;
mod serve_e2e;
mod serve_hardening;
mod sft_e2e;
mod slurm_e2e;
mod sweep_e2e;
mod trajectory_sft;
mod workflow_e2e;
