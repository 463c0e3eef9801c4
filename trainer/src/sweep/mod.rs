//! `lora-train sweep`: several candidate configurations, packed onto the devices, each
//! trained exactly as `sft` would train it (its directory under `DIR/candidates/<name>/`
//! is an `sft` run directory), then a scoreboard and a winner by eval loss.
//!
//! The parent process plans (candidates -> estimates -> groups on devices), launches one
//! worker process per group (`lora-train sweep-worker`), watches their metrics files for
//! progress, and records each candidate's outcome in `DIR/sweep.json`. Worker processes
//! keep a crash contained to its group.
pub mod candidates;
pub mod plan;
pub mod report;
pub mod worker;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::config::{TrainConfig, TrainOptions};
use crate::engine::{self, Method, RunStatus};
use crate::run_control::Control;
use crate::metrics::MetricsRow;
use crate::recipes::sft::{self, Sft, SftData};
use plan::{DeviceSlot, Item, Plan};
use crate::share_key::ShareKey;
use worker::{GroupMember, GroupSpec};

pub const SWEEP_FILE: &str = "sweep.json";
pub const CANDIDATES_DIR: &str = "candidates";

/// How the sweep runs (everything that is not a training flag).
#[derive(Clone, Debug)]
pub struct SweepOptions {
    pub candidates: Vec<String>,
    pub grid: Vec<String>,
    /// Subsample the training set to this many samples for tuning (0 = all).
    pub tuning_samples: usize,
    pub pack: bool,
    /// `auto`, or a list like `cpu` / `cuda:0,cuda:1`.
    pub devices: String,
    pub simulate_devices: Option<String>,
    pub max_parallel: usize,
    pub dry_run: bool,
    pub resume: bool,
    pub quiet: bool,
    /// `--backend slurm`: plan and write the groups' specs; the caller submits them.
    pub slurm: bool,
    /// When to stop (the workers are sent the same signal) and who hears the steps.
    pub control: Control,
}

/// One candidate's line in `sweep.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CandidateRecord {
    pub name: String,
    /// The keys this candidate sets over the shared flags.
    pub overrides: BTreeMap<String, String>,
    pub config: TrainConfig,
    pub status: RunStatus,
    pub output: PathBuf,
    pub device: Option<String>,
    pub group: Option<usize>,
    pub steps: usize,
    pub total_steps: usize,
    pub eval_loss_before: Option<f64>,
    pub eval_loss: Option<f64>,
    pub train_loss: Option<f64>,
    pub elapsed_s: Option<f64>,
    pub est_memory_bytes: u64,
    pub est_seconds: f64,
    /// Training tokens and FLOPs the planner counted (the workflows' cost estimate).
    #[serde(default)]
    pub est_tokens: u64,
    #[serde(default)]
    pub est_flops: f64,
    /// Measured peak RSS of the worker process that trained this candidate (its group).
    #[serde(default)]
    pub group_peak_rss_bytes: Option<u64>,
    pub error: Option<String>,
}

/// `DIR/sweep.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SweepRecord {
    pub version: String,
    pub status: String,
    pub candidates: Vec<CandidateRecord>,
    pub winner: Option<String>,
    /// How the winner was chosen (`eval_loss`, or `train_loss` without held-out data).
    pub criterion: String,
    pub plan: serde_json::Value,
    pub wall_s: f64,
    /// Peak RSS of the planning/monitoring parent process.
    #[serde(default)]
    pub parent_peak_rss_bytes: Option<u64>,
}

/// Plan (and unless `--dry-run`, run) the sweep. Returns the record; the caller prints it.
pub fn run(base: TrainOptions, opts: &SweepOptions) -> Result<SweepRecord> {
    let wall = Instant::now();
    let base_cfg = base.clone().resolve()?;
    let dir = base_cfg.output.clone();
    let cands = candidates::build(&base, &opts.candidates, &opts.grid)?;

    // ---- candidate configurations (each is the `sft` run it stands for) ----------------
    let mut configs = Vec::new();
    for c in &cands {
        let mut o = candidates::apply(&base, &c.overrides)?;
        o.output = Some(dir.join(CANDIDATES_DIR).join(&c.name));
        if o.max_train_samples.is_none() && opts.tuning_samples > 0 {
            o.max_train_samples = Some(opts.tuning_samples);
        }
        configs.push(o.resolve().with_context(|| format!("candidate {}", c.name))?);
    }
    if !opts.resume && !opts.dry_run && (dir.join(SWEEP_FILE).exists() || dir.join(CANDIDATES_DIR).exists()) {
        bail!("{} already holds a sweep; pass --resume to continue it, or choose another --output", dir.display());
    }
    if opts.resume {
        // Refuse a changed command line here, with the differences, rather than in workers.
        for (c, cfg) in cands.iter().zip(&configs) {
            if cfg.output.join(engine::RUN_FILE).exists() {
                engine::prepare_run_dir(&cfg.output, cfg, &serde_json::Value::Null, true).with_context(|| format!("--resume: candidate {}", c.name))?;
            }
        }
    }

    // ---- estimates: real token counts of each candidate's data -------------------------
    let model_cfg = lora_models::load_model_config(&base_cfg.model).with_context(|| format!("reading the configuration of {}", base_cfg.model))?;
    let bundle = lora_models::load_tokenizer_bundle(&base_cfg.model)?;
    let mut data_cache: BTreeMap<ShareKey, (usize, usize, u64, usize)> = BTreeMap::new();
    let mut records = Vec::new();
    let mut items = Vec::new();
    for (c, cfg) in cands.iter().zip(&configs) {
        let key = ShareKey::steps(cfg);
        let (steps_per_epoch, train_samples, tokens_per_epoch, longest) = match data_cache.get(&key) {
            Some(v) => *v,
            None => {
                let (train, eval) = sft::load_split(cfg)?;
                let data = SftData::tokenize(&bundle, &train, eval.as_ref(), cfg)?;
                let m = Sft::new(&data, cfg);
                let longest = data.train.samples.iter().map(|s| s.len()).max().unwrap_or(1);
                let v = (m.steps_per_epoch(), m.sample_counts().0, data.train.tokens as u64, longest);
                data_cache.insert(key, v);
                v
            }
        };
        let epochs = cfg.epochs.unwrap_or_else(|| TrainConfig::default_epochs(train_samples));
        let total_steps = cfg.steps.unwrap_or(epochs * steps_per_epoch);
        let tokens = tokens_per_epoch * total_steps as u64 / steps_per_epoch.max(1) as u64;
        let row_len = if cfg.packing { cfg.max_sequence_length } else { longest };
        let estimate = plan::estimate(&model_cfg, cfg, tokens, row_len);
        items.push(Item { name: c.name.clone(), pack_key: ShareKey::base(cfg).into_string(), estimate: estimate.clone() });
        records.push(CandidateRecord {
            name: c.name.clone(),
            overrides: c.overrides.clone(),
            config: cfg.clone(),
            status: RunStatus::Pending,
            output: cfg.output.clone(),
            device: None,
            group: None,
            steps: 0,
            total_steps,
            eval_loss_before: None,
            eval_loss: None,
            train_loss: None,
            elapsed_s: None,
            est_memory_bytes: estimate.base_bytes + estimate.own_bytes,
            est_seconds: 0.0,
            est_tokens: estimate.tokens,
            est_flops: estimate.flops,
            group_peak_rss_bytes: None,
            error: None,
        });
    }

    // ---- the plan -----------------------------------------------------------------------
    let devices = resolve_devices(opts)?;
    let plan = plan::pack(&items, &devices, opts.max_parallel, opts.pack)?;
    for (gi, g) in plan.groups.iter().enumerate() {
        let rate = devices.iter().find(|d| d.name == g.device).map_or(1.0, |d| d.flops_per_s);
        for name in &g.candidates {
            if let Some(r) = records.iter_mut().find(|r| &r.name == name) {
                r.device = Some(g.device.clone());
                r.group = Some(gi);
                r.est_seconds = items.iter().find(|i| &i.name == name).map_or(0.0, |i| i.estimate.flops / rate);
            }
        }
    }
    let mut record = SweepRecord {
        version: env!("CARGO_PKG_VERSION").into(),
        status: "planned".into(),
        candidates: records,
        winner: None,
        criterion: "eval_loss".into(),
        plan: serde_json::to_value(&plan)?,
        wall_s: 0.0,
        parent_peak_rss_bytes: None,
    };
    if !opts.quiet {
        eprint!("{}", report::plan_table(&plan, &record.candidates));
    }
    if opts.dry_run {
        return Ok(record);
    }
    // On Slurm the plan is for the compute nodes' GPUs, which the submitting machine may
    // not have: --simulate-devices describes them.
    if devices.iter().any(|d| d.simulated) && !opts.slurm {
        bail!("--simulate-devices only plans: add --dry-run (or submit with --backend slurm)");
    }
    if opts.slurm {
        // Each group with work left becomes one task of a Slurm job array that runs
        // `sweep-worker` on its spec; the sweep's final job collects the outcome.
        std::fs::create_dir_all(dir.join("groups")).with_context(|| format!("creating {}", dir.display()))?;
        for r in record.candidates.iter_mut() {
            refresh(r)?;
        }
        for k in 0..plan.groups.len() {
            if let Some(spec) = group_spec(dir.as_path(), &plan, k, &record) {
                crate::checkpoint::write_atomic(&worker::spec_path(&dir, k), &serde_json::to_vec_pretty(&spec)?)?;
            }
        }
        record.status = "submitted".into();
        save(&dir, &record)?;
        return Ok(record);
    }

    // ---- run the groups ------------------------------------------------------------------
    std::fs::create_dir_all(dir.join("groups")).with_context(|| format!("creating {}", dir.display()))?;
    for r in record.candidates.iter_mut() {
        refresh(r)?;
    }
    record.status = "running".into();
    save(&dir, &record)?;
    // Planned and written: from here on the sweep is a job.
    opts.control.started();
    execute(&dir, &plan, &mut record, opts)?;
    if let Some(signal) = opts.control.stop_requested() {
        for r in record.candidates.iter_mut() {
            refresh(r)?;
        }
        record.status = "stopped".into();
        record.wall_s = wall.elapsed().as_secs_f64();
        save(&dir, &record)?;
        return Err(crate::run_control::Stopped { signal, checkpoints: vec![] }.into());
    }

    // ---- outcome --------------------------------------------------------------------------
    read_outcome(&mut record)?;
    record.status = if record.candidates.iter().any(|c| c.status == RunStatus::Completed) { "completed".into() } else { "failed".into() };
    record.wall_s = wall.elapsed().as_secs_f64();
    record.parent_peak_rss_bytes = worker::peak_rss_bytes();
    save(&dir, &record)?;
    report::write(&dir, &record)?;
    Ok(record)
}

/// Candidates can share one process and one copy of the base when these agree.
fn resolve_devices(opts: &SweepOptions) -> Result<Vec<DeviceSlot>> {
    if let Some(spec) = &opts.simulate_devices {
        return plan::parse_simulated(spec);
    }
    let gpus = plan::gpu_devices();
    let spec = opts.devices.trim();
    if spec == "auto" {
        return Ok(if gpus.is_empty() { vec![plan::cpu_device()] } else { gpus });
    }
    spec.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|name| match crate::device::parse_spec(name)? {
            crate::device::DeviceSpec::Cpu => Ok(plan::cpu_device()),
            crate::device::DeviceSpec::Cuda(i) => gpus
                .iter()
                .find(|g| g.name == format!("cuda:{i}"))
                .cloned()
                .with_context(|| format!("--device: cuda:{i} is not available ({})", crate::device::cuda_device_count().err().map_or("no such GPU".into(), |e| format!("{e:#}")))),
            crate::device::DeviceSpec::Auto => bail!("--device: `auto` cannot be part of a list"),
        })
        .collect()
}

/// A running group.
struct Running {
    group: usize,
    device: String,
    child: Child,
    members: Vec<String>,
}

/// Launch groups as devices and the `--max-parallel` budget allow, watch them, record
/// outcomes. Candidates already completed or diverged (a resumed sweep) are not rerun.
fn execute(dir: &Path, plan: &Plan, record: &mut SweepRecord, opts: &SweepOptions) -> Result<()> {
    let bars = Bars::new(record, opts.quiet, opts.control.clone());
    let mut queue: Vec<usize> = (0..plan.groups.len()).collect();
    let mut running: Vec<Running> = Vec::new();
    let mut stopping = false;
    loop {
        // Asked to stop (jobs cancel, Ctrl-C): the workers checkpoint and stop too, and
        // no further group starts.
        if let Some(signal) = opts.control.stop_requested().filter(|_| !stopping) {
            stopping = true;
            queue.clear();
            for r in &running {
                let _ = crate::jobs::process::send_signal(r.child.id() as i64, signal);
            }
        }
        // Start what fits: one group per device at a time, within the parallel budget.
        let mut i = 0;
        while i < queue.len() {
            let g = &plan.groups[queue[i]];
            let active: usize = running.iter().map(|r| r.members.len()).sum();
            let device_busy = running.iter().any(|r| r.device == g.device);
            let Some(spec) = group_spec(dir, plan, queue[i], record) else {
                queue.remove(i);
                continue;
            };
            if device_busy || (active > 0 && active + spec.members.len() > plan.max_parallel) {
                i += 1;
                continue;
            }
            let k = queue.remove(i);
            let members = spec.members.iter().map(|m| m.name.clone()).collect();
            let child = spawn_worker(dir, k, &spec)?;
            for m in &spec.members {
                if let Some(c) = record.candidates.iter_mut().find(|c| c.name == m.name) {
                    c.status = RunStatus::Running;
                }
            }
            running.push(Running { group: k, device: g.device.clone(), child, members });
        }
        if running.is_empty() && queue.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
        bars.update(record);
        let mut still = Vec::new();
        for mut r in running.drain(..) {
            match r.child.try_wait()? {
                None => still.push(r),
                Some(status) => {
                    let peak = worker::read_peak_rss(&worker::result_path(dir, r.group));
                    for name in &r.members {
                        if let Some(c) = record.candidates.iter_mut().find(|c| &c.name == name) {
                            refresh(c)?;
                            c.group_peak_rss_bytes = peak;
                            if !finished(c.status) {
                                c.status = RunStatus::Failed;
                                c.error = Some(format!("its worker process exited ({status}); see {}: {}", worker::log_path(dir, r.group).display(), last_error(&worker::log_path(dir, r.group), name)));
                            }
                            bars.done(c);
                        }
                    }
                    save(dir, record)?;
                }
            }
        }
        running = still;
    }
    bars.update(record);
    bars.finish();
    Ok(())
}

/// A candidate that is done for good (a resumed sweep does not rerun it).
pub fn finished(s: RunStatus) -> bool {
    matches!(s, RunStatus::Completed | RunStatus::Diverged)
}

/// What group `k`'s worker trains: its candidates that are not finished (each resuming
/// where its run directory holds a run); `None` when there are none.
fn group_spec(dir: &Path, plan: &Plan, k: usize, record: &SweepRecord) -> Option<GroupSpec> {
    let g = &plan.groups[k];
    let members: Vec<GroupMember> = g
        .candidates
        .iter()
        .filter_map(|n| record.candidates.iter().find(|c| &c.name == n))
        .filter(|c| !finished(c.status))
        .map(|c| GroupMember { name: c.name.clone(), config: c.config.clone(), resume: c.output.join(engine::RUN_FILE).exists(), recipe: None })
        .collect();
    (!members.is_empty()).then(|| GroupSpec { result_file: Some(worker::result_path(dir, k)), device: g.device.clone(), members, recipe: worker::RecipeSpec::Sft })
}

fn spawn_worker(dir: &Path, k: usize, spec: &GroupSpec) -> Result<Child> {
    let spec_path = worker::spec_path(dir, k);
    crate::checkpoint::write_atomic(&spec_path, &serde_json::to_vec_pretty(spec)?)?;
    let log = std::fs::File::create(worker::log_path(dir, k)).with_context(|| format!("creating {}", worker::log_path(dir, k).display()))?;
    let exe = std::env::current_exe().context("locating the lora-train binary")?;
    Command::new(exe)
        .arg("sweep-worker")
        .arg("--spec")
        .arg(&spec_path)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting the worker of group {k}"))
}

/// The most telling line of a worker log for a candidate: an error naming it, else the
/// last error or panic, else the last line.
fn last_error(log: &Path, name: &str) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    lines
        .iter()
        .rev()
        .find(|l| l.contains("error") && l.contains(name))
        .or_else(|| lines.iter().rev().find(|l| l.contains("error") || l.contains("panicked")))
        .or(lines.last())
        .map_or_else(|| "no output (killed?)".into(), |l| l.to_string())
}

/// Read a candidate's run directory: status, steps and losses so far. A damaged
/// `metrics.jsonl` is an error naming FILE:LINE, never a candidate without losses.
fn refresh(c: &mut CandidateRecord) -> Result<()> {
    if let Some(s) = engine::read_status(&c.output) {
        if s != RunStatus::Running || c.status != RunStatus::Failed {
            c.status = s;
        }
    }
    let rows: Vec<MetricsRow> = crate::metrics::read_metrics_so_far(&c.output.join(engine::METRICS_FILE))?;
    c.steps = rows.last().map_or(0, |r| r.step);
    c.eval_loss_before = rows.iter().find(|r| r.step == 0).and_then(|r| r.eval_loss);
    c.eval_loss = rows.iter().rev().find(|r| r.step > 0 && r.eval_loss.is_some()).and_then(|r| r.eval_loss);
    c.train_loss = rows.iter().rev().find_map(|r| r.loss);
    c.elapsed_s = rows.last().map(|r| r.elapsed_s);
    Ok(())
}

/// Every candidate's final state, then the winner.
fn read_outcome(record: &mut SweepRecord) -> Result<()> {
    for c in record.candidates.iter_mut() {
        refresh(c)?;
    }
    choose_winner(record);
    Ok(())
}

/// Lowest eval loss among completed candidates; by final train loss when no candidate
/// has held-out data.
fn choose_winner(record: &mut SweepRecord) {
    let done: Vec<&CandidateRecord> = record.candidates.iter().filter(|c| c.status == RunStatus::Completed).collect();
    let by = |f: fn(&CandidateRecord) -> Option<f64>| {
        done.iter().filter_map(|c| f(c).filter(|v| v.is_finite()).map(|v| (v, c.name.clone()))).min_by(|a, b| a.0.total_cmp(&b.0)).map(|(_, n)| n)
    };
    let (winner, criterion) = match by(|c| c.eval_loss) {
        Some(w) => (Some(w), "eval_loss"),
        None => (by(|c| c.train_loss), "train_loss"),
    };
    record.winner = winner;
    record.criterion = criterion.into();
}

fn save(dir: &Path, record: &SweepRecord) -> Result<()> {
    crate::checkpoint::write_atomic(&dir.join(SWEEP_FILE), &serde_json::to_vec_pretty(record)?)
}

/// One progress bar per candidate, fed from its `metrics.jsonl`.
struct Bars {
    multi: MultiProgress,
    bars: Vec<(String, ProgressBar)>,
    tty: bool,
    quiet: bool,
    control: Control,
}

impl Bars {
    fn new(record: &SweepRecord, quiet: bool, control: Control) -> Self {
        let tty = !quiet && std::io::IsTerminal::is_terminal(&std::io::stderr());
        let multi = MultiProgress::with_draw_target(if tty { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() });
        let width = record.candidates.iter().map(|c| c.name.len()).max().unwrap_or(8);
        let style = ProgressStyle::with_template(&format!("{{prefix:{width}}} [{{bar:25.cyan/blue}}] {{pos}}/{{len}} {{msg}}"))
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        let bars = record
            .candidates
            .iter()
            .map(|c| {
                let b = multi.add(ProgressBar::new(c.total_steps as u64));
                b.set_style(style.clone());
                b.set_prefix(c.name.clone());
                b.set_position(c.steps as u64);
                b.set_message(if finished(c.status) { format!("{:?}", c.status).to_lowercase() } else { "waiting".into() });
                (c.name.clone(), b)
            })
            .collect();
        Bars { multi, bars, tty, quiet, control }
    }

    fn update(&self, record: &mut SweepRecord) {
        for c in record.candidates.iter_mut().filter(|c| c.status == RunStatus::Running) {
            // Only the bars read this; a damaged file fails the sweep at its next
            // `refresh` outside the bars (a worker's exit, the outcome).
            if refresh(c).is_err() {
                continue;
            }
            if let Some((_, b)) = self.bars.iter().find(|(n, _)| *n == c.name) {
                b.set_position(c.steps as u64);
                let f = |x: Option<f64>| x.map_or("-".into(), |v| format!("{v:.4}"));
                b.set_message(format!("loss {} eval {}", f(c.train_loss), f(c.eval_loss.or(c.eval_loss_before))));
            }
        }
        // The sweep's job row (`jobs list`): the steps of all candidates together and the
        // lowest train loss so far.
        let (done, total) = record.candidates.iter().fold((0, 0), |(d, t), c| (d + c.steps, t + c.total_steps));
        let best = record.candidates.iter().filter_map(|c| c.train_loss).reduce(f64::min);
        if total > 0 {
            self.control.on_step(done, total.max(done), best);
        }
    }

    fn done(&self, c: &CandidateRecord) {
        let status = format!("{:?}", c.status).to_lowercase();
        if let Some((_, b)) = self.bars.iter().find(|(n, _)| *n == c.name) {
            b.set_position(c.steps as u64);
            b.finish_with_message(format!("{status} eval {}", c.eval_loss.map_or("-".into(), |v| format!("{v:.4}"))));
        }
        if !self.tty && !self.quiet {
            eprintln!("sweep: {} {status} after {} steps, eval loss {:?}", c.name, c.steps, c.eval_loss);
        }
    }

    fn finish(&self) {
        let _ = self.multi.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A completed candidate whose held-out loss ends at `eval_loss`.
    fn completed(dir: &Path, name: &str, eval_loss: f64) -> Result<CandidateRecord> {
        let output = dir.join(name);
        std::fs::create_dir_all(&output)?;
        let config = TrainOptions { model: Some("m".into()), dataset: Some("d.jsonl".into()), output: Some(output.clone()), ..Default::default() }.resolve()?;
        engine::write_run_json(&output, "sft", &config, &serde_json::Value::Null, RunStatus::Completed, None::<&()>)?;
        let mut w = crate::metrics_writer::MetricsWriter::create(&output.join(engine::METRICS_FILE))?;
        w.write(&MetricsRow { step: 0, eval_loss: Some(3.0), ..Default::default() })?;
        w.write(&MetricsRow { step: 1, loss: Some(2.0), ..Default::default() })?;
        w.write(&MetricsRow { step: 2, loss: Some(1.5), eval_loss: Some(eval_loss), ..Default::default() })?;
        Ok(CandidateRecord {
            name: name.into(),
            overrides: BTreeMap::new(),
            config,
            status: RunStatus::Running,
            output,
            device: None,
            group: None,
            steps: 0,
            total_steps: 2,
            eval_loss_before: None,
            eval_loss: None,
            train_loss: None,
            elapsed_s: None,
            est_memory_bytes: 0,
            est_seconds: 0.0,
            est_tokens: 0,
            est_flops: 0.0,
            group_peak_rss_bytes: None,
            error: None,
        })
    }

    fn record(candidates: Vec<CandidateRecord>) -> SweepRecord {
        SweepRecord { version: String::new(), status: String::new(), candidates, winner: None, criterion: String::new(), plan: serde_json::Value::Null, wall_s: 0.0, parent_peak_rss_bytes: None }
    }

    #[test]
    fn the_winner_is_the_lowest_eval_loss_and_a_damaged_metrics_file_is_an_error() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let mut r = record(vec![completed(dir.path(), "a", 1.0)?, completed(dir.path(), "b", 2.0)?]);
        read_outcome(&mut r)?;
        assert_eq!((r.winner.as_deref(), r.criterion.as_str()), (Some("a"), "eval_loss"));

        // The best candidate's file damaged in the middle: the sweep must not pick `b` from
        // what is left, it names the line.
        let path = dir.path().join("a").join(engine::METRICS_FILE);
        let text = std::fs::read_to_string(&path)?;
        let lines: Vec<&str> = text.lines().collect();
        std::fs::write(&path, format!("{}\n{{\"step\": 1, \"lo\n{}\n", lines[0], lines[2]))?;
        let mut r = record(vec![completed(dir.path(), "b", 2.0)?, r.candidates.remove(0)]);
        let err = format!("{:#}", read_outcome(&mut r).unwrap_err());
        assert!(err.contains(&format!("{}:2:", path.display())), "{err}");
        assert_eq!(r.winner, None);
        Ok(())
    }
}
