//! Jobs: every training command (`sft`, `dpo`, `orpo`, `grpo`, `sweep`) is a job in the
//! local job store (`store.rs`), whether it runs in the foreground, in the background
//! (`--detach`) or on a Slurm cluster (`--backend slurm`, `slurm.rs`). `lora-train jobs`
//! (`commands/jobs.rs`) lists, shows, follows, waits for, cancels and retries them.
//!
//! A job's process keeps its row current: `running` with its pid and start time when it
//! starts, step and loss from the run's step observer (at most every few seconds), and how it ended. A process that dies without a word (kill -9, OOM, reboot)
//! cannot write that last part: [`reconcile`] finds it gone by pid and start time when the
//! job is next looked at, and marks it failed with its newest checkpoint.
pub mod process;
pub mod slurm;
pub mod store;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub use store::{Job, JobStatus, NewJob, Store};

use crate::run_control::{Control, Outcome, StepObserver};

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
    /// The file in `output` whose presence means there is a run to continue: a retried or
    /// requeued job adds `--resume` when it exists (the engine's `run.json`, a sweep's
    /// `sweep.json`, a workflow's `workflow.json`: the command knows, the jobs do not).
    pub resume_marker: Option<&'static str>,
    pub json: bool,
    /// `--dry-run` with `--backend slurm`: print the sbatch script, submit nothing.
    pub dry_run: bool,
}

impl Launch<'_> {
    /// The row of this command line, run from here. The output directory is stored
    /// absolute, so `jobs retry` and the dashboard find it from any working directory.
    pub fn new_job(&self, backend: Backend, status: JobStatus) -> Result<NewJob> {
        let cwd = std::env::current_dir()?;
        Ok(NewJob {
            command: self.command.into(),
            argv: std::env::args().collect(),
            backend: backend.as_str().into(),
            status,
            output: self.output.as_ref().map(|o| cwd.join(o)),
            resume_marker: self.resume_marker.map(String::from),
            cwd,
            log: None,
            retry_of: None,
        })
    }

    /// The resume marker's absolute path, when the command has one.
    pub fn resume_marker_path(&self) -> Result<Option<PathBuf>> {
        let cwd = std::env::current_dir()?;
        Ok(self.output.as_ref().zip(self.resume_marker).map(|(o, m)| cwd.join(o).join(m)))
    }
}

/// Whether a job's next attempt continues its run (`--resume`) or starts afresh: its
/// output holds the command's resume marker. `jobs retry` and Slurm's requeue script
/// (the same test in shell) both follow it.
pub fn continues(marker: Option<&Path>) -> bool {
    marker.is_some_and(Path::exists)
}

/// Run a training command as a job: submit it to Slurm, start it in the background, or
/// run `train` here with the job's row kept current through the [`Control`] it is handed
/// (the stop token of this process's signal handlers, and the row's step observer).
pub fn run_training(launch: Launch, train: impl FnOnce(&Control) -> Result<()>) -> Result<()> {
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
    let stop = process::signal_stop_token();
    let tracker = Arc::new(JobTracker::new(&launch)?);
    let result = train(&Control::new(stop, Some(tracker.clone())));
    if let Err(e) = tracker.record_end(&launch, &result) {
        tracing::warn!("recording how the job ended: {e:#}");
    }
    result
}

/// The job row of this process's run. A row given by `--job-id` (a detached, Slurm or
/// retried job) is attached at once; a foreground run registers its row when the run
/// starts (`StepObserver::started`), so a command that fails its argument or data checks
/// leaves no row behind.
struct JobTracker {
    inner: Mutex<Tracker>,
}

struct Tracker {
    /// The row to insert when the run starts (a foreground run without a row yet).
    to_register: Option<NewJob>,
    /// The store and the row, once there is one (none: untracked, said once).
    row: Option<(Store, i64)>,
    last_write: Option<Instant>,
    /// The newest step not yet written (step, total, loss), flushed when the run ends.
    pending: Option<(usize, usize, Option<f64>)>,
    warned: bool,
}

/// How often the step hook writes to the store: the store is shared by every job, and a
/// job's step and loss a few seconds old are current enough for `jobs list`.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);

impl JobTracker {
    fn new(launch: &Launch) -> Result<Self> {
        let mut t = Tracker { to_register: None, row: None, last_write: None, pending: None, warned: false };
        match launch.job.job_id {
            Some(id) => {
                let store = Store::open_default()?;
                store.require(id).with_context(|| format!("--job-id {id}"))?;
                set_running(&store, id)?;
                t.row = Some((store, id));
            }
            None => t.to_register = Some(launch.new_job(Backend::Local, JobStatus::Running)?),
        }
        Ok(JobTracker { inner: Mutex::new(t) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tracker> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record_end(&self, launch: &Launch, result: &Result<()>) -> Result<()> {
        let t = self.lock();
        let Some((store, id)) = &t.row else { return Ok(()) };
        if let Some((step, total, loss)) = t.pending {
            store.set_progress(*id, step, total, loss)?;
        }
        let checkpoint = launch.output.as_deref().and_then(latest_checkpoint);
        let reason = result.as_ref().err().map(|e| format!("{e:#}"));
        let code = Outcome::of(result).exit_code() as i64;
        let status = match Outcome::of(result) {
            Outcome::Completed => JobStatus::Completed,
            Outcome::Stopped { signal } if signal == libc::SIGUSR1 && slurm::requeue_self() => {
                let reason = format!("{}; requeued by Slurm", reason.unwrap_or_default());
                store.finish(*id, JobStatus::Queued, code, Some(&reason), checkpoint.as_deref(), false)?;
                return Ok(());
            }
            Outcome::Stopped { .. } => JobStatus::Cancelled,
            // A workflow waiting at a gate (no terminal, no --yes): the reason says how to
            // go on (`--resume --yes`).
            Outcome::AwaitingApproval => JobStatus::AwaitingApproval,
            Outcome::Failed => JobStatus::Failed,
        };
        store.finish(*id, status, code, reason.as_deref(), checkpoint.as_deref(), false)?;
        Ok(())
    }
}

fn set_running(store: &Store, id: i64) -> Result<()> {
    let pid = std::process::id() as i64;
    store.set_running(id, pid, process::start_time(pid), &process::hostname())?;
    tracing::info!("job {id} (lora-train jobs show {id})");
    Ok(())
}

impl StepObserver for JobTracker {
    fn started(&self) {
        let mut t = self.lock();
        let Some(new) = t.to_register.take() else { return };
        let registered = Store::open_default().and_then(|store| {
            let id = store.insert(&new)?;
            set_running(&store, id)?;
            Ok((store, id))
        });
        match registered {
            Ok(row) => t.row = Some(row),
            // A foreground run still trains when the store is unusable (read-only home,
            // say); it says so once instead of failing the run over bookkeeping.
            Err(e) => tracing::warn!("this run is not tracked as a job: {e:#}"),
        }
    }

    /// The current job's step and loss, written at most every [`PROGRESS_INTERVAL`] (and
    /// at the last step).
    fn on_step(&self, step: usize, total_steps: usize, loss: Option<f64>) {
        let mut t = self.lock();
        if t.row.is_none() {
            return;
        }
        if step < total_steps && t.last_write.is_some_and(|w| w.elapsed() < PROGRESS_INTERVAL) {
            t.pending = Some((step, total_steps, loss));
            return;
        }
        t.last_write = Some(Instant::now());
        t.pending = None;
        let Some((store, id)) = &t.row else { return };
        if let Err(e) = store.set_progress(*id, step, total_steps, loss) {
            let id = *id;
            if !t.warned {
                t.warned = true;
                tracing::warn!("job {id}: cannot record progress in the job store: {e:#}");
            }
        }
    }
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
