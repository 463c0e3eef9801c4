//! The job store: one SQLite database (`$LORA_TRAIN_HOME/jobs.sqlite`) that every training
//! process, `--detach` launcher, Slurm submitter and `lora-train jobs` command opens.
//!
//! Several processes write at once (a sweep's parent, detached runs, `jobs cancel`), so the
//! database runs in WAL mode (readers never block the writer) with a busy timeout (a writer
//! waits for the lock instead of failing with SQLITE_BUSY), and every write is one short
//! statement or transaction. The schema carries a version so a later release can migrate.
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::Serialize;

pub const DB_FILE: &str = "jobs.sqlite";
/// 2: `resume_marker` (the file whose presence makes a retry or requeue `--resume`).
const SCHEMA_VERSION: i64 = 2;

/// Where a job stands. `queued`: registered, its process (or Slurm job) not started yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
    /// A workflow stopped at a gate (no terminal, no `--yes`): nothing after it ran;
    /// `--resume --yes` (or `jobs retry`) continues.
    #[serde(rename = "awaiting_approval")]
    AwaitingApproval,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
            JobStatus::AwaitingApproval => "awaiting_approval",
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "queued" => JobStatus::Queued,
            "running" => JobStatus::Running,
            "completed" => JobStatus::Completed,
            "failed" => JobStatus::Failed,
            "cancelled" => JobStatus::Cancelled,
            "awaiting_approval" => JobStatus::AwaitingApproval,
            other => bail!("unknown job status `{other}` in the job store"),
        })
    }
    pub fn is_final(self) -> bool {
        matches!(self, JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled | JobStatus::AwaitingApproval)
    }
}

/// One row of the `jobs` table.
#[derive(Clone, Debug, Serialize)]
pub struct Job {
    pub id: i64,
    /// The training command (`sft`, `dpo`, `sweep`, ...).
    pub command: String,
    /// The command line as typed (program name first), re-run by `--detach`, Slurm and retry.
    pub argv: Vec<String>,
    pub cwd: PathBuf,
    /// `local` or `slurm`.
    pub backend: String,
    pub status: JobStatus,
    pub pid: Option<i64>,
    /// The process's start time in clock ticks since boot (/proc/PID/stat field 22): with
    /// the pid it names one process, so a pid reused after a crash is not mistaken for it.
    pub pid_start: Option<u64>,
    pub host: Option<String>,
    /// Slurm job ids (a sweep: the candidates' array job, then the final job).
    pub slurm_job_ids: Vec<String>,
    pub output: Option<PathBuf>,
    pub log: Option<PathBuf>,
    /// Unix seconds.
    pub created_at: f64,
    pub started_at: Option<f64>,
    pub ended_at: Option<f64>,
    pub step: Option<i64>,
    pub total_steps: Option<i64>,
    pub loss: Option<f64>,
    pub exit_code: Option<i64>,
    pub exit_reason: Option<String>,
    /// The newest complete checkpoint when the job stopped early.
    pub checkpoint: Option<PathBuf>,
    /// The job this one retries.
    pub retry_of: Option<i64>,
    /// The file whose presence in `output` means a retry continues the run (`--resume`).
    pub resume_marker: Option<String>,
}

/// What a new job is registered with.
#[derive(Clone, Debug)]
pub struct NewJob {
    pub command: String,
    pub argv: Vec<String>,
    pub cwd: PathBuf,
    pub backend: String,
    pub status: JobStatus,
    pub output: Option<PathBuf>,
    pub log: Option<PathBuf>,
    pub retry_of: Option<i64>,
    pub resume_marker: Option<String>,
}

pub struct Store {
    conn: Connection,
    path: PathBuf,
}

/// `LORA_TRAIN_HOME`, else the user's data directory (`$XDG_DATA_HOME/lora-train`,
/// `~/.local/share/lora-train` on Linux).
pub fn home() -> Result<PathBuf> {
    if let Some(h) = std::env::var_os("LORA_TRAIN_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(h));
    }
    dirs::data_dir().map(|d| d.join("lora-train")).context("no data directory for the job store: set LORA_TRAIN_HOME")
}

pub fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

const COLUMNS: &str = "id, command, argv, cwd, backend, status, pid, pid_start, host, slurm_job_ids, output, log, \
created_at, started_at, ended_at, step, total_steps, loss, exit_code, exit_reason, checkpoint, retry_of, resume_marker";

impl Store {
    /// Open (and create) the store under [`home`].
    pub fn open_default() -> Result<Self> {
        let home = home()?;
        std::fs::create_dir_all(&home).with_context(|| format!("creating {}", home.display()))?;
        Self::open(&home.join(DB_FILE))
    }

    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path).with_context(|| format!("opening the job store {}", path.display()))?;
        // First: every later statement (the WAL switch included) waits for a busy lock.
        conn.busy_timeout(Duration::from_secs(30))?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).with_context(|| format!("{}: enabling WAL", path.display()))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!("{}: SQLite kept journal mode {mode} (WAL unsupported on this file system?); concurrent jobs will wait on each other", path.display());
        }
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let mut store = Store { conn, path: path.to_path_buf() };
        store.migrate()?;
        Ok(store)
    }

    /// Open an existing store for reading only (the dashboard): nothing is created or
    /// migrated, and a store of a newer schema is refused as [`Store::open`] refuses it.
    pub fn open_read_only(path: &Path) -> Result<Self> {
        let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("opening the job store {} (read-only)", path.display()))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let version: Option<i64> = conn.query_row("SELECT MAX(version) FROM schema_version", [], |r| r.get(0)).with_context(|| format!("{}: not a job store", path.display()))?;
        if version.is_some_and(|v| v > SCHEMA_VERSION) {
            bail!("{}: job store schema version {} is newer than this lora-train understands ({SCHEMA_VERSION})", path.display(), version.unwrap_or_default());
        }
        Ok(Store { conn, path: path.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Create the tables, or check that an existing store is one this build understands.
    fn migrate(&mut self) -> Result<()> {
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS jobs (
                 id INTEGER PRIMARY KEY AUTOINCREMENT,
                 command TEXT NOT NULL, argv TEXT NOT NULL, cwd TEXT NOT NULL,
                 backend TEXT NOT NULL, status TEXT NOT NULL,
                 pid INTEGER, pid_start INTEGER, host TEXT, slurm_job_ids TEXT,
                 output TEXT, log TEXT,
                 created_at REAL NOT NULL, started_at REAL, ended_at REAL,
                 step INTEGER, total_steps INTEGER, loss REAL,
                 exit_code INTEGER, exit_reason TEXT, checkpoint TEXT, retry_of INTEGER,
                 resume_marker TEXT);",
        )?;
        let version: Option<i64> = tx.query_row("SELECT MAX(version) FROM schema_version", [], |r| r.get(0))?;
        match version {
            None => {
                tx.execute("INSERT INTO schema_version (version) VALUES (?1)", [SCHEMA_VERSION])?;
            }
            Some(v) if v > SCHEMA_VERSION => {
                bail!("{}: job store schema version {v} is newer than this lora-train understands ({SCHEMA_VERSION})", self.path.display())
            }
            Some(1) => {
                // Version 1 had no resume marker: its jobs retry by the old rule (any of
                // the run, sweep or workflow state files), see `commands/jobs.rs`.
                tx.execute_batch("ALTER TABLE jobs ADD COLUMN resume_marker TEXT")?;
                tx.execute("INSERT INTO schema_version (version) VALUES (?1)", [SCHEMA_VERSION])?;
            }
            Some(_) => {}
        }
        tx.commit()?;
        Ok(())
    }

    pub fn insert(&self, job: &NewJob) -> Result<i64> {
        self.conn.execute(
            "INSERT INTO jobs (command, argv, cwd, backend, status, output, log, created_at, retry_of, resume_marker)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                job.command,
                serde_json::to_string(&job.argv)?,
                job.cwd.to_string_lossy(),
                job.backend,
                job.status.as_str(),
                job.output.as_ref().map(|p| p.to_string_lossy().into_owned()),
                job.log.as_ref().map(|p| p.to_string_lossy().into_owned()),
                now(),
                job.retry_of,
                job.resume_marker,
            ],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    pub fn get(&self, id: i64) -> Result<Option<Job>> {
        Ok(self.conn.query_row(&format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1"), [id], read_row).optional()?)
    }

    /// The job `id`, or an error saying there is none.
    pub fn require(&self, id: i64) -> Result<Job> {
        self.get(id)?.with_context(|| format!("no job {id} in {}", self.path.display()))
    }

    /// Every job, newest first.
    pub fn list(&self) -> Result<Vec<Job>> {
        let mut stmt = self.conn.prepare(&format!("SELECT {COLUMNS} FROM jobs ORDER BY id DESC"))?;
        let rows = stmt.query_map([], read_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The process now running job `id` (it may have been registered by a launcher).
    pub fn set_running(&self, id: i64, pid: i64, pid_start: Option<u64>, host: &str) -> Result<()> {
        self.conn.execute(
            "UPDATE jobs SET status = 'running', pid = ?2, pid_start = ?3, host = ?4, started_at = ?5,
                 ended_at = NULL, exit_code = NULL, exit_reason = NULL WHERE id = ?1",
            params![id, pid, pid_start.map(|s| s as i64), host, now()],
        )?;
        Ok(())
    }

    /// A launcher records the process it started; the process itself may have done so
    /// already (same values), and a status it already set is kept.
    pub fn set_process(&self, id: i64, pid: i64, pid_start: Option<u64>, host: &str) -> Result<()> {
        self.conn.execute(
            "UPDATE jobs SET pid = ?2, pid_start = ?3, host = ?4 WHERE id = ?1",
            params![id, pid, pid_start.map(|s| s as i64), host],
        )?;
        Ok(())
    }

    pub fn set_log(&self, id: i64, log: &Path) -> Result<()> {
        self.conn.execute("UPDATE jobs SET log = ?2 WHERE id = ?1", params![id, log.to_string_lossy()])?;
        Ok(())
    }

    pub fn set_retry_of(&self, id: i64, retry_of: i64) -> Result<()> {
        self.conn.execute("UPDATE jobs SET retry_of = ?2 WHERE id = ?1", params![id, retry_of])?;
        Ok(())
    }

    pub fn set_slurm_ids(&self, id: i64, ids: &[String]) -> Result<()> {
        self.conn.execute("UPDATE jobs SET slurm_job_ids = ?2 WHERE id = ?1", params![id, ids.join(",")])?;
        Ok(())
    }

    pub fn set_status(&self, id: i64, status: JobStatus) -> Result<()> {
        self.conn.execute("UPDATE jobs SET status = ?2 WHERE id = ?1", params![id, status.as_str()])?;
        Ok(())
    }

    pub fn set_progress(&self, id: i64, step: usize, total_steps: usize, loss: Option<f64>) -> Result<()> {
        self.conn.execute(
            "UPDATE jobs SET step = ?2, total_steps = ?3, loss = COALESCE(?4, loss) WHERE id = ?1",
            params![id, step as i64, total_steps as i64, loss],
        )?;
        Ok(())
    }

    /// Record how the job ended. `only_if_active`: leave a job alone that already has a
    /// final status (a process finishing at the same moment as a liveness check).
    pub fn finish(&self, id: i64, status: JobStatus, exit_code: i64, reason: Option<&str>, checkpoint: Option<&Path>, only_if_active: bool) -> Result<bool> {
        let guard = if only_if_active { " AND status IN ('queued', 'running')" } else { "" };
        let n = self.conn.execute(
            &format!("UPDATE jobs SET status = ?2, exit_code = ?3, exit_reason = ?4, checkpoint = ?5, ended_at = ?6 WHERE id = ?1{guard}"),
            params![id, status.as_str(), exit_code, reason, checkpoint.map(|p| p.to_string_lossy().into_owned()), now()],
        )?;
        Ok(n > 0)
    }
}

fn read_row(r: &Row) -> rusqlite::Result<Job> {
    let text = |i: usize| r.get::<_, Option<String>>(i);
    let path = |i: usize| text(i).map(|o| o.map(PathBuf::from));
    let status: String = r.get(5)?;
    let argv: String = r.get(2)?;
    Ok(Job {
        id: r.get(0)?,
        command: r.get(1)?,
        argv: serde_json::from_str(&argv).map_err(|e| rusqlite::Error::FromSqlConversionFailure(2, rusqlite::types::Type::Text, Box::new(e)))?,
        cwd: PathBuf::from(r.get::<_, String>(3)?),
        backend: r.get(4)?,
        status: JobStatus::parse(&status).map_err(|e| rusqlite::Error::FromSqlConversionFailure(5, rusqlite::types::Type::Text, e.into()))?,
        pid: r.get(6)?,
        pid_start: r.get::<_, Option<i64>>(7)?.map(|v| v as u64),
        host: text(8)?,
        slurm_job_ids: text(9)?.map(|s| s.split(',').filter(|x| !x.is_empty()).map(String::from).collect()).unwrap_or_default(),
        output: path(10)?,
        log: path(11)?,
        created_at: r.get(12)?,
        started_at: r.get(13)?,
        ended_at: r.get(14)?,
        step: r.get(15)?,
        total_steps: r.get(16)?,
        loss: r.get(17)?,
        exit_code: r.get(18)?,
        exit_reason: text(19)?,
        checkpoint: path(20)?,
        retry_of: r.get(21)?,
        resume_marker: r.get(22)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_job(n: usize) -> NewJob {
        NewJob {
            command: "sft".into(),
            argv: vec!["lora-train".into(), "sft".into(), format!("--steps={n}")],
            cwd: "/tmp".into(),
            backend: "local".into(),
            status: JobStatus::Queued,
            output: Some(format!("/tmp/run-{n}").into()),
            log: None,
            retry_of: None,
            resume_marker: None,
        }
    }

    #[test]
    fn jobs_round_trip_and_final_status_is_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join(DB_FILE)).unwrap();
        let id = store.insert(&new_job(1)).unwrap();
        store.set_running(id, 42, Some(7), "host").unwrap();
        store.set_progress(id, 3, 10, Some(1.5)).unwrap();
        store.set_progress(id, 4, 10, None).unwrap();
        let j = store.require(id).unwrap();
        assert_eq!((j.status, j.pid, j.pid_start, j.step, j.loss), (JobStatus::Running, Some(42), Some(7), Some(4), Some(1.5)));
        assert_eq!(j.argv[2], "--steps=1");
        assert!(store.finish(id, JobStatus::Completed, 0, None, None, true).unwrap());
        assert!(!store.finish(id, JobStatus::Failed, 1, Some("late"), None, true).unwrap(), "a final status stays");
        assert_eq!(store.require(id).unwrap().status, JobStatus::Completed);
        assert!(store.require(id + 1).is_err());
        // A second open of the same file sees the same rows (and does not re-create them).
        assert_eq!(Store::open(&dir.path().join(DB_FILE)).unwrap().list().unwrap().len(), 1);
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        drop(Store::open(&path).unwrap());
        Connection::open(&path).unwrap().execute("INSERT INTO schema_version (version) VALUES (99)", []).unwrap();
        let err = Store::open(&path).err().unwrap();
        assert!(format!("{err:#}").contains("schema version 99"), "{err:#}");
    }

    #[test]
    fn a_version_1_store_gains_the_resume_marker_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE schema_version (version INTEGER NOT NULL); INSERT INTO schema_version VALUES (1);
                 CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, command TEXT NOT NULL, argv TEXT NOT NULL, cwd TEXT NOT NULL,
                     backend TEXT NOT NULL, status TEXT NOT NULL, pid INTEGER, pid_start INTEGER, host TEXT, slurm_job_ids TEXT,
                     output TEXT, log TEXT, created_at REAL NOT NULL, started_at REAL, ended_at REAL, step INTEGER, total_steps INTEGER,
                     loss REAL, exit_code INTEGER, exit_reason TEXT, checkpoint TEXT, retry_of INTEGER);
                 INSERT INTO jobs (command, argv, cwd, backend, status, created_at) VALUES ('sft', '[\"lora-train\"]', '/tmp', 'local', 'failed', 1.0);",
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let old = store.require(1).unwrap();
        assert_eq!((old.command.as_str(), old.status, old.resume_marker), ("sft", JobStatus::Failed, None));
        let id = store.insert(&NewJob { resume_marker: Some("run.json".into()), ..new_job(2) }).unwrap();
        assert_eq!(store.require(id).unwrap().resume_marker.as_deref(), Some("run.json"));
        drop(store);
        assert!(Store::open(&path).is_ok(), "opening a migrated store again migrates nothing");
    }

    #[test]
    fn parallel_writers_never_lose_or_corrupt_a_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        let (threads, per_thread) = (8, 40);
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let path = path.clone();
                std::thread::spawn(move || {
                    // Each thread its own connection, as separate processes would have.
                    let store = Store::open(&path).unwrap();
                    for i in 0..per_thread {
                        let id = store.insert(&new_job(t * 1000 + i)).unwrap();
                        store.set_running(id, (t * 1000 + i) as i64, Some(1), "h").unwrap();
                        for step in 1..=3 {
                            store.set_progress(id, step, 3, Some(step as f64)).unwrap();
                        }
                        store.finish(id, JobStatus::Completed, 0, None, None, true).unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let store = Store::open(&path).unwrap();
        let jobs = store.list().unwrap();
        assert_eq!(jobs.len(), threads * per_thread);
        for j in &jobs {
            let n: usize = j.argv[2].trim_start_matches("--steps=").parse().unwrap();
            assert_eq!(j.pid, Some(n as i64), "job {} mixed with another job's row", j.id);
            assert_eq!((j.status, j.step, j.loss), (JobStatus::Completed, Some(3), Some(3.0)));
        }
        let ok: String = store.conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
        assert_eq!(ok, "ok");
    }
}
