//! `lora-train run sft|classify|dpo|rft`: a dataset and a model to a promoted adapter and
//! `final_report.md`, as the hosted fine-tuning agents do it, without an LLM in the loop.
//!
//! A workflow is a sequence of phases, one module each, shared by every workflow:
//! `inspect` (format, tokens, conversions applied to a copy), `plan` (candidates and their
//! cost, `plan.md`), `approval` (one prompt, `--yes`, or exit status 3 without a
//! terminal), `sweep` (the `sweep` machinery), `promotion` (scoreboard and gate),
//! `final_run` (the winner on all the data), `evaluation` (base against fine-tuned) and
//! `report` (`final_report.md` + `.json`). The state lives in `DIR/workflow.json`,
//! rewritten atomically after every phase: a phase that is done is never run again, so
//! `--resume` continues a killed workflow at the phase where it stopped (and the sweep
//! and the final run continue at their candidate and checkpoint).
pub mod approval;
pub mod classify;
pub mod dpo;
pub mod evaluation;
pub mod final_run;
pub mod inspect;
pub mod plan;
pub mod plots;
pub mod promotion;
pub mod report;
pub mod rft;
pub mod sft;
pub mod sweep;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::Value;

use crate::run_control::{Control, Outcome};

pub const STATE_FILE: &str = "workflow.json";
pub const PLAN_FILE: &str = "plan.md";
pub const REPORT_MD: &str = "final_report.md";
pub const REPORT_JSON: &str = "final_report.json";

/// A workflow stopped at a gate (plan approval or promotion): `main` exits with status 3
/// and prints the message (which says how to continue); the job shows `awaiting approval`.
pub use crate::run_control::AwaitingApproval;

/// One phase's line in `workflow.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PhaseRecord {
    pub name: String,
    /// `running` (started, not finished: killed, or failed) or `done`.
    pub status: String,
    pub started_unix: f64,
    pub finished_unix: Option<f64>,
    /// Seconds spent in the phase over all attempts.
    pub elapsed_s: f64,
    /// Attempts (more than 1 after a `--resume`).
    pub attempts: usize,
    /// What the phase produced (read back instead of rerunning it).
    pub outputs: Value,
}

/// `DIR/workflow.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct State {
    pub version: String,
    /// `sft` or `classify`.
    pub workflow: String,
    /// The options that define the workflow; `--resume` refuses different ones.
    pub settings: Value,
    pub created_unix: f64,
    pub phases: Vec<PhaseRecord>,
    /// `running`, `stopped` (at a gate), `failed`, `completed`.
    pub status: String,
}

/// A workflow's directory and state.
pub struct Workflow {
    pub dir: PathBuf,
    pub state: State,
    /// `--yes`: approve the plan and the promotion without asking.
    pub yes: bool,
    /// Phases in the order this workflow runs them (for the `[k/n]` progress lines).
    order: Vec<&'static str>,
    /// The job's stop token and step observer, handed to every run and sweep it starts.
    pub control: Control,
}

pub fn now_unix() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

impl Workflow {
    /// Opens `dir` for a fresh workflow (it must not hold one) or, with `resume`, the
    /// workflow already there, which must have been started with the same `settings`.
    pub fn open(dir: &Path, workflow: &str, settings: Value, resume: bool, yes: bool, order: Vec<&'static str>) -> Result<Self> {
        let path = dir.join(STATE_FILE);
        let state = if path.exists() {
            if !resume {
                bail!("{} already holds a workflow; pass --resume to continue it, or choose another --output", dir.display());
            }
            let state: State = serde_json::from_slice(&std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?)
                .with_context(|| format!("{}: not a workflow state file", path.display()))?;
            if state.workflow != workflow {
                bail!("--resume: {} holds a `run {}` workflow, not `run {workflow}`", dir.display(), state.workflow);
            }
            let diffs = differences(&state.settings, &settings);
            if !diffs.is_empty() {
                bail!("--resume needs the command line of the workflow it continues; these differ:\n  {}", diffs.join("\n  "));
            }
            state
        } else {
            if resume {
                bail!("--resume: {} not found (nothing to resume)", path.display());
            }
            if dir.exists() && std::fs::read_dir(dir).map(|mut d| d.next().is_some()).unwrap_or(false) {
                bail!("{} is not empty; a workflow needs a new or empty --output directory", dir.display());
            }
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            State { version: env!("CARGO_PKG_VERSION").into(), workflow: workflow.into(), settings, created_unix: now_unix(), phases: Vec::new(), status: "running".into() }
        };
        let mut wf = Workflow { dir: dir.to_path_buf(), state, yes, order, control: Control::default() };
        wf.state.status = "running".into();
        wf.save()?;
        Ok(wf)
    }

    /// The workflow as a job: stopped by `control`'s token, heard by its observer.
    pub fn with_control(mut self, control: &Control) -> Self {
        self.control = control.clone();
        self
    }

    pub fn save(&self) -> Result<()> {
        crate::checkpoint::write_atomic(&self.dir.join(STATE_FILE), &serde_json::to_vec_pretty(&self.state)?)
    }

    /// The outputs of a finished phase.
    pub fn outputs<T: DeserializeOwned>(&self, name: &str) -> Option<T> {
        self.state.phases.iter().find(|p| p.name == name && p.status == "done").and_then(|p| serde_json::from_value(p.outputs.clone()).ok())
    }

    /// Runs phase `name` unless it is done already (then its recorded outputs are returned).
    /// The phase is recorded as `running` before it starts and `done` with its outputs
    /// after, each time with an atomic rewrite of `workflow.json`.
    pub fn phase<T: Serialize + DeserializeOwned>(&mut self, name: &'static str, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let k = self.order.iter().position(|p| *p == name).map_or(0, |i| i + 1);
        let n = self.order.len();
        if let Some(out) = self.outputs::<T>(name) {
            eprintln!("[{k}/{n}] {name}: done earlier, kept");
            return Ok(out);
        }
        eprintln!("[{k}/{n}] {name}");
        // A workflow becomes a job once its data passed inspection: a typo in a path or a
        // broken dataset leaves no job row behind.
        if name != "inspect" {
            self.control.started();
        }
        let started = now_unix();
        match self.state.phases.iter_mut().find(|p| p.name == name) {
            Some(p) => {
                p.attempts += 1;
                p.status = "running".into();
            }
            None => self.state.phases.push(PhaseRecord { name: name.into(), status: "running".into(), started_unix: started, finished_unix: None, elapsed_s: 0.0, attempts: 1, outputs: Value::Null }),
        }
        self.save()?;
        let clock = Instant::now();
        let result = f(self);
        let elapsed = clock.elapsed().as_secs_f64();
        let p = self.state.phases.iter_mut().find(|p| p.name == name).context("phase record vanished")?;
        p.elapsed_s += elapsed;
        match result {
            Ok(out) => {
                p.status = "done".into();
                p.finished_unix = Some(now_unix());
                p.outputs = serde_json::to_value(&out)?;
                self.save()?;
                Ok(out)
            }
            Err(e) => {
                self.state.status = match Outcome::of_error(&e) {
                    Outcome::AwaitingApproval => "stopped",
                    Outcome::Stopped { .. } => "cancelled",
                    _ => "failed",
                }
                .into();
                self.save()?;
                Err(e)
            }
        }
    }

    /// Seconds spent in a phase so far.
    pub fn elapsed(&self, name: &str) -> f64 {
        self.state.phases.iter().find(|p| p.name == name).map_or(0.0, |p| p.elapsed_s)
    }

    pub fn finish(&mut self) -> Result<()> {
        self.state.status = "completed".into();
        self.save()
    }

    /// The end of a workflow with a promoted adapter: mark it completed, say where the
    /// adapter and the report are, and with `--json` print `final_report.json` on stdout.
    pub fn finish_with_report(&mut self, adapter: &Path, json: bool) -> Result<()> {
        self.finish()?;
        eprintln!("done: adapter {}\n      report {}", adapter.display(), self.dir.join(REPORT_MD).display());
        if json {
            let path = self.dir.join(REPORT_JSON);
            let report: Value = serde_json::from_slice(&std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?)?;
            println!("{}", serde_json::to_string(&report)?);
        }
        Ok(())
    }
}

/// `key: old in the workflow, new now` for every top-level key that differs.
fn differences(a: &Value, b: &Value) -> Vec<String> {
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return if a == b { Vec::new() } else { vec!["settings".into()] };
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|k| {
            let (va, vb) = (a.get(k).unwrap_or(&Value::Null), b.get(k).unwrap_or(&Value::Null));
            (va != vb).then(|| format!("{k}: {va} in the workflow, {vb} now"))
        })
        .collect()
}

/// A new file name in `dir` for generated data: `{stem}-YYYYMMDD-HHMMSS.jsonl`, never an
/// existing file (the user's files are never touched).
pub fn generated_path(dir: &Path, stem: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    crate::output_file::fresh_path(dir, stem, "jsonl", ".provenance.json")
}

/// Where a generated dataset came from (`final_report.md`'s provenance section).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Generated {
    pub path: PathBuf,
    pub from: PathBuf,
    pub what: String,
}

/// Writes `lines` (JSON objects) to a fresh file and its provenance sidecar.
pub fn write_generated(dir: &Path, stem: &str, from: &Path, what: &str, lines: &[Value]) -> Result<Generated> {
    let mut text = String::new();
    for l in lines {
        text.push_str(&serde_json::to_string(l)?);
        text.push('\n');
    }
    write_generated_text(dir, stem, from, what, &text)
}

/// Writes `text` (JSON lines) to a fresh file in `dir` and its provenance sidecar.
pub fn write_generated_text(dir: &Path, stem: &str, from: &Path, what: &str, text: &str) -> Result<Generated> {
    let path = generated_path(dir, stem)?;
    lora_models::write_new(&path, text.as_bytes())?;
    let sidecar = crate::output_file::with_suffix(&path, ".provenance.json");
    lora_models::write_new(&sidecar, &serde_json::to_vec_pretty(&serde_json::json!({"source": from, "conversion": what, "created_unix": now_unix(), "version": env!("CARGO_PKG_VERSION")}))?)?;
    Ok(Generated { path, from: from.to_path_buf(), what: what.into() })
}

/// Is there a person to ask? Both stdin (to read the answer) and stderr (to show the
/// question) must be terminals.
pub fn interactive() -> bool {
    use std::io::IsTerminal;
    std::io::stdin().is_terminal() && std::io::stderr().is_terminal()
}

/// Asks `question` on stderr and reads y/yes from stdin.
pub fn ask(question: &str) -> Result<bool> {
    use std::io::Write;
    eprint!("{question} [y/N] ");
    std::io::stderr().flush().ok();
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).context("reading the answer from the terminal")?;
    Ok(matches!(line.trim().to_ascii_lowercase().as_str(), "y" | "yes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_run_once_and_resume_needs_the_same_settings() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("wf");
        let settings = serde_json::json!({"a": 1});
        let mut wf = Workflow::open(&dir, "sft", settings.clone(), false, false, vec!["one", "two"]).unwrap();
        let v: usize = wf.phase("one", |_| Ok(7)).unwrap();
        assert_eq!(v, 7);
        let err = wf.phase::<usize>("two", |_| bail!("boom")).unwrap_err();
        assert!(format!("{err}").contains("boom"));
        assert!(Workflow::open(&dir, "sft", settings.clone(), false, false, vec![]).is_err(), "a fresh start refuses an existing workflow");
        let changed = Workflow::open(&dir, "sft", serde_json::json!({"a": 2}), true, false, vec![]).err().unwrap();
        assert!(format!("{changed:#}").contains("a: 1 in the workflow, 2 now"), "{changed:#}");
        assert!(Workflow::open(&dir, "classify", settings.clone(), true, false, vec![]).is_err());
        let mut again = Workflow::open(&dir, "sft", settings, true, false, vec!["one", "two"]).unwrap();
        let v: usize = again.phase("one", |_| panic!("a done phase never reruns")).unwrap();
        assert_eq!(v, 7);
        let v: usize = again.phase("two", |_| Ok(3)).unwrap();
        assert_eq!(v, 3);
        assert_eq!(again.state.phases[1].attempts, 2);
        assert!(Workflow::open(&tmp.path().join("none"), "sft", Value::Null, true, false, vec![]).is_err());
    }

    #[test]
    fn a_stopped_phase_marks_the_workflow_stopped() {
        let tmp = tempfile::tempdir().unwrap();
        let mut wf = Workflow::open(tmp.path(), "sft", Value::Null, false, false, vec!["gate"]).unwrap();
        let err = wf.phase::<()>("gate", |_| Err(AwaitingApproval("no".into()).into())).unwrap_err();
        assert!(err.downcast_ref::<AwaitingApproval>().is_some());
        assert_eq!(wf.state.status, "stopped");
    }
}
