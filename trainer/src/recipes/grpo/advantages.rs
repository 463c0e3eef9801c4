//! Group-relative advantages, as TRL's GRPOTrainer computes them (`sum_then_normalize`):
//! A = (r - group mean) / (std + 1e-4), the std of the group (`group`), of the whole
//! batch (`batch`), or no division (`none`). Means and stds skip completions without a
//! reward (TRL's nanmean / nanstd, n - 1 denominator); such a completion, and every
//! completion of a group with fewer than two rewards where a std is needed, gets
//! advantage 0 (TRL's `nan_to_num`). TRL's config also takes the booleans: `true` is
//! `group`, `false` is `none` (`GRPOConfig.__post_init__`); they are aliases here.
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    #[value(alias = "true")]
    Group,
    Batch,
    #[value(alias = "false")]
    None,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Advantages {
    pub values: Vec<f64>,
    /// Fraction of completions whose reward std (group, or batch) is 0: no signal.
    pub frac_reward_zero_std: f64,
}

/// `rewards` are grouped by `group` consecutive completions (one prompt each).
pub fn advantages(rewards: &[Option<f64>], group: usize, scale: ScaleRewards) -> Advantages {
    let group = group.max(1);
    let batch_std = nanstd(rewards);
    let mut values = Vec::with_capacity(rewards.len());
    let mut zero_std = 0usize;
    for chunk in rewards.chunks(group) {
        let mean = nanmean(chunk);
        let std = match scale {
            ScaleRewards::Batch => batch_std,
            ScaleRewards::Group | ScaleRewards::None => nanstd(chunk),
        };
        if std.is_some_and(|s| s.abs() <= 1e-8) {
            zero_std += chunk.len();
        }
        for r in chunk {
            let a = match (r, mean) {
                (Some(r), Some(m)) => match scale {
                    ScaleRewards::None => Some(r - m),
                    _ => std.map(|s| (r - m) / (s + 1e-4)),
                },
                _ => None,
            };
            values.push(a.filter(|a| a.is_finite()).unwrap_or(0.0));
        }
    }
    Advantages { values, frac_reward_zero_std: if rewards.is_empty() { 0.0 } else { zero_std as f64 / rewards.len() as f64 } }
}

fn nanmean(xs: &[Option<f64>]) -> Option<f64> {
    let present: Vec<f64> = xs.iter().flatten().copied().collect();
    (!present.is_empty()).then(|| present.iter().sum::<f64>() / present.len() as f64)
}

/// None with fewer than two values (TRL: NaN).
fn nanstd(xs: &[Option<f64>]) -> Option<f64> {
    let present: Vec<f64> = xs.iter().flatten().copied().collect();
    if present.len() < 2 {
        return None;
    }
    let mean = present.iter().sum::<f64>() / present.len() as f64;
    Some((present.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (present.len() - 1) as f64).sqrt())
}
