//! Whether a GRPO run has anything to learn from. A group (the G completions of one
//! prompt) whose rewards are all equal, or that has fewer than two rewards, gives every
//! completion advantage 0: no policy gradient. A step where every group is like that
//! teaches nothing, whatever the learning rate; the cure is more signal (more
//! completions, more diverse sampling, an evaluator that gives partial credit), so the
//! run says so once, and `--stop-on-no-signal K` ends it after K such steps in a row.
use std::collections::VecDeque;

/// Steps in a row without signal before the warning (or K, when `--stop-on-no-signal K` is smaller).
const WARN_AFTER: usize = 3;

/// Groups of `group` consecutive rewards that carry no signal: fewer than two rewards, or
/// a reward std of 0 (TRL's `isclose(std, 0)`: within 1e-8).
pub fn groups_without_signal(rewards: &[Option<f64>], group: usize) -> usize {
    rewards
        .chunks(group.max(1))
        .filter(|chunk| {
            let present: Vec<f64> = chunk.iter().flatten().copied().collect();
            if present.len() < 2 {
                return true;
            }
            let mean = present.iter().sum::<f64>() / present.len() as f64;
            present.iter().all(|r| (r - mean).abs() <= 1e-8)
        })
        .count()
}

/// What to change when the groups carry no signal, naming the current settings.
pub fn advice(num_generations: usize, temperature: f64) -> String {
    format!(
        "more completions per prompt (--num-generations, now {num_generations}), a higher --temperature (now {temperature}) for more \
         diverse completions, or an evaluator that grades (partial credit) instead of pass/fail"
    )
}

/// Watches the steps of one run.
#[derive(Debug, Default)]
pub struct SignalWatch {
    stop_after: Option<usize>,
    /// (step, groups without signal, groups) of the latest steps, newest last.
    recent: VecDeque<(usize, usize, usize)>,
    /// Steps in a row, up to the latest, where no group had signal.
    consecutive: usize,
    warned: bool,
    totals: (usize, usize),
}

impl SignalWatch {
    pub fn new(stop_after: Option<usize>) -> Self {
        SignalWatch { stop_after, ..Default::default() }
    }

    fn window(&self) -> usize {
        self.stop_after.map_or(WARN_AFTER, |k| k.min(WARN_AFTER)).max(1)
    }

    /// Record step `step` (1-based) with `without` of its `groups` groups lacking signal;
    /// returns the warning the first time `window` steps in a row had none at all.
    pub fn observe(&mut self, step: usize, without: usize, groups: usize, advice: &str) -> Option<String> {
        self.recent.push_back((step, without, groups));
        while self.recent.len() > self.window() {
            self.recent.pop_front();
        }
        self.totals.0 += without;
        self.totals.1 += groups;
        self.consecutive = if groups > 0 && without == groups { self.consecutive + 1 } else { 0 };
        if self.warned || self.consecutive < self.window() {
            return None;
        }
        self.warned = true;
        let first = self.recent.front().map_or(step, |r| r.0);
        let share = |a: usize, b: usize| 100.0 * a as f64 / b.max(1) as f64;
        Some(format!(
            "no learning signal: in steps {first}-{step}, {:.0}% of the groups had zero reward variance (every completion of a prompt \
             got the same reward, so every advantage is 0 and the policy loss has no gradient); {:.0}% of all groups so far. \
             Try {advice} (`lora-train grpo ... --preview N` shows the rewards before a run).",
            share(self.recent.iter().map(|r| r.1).sum(), self.recent.iter().map(|r| r.2).sum()),
            share(self.totals.0, self.totals.1),
        ))
    }

    /// Why the run should end now (`--stop-on-no-signal K` and K steps in a row without signal).
    pub fn stop_reason(&self, advice: &str) -> Option<String> {
        let k = self.stop_after?;
        (self.consecutive >= k).then(|| {
            format!(
                "--stop-on-no-signal {k}: the last {k} steps had zero reward variance in every group, so they could not change \
                 the policy. Try {advice}"
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_without_two_distinct_rewards_has_no_signal() {
        let r = [Some(1.0), Some(1.0), Some(0.0), Some(1.0), None, Some(0.5), None, None];
        assert_eq!(groups_without_signal(&r, 2), 3, "equal, one reward, none; not (0, 1)");
    }

    #[test]
    fn warns_once_and_stops_after_k_steps_in_a_row() {
        let mut w = SignalWatch::new(Some(4));
        assert!(w.observe(1, 2, 2, "x").is_none());
        assert!(w.observe(2, 1, 2, "x").is_none(), "one group had signal: the count restarts");
        assert!(w.observe(3, 2, 2, "x").is_none());
        assert!(w.observe(4, 2, 2, "x").is_none());
        let warning = w.observe(5, 2, 2, "x").expect("third step in a row");
        assert!(warning.contains("steps 3-5") && warning.contains("100%"), "{warning}");
        assert!(w.stop_reason("x").is_none());
        assert!(w.observe(6, 2, 2, "x").is_none(), "warned once");
        assert!(w.stop_reason("x").unwrap().contains("--stop-on-no-signal 4"));
        assert!(SignalWatch::new(None).stop_reason("x").is_none());
    }
}
