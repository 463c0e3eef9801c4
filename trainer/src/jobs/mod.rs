//! Jobs: every training command (`sft`, `dpo`, `orpo`, `grpo`, `sweep`) is a job in the
//! local job store (`store.rs`), whether it runs in the foreground, in the background
//! (`--detach`) or on a Slurm cluster (`--backend slurm`, `slurm.rs`). `lora-train jobs`
//! (`commands/jobs.rs`) lists, shows, follows, waits for, cancels and retries them.
//!
//! A job's process keeps its row current: `running` with its pid and start time when it
//! starts, step and loss from the engine's step hook ([`on_step`], at most every few
//! seconds), and how it ended. A process that dies without a word (kill -9, OOM, reboot)
//! cannot write that last part: [`reconcile`] finds it gone by pid and start time when the
//! job is next looked at, and marks it failed with its newest checkpoint.
pub mod process;
pub mod slurm;
pub mod store;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub use process::{stop_requested, Interrupted};
pub use store::{Job, JobStatus, NewJob, Store};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// This machine.
    Local,
    /// Submit to Slurm with sbatch.
    Slurm,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Local => "local",
            Backend::Slurm => "slurm",
        }
    }
}

/// The job flags of every training command.
#[derive(clap::Args, Clone, Debug)]
#[group(skip)]
pub struct JobArgs {
    /// Run in the background: register the job, print its id (`{"job_id": N}` with --json)
    /// and return. Follow it with `lora-train jobs logs ID --follow`.
    #[arg(long, help_heading = "Jobs")]
    pub detach: bool,
    /// Stay in the foreground until the run ends (the default without --detach).
    #[arg(long, help_heading = "Jobs", conflicts_with = "detach")]
    pub wait: bool,
    /// Where the job runs: this machine, or a Slurm cluster (sbatch).
    #[arg(long, value_enum, default_value_t = Backend::Local, help_heading = "Jobs")]
    pub backend: Backend,
    /// Slurm partition (sbatch --partition).
    #[arg(long, value_name = "NAME", help_heading = "Slurm")]
    pub slurm_partition: Option<String>,
    /// Slurm account (sbatch --account).
    #[arg(long, value_name = "NAME", help_heading = "Slurm")]
    pub slurm_account: Option<String>,
    /// Slurm time limit, e.g. 4:00:00 (sbatch --time).
    #[arg(long, value_name = "TIME", help_heading = "Slurm")]
    pub slurm_time: Option<String>,
    /// GPUs per Slurm job (per sweep group): sbatch --gres=gpu:N.
    #[arg(long, value_name = "N", help_heading = "Slurm")]
    pub gpus: Option<u32>,
    /// Preemption-safe: sbatch --requeue --signal=B:USR1@120; on the signal the run writes
    /// a checkpoint, asks Slurm to requeue it and exits, and the requeued job resumes.
    #[arg(long, help_heading = "Slurm")]
    pub requeue: bool,
    /// The job-store row this process runs (set by --detach, Slurm scripts and retry).
    #[arg(long, hide = true)]
    pub job_id: Option<i64>,
}

/// What a training command tells [`run_training`] about itself.
pub struct Launch<'a> {
    pub command: &'static str,
    pub job: &'a JobArgs,
    /// The run directory (`--output`, after `--config`).
    pub output: Option<PathBuf>,
    pub json: bool,
    /// `--dry-run` with `--backend slurm`: print the sbatch script, submit nothing.
    pub dry_run: bool,
}

impl Launch<'_> {
    /// The row of this command line, run from here.
    pub fn new_job(&self, backend: Backend, status: JobStatus) -> Result<NewJob> {
        Ok(NewJob {
            command: self.command.into(),
            argv: std::env::args().collect(),
            cwd: std::env::current_dir()?,
            backend: backend.as_str().into(),
            status,
            output: self.output.clone(),
            log: None,
            retry_of: None,
        })
    }
}

/// Run a training command as a job: submit it to Slurm, start it in the background, or
/// run `train` here with the job's row kept current.
pub fn run_training(launch: Launch, train: impl FnOnce() -> Result<()>) -> Result<()> {
    let job = launch.job;
    if job.job_id.is_none() {
        if job.backend == Backend::Slurm {
            return slurm::submit_command(&launch);
        }
        if launch.dry_run {
            bail!("--dry-run shows the sbatch script of --backend slurm; a local {} has nothing to show", launch.command);
        }
        if job.detach {
            return detach(&launch);
        }
    }
    process::install_stop_handlers();
    let tracked = match attach_or_register(&launch) {
        Ok(t) => Some(t),
        Err(e) if job.job_id.is_some() => return Err(e),
        Err(e) => {
            // A foreground run still trains when the store is unusable (read-only home,
            // say); it says so once instead of failing the run over bookkeeping.
            tracing::warn!("this run is not tracked as a job: {e:#}");
            None
        }
    };
    let result = train();
    if let Some(id) = tracked {
        if let Err(e) = record_end(id, &launch, &result) {
            tracing::warn!("job {id}: recording how the run ended: {e:#}");
        }
        *CURRENT.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
    result
}

/// The job this process runs, for [`on_step`].
struct Current {
    store: Store,
    id: i64,
    last_write: Option<Instant>,
    /// The newest step not yet written (step, total, loss), flushed when the run ends.
    pending: Option<(usize, usize, Option<f64>)>,
    warned: bool,
}

static CURRENT: Mutex<Option<Current>> = Mutex::new(None);

/// How often the step hook writes to the store: the store is shared by every job, and a
/// job's step and loss a few seconds old are current enough for `jobs list`.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);

fn attach_or_register(launch: &Launch) -> Result<i64> {
    let store = Store::open_default()?;
    let pid = std::process::id() as i64;
    let id = match launch.job.job_id {
        Some(id) => {
            store.require(id).with_context(|| format!("--job-id {id}"))?;
            id
        }
        None => store.insert(&launch.new_job(Backend::Local, JobStatus::Running)?)?,
    };
    store.set_running(id, pid, process::start_time(pid), &process::hostname())?;
    tracing::info!("job {id} (lora-train jobs show {id})");
    *CURRENT.lock().unwrap_or_else(|p| p.into_inner()) = Some(Current { store, id, last_write: None, pending: None, warned: false });
    Ok(id)
}

/// The engine's step hook: the current job's step and loss, written at most every
/// [`PROGRESS_INTERVAL`] (and at the last step). A no-op in a process that runs no job.
pub fn on_step(step: usize, total_steps: usize, loss: Option<f64>) {
    let mut guard = CURRENT.lock().unwrap_or_else(|p| p.into_inner());
    let Some(cur) = guard.as_mut() else { return };
    if step < total_steps && cur.last_write.is_some_and(|t| t.elapsed() < PROGRESS_INTERVAL) {
        cur.pending = Some((step, total_steps, loss));
        return;
    }
    cur.last_write = Some(Instant::now());
    cur.pending = None;
    if let Err(e) = cur.store.set_progress(cur.id, step, total_steps, loss) {
        if !cur.warned {
            cur.warned = true;
            tracing::warn!("job {}: cannot record progress in the job store: {e:#}", cur.id);
        }
    }
}

fn record_end(id: i64, launch: &Launch, result: &Result<()>) -> Result<()> {
    let guard = CURRENT.lock().unwrap_or_else(|p| p.into_inner());
    let Some(cur) = guard.as_ref() else { return Ok(()) };
    let store = &cur.store;
    if let Some((step, total, loss)) = cur.pending {
        store.set_progress(id, step, total, loss)?;
    }
    match result {
        Ok(()) => {
            store.finish(id, JobStatus::Completed, 0, None, None, false)?;
        }
        Err(e) => {
            let checkpoint = launch.output.as_deref().and_then(latest_checkpoint);
            match e.downcast_ref::<Interrupted>() {
                Some(stop) if stop.signal == libc::SIGUSR1 && slurm::requeue_self() => {
                    store.finish(id, JobStatus::Queued, 128 + stop.signal as i64, Some(&format!("{stop}; requeued by Slurm")), checkpoint.as_deref(), false)?;
                }
                Some(stop) => {
                    store.finish(id, JobStatus::Cancelled, 128 + stop.signal as i64, Some(&stop.to_string()), checkpoint.as_deref(), false)?;
                }
                // A workflow waiting at a gate (no terminal, no --yes): exit status 3, and
                // the reason says how to go on (`--resume --yes`).
                None if e.downcast_ref::<crate::workflow::Stopped>().is_some() => {
                    let code = crate::workflow::EXIT_NEEDS_APPROVAL as i64;
                    store.finish(id, JobStatus::Failed, code, Some(&format!("{e:#}")), checkpoint.as_deref(), false)?;
                }
                None => {
                    store.finish(id, JobStatus::Failed, 1, Some(&format!("{e:#}")), checkpoint.as_deref(), false)?;
                }
            }
        }
    }
    Ok(())
}

/// The newest complete checkpoint of a run directory (a sweep's: of none, its candidates
/// keep their own).
pub fn latest_checkpoint(output: &Path) -> Option<PathBuf> {
    crate::checkpoint::latest_checkpoint(output).ok().flatten().map(|(dir, _)| dir)
}

/// The job's log file under the store's home.
pub fn log_path(id: i64) -> Result<PathBuf> {
    Ok(store::home()?.join("jobs").join(format!("{id}.log")))
}

/// `argv` without the flags that launched it (`--detach`, `--wait`, `--job-id N`), ready
/// to be run again as the job itself.
pub fn relaunch_argv(argv: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(argv.len());
    let mut skip_value = false;
    for a in argv {
        if skip_value {
            skip_value = false;
            continue;
        }
        match a.as_str() {
            "--detach" | "--wait" => {}
            "--job-id" => skip_value = true,
            s if s.starts_with("--job-id=") || s.starts_with("--detach=") => {}
            _ => out.push(a.clone()),
        }
    }
    out
}

/// `--detach`: register the job as queued, start this same command line as a new session
/// (setsid: it outlives the terminal and a Ctrl-C there) writing to the job's log, print
/// the job id.
fn detach(launch: &Launch) -> Result<()> {
    let store = Store::open_default()?;
    let new = launch.new_job(Backend::Local, JobStatus::Queued)?;
    let argv = new.argv.clone();
    let id = store.insert(&new)?;
    let log = log_path(id)?;
    let pid = match spawn_detached(id, &argv, &log, None) {
        Ok(pid) => pid,
        Err(e) => {
            store.finish(id, JobStatus::Failed, 1, Some(&format!("could not start: {e:#}")), None, false)?;
            return Err(e);
        }
    };
    store.set_log(id, &log)?;
    store.set_process(id, pid, process::start_time(pid), &process::hostname())?;
    print_job_id(id, launch.json, &log);
    Ok(())
}

pub fn print_job_id(id: i64, json: bool, log: &Path) {
    if json {
        println!("{}", serde_json::json!({ "job_id": id }));
    } else {
        println!("job {id} started in the background (log: {}; follow: lora-train jobs logs {id} --follow)", log.display());
    }
}

/// Start `argv` (program first) again as job `id` in its own session, output to `log`.
/// Returns the pid.
pub fn spawn_detached(id: i64, argv: &[String], log: &Path, cwd: Option<&Path>) -> Result<i64> {
    use std::os::unix::process::CommandExt;
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let file = std::fs::OpenOptions::new().create(true).append(true).open(log).with_context(|| format!("creating {}", log.display()))?;
    let exe = std::env::current_exe().context("locating the lora-train binary")?;
    let mut args = relaunch_argv(argv);
    args.remove(0);
    let mut cmd = std::process::Command::new(exe);
    cmd.args(&args).arg("--job-id").arg(id.to_string()).stdin(std::process::Stdio::null()).stdout(file.try_clone()?).stderr(file);
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    // SAFETY: setsid() is async-signal-safe, as pre_exec requires.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().context("starting the background job")?;
    Ok(child.id() as i64)
}

/// A local job still without a process this long after it was registered never started
/// (a launcher records the pid right after spawning it).
const NEVER_STARTED_S: f64 = 60.0;

/// Bring a job's row up to date with reality: a local process that is gone (pid missing,
/// or reused by another process), a Slurm job that left the queue. Returns the fresh row.
pub fn reconcile(store: &Store, job: Job) -> Result<Job> {
    if job.status.is_final() {
        return Ok(job);
    }
    let id = job.id;
    if job.backend == Backend::Slurm.as_str() {
        slurm::reconcile(store, &job)?;
        return store.require(id);
    }
    if job.pid.is_none() && store::now() - job.created_at > NEVER_STARTED_S {
        // The launcher registered it and died before it could start the process.
        store.finish(id, JobStatus::Failed, 1, Some("its process never started (the launcher exited first)"), None, true)?;
        return store.require(id);
    }
    let here = job.host.as_deref().is_none_or(|h| h == process::hostname());
    let Some(pid) = job.pid.filter(|_| here) else { return Ok(job) };
    if process::is_alive(pid, job.pid_start) {
        return Ok(job);
    }
    let checkpoint = job.output.as_deref().and_then(latest_checkpoint);
    let reason = format!(
        "its process ({pid}) died without a word (killed, out of memory, or the machine restarted); {}",
        match &checkpoint {
            Some(c) => format!("last checkpoint {}: lora-train jobs retry {id} continues from it", c.display()),
            None => "no checkpoint was written".to_string(),
        }
    );
    store.finish(id, JobStatus::Failed, 137, Some(&reason), checkpoint.as_deref(), true)?;
    store.require(id)
}
