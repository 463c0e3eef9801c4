//! `--backend slurm`: a training command becomes an sbatch script that runs the same
//! command line on a compute node as the job's own process (`--backend local --job-id N`),
//! so the job store, checkpoints, signals and resume work there exactly as on this machine.
//! A sweep becomes a job array (one task per group of candidates, `sweep-worker`) and a
//! final job that depends on it (`afterok`) and writes the scoreboard.
//!
//! The store learns a Slurm job's state from the job's process (running, step, loss, how it
//! ended) and, for what that process cannot say (still pending, killed, never started),
//! from `squeue` and then `sacct`.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::{relaunch_argv, store, Backend, Job, JobArgs, JobStatus, Launch, Store};

/// Quote a word for bash.
fn sh_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b)) {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn sh_words(words: &[String]) -> String {
    words.iter().map(|w| sh_quote(w)).collect::<Vec<_>>().join(" ")
}

/// One sbatch script's settings.
struct Script<'a> {
    name: String,
    log: String,
    cwd: &'a Path,
    job: &'a JobArgs,
    /// Extra `#SBATCH` lines (array, dependency).
    extra: Vec<String>,
    /// Request the job's GPUs (not for a sweep's final job, which only writes the report).
    gpus: bool,
    /// The body after the header: ends in `exec lora-train ...`.
    body: String,
}

impl Script<'_> {
    fn render(&self) -> Result<String> {
        let home = store::home()?;
        let mut s = String::from("#!/bin/bash\n");
        let mut directive = |line: String| {
            s.push_str("#SBATCH ");
            s.push_str(&line);
            s.push('\n');
        };
        directive(format!("--job-name={}", sh_quote(&self.name)));
        directive(format!("--output={}", sh_quote(&self.log)));
        // A requeued job appends to its log instead of starting it over.
        directive("--open-mode=append".into());
        directive(format!("--chdir={}", sh_quote(&self.cwd.to_string_lossy())));
        if let Some(p) = &self.job.slurm_partition {
            directive(format!("--partition={}", sh_quote(p)));
        }
        if let Some(a) = &self.job.slurm_account {
            directive(format!("--account={}", sh_quote(a)));
        }
        if let Some(t) = &self.job.slurm_time {
            directive(format!("--time={}", sh_quote(t)));
        }
        if let Some(n) = self.job.gpus.filter(|_| self.gpus) {
            directive(format!("--gres=gpu:{n}"));
        }
        if self.job.requeue {
            directive("--requeue".into());
            // B: the batch shell itself gets the signal; it is lora-train (exec below).
            directive("--signal=B:USR1@120".into());
        } else {
            directive("--no-requeue".into());
        }
        for line in &self.extra {
            directive(line.clone());
        }
        s.push_str("set -euo pipefail\n");
        s.push_str(&format!("export LORA_TRAIN_HOME={}\n", sh_quote(&home.to_string_lossy())));
        if self.job.requeue {
            s.push_str("export LORA_TRAIN_SLURM_REQUEUE=1\n");
        }
        s.push_str(&self.body);
        Ok(s)
    }
}

fn exe() -> Result<String> {
    Ok(std::env::current_exe().context("locating the lora-train binary")?.to_string_lossy().into_owned())
}

/// The job's own command line on the compute node: this one, run locally as job `id`,
/// with `--resume` added when Slurm restarts it (requeue) after it wrote its run directory.
fn job_body(argv: &[String], id: &str, resume_marker: Option<&Path>, force_resume: bool) -> Result<String> {
    // The job as it would run: a `--dry-run` that printed this script is not part of it.
    let mut words: Vec<String> = relaunch_argv(argv).into_iter().filter(|w| w != "--dry-run").collect();
    words[0] = exe()?;
    words.extend(["--backend".into(), "local".into(), "--job-id".into(), id.into()]);
    if force_resume {
        words.push("--resume".into());
    }
    let mut body = String::new();
    match resume_marker.filter(|_| !force_resume) {
        Some(marker) => {
            body.push_str("RESUME=()\n");
            body.push_str(&format!(
                "if [ \"${{SLURM_RESTART_COUNT:-0}}\" -gt 0 ] && [ -e {} ]; then RESUME=(--resume); fi\n",
                sh_quote(&marker.to_string_lossy())
            ));
            body.push_str(&format!("exec {} \"${{RESUME[@]}}\"\n", sh_words(&words)));
        }
        None => body.push_str(&format!("exec {}\n", sh_words(&words))),
    }
    Ok(body)
}

fn has_resume(argv: &[String]) -> bool {
    argv.iter().any(|a| a == "--resume")
}

/// Register the job, write its script next to the store and submit it; or with
/// `--dry-run`, print the script.
pub fn submit_command(launch: &Launch) -> Result<()> {
    let argv: Vec<String> = std::env::args().collect();
    let cwd = std::env::current_dir()?;
    let marker = launch.resume_marker_path()?;
    let script = |id: &str, log: String| -> Result<String> {
        Script {
            name: format!("lora-train-{}-{id}", launch.command),
            log,
            cwd: &cwd,
            job: launch.job,
            extra: vec![],
            gpus: true,
            body: job_body(&argv, id, marker.as_deref(), has_resume(&argv))?,
        }
        .render()
    };
    if launch.dry_run {
        let text = script("<job id>", jobs_dir()?.join("<job id>.log").to_string_lossy().into_owned())?;
        return print_dry_run(launch.json, &[text]);
    }
    let (store, id) = register(launch)?;
    let log = super::log_path(id)?;
    let text = script(&id.to_string(), log.to_string_lossy().into_owned())?;
    let ids = match write_and_submit(id, "", &text, &[]) {
        Ok(sid) => vec![sid],
        Err(e) => return fail_submission(&store, id, e),
    };
    store.set_slurm_ids(id, &ids)?;
    report_submitted(launch.json, id, &ids, &log);
    Ok(())
}

/// The word of an array task's argv that stands for its task index (`${SLURM_ARRAY_TASK_ID}`).
pub const ARRAY_TASK: &str = "{array_task}";

/// One array task's command line as a shell line: `argv` (program first) with
/// [`ARRAY_TASK`] replaced by the task index; words holding it are double-quoted so the
/// shell expands only that variable.
fn array_task_line(argv: &[String]) -> String {
    argv.iter()
        .map(|w| match w.contains(ARRAY_TASK) {
            true => {
                let escaped: String = w.chars().flat_map(|c| if matches!(c, '"' | '$' | '`' | '\\') { vec!['\\', c] } else { vec![c] }).collect();
                format!("\"{}\"", escaped.replace(ARRAY_TASK, "${SLURM_ARRAY_TASK_ID}"))
            }
            false => sh_quote(w),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A sweep on Slurm: its groups (the task indices `groups`) as one job array, each task
/// running `task_argv` (the sweep's worker command line, with [`ARRAY_TASK`] for the
/// task's index: the sweep knows its files, the jobs do not), then the sweep command
/// itself with `--resume` once every task succeeded, to collect the candidates into its
/// record and report.
pub fn submit_sweep(launch: &Launch, task_argv: &[String], groups: &[usize]) -> Result<()> {
    let argv: Vec<String> = std::env::args().collect();
    let cwd = std::env::current_dir()?;
    let array = groups.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
    let mut task = vec![exe()?];
    task.extend(task_argv.iter().cloned());
    let scripts = |id: &str, dependency: &str| -> Result<(String, String)> {
        let worker = Script {
            name: format!("lora-train-sweep-{id}-groups"),
            log: jobs_dir()?.join(format!("{id}.group-%a.log")).to_string_lossy().into_owned(),
            cwd: &cwd,
            job: launch.job,
            extra: vec![format!("--array={array}")],
            gpus: true,
            body: format!("exec {}\n", array_task_line(&task)),
        }
        .render()?;
        let final_job = Script {
            name: format!("lora-train-sweep-{id}"),
            log: jobs_dir()?.join(format!("{id}.log")).to_string_lossy().into_owned(),
            cwd: &cwd,
            job: launch.job,
            extra: vec![format!("--dependency=afterok:{dependency}"), "--kill-on-invalid-dep=yes".into()],
            gpus: false,
            body: job_body(&argv, id, None, true)?,
        }
        .render()?;
        Ok((worker, final_job))
    };
    if launch.dry_run {
        let (w, f) = scripts("<job id>", "<array job id>")?;
        return print_dry_run(launch.json, &[w, f]);
    }
    let (store, id) = register(launch)?;
    let submitted = (|| -> Result<Vec<String>> {
        let (worker, _) = scripts(&id.to_string(), "")?;
        let array_id = write_and_submit(id, ".groups", &worker, &[])?;
        let (_, final_job) = scripts(&id.to_string(), &array_id)?;
        let final_id = write_and_submit(id, "", &final_job, &[])?;
        Ok(vec![array_id, final_id])
    })();
    let ids = match submitted {
        Ok(ids) => ids,
        Err(e) => return fail_submission(&store, id, e),
    };
    store.set_slurm_ids(id, &ids)?;
    report_submitted(launch.json, id, &ids, &super::log_path(id)?);
    Ok(())
}

fn jobs_dir() -> Result<PathBuf> {
    Ok(store::home()?.join("jobs"))
}

fn register(launch: &Launch) -> Result<(Store, i64)> {
    let store = Store::open_default()?;
    let id = store.insert(&launch.new_job(Backend::Slurm, JobStatus::Queued)?)?;
    store.set_log(id, &super::log_path(id)?)?;
    Ok((store, id))
}

fn fail_submission(store: &Store, id: i64, e: anyhow::Error) -> Result<()> {
    store.finish(id, JobStatus::Failed, 1, Some(&format!("sbatch failed: {e:#}")), None, false)?;
    Err(e.context(format!("submitting job {id} to Slurm")))
}

/// Write `JOBS/ID{suffix}.sbatch` and submit it; the Slurm job id.
fn write_and_submit(id: i64, suffix: &str, text: &str, extra_args: &[&str]) -> Result<String> {
    let path = jobs_dir()?.join(format!("{id}{suffix}.sbatch"));
    std::fs::create_dir_all(jobs_dir()?)?;
    crate::checkpoint::write_atomic(&path, text.as_bytes())?;
    let out = Command::new("sbatch")
        .arg("--parsable")
        .args(extra_args)
        .arg(&path)
        .output()
        .context("running sbatch (is Slurm installed and on PATH?)")?;
    if !out.status.success() {
        bail!("sbatch {}: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    // --parsable prints `jobid` or `jobid;cluster`.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let sid = stdout.trim().split(';').next().unwrap_or_default().to_string();
    if sid.is_empty() || !sid.bytes().all(|b| b.is_ascii_digit()) {
        bail!("sbatch {}: unexpected output {:?}", path.display(), stdout.trim());
    }
    Ok(sid)
}

fn print_dry_run(json: bool, scripts: &[String]) -> Result<()> {
    if json {
        println!("{}", serde_json::json!({ "backend": "slurm", "scripts": scripts }));
    } else {
        for (i, s) in scripts.iter().enumerate() {
            if scripts.len() > 1 {
                println!("# ---- sbatch script {} of {} ----", i + 1, scripts.len());
            }
            print!("{s}");
        }
    }
    Ok(())
}

fn report_submitted(json: bool, id: i64, slurm_ids: &[String], log: &Path) {
    if json {
        println!("{}", serde_json::json!({ "job_id": id, "backend": "slurm", "slurm_job_ids": slurm_ids }));
    } else {
        println!("job {id} submitted to Slurm as {} (log: {}; lora-train jobs show {id})", slurm_ids.join(", "), log.display());
    }
}

/// On SIGUSR1 in a job submitted with `--requeue`: ask Slurm to put this job back in the
/// queue (it restarts the same script, which resumes). False when not applicable.
pub fn requeue_self() -> bool {
    if std::env::var("LORA_TRAIN_SLURM_REQUEUE").as_deref() != Ok("1") {
        return false;
    }
    let Ok(job) = std::env::var("SLURM_JOB_ID") else { return false };
    match Command::new("scontrol").args(["requeue", &job]).output() {
        Ok(out) if out.status.success() => {
            tracing::warn!("Slurm job {job} requeued; it resumes from the checkpoint just written");
            true
        }
        Ok(out) => {
            tracing::warn!("scontrol requeue {job} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
            false
        }
        Err(e) => {
            tracing::warn!("scontrol requeue {job}: {e}");
            false
        }
    }
}

/// A Slurm job's state as `squeue`/`sacct` name it (upper case), and why it is pending.
#[derive(Debug, Clone)]
struct SlurmState {
    state: String,
    reason: String,
}

/// The states of the job ids (array tasks included) the controller still knows.
fn squeue(ids: &[String]) -> Vec<SlurmState> {
    let mut out = Vec::new();
    for id in ids {
        // One id at a time: squeue refuses the whole list when one id is unknown.
        let Ok(res) = Command::new("squeue").args(["-h", "-t", "all", "-j", id, "-o", "%i|%T|%r"]).output() else { continue };
        if !res.status.success() {
            continue;
        }
        for line in String::from_utf8_lossy(&res.stdout).lines() {
            let mut parts = line.trim().split('|');
            if let (Some(_), Some(state), reason) = (parts.next(), parts.next(), parts.next()) {
                out.push(SlurmState { state: state.to_string(), reason: reason.unwrap_or("").to_string() });
            }
        }
    }
    out
}

/// Final states from accounting (`sacct`, or its job-completion log with `-c` on
/// clusters without slurmdbd).
fn sacct(ids: &[String]) -> Vec<SlurmState> {
    for extra in [&[][..], &["-c"][..]] {
        let Ok(res) = Command::new("sacct").args(extra).args(["-n", "-P", "-X", "-o", "JobID,State", "-j", &ids.join(",")]).output() else { continue };
        if !res.status.success() {
            continue;
        }
        let states: Vec<SlurmState> = String::from_utf8_lossy(&res.stdout)
            .lines()
            .filter_map(|l| l.trim().split('|').nth(1).map(|s| SlurmState { state: s.split_whitespace().next().unwrap_or("").to_string(), reason: String::new() }))
            .filter(|s| !s.state.is_empty())
            .collect();
        if !states.is_empty() {
            return states;
        }
    }
    Vec::new()
}

/// How long a job that asked for its own requeue may look finished to squeue.
const REQUEUE_GRACE_S: f64 = 60.0;

const ACTIVE: &[&str] = &["RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "RESIZING", "SIGNALING", "STAGE_OUT"];
const PENDING: &[&str] = &["PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD", "SPECIAL_EXIT"];

/// Update a Slurm job's row from the scheduler.
pub fn reconcile(store: &Store, job: &Job) -> Result<()> {
    if job.slurm_job_ids.is_empty() {
        return Ok(());
    }
    let mut states = squeue(&job.slurm_job_ids);
    let live = |s: &SlurmState| ACTIVE.contains(&s.state.as_str()) || PENDING.contains(&s.state.as_str());
    if states.iter().any(|s| ACTIVE.contains(&s.state.as_str())) {
        // Not a job whose process just stopped for a requeue (it recorded its end, and
        // Slurm shows the old allocation a moment longer); the restarted process says
        // `running` itself.
        if job.status == JobStatus::Queued && job.ended_at.is_none() {
            store.set_status(job.id, JobStatus::Running)?;
        }
        return Ok(());
    }
    if let Some(stuck) = states.iter().find(|s| PENDING.contains(&s.state.as_str()) && s.reason.contains("DependencyNeverSatisfied")) {
        // A sweep whose array failed: its final job can never start.
        let _ = Command::new("scancel").args(&job.slurm_job_ids).status();
        let reason = format!("a job it depends on did not succeed ({}); see lora-train jobs logs {}", stuck.reason, job.id);
        store.finish(job.id, JobStatus::Failed, 1, Some(&reason), None, true)?;
        return Ok(());
    }
    if states.iter().any(live) {
        return Ok(());
    }
    // The job's process stopped for a requeue a moment ago: until Slurm has put it back
    // as PENDING, squeue may still show the old run's end (FAILED, COMPLETED).
    let requeued_at = job.ended_at.filter(|_| job.status == JobStatus::Queued);
    if requeued_at.is_some_and(|t| store::now() - t < REQUEUE_GRACE_S) {
        return Ok(());
    }
    if states.is_empty() {
        states = sacct(&job.slurm_job_ids);
    }
    // Everything left the queue. The job's process records its own end; this is for the
    // ends it could not record (scancel while pending, killed by the node, time limit).
    let fresh = store.require(job.id)?;
    if fresh.status.is_final() {
        return Ok(());
    }
    let checkpoint = job.output.as_deref().and_then(super::latest_checkpoint);
    let names: Vec<&str> = states.iter().map(|s| s.state.as_str()).collect();
    let (status, reason) = if names.iter().any(|s| s.starts_with("CANCELLED")) {
        (JobStatus::Cancelled, format!("cancelled in Slurm ({})", names.join(", ")))
    } else if names.is_empty() {
        (JobStatus::Failed, "left the Slurm queue without a final word, and sacct knows nothing of it".to_string())
    } else if names.iter().all(|s| *s == "COMPLETED") {
        (JobStatus::Failed, "Slurm says COMPLETED, but the run never recorded its end (see its log)".to_string())
    } else {
        (JobStatus::Failed, format!("Slurm state {}", names.join(", ")))
    };
    store.finish(job.id, status, if status == JobStatus::Cancelled { 143 } else { 1 }, Some(&reason), checkpoint.as_deref(), true)?;
    Ok(())
}

/// `jobs cancel` of a Slurm job: scancel every Slurm job of it (the running process gets
/// SIGTERM, checkpoints and stops; a pending one never starts).
pub fn cancel(job: &Job) -> Result<()> {
    if job.slurm_job_ids.is_empty() {
        bail!("job {} has no Slurm job id (it was never submitted)", job.id);
    }
    let out = Command::new("scancel").args(&job.slurm_job_ids).output().context("running scancel")?;
    if !out.status.success() {
        bail!("scancel {}: {}", job.slurm_job_ids.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_array_task_line_expands_only_the_task_index() {
        let argv: Vec<String> = ["/bin/lora-train", "sweep-worker", "--spec", "/out dir/$x/group-{array_task}.json"].map(String::from).to_vec();
        let line = array_task_line(&argv);
        assert_eq!(line, "/bin/lora-train sweep-worker --spec \"/out dir/\\$x/group-${SLURM_ARRAY_TASK_ID}.json\"");
        let out = std::process::Command::new("bash").arg("-c").arg(format!("set -- {line}; printf %s \"$4\"")).env("SLURM_ARRAY_TASK_ID", "7").output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "/out dir/$x/group-7.json");
    }

    #[test]
    fn a_requeued_job_resumes_when_its_commands_marker_exists() {
        // A workflow's marker is its workflow.json (not the engine's run.json): the
        // requeued script adds --resume exactly when it exists, as `jobs retry` does.
        let tmp = tempfile::tempdir().unwrap();
        let marker = tmp.path().join("workflow.json");
        let argv: Vec<String> = ["lora-train", "run", "sft", "-o", "wf"].map(String::from).to_vec();
        let body = job_body(&argv, "5", Some(&marker), false).unwrap();
        let run = |restarts: &str| {
            let script = body.replace("exec ", "printf '%s ' ");
            let out = std::process::Command::new("bash").arg("-c").arg(&script).env("SLURM_RESTART_COUNT", restarts).output().unwrap();
            String::from_utf8_lossy(&out.stdout).contains("--resume")
        };
        assert!(!run("1"), "no state yet: the requeued job starts afresh");
        std::fs::write(&marker, "{}").unwrap();
        assert!(!run("0"), "a first start never resumes");
        assert!(run("1"), "requeued with its workflow state: --resume");
        assert!(crate::jobs::continues(Some(&marker)));
    }

    #[test]
    fn words_are_quoted_for_bash() {
        assert_eq!(sh_quote("--lr=1e-4"), "--lr=1e-4");
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), "'it'\\''s'");
        assert_eq!(sh_quote(""), "''");
        assert_eq!(sh_quote("$HOME"), "'$HOME'");
    }

    #[test]
    fn the_job_body_drops_launch_flags_and_resumes_only_when_restarted() {
        let argv: Vec<String> = ["lora-train", "sft", "--detach", "--output", "out dir", "--job-id", "3"].iter().map(|s| s.to_string()).collect();
        let body = job_body(&argv, "7", Some(Path::new("out dir/run.json")), false).unwrap();
        assert!(!body.contains("--detach") && !body.contains("--job-id 3"), "{body}");
        assert!(body.contains("sft --output 'out dir' --backend local --job-id 7 \"${RESUME[@]}\""), "{body}");
        assert!(body.contains("SLURM_RESTART_COUNT") && body.contains("'out dir/run.json'"), "{body}");
        let forced = job_body(&argv, "7", None, true).unwrap();
        assert!(forced.trim_end().ends_with("--job-id 7 --resume"), "{forced}");
    }
}
