//! DPO's per-pair loss, as TRL 1.16's `DPOTrainer._compute_loss` writes it (reverse-KL
//! scores, one loss type at a time, no length weighting):
//!
//! - log ratios rho_w = log pi(y_w|x) - log pi_ref(y_w|x), rho_l likewise (sequence
//!   log-probs summed over the completion tokens), delta = rho_w - rho_l
//! - `sigmoid`: -log sigmoid(beta * delta)
//! - `hinge`:   relu(1 - beta * delta)
//! - `ipo`:     (rho_w / |y_w| - rho_l / |y_l| - 1 / (2 beta))^2 (per-token means)
//! - `robust`:  (-(1 - e) log sigmoid(beta delta) + e log sigmoid(-beta delta)) / (1 - 2e),
//!   e = label smoothing (TRL 1.16 applies it to `robust` only)
//!
//! Metrics: rewards = beta * rho (detached), accuracy = reward_w > reward_l strictly,
//! margin = reward_w - reward_l, and the policy's summed log-probs.
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::preference::{reward_metrics, PairLogps, PairLosses, PairObjective};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LossType {
    Sigmoid,
    Ipo,
    Hinge,
    Robust,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Dpo {
    pub beta: f64,
    pub loss_type: LossType,
    pub label_smoothing: f64,
}

impl Dpo {
    pub fn new(beta: f64, loss_type: LossType, label_smoothing: f64) -> Result<Self> {
        if !(beta > 0.0 && beta.is_finite()) {
            bail!("--beta must be a positive number, got {beta}");
        }
        if label_smoothing != 0.0 && loss_type != LossType::Robust {
            bail!("--label-smoothing applies to --loss-type robust only (TRL's DPO ignores it elsewhere)");
        }
        if !(0.0..0.5).contains(&label_smoothing) {
            bail!("--label-smoothing must be in [0, 0.5), got {label_smoothing}");
        }
        Ok(Dpo { beta, loss_type, label_smoothing })
    }
}

/// log sigmoid(x) = min(x, 0) - log(1 + exp(-|x|)), stable for any x.
pub fn log_sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    let low = (x - x.relu()?)?;
    low - ((x.abs()?.neg()?.exp()? + 1.0)?.log()?)
}

impl PairObjective for Dpo {
    fn name(&self) -> &'static str {
        "dpo"
    }

    fn uses_reference(&self) -> bool {
        true
    }

    fn losses(&self, policy: &PairLogps, reference: Option<&PairLogps>) -> Result<PairLosses> {
        let reference = reference.context("DPO needs the reference log-probs")?;
        let beta = self.beta;
        let chosen_ratio = (&policy.chosen - &reference.chosen)?;
        let rejected_ratio = (&policy.rejected - &reference.rejected)?;
        let delta = (&chosen_ratio - &rejected_ratio)?;
        let losses = match self.loss_type {
            LossType::Sigmoid => log_sigmoid(&(&delta * beta)?)?.neg()?,
            LossType::Hinge => (1.0 - (&delta * beta)?)?.relu()?,
            LossType::Ipo => {
                let per_token = |ratio: &Tensor, n: &Tensor| ratio.broadcast_div(&n.clamp(1.0, f64::INFINITY)?);
                let d = (per_token(&chosen_ratio, &policy.chosen_tokens)? - per_token(&rejected_ratio, &policy.rejected_tokens)?)?;
                (d - 1.0 / (2.0 * beta))?.sqr()?
            }
            LossType::Robust => {
                let e = self.label_smoothing;
                let clean = (log_sigmoid(&(&delta * beta)?)? * -(1.0 - e))?;
                let flipped = (log_sigmoid(&(&delta * -beta)?)? * e)?;
                ((clean + flipped)? / (1.0 - 2.0 * e))?
            }
        };
        let rewards_chosen = (chosen_ratio.detach() * beta)?;
        let rewards_rejected = (rejected_ratio.detach() * beta)?;
        Ok(PairLosses { losses, metrics: reward_metrics(rewards_chosen, rewards_rejected, &policy.chosen, &policy.rejected)? })
    }
}
