//! A sweep worker: one child process per group of candidates on one device. It loads the
//! base once, starts every candidate with the group's recipe (any method), and lets the
//! engine train them packed in one forward pass. A crash here (OOM, panic, kill -9) takes only this group down;
//! the parent marks its unfinished candidates failed and the other groups go on.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::engine::{self, Run, RunOptions};
use crate::recipes::dpo::Dpo;
use crate::recipes::grpo::GrpoRecipe;
use crate::recipes::orpo::Orpo;
use crate::recipes::preference::PreferenceRecipe;
use crate::recipes::recipe::{self, load_base_on, Recipe};
use crate::recipes::sft::SftRecipe;
use crate::run_control::Control;

/// What the parent hands a worker (written to `DIR/groups/group-K.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GroupSpec {
    pub device: String,
    pub members: Vec<GroupMember>,
    /// Where the worker writes its measured peak RSS when it finishes.
    #[serde(default)]
    pub result_file: Option<PathBuf>,
    /// The method every member trains (a spec written before methods were packable: SFT).
    #[serde(default)]
    pub recipe: RecipeSpec,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GroupMember {
    pub name: String,
    pub config: TrainConfig,
    /// Continue the run in `config.output` from its latest checkpoint.
    pub resume: bool,
    /// This member's own method options (DPO candidates with their own beta), of the
    /// group's method; none: the group's.
    #[serde(default)]
    pub recipe: Option<RecipeSpec>,
}

/// The method of a group's candidates with its own options: every method packs the same
/// way (one base, each candidate's adapter routed to its own rows).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "lowercase")]
pub enum RecipeSpec {
    #[default]
    Sft,
    Dpo(PreferenceRecipe<Dpo>),
    Orpo(PreferenceRecipe<Orpo>),
    Grpo(GrpoRecipe),
}

pub fn read_spec(path: &Path) -> Result<GroupSpec> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{}: not a sweep group spec", path.display()))
}

/// Train one group to the end. A candidate that cannot start is reported and left out;
/// the others train.
pub fn run_group(spec: &GroupSpec, control: &Control) -> Result<()> {
    exit_with_parent();
    train_spec(spec, control)?;
    // What the group really took, next to the planner's estimate in sweep.json.
    if let Some(bytes) = peak_rss_bytes() {
        eprintln!("peak RSS of this group: {:.2} GiB", bytes as f64 / super::plan::GIB);
        if let Some(path) = &spec.result_file {
            crate::checkpoint::write_atomic(path, &serde_json::to_vec(&serde_json::json!({ "peak_rss_bytes": bytes }))?)?;
        }
    }
    Ok(())
}

/// Train the group of `spec` in this process, whatever its method.
pub fn train_spec(spec: &GroupSpec, control: &Control) -> Result<()> {
    match &spec.recipe {
        RecipeSpec::Sft => {
            // One recipe for all: candidates with the same data share its tokenization.
            let sft = SftRecipe::default();
            train_group(&spec.members.iter().map(|m| (m, &sft)).collect::<Vec<_>>(), &spec.device, control)
        }
        RecipeSpec::Dpo(group) => train_group(&member_recipes(spec, group, |r| if let RecipeSpec::Dpo(x) = r { Some(x) } else { None })?, &spec.device, control),
        RecipeSpec::Orpo(group) => train_group(&member_recipes(spec, group, |r| if let RecipeSpec::Orpo(x) = r { Some(x) } else { None })?, &spec.device, control),
        RecipeSpec::Grpo(group) => train_group(&member_recipes(spec, group, |r| if let RecipeSpec::Grpo(x) = r { Some(x) } else { None })?, &spec.device, control),
    }
}

/// Each member with its own recipe, or the group's.
fn member_recipes<'a, R>(spec: &'a GroupSpec, group: &'a R, pick: impl Fn(&'a RecipeSpec) -> Option<&'a R>) -> Result<Vec<(&'a GroupMember, &'a R)>> {
    spec.members
        .iter()
        .map(|m| match &m.recipe {
            None => Ok((m, group)),
            Some(r) => pick(r).map(|r| (m, r)).with_context(|| format!("candidate {}: its method differs from its group's", m.name)),
        })
        .collect()
}

/// The group's base loaded once on `device`, every member started on it with its recipe,
/// and all trained packed by the engine.
pub fn train_group<R: Recipe>(members: &[(&GroupMember, &R)], device: &str, control: &Control) -> Result<()> {
    let Some((first, _)) = members.first() else { bail!("empty group") };
    let base = TrainConfig { device: device.to_string(), ..first.config.clone() };
    let (mut model, bundle, source) = load_base_on(&base, device)?;
    let mut runs = Vec::new();
    // A Slurm task restarted by a requeue finds the run directories its first attempt wrote.
    let restarted = std::env::var("SLURM_RESTART_COUNT").is_ok_and(|c| c.trim() != "0");
    for (m, recipe) in members {
        let started = (|| -> Result<Run<R::Method>> {
            let cfg = recipe::prepared(*recipe, &TrainConfig { device: device.to_string(), ..m.config.clone() })?;
            let resume = m.resume || (restarted && cfg.output.join(engine::RUN_FILE).exists());
            let resume_from = engine::prepare_run_dir(&cfg.output, &cfg, &recipe.options(), resume)?;
            let data = recipe.read(&cfg)?;
            let (method, fingerprint) = recipe.build(data, &mut model, &bundle, &cfg, &m.name)?;
            let fresh = resume_from.is_none();
            let opts = RunOptions { resume, quiet: false, control: control.clone() };
            let run = Run::start(&mut model, &m.name, cfg.clone(), method, fingerprint, resume_from, &source, &opts)?;
            recipe.attached(&model, &cfg, &m.name, fresh)?;
            Ok(run)
        })();
        match started {
            Ok(run) => runs.push(run),
            Err(e) => eprintln!("error: candidate {} could not start: {e:#}", m.name),
        }
    }
    if runs.is_empty() {
        bail!("no candidate of this group could start");
    }
    engine::train(&model, &mut runs)
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
