//! Learning-rate schedules with linear warmup, matching transformers'
//! `get_cosine_schedule_with_warmup`, `get_linear_schedule_with_warmup` and
//! `get_constant_schedule_with_warmup` (warmup steps = ceil(warmup_ratio * total), as
//! `TrainingArguments.get_warmup_steps`).
//!
//! `lr_at(k)` is the learning rate used by the (k+1)-th optimizer step, i.e. after `k`
//! steps were taken; like transformers, the first step of a warmup uses lr 0.
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SchedulerKind {
    Cosine,
    Linear,
    Constant,
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SchedulerKind::Cosine => "cosine",
            SchedulerKind::Linear => "linear",
            SchedulerKind::Constant => "constant",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LrSchedule {
    pub kind: SchedulerKind,
    pub base_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl LrSchedule {
    pub fn new(kind: SchedulerKind, base_lr: f64, warmup_ratio: f64, total_steps: usize) -> Self {
        let warmup_steps = (warmup_ratio * total_steps as f64).ceil() as usize;
        Self { kind, base_lr, warmup_steps, total_steps }
    }

    /// The multiplier transformers' LambdaLR applies after `step` scheduler steps.
    pub fn factor(&self, step: usize) -> f64 {
        let (w, n) = (self.warmup_steps, self.total_steps);
        if step < w {
            return step as f64 / w.max(1) as f64;
        }
        match self.kind {
            SchedulerKind::Constant => 1.0,
            SchedulerKind::Linear => (n.saturating_sub(step)) as f64 / (n.saturating_sub(w)).max(1) as f64,
            SchedulerKind::Cosine => {
                let progress = (step - w) as f64 / (n.saturating_sub(w)).max(1) as f64;
                // num_cycles = 0.5
                (0.5 * (1.0 + (std::f64::consts::PI * 2.0 * 0.5 * progress).cos())).max(0.0)
            }
        }
    }

    pub fn lr_at(&self, step: usize) -> f64 {
        self.base_lr * self.factor(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_like_transformers() {
        // torch: LambdaLR(opt, get_cosine_schedule_with_warmup(opt, 3, 10)) lrs with base 1.0:
        // [0.0, 0.3333, 0.6667, 1.0, 0.9505, 0.8117, 0.6113, 0.3887, 0.1883, 0.0495]
        let s = LrSchedule::new(SchedulerKind::Cosine, 1.0, 0.25, 10);
        assert_eq!(s.warmup_steps, 3); // ceil(2.5)
        let want = [0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0, 0.950484, 0.811745, 0.611260, 0.388740, 0.188255, 0.049516];
        for (k, w) in want.iter().enumerate() {
            assert!((s.lr_at(k) - w).abs() < 1e-5, "step {k}: {} vs {w}", s.lr_at(k));
        }
    }

    #[test]
    fn linear_and_constant() {
        let s = LrSchedule::new(SchedulerKind::Linear, 2.0, 0.0, 4);
        let got: Vec<f64> = (0..5).map(|k| s.lr_at(k)).collect();
        assert_eq!(got, vec![2.0, 1.5, 1.0, 0.5, 0.0]);
        let s = LrSchedule::new(SchedulerKind::Constant, 1.0, 0.5, 4);
        let got: Vec<f64> = (0..4).map(|k| s.lr_at(k)).collect();
        assert_eq!(got, vec![0.0, 0.5, 1.0, 1.0]);
    }
}
