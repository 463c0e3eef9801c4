//! `lora-train sweep`: train several candidate configurations (packed over one base where
//! they share it) and pick the one with the lowest eval loss (see `sweep/`).
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use crate::config::TrainOptions;
use crate::jobs::{Backend, Launch};
use crate::run_control::{Control, Outcome};
use crate::sweep::{self, SweepOptions};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PackMode {
    /// Candidates that share model, data settings, sequence length and dtypes train
    /// together in one process over one copy of the base.
    Auto,
    /// One process per candidate.
    Off,
}

#[derive(clap::Args, Debug)]
#[command(after_help = "Each candidate is the shared flags with its own keys on top, trained exactly as \
`lora-train sft` would train it, into OUTPUT/candidates/<name>/ (an sft run directory). \
OUTPUT/sweep.json and OUTPUT/report.md hold the scoreboard; the winner has the lowest eval loss.")]
pub struct Args {
    #[command(flatten)]
    pub options: TrainOptions,
    /// TOML file with any of the training options (flags override it).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A candidate as key=value pairs over the shared flags, e.g. `rank=8,lr=1.5e-4`
    /// (any training flag; `lr`, `rank`, `alpha` as short names; list values join with +,
    /// as in target_modules=q+v). Repeatable.
    #[arg(long, value_name = "K=V,..", help_heading = "Sweep")]
    pub candidate: Vec<String>,
    /// One axis of a grid, e.g. `--grid rank=8,16 --grid lr=1e-4,5e-5` (Cartesian product).
    /// Without --candidate and --grid: (rank 8, lr 1.5e-4), (16, 1e-4), (32, 5e-5).
    #[arg(long, value_name = "K=V1,V2", help_heading = "Sweep")]
    pub grid: Vec<String>,
    /// Above this many training samples, candidates train on a subsample of this size
    /// (drawn with --seed); 0 = all.
    #[arg(long, default_value_t = 1000, help_heading = "Sweep")]
    pub tuning_samples: usize,
    /// Share one base between candidates that can (auto) or not (off).
    #[arg(long, value_enum, default_value_t = PackMode::Auto, help_heading = "Sweep")]
    pub pack: PackMode,
    /// At most this many candidates train at the same time.
    #[arg(long, default_value_t = 6, help_heading = "Sweep")]
    pub max_parallel: usize,
    /// Print the plan (placement, memory, time) and stop.
    #[arg(long, help_heading = "Sweep")]
    pub dry_run: bool,
    /// Plan for made-up devices, e.g. "cuda:0=24GiB,cuda:1=80GiB@150TFLOPS" (with --dry-run).
    #[arg(long, value_name = "SPEC", help_heading = "Sweep")]
    pub simulate_devices: Option<String>,
    /// Continue a killed sweep in --output: finished candidates are kept, the others resume
    /// from their latest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Print one JSON object (candidates, winner; the plan with --dry-run) on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub job: crate::jobs::JobArgs,
}

pub fn run(args: Args) -> Result<()> {
    let launch = Launch {
        command: "sweep",
        job: &args.job,
        output: super::sft::run_dir(&args.options, args.config.as_deref()),
        resume_marker: Some(sweep::SWEEP_FILE),
        json: args.json,
        dry_run: args.dry_run,
    };
    if args.job.backend == Backend::Slurm && args.job.job_id.is_none() {
        return submit_to_slurm(&args, &launch);
    }
    if args.dry_run {
        // A local sweep's --dry-run is its plan: no job, nothing trained.
        return train(&args, &Control::default());
    }
    crate::jobs::run_training(launch, |control| train(&args, control))
}

/// The sweep's options: its candidates are placed on `--device` (a list, or auto).
fn sweep_options(args: &Args, slurm: bool, control: &Control) -> Result<(TrainOptions, SweepOptions)> {
    let options = args.options.clone().with_config_file(args.config.as_deref())?;
    let devices = options.device.clone().unwrap_or_else(|| "auto".into());
    if args.max_parallel == 0 {
        bail!("--max-parallel must be at least 1");
    }
    let opts = SweepOptions {
        candidates: args.candidate.clone(),
        grid: args.grid.clone(),
        tuning_samples: args.tuning_samples,
        pack: args.pack == PackMode::Auto,
        devices,
        simulate_devices: args.simulate_devices.clone(),
        max_parallel: args.max_parallel,
        dry_run: args.dry_run,
        resume: args.resume,
        quiet: args.json,
        slurm,
        control: control.clone(),
    };
    Ok((options, opts))
}

/// `--backend slurm`: plan here, write the groups' specs, submit them as a job array and
/// the sweep itself (with --resume, after the array) as the final job.
fn submit_to_slurm(args: &Args, launch: &Launch) -> Result<()> {
    let (options, opts) = sweep_options(args, true, &Control::default())?;
    let record = sweep::run(options, &opts)?;
    let mut groups: Vec<usize> = record.candidates.iter().filter(|c| !sweep::finished(c.status)).filter_map(|c| c.group).collect();
    groups.sort_unstable();
    groups.dedup();
    if groups.is_empty() && !opts.dry_run {
        bail!("every candidate of this sweep has finished; nothing to submit");
    }
    let dir = launch.output.clone().context("sweep needs --output")?;
    crate::jobs::slurm::submit_sweep(launch, &sweep::worker::task_argv(&dir, crate::jobs::slurm::ARRAY_TASK), &groups)
}

fn train(args: &Args, control: &Control) -> Result<()> {
    let (options, opts) = sweep_options(args, false, control)?;
    let record = sweep::run(options, &opts)?;
    if args.json {
        let out = if opts.dry_run {
            serde_json::json!({ "plan": record.plan, "candidates": record.candidates.iter().map(|c| serde_json::json!({
                "name": c.name, "config": c.overrides, "device": c.device, "group": c.group,
                "est_memory_bytes": c.est_memory_bytes, "est_seconds": c.est_seconds, "total_steps": c.total_steps,
            })).collect::<Vec<_>>() })
        } else {
            serde_json::json!({
                "candidates": record.candidates.iter().map(|c| serde_json::json!({
                    "name": c.name, "config": c.overrides, "status": c.status, "eval_loss": c.eval_loss, "output": c.output,
                })).collect::<Vec<_>>(),
                "winner": record.winner,
            })
        };
        println!("{out}");
    } else if !opts.dry_run {
        eprintln!("{}", sweep::report::render(&record).lines().take(4).collect::<Vec<_>>().join("\n"));
        eprintln!("report: {}", record.candidates.first().and_then(|c| c.output.parent()).and_then(|p| p.parent()).map_or(String::new(), |d| d.join("report.md").display().to_string()));
    }
    if !opts.dry_run && !record.candidates.iter().any(|c| c.status == crate::engine::RunStatus::Completed) {
        bail!("no candidate completed (see {})", record.candidates.first().and_then(|c| c.output.parent()).and_then(|p| p.parent()).map_or(String::new(), |d| d.join("sweep.json").display().to_string()));
    }
    Ok(())
}

/// `lora-train sweep-worker --spec FILE`: one group of a sweep (started by `sweep`).
#[derive(clap::Args, Debug)]
pub struct WorkerArgs {
    #[arg(long)]
    pub spec: PathBuf,
}

pub fn run_worker(args: WorkerArgs) -> Result<()> {
    // SIGTERM (the sweep's own cancel, scancel), SIGINT and Slurm's SIGUSR1: the group's
    // runs checkpoint and stop; on SIGUSR1 under --requeue, Slurm restarts the task.
    let control = Control::new(crate::jobs::process::signal_stop_token(), None);
    let result = sweep::worker::run_group(&sweep::worker::read_spec(&args.spec)?, &control);
    if Outcome::of(&result) == (Outcome::Stopped { signal: libc::SIGUSR1 }) {
        crate::jobs::slurm::requeue_self();
    }
    result
}
