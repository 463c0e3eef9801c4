//! How the world outside a training run steers it and hears from it, and how a command
//! ended. A leaf: the engine, sweeps and workflows take a [`Control`] (a stop token and a
//! step observer) in their options instead of reaching for process-wide job state, and
//! `jobs` builds one from its signal handlers and its job row. A run stopped on request
//! returns [`Stopped`]; a workflow waiting at a gate returns [`AwaitingApproval`];
//! [`Outcome`] turns a command's result into `main`'s exit status and the job store's row.
use std::path::PathBuf;
use std::sync::Arc;

/// Asks a run to stop between optimizer steps: the signal that asked (SIGTERM from
/// `jobs cancel`, SIGINT from Ctrl-C, SIGUSR1 from Slurm before a preemption), or none.
#[derive(Clone, Default)]
pub struct StopToken(Option<Arc<dyn Fn() -> Option<i32> + Send + Sync>>);

impl StopToken {
    /// A token that never asks to stop (library calls, tests).
    pub fn never() -> Self {
        StopToken(None)
    }

    /// A token that asks whatever `requested` answers (a signal number, or none).
    pub fn new(requested: impl Fn() -> Option<i32> + Send + Sync + 'static) -> Self {
        StopToken(Some(Arc::new(requested)))
    }

    pub fn requested(&self) -> Option<i32> {
        self.0.as_ref().and_then(|f| f())
    }
}

impl std::fmt::Debug for StopToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StopToken({})", if self.0.is_some() { "armed" } else { "never" })
    }
}

/// Hears a run's progress: a job keeps its row current through it.
pub trait StepObserver: Send + Sync {
    /// The run passed its checks (arguments, data, model) and starts its real work. Called
    /// once or more (every packed run, every workflow phase): implementations act once.
    fn started(&self) {}
    /// An optimizer step (or, for a sweep, the steps of all candidates together) finished.
    fn on_step(&self, step: usize, total_steps: usize, loss: Option<f64>);
}

/// What a caller hands a run, a sweep or a workflow: when to stop and who listens.
#[derive(Clone, Default)]
pub struct Control {
    pub stop: StopToken,
    observer: Option<Arc<dyn StepObserver>>,
}

impl Control {
    pub fn new(stop: StopToken, observer: Option<Arc<dyn StepObserver>>) -> Self {
        Control { stop, observer }
    }

    pub fn stop_requested(&self) -> Option<i32> {
        self.stop.requested()
    }

    pub fn started(&self) {
        if let Some(o) = &self.observer {
            o.started();
        }
    }

    pub fn on_step(&self, step: usize, total_steps: usize, loss: Option<f64>) {
        if let Some(o) = &self.observer {
            o.on_step(step, total_steps, loss);
        }
    }
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Control {{ stop: {:?}, observer: {} }}", self.stop, self.observer.is_some())
    }
}

/// A run (or sweep, or workflow) stopped because its [`StopToken`] asked, after writing a
/// checkpoint of every active run: `--resume` continues it bit-exactly.
#[derive(Debug)]
pub struct Stopped {
    pub signal: i32,
    pub checkpoints: Vec<PathBuf>,
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stopped by {}", signal_name(self.signal))?;
        match self.checkpoints.as_slice() {
            [] => write!(f, " before the first checkpoint"),
            [one] => write!(f, " after writing checkpoint {}", one.display()),
            many => write!(f, " after writing {} checkpoints", many.len()),
        }?;
        write!(f, "; continue with --resume")
    }
}

impl std::error::Error for Stopped {}

/// A workflow stopped at a gate it may not pass alone (plan approval, promotion: no
/// terminal and no `--yes`, or declined). The message says how to continue.
#[derive(Debug)]
pub struct AwaitingApproval(pub String);

impl std::fmt::Display for AwaitingApproval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for AwaitingApproval {}

/// How a command ended, for its exit status and its job row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    /// Stopped on request by this signal, checkpoints written.
    Stopped { signal: i32 },
    /// A workflow waiting at a gate: nothing after it ran.
    AwaitingApproval,
    Failed,
}

/// The exit status of a workflow waiting for an approval.
pub const EXIT_AWAITING_APPROVAL: u8 = 3;

impl Outcome {
    pub fn of<T>(result: &anyhow::Result<T>) -> Outcome {
        match result {
            Ok(_) => Outcome::Completed,
            Err(e) => Outcome::of_error(e),
        }
    }

    /// How an error ended a command (a context added on the way up does not hide it).
    pub fn of_error(e: &anyhow::Error) -> Outcome {
        if let Some(s) = e.downcast_ref::<Stopped>() {
            Outcome::Stopped { signal: s.signal }
        } else if e.downcast_ref::<AwaitingApproval>().is_some() {
            Outcome::AwaitingApproval
        } else {
            Outcome::Failed
        }
    }

    /// The process exit status: 0, 128 + the signal (as a shell reports a process the
    /// signal ended), 3 at a gate, 1 otherwise.
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Completed => 0,
            Outcome::Stopped { signal } => (128 + signal.clamp(0, 127)) as u8,
            Outcome::AwaitingApproval => EXIT_AWAITING_APPROVAL,
            Outcome::Failed => 1,
        }
    }
}

/// A stop signal's name, for messages.
pub fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGKILL => "SIGKILL",
        _ => "a signal",
    }
}

/// Whether `error` (anywhere in its chain of contexts) is a stop on request, which a
/// sweep or workflow passes up instead of counting it as a failed candidate.
pub fn is_stop(error: &anyhow::Error) -> bool {
    error.downcast_ref::<Stopped>().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI32, Ordering};

    #[test]
    fn outcomes_and_exit_codes() {
        let stopped: anyhow::Result<()> = Err(anyhow::Error::new(Stopped { signal: libc::SIGTERM, checkpoints: vec![] }).context("candidate b"));
        assert_eq!(Outcome::of(&stopped), Outcome::Stopped { signal: libc::SIGTERM });
        assert_eq!(Outcome::of(&stopped).exit_code(), 143);
        assert!(is_stop(stopped.as_ref().unwrap_err()), "a stop under a context is still a stop");
        let gate: anyhow::Result<()> = Err(AwaitingApproval("approve".into()).into());
        assert_eq!(Outcome::of(&gate).exit_code(), EXIT_AWAITING_APPROVAL);
        assert_eq!(Outcome::of(&anyhow::Result::<()>::Err(anyhow::anyhow!("x"))), Outcome::Failed);
        assert_eq!(Outcome::of(&anyhow::Result::<()>::Ok(())).exit_code(), 0);
    }

    #[test]
    fn a_token_asks_what_its_source_says() {
        static FLAG: AtomicI32 = AtomicI32::new(0);
        let token = StopToken::new(|| Some(FLAG.load(Ordering::SeqCst)).filter(|&s| s != 0));
        assert_eq!(token.requested(), None);
        FLAG.store(libc::SIGINT, Ordering::SeqCst);
        assert_eq!(token.clone().requested(), Some(libc::SIGINT));
        assert_eq!(StopToken::never().requested(), None);
    }
}
