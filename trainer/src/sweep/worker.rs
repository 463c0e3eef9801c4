//! A sweep worker: one child process per group of candidates on one device. It loads the
//! base once, attaches every candidate's adapter, and lets the engine train them packed
//! in one forward pass. A crash here (OOM, panic, kill -9) takes only this group down;
//! the parent marks its unfinished candidates failed and the other groups go on.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::engine::{self, Run, RunOptions};
use crate::run_control::Control;
use crate::recipes::sft::{self, Sft, SftData};

/// What the parent hands a worker (written to `DIR/groups/group-K.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GroupSpec {
    pub device: String,
    pub members: Vec<GroupMember>,
    /// Where the worker writes its measured peak RSS when it finishes.
    #[serde(default)]
    pub result_file: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GroupMember {
    pub name: String,
    pub config: TrainConfig,
    /// Continue the run in `config.output` from its latest checkpoint.
    pub resume: bool,
}

pub fn read_spec(path: &Path) -> Result<GroupSpec> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{}: not a sweep group spec", path.display()))
}

/// Train one group to the end. A candidate that cannot start is reported and left out;
/// the others train.
pub fn run_group(spec: &GroupSpec, control: &Control) -> Result<()> {
    let Some(first) = spec.members.first() else { bail!("empty group") };
    exit_with_parent();
    let base = &first.config;
    let (mut model, bundle, source) = sft::load_base_on(base, &spec.device)?;
    // Candidates with the same data settings share the tokenized sets.
    let mut data: HashMap<super::keys::ShareKey, std::rc::Rc<SftData>> = HashMap::new();
    let mut runs = Vec::new();
    // A Slurm task restarted by a requeue finds the run directories its first attempt wrote.
    let restarted = std::env::var("SLURM_RESTART_COUNT").is_ok_and(|c| c.trim() != "0");
    for m in &spec.members {
        let mut cfg = m.config.clone();
        cfg.device = spec.device.clone();
        let resume = m.resume || (restarted && cfg.output.join(engine::RUN_FILE).exists());
        let started = (|| -> Result<Run<Sft>> {
            let resume_from = engine::prepare_run_dir(&cfg.output, &cfg, resume)?;
            let key = super::keys::ShareKey::data(&cfg);
            let set = match data.get(&key) {
                Some(d) => d.clone(),
                None => {
                    let (train, eval) = sft::load_split(&cfg)?;
                    let d = std::rc::Rc::new(SftData::tokenize(&bundle, &train, eval.as_ref(), &cfg)?);
                    data.insert(key, d.clone());
                    d
                }
            };
            let method = Sft::new(&set, &cfg);
            Run::start(&mut model, &m.name, cfg.clone(), method, set.train.fingerprint(), resume_from, &source, &RunOptions { resume, quiet: false, control: control.clone() })
        })();
        match started {
            Ok(run) => runs.push(run),
            Err(e) => eprintln!("error: candidate {} could not start: {e:#}", m.name),
        }
    }
    if runs.is_empty() {
        bail!("no candidate of this group could start");
    }
    engine::train(&model, &mut runs)?;
    // What the group really took, next to the planner's estimate in sweep.json.
    if let Some(bytes) = peak_rss_bytes() {
        eprintln!("peak RSS of this group: {:.2} GiB", bytes as f64 / super::plan::GIB);
        if let Some(path) = &spec.result_file {
            crate::checkpoint::write_atomic(path, &serde_json::to_vec(&serde_json::json!({ "peak_rss_bytes": bytes }))?)?;
        }
    }
    Ok(())
}

/// This process's peak resident set size (VmHWM), where /proc has it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The peak RSS a finished worker reported, if any.
pub fn read_peak_rss(result_file: &Path) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(result_file).ok()?).ok()?;
    v.get("peak_rss_bytes")?.as_u64()
}

/// Stop when the sweep process that started us is gone (killed with -9, say): an orphaned
/// worker would otherwise keep writing into candidate directories that `sweep --resume`
/// hands to a new worker. It stops the way `jobs cancel` stops it (as on SIGTERM): after
/// the current optimizer step, with a checkpoint that the resumed sweep continues from.
fn exit_with_parent() {
    let parent = std::os::unix::process::parent_id();
    std::thread::spawn(move || loop {
        std::thread::sleep(std::time::Duration::from_millis(500));
        if std::os::unix::process::parent_id() != parent {
            eprintln!("error: the sweep process exited; this worker checkpoints and stops (resume the sweep with --resume)");
            crate::jobs::process::request_stop(libc::SIGTERM);
            return;
        }
    });
}

/// `DIR/groups/group-K.json` and its log.
pub fn spec_path(dir: &Path, k: usize) -> PathBuf {
    dir.join("groups").join(format!("group-{k}.json"))
}

/// The command line (after the program) of the worker of group `task`, where `task` is a
/// group index or a placeholder the job system fills in (a Slurm array's task index).
pub fn task_argv(dir: &Path, task: &str) -> Vec<String> {
    let spec = dir.join("groups").join(format!("group-{task}.json"));
    vec!["sweep-worker".into(), "--spec".into(), spec.to_string_lossy().into_owned()]
}
pub fn result_path(dir: &Path, k: usize) -> PathBuf {
    dir.join("groups").join(format!("group-{k}.result.json"))
}
pub fn log_path(dir: &Path, k: usize) -> PathBuf {
    dir.join("groups").join(format!("group-{k}.log"))
}
