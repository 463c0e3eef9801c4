//! `lora-train jobs`: the job store (`jobs/`) from the command line: list, show, logs,
//! wait, cancel, retry. Every command first brings the jobs it reads up to date
//! (`jobs::reconcile`), so a job whose process died silently shows as failed.
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::jobs::{self, Job, JobStatus, Store};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub command: JobsCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum JobsCommand {
    /// Every job, newest first: id, status, backend, command, step, loss, output.
    List {
        /// One JSON object `{"jobs": [...]}` on stdout.
        #[arg(long)]
        json: bool,
    },
    /// One job in full (command line, process or Slurm ids, times, exit reason, checkpoint).
    Show {
        id: i64,
        #[arg(long)]
        json: bool,
    },
    /// The job's output (its log file; a Slurm sweep's group logs after it).
    Logs {
        id: i64,
        /// Keep printing new output until the job ends.
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Wait until the job ends; the exit status is the job's (0 completed, 143 cancelled,
    /// 137 killed, 1 failed).
    Wait {
        id: i64,
        /// Give up after this many seconds (exit status 124). [default: no limit]
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<f64>,
    },
    /// Stop a job: SIGTERM to its process (Slurm: scancel); the run writes a checkpoint
    /// and stops cleanly. Waits until it has.
    Cancel {
        id: i64,
        /// Seconds to wait for the job to stop before giving up.
        #[arg(long, default_value_t = 300.0)]
        timeout: f64,
    },
    /// Run a failed or cancelled job again, resuming from its last checkpoint, in the
    /// background on the same backend. Prints the new job's id.
    Retry {
        id: i64,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(args: Args) -> Result<()> {
    let store = Store::open_default()?;
    match args.command {
        JobsCommand::List { json } => list(&store, json),
        JobsCommand::Show { id, json } => show(&store, id, json),
        JobsCommand::Logs { id, follow } => logs(&store, id, follow),
        JobsCommand::Wait { id, timeout } => {
            let job = wait(&store, id, timeout.map(Duration::from_secs_f64))?;
            let Some(job) = job else {
                eprintln!("job {id} is still {} after the timeout", store.require(id)?.status.as_str());
                std::process::exit(124);
            };
            eprintln!("job {id} {}{}", job.status.as_str(), job.exit_reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default());
            let code = job.exit_code.unwrap_or(if job.status == JobStatus::Completed { 0 } else { 1 });
            std::io::stdout().flush()?;
            std::process::exit(code.clamp(0, 255) as i32);
        }
        JobsCommand::Cancel { id, timeout } => cancel(&store, id, Duration::from_secs_f64(timeout)),
        JobsCommand::Retry { id, json } => retry(&store, id, json),
    }
}

fn fresh(store: &Store, id: i64) -> Result<Job> {
    jobs::reconcile(store, store.require(id)?)
}

fn list(store: &Store, json: bool) -> Result<()> {
    let all: Vec<Job> = store.list()?.into_iter().map(|j| jobs::reconcile(store, j)).collect::<Result<_>>()?;
    if json {
        println!("{}", serde_json::json!({ "jobs": all }));
        return Ok(());
    }
    if all.is_empty() {
        eprintln!("no jobs yet in {}", store.path().display());
        return Ok(());
    }
    println!("{:>5}  {:<9}  {:<7}  {:<6}  {:>11}  {:>8}  {:<19}  OUTPUT", "ID", "STATUS", "BACKEND", "COMMAND", "STEP", "LOSS", "STARTED (UTC)");
    for j in &all {
        let step = match (j.step, j.total_steps) {
            (Some(s), Some(t)) => format!("{s}/{t}"),
            _ => "-".into(),
        };
        println!(
            "{:>5}  {:<9}  {:<7}  {:<6}  {:>11}  {:>8}  {:<19}  {}",
            j.id,
            j.status.as_str(),
            j.backend,
            j.command,
            step,
            j.loss.map_or("-".into(), |l| format!("{l:.4}")),
            fmt_utc(j.started_at.unwrap_or(j.created_at)),
            j.output.as_ref().map_or("-".into(), |p| p.display().to_string()),
        );
    }
    Ok(())
}

fn show(store: &Store, id: i64, json: bool) -> Result<()> {
    let j = fresh(store, id)?;
    if json {
        println!("{}", serde_json::to_string(&j)?);
        return Ok(());
    }
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let rows = [
        ("id", j.id.to_string()),
        ("status", j.status.as_str().to_string()),
        ("command", j.argv.join(" ")),
        ("directory", j.cwd.display().to_string()),
        ("backend", j.backend.clone()),
        ("process", opt(j.pid.map(|p| format!("{p} on {}", j.host.as_deref().unwrap_or("?"))))),
        ("slurm job ids", if j.slurm_job_ids.is_empty() { "-".into() } else { j.slurm_job_ids.join(", ") }),
        ("output", opt(j.output.as_ref().map(|p| p.display().to_string()))),
        ("log", opt(j.log.as_ref().map(|p| p.display().to_string()))),
        ("created", fmt_utc(j.created_at)),
        ("started", opt(j.started_at.map(fmt_utc))),
        ("ended", opt(j.ended_at.map(fmt_utc))),
        ("step", opt(j.step.map(|s| format!("{s} of {}", j.total_steps.map_or("?".into(), |t| t.to_string()))))),
        ("loss", opt(j.loss.map(|l| format!("{l:.4}")))),
        ("exit code", opt(j.exit_code.map(|c| c.to_string()))),
        ("exit reason", opt(j.exit_reason.clone())),
        ("checkpoint", opt(j.checkpoint.as_ref().map(|p| p.display().to_string()))),
        ("retry of", opt(j.retry_of.map(|r| r.to_string()))),
    ];
    for (k, v) in rows {
        println!("{k:>14}: {v}");
    }
    Ok(())
}

/// The job's log files: its own, then (a Slurm sweep) its groups' in order.
fn log_files(job: &Job) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let Some(log) = &job.log else { return files };
    files.push(log.clone());
    if let Some(dir) = log.parent() {
        let prefix = format!("{}.group-", job.id);
        let mut groups: Vec<PathBuf> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".log")))
            .collect();
        groups.sort();
        files.extend(groups);
    }
    files
}

fn logs(store: &Store, id: i64, follow: bool) -> Result<()> {
    let job = fresh(store, id)?;
    if job.log.is_none() {
        bail!("job {id} ran in the foreground: its output went to its terminal, there is no log file (see its output directory's metrics.jsonl)");
    }
    let mut offsets: Vec<(PathBuf, u64)> = Vec::new();
    let mut out = std::io::stdout();
    loop {
        let job = fresh(store, id)?;
        let files = log_files(&job);
        for f in &files {
            if !offsets.iter().any(|(p, _)| p == f) {
                offsets.push((f.clone(), 0));
            }
        }
        let several = offsets.len() > 1;
        for (path, offset) in offsets.iter_mut() {
            let n = copy_from(path, *offset, &mut out, several)?;
            *offset += n;
        }
        out.flush()?;
        if !follow || job.status.is_final() {
            if job.status.is_final() {
                // Anything written between the last read and the end.
                for (path, offset) in offsets.iter_mut() {
                    *offset += copy_from(path, *offset, &mut out, several)?;
                }
            }
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Print what `path` holds past `offset` (with a header naming the file when there are
/// several and it is the first output of it); the bytes printed.
fn copy_from(path: &Path, offset: u64, out: &mut impl Write, header: bool) -> Result<u64> {
    let Ok(mut f) = std::fs::File::open(path) else { return Ok(0) };
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).with_context(|| format!("reading {}", path.display()))?;
    if buf.is_empty() {
        return Ok(0);
    }
    if header && offset == 0 {
        writeln!(out, "==> {} <==", path.display())?;
    }
    out.write_all(&buf)?;
    Ok(buf.len() as u64)
}

/// Poll until the job has a final status; `None` on timeout.
fn wait(store: &Store, id: i64, timeout: Option<Duration>) -> Result<Option<Job>> {
    let t0 = Instant::now();
    loop {
        let job = fresh(store, id)?;
        if job.status.is_final() {
            return Ok(Some(job));
        }
        if timeout.is_some_and(|t| t0.elapsed() >= t) {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(if job.backend == "slurm" { 1000 } else { 250 }));
    }
}

fn cancel(store: &Store, id: i64, timeout: Duration) -> Result<()> {
    let job = fresh(store, id)?;
    if job.status.is_final() {
        bail!("job {id} already ended ({})", job.status.as_str());
    }
    if job.backend == "slurm" {
        jobs::slurm::cancel(&job)?;
    } else {
        let Some(pid) = job.pid else { bail!("job {id} has no process yet; try again in a moment") };
        if job.host.as_deref().is_some_and(|h| h != jobs::process::hostname()) {
            bail!("job {id} runs on {}; cancel it there", job.host.as_deref().unwrap_or("?"));
        }
        if !jobs::process::is_alive(pid, job.pid_start) {
            fresh(store, id)?;
            bail!("job {id}'s process is already gone");
        }
        jobs::process::send_signal(pid, libc::SIGTERM).with_context(|| format!("sending SIGTERM to process {pid}"))?;
    }
    eprintln!("job {id}: asked to stop; waiting for its checkpoint");
    let Some(job) = wait(store, id, Some(timeout))? else {
        bail!("job {id} did not stop within {:.0} s (it finishes its current step first); it is still {}", timeout.as_secs_f64(), store.require(id)?.status.as_str());
    };
    // A Slurm job cancelled while pending never ran a process to say so.
    if job.backend == "slurm" && job.status == JobStatus::Failed && job.exit_reason.as_deref().is_some_and(|r| r.contains("without a final word")) {
        store.finish(id, JobStatus::Cancelled, 143, Some("cancelled before it started"), job.checkpoint.as_deref(), false)?;
    }
    let job = store.require(id)?;
    println!("job {id} {}{}", job.status.as_str(), job.checkpoint.as_ref().map(|c| format!(" (checkpoint {})", c.display())).unwrap_or_default());
    Ok(())
}

/// Resume with `--resume` where the run directory holds a run to continue; otherwise
/// (it never got that far) start it afresh.
fn retry(store: &Store, id: i64, json: bool) -> Result<()> {
    let job = fresh(store, id)?;
    if !job.status.is_final() {
        bail!("job {id} is still {}: wait for it or cancel it first", job.status.as_str());
    }
    if job.status == JobStatus::Completed {
        bail!("job {id} completed; there is nothing to retry");
    }
    let mut argv = jobs::relaunch_argv(&job.argv);
    // The rule Slurm's requeue script follows too: the command's resume marker exists.
    let started = match (&job.output, &job.resume_marker) {
        (Some(o), Some(marker)) => jobs::continues(Some(&o.join(marker))),
        // A row written before jobs carried their marker: any run, sweep or workflow state.
        (Some(o), None) => [crate::engine::RUN_FILE, crate::sweep::SWEEP_FILE, crate::workflow::STATE_FILE].iter().any(|f| o.join(f).exists()),
        (None, _) => false,
    };
    if started && !argv.iter().any(|a| a == "--resume") {
        argv.push("--resume".into());
    }
    if job.backend != "slurm" {
        argv.push("--detach".into());
    }
    argv.push("--json".into());
    let exe = std::env::current_exe().context("locating the lora-train binary")?;
    let out = std::process::Command::new(exe)
        .args(&argv[1..])
        .current_dir(&job.cwd)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("re-running job {id}"))?;
    if !out.status.success() {
        bail!("retrying job {id} failed ({})", out.status);
    }
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| format!("retry of job {id}: unexpected output {:?}", String::from_utf8_lossy(&out.stdout)))?;
    let new_id = reply["job_id"].as_i64().with_context(|| format!("retry of job {id}: no job id in {reply}"))?;
    store.set_retry_of(new_id, id)?;
    if json {
        println!("{}", serde_json::json!({ "job_id": new_id, "retry_of": id }));
    } else {
        println!("job {new_id} retries job {id}{} (follow: lora-train jobs logs {new_id} --follow)", if started { " from its last checkpoint" } else { "" });
    }
    Ok(())
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS` (UTC).
pub fn fmt_utc(secs: f64) -> String {
    let s = secs.max(0.0) as i64;
    let (days, rem) = (s.div_euclid(86_400), s.rem_euclid(86_400));
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_formatting() {
        assert_eq!(super::fmt_utc(0.0), "1970-01-01 00:00:00");
        assert_eq!(super::fmt_utc(951_782_400.0), "2000-02-29 00:00:00");
        assert_eq!(super::fmt_utc(1_764_613_543.0), "2025-12-01 18:25:43");
    }
}
