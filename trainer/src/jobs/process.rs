//! Processes: identity (pid + start time), liveness, signals, and the stop request a
//! signal leaves for the training loop.
use crate::run_control::StopToken;
use std::sync::atomic::{AtomicI32, Ordering};

/// The start time of process `pid` in clock ticks since boot (field 22 of /proc/PID/stat),
/// `None` when the process does not exist (or /proc is unavailable).
pub fn start_time(pid: i64) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 2 is the command name in parentheses and may itself hold spaces and ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the name: state is field 3, so start time (22) is the 20th field here.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Is the process that ran the job (same pid, same start time) still there? A zombie (the
/// process exited, its parent has not reaped it) counts as gone.
pub fn is_alive(pid: i64, recorded_start: Option<u64>) -> bool {
    let Some(start) = start_time(pid) else { return false };
    if recorded_start.is_some_and(|s| s != start) {
        return false;
    }
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| s.rfind(')').and_then(|i| s[i + 1..].split_whitespace().next().map(String::from)));
    state.as_deref() != Some("Z")
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "localhost".into())
}

/// Send `signal` to `pid`.
pub fn send_signal(pid: i64, signal: i32) -> std::io::Result<()> {
    // SAFETY: kill(2) has no memory-safety preconditions.
    if unsafe { libc::kill(pid as libc::pid_t, signal) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The first stop signal received (0: none).
static STOP: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(signal: libc::c_int) {
    // Only an atomic store: the one thing a signal handler may safely do here.
    STOP.store(signal, Ordering::SeqCst);
}

/// SIGTERM (`jobs cancel`, `scancel`, preemption), SIGINT (Ctrl-C) and SIGUSR1 (Slurm's
/// warning before the time limit, `--signal=B:USR1@120`) ask the training loop to write a
/// checkpoint and stop after the current optimizer step. The handler resets itself, so a
/// second signal of the same kind ends the process at once.
pub fn install_stop_handlers() {
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGUSR1] {
        // SAFETY: a zeroed sigaction is valid; the handler only stores to an atomic.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESETHAND | libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

/// Ask the training loop to stop as if `signal` had arrived (a worker whose sweep died).
pub fn request_stop(signal: i32) {
    let _ = STOP.compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst);
}

/// The signal that asked this process to stop, if one did.
pub fn stop_requested() -> Option<i32> {
    match STOP.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// A stop token armed by this process's SIGTERM / SIGINT / SIGUSR1 handlers (installed
/// here): what a job hands its run.
pub fn signal_stop_token() -> StopToken {
    install_stop_handlers();
    StopToken::new(stop_requested)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_wrong_start_time_is_not() {
        let me = std::process::id() as i64;
        let start = start_time(me).expect("/proc/self/stat");
        assert!(is_alive(me, Some(start)));
        assert!(!is_alive(me, Some(start + 1)), "same pid, other start time: a reused pid");
        assert!(!is_alive(i32::MAX as i64, None));
    }

    #[test]
    fn a_reaped_child_is_gone_and_an_unreaped_one_is_a_zombie() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i64;
        let start = start_time(pid);
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(!is_alive(pid, start), "an exited (zombie) process is not alive");
        child.wait().unwrap();
        assert!(!is_alive(pid, start));
    }
}
