//! The training progress bar on stderr: step, the method's loss and quantities (its
//! `report_spec`), lr, tokens/s, ETA.
//!
//! When stderr is not a terminal the bar is hidden and a plain log line is printed every
//! `log_every` steps instead, so logs of batch jobs still show progress.
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct TrainProgress {
    bar: ProgressBar,
    total: u64,
    tty: bool,
    quiet: bool,
    log_every: usize,
    started: Instant,
    start_step: usize,
    tokens_since_start: u64,
}

impl TrainProgress {
    pub fn new(total_steps: usize, start_step: usize, quiet: bool) -> Self {
        let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let bar = if quiet || !tty {
            ProgressBar::hidden()
        } else {
            let b = ProgressBar::with_draw_target(Some(total_steps as u64), ProgressDrawTarget::stderr());
            b.set_style(
                ProgressStyle::with_template("{prefix} [{bar:30.cyan/blue}] {pos}/{len} {msg} ETA {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            b.set_prefix("sft");
            b.enable_steady_tick(Duration::from_millis(500));
            b
        };
        bar.set_position(start_step as u64);
        Self {
            bar,
            total: total_steps as u64,
            tty,
            quiet,
            log_every: (total_steps / 20).max(1),
            started: Instant::now(),
            start_step,
            tokens_since_start: 0,
        }
    }

    /// The label in front of the bar (the method, or a sweep candidate's name).
    pub fn set_prefix(&mut self, prefix: &str) {
        self.bar.set_prefix(prefix.to_string());
    }

    /// Record a finished optimizer step: `loss_label` names what the method's loss is
    /// (`loss per pair`, ...); `extra` (the method's quantities) goes between the loss and
    /// the learning rate.
    pub fn step(&mut self, step: usize, loss_label: &str, loss: f64, lr: f64, step_tokens: u64, extra: &str) {
        self.tokens_since_start += step_tokens;
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        let tps = self.tokens_since_start as f64 / secs;
        let msg = step_message(loss_label, loss, extra, lr, tps);
        self.bar.set_position(step as u64);
        self.bar.set_message(msg.clone());
        if !self.tty && !self.quiet && (step % self.log_every == 0 || step as u64 == self.total) {
            let done = (step - self.start_step) as f64;
            let eta = if done > 0.0 { secs / done * (self.total as f64 - step as f64) } else { 0.0 };
            eprintln!("step {step}/{} {msg} ETA {}", self.total, fmt_duration(eta));
        }
    }

    /// Print a line above the bar (eval results, checkpoints).
    pub fn println(&self, line: &str) {
        if self.quiet {
            return;
        }
        if self.tty {
            self.bar.println(line);
        } else {
            eprintln!("{line}");
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// `loss per pair 0.6931 | reward acc 0.750 margin 0.120 | lr 5.00e-4 812 tok/s`
fn step_message(loss_label: &str, loss: f64, extra: &str, lr: f64, tps: f64) -> String {
    let extra = if extra.is_empty() { String::new() } else { format!("| {extra} ") };
    format!("{loss_label} {loss:.4} {extra}| lr {lr:.2e} {tps:.0} tok/s")
}

pub fn fmt_duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m{:02}s", s / 3600, s / 60 % 60, s % 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{secs:.1}s")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations() {
        assert_eq!(super::fmt_duration(5.04), "5.0s");
        assert_eq!(super::fmt_duration(125.0), "2m05s");
        assert_eq!(super::fmt_duration(3725.0), "1h02m05s");
    }

    #[test]
    fn the_step_line_names_the_method_quantities() {
        assert_eq!(super::step_message("loss per token", 1.5, "", 1e-3, 100.0), "loss per token 1.5000 | lr 1.00e-3 100 tok/s");
        assert_eq!(
            super::step_message("surrogate loss", -0.01, "reward 0.3440 reward std 0.2000", 2e-4, 50.0),
            "surrogate loss -0.0100 | reward 0.3440 reward std 0.2000 | lr 2.00e-4 50 tok/s"
        );
    }
}
