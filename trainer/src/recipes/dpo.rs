//! DPO's per-pair loss, as TRL 1.16's `DPOTrainer._compute_loss` writes it (reverse-KL
//! scores, no length weighting): a weighted sum of loss types (TRL's `loss_type` list and
//! `loss_weights`, e.g. `["sigmoid", "sft"]`, the chosen side's NLL added as in RPO).
//!
//! - log ratios rho_w = log pi(y_w|x) - log pi_ref(y_w|x), rho_l likewise (sequence
//!   log-probs summed over the completion tokens), delta = rho_w - rho_l, s = sigmoid
//! - `sigmoid`:      -log s(beta * delta)
//! - `hinge`:        relu(1 - beta * delta)
//! - `ipo`:          (rho_w / |y_w| - rho_l / |y_l| - 1 / (2 beta))^2 (per-token means)
//! - `robust`:       (-(1 - e) log s(beta delta) + e log s(-beta delta)) / (1 - 2e),
//!   e = label smoothing (TRL 1.16 applies it to `robust` only)
//! - `sigmoid_norm`: -log s(beta (rho_w / |y_w| - rho_l / |y_l|)) (per-token means)
//! - `apo_zero`:     (1 - s(beta rho_w)) + s(beta rho_l) (chosen up, rejected down)
//! - `apo_down`:     s(beta rho_w) + (1 - s(beta delta)) (both down, rejected more)
//! - `bco_pair`:     -log s(beta rho_w) - log s(-beta rho_l) (TRL 1.16 has no running
//!   reward mean in it any more: the rewards are compared with 0)
//! - `sft`:          the NLL of the chosen completion per token. TRL averages it over all
//!   chosen tokens of a device batch; here it is the per-pair mean, so a step is the mean
//!   of its pairs and accumulation stays exact: TRL with one pair per device batch.
//!
//! Metrics: rewards = beta * rho (detached), accuracy = reward_w > reward_l strictly,
//! margin = reward_w - reward_l, the policy's summed log-probs, and with several loss
//! types each term's mean before weighting (`loss_term_<type>`).
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::preference::{pair_report_spec, reward_metrics, PairLogps, PairLosses, PairObjective};
use crate::metrics::MetricsRow;
use crate::report::{q, ReportSpec};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    Sigmoid,
    Ipo,
    Hinge,
    Robust,
    #[value(name = "sigmoid_norm")]
    SigmoidNorm,
    #[value(name = "apo_zero")]
    ApoZero,
    #[value(name = "apo_down")]
    ApoDown,
    #[value(name = "bco_pair")]
    BcoPair,
    Sft,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Dpo {
    pub beta: f64,
    pub loss_type: Vec<LossType>,
    /// One weight per loss type.
    pub loss_weights: Vec<f64>,
    pub label_smoothing: f64,
}

impl Dpo {
    /// One loss type.
    pub fn new(beta: f64, loss_type: LossType, label_smoothing: f64) -> Result<Self> {
        Self::combined(beta, vec![loss_type], None, label_smoothing)
    }

    /// A weighted sum of loss types (weights: 1 each when None).
    pub fn combined(beta: f64, loss_type: Vec<LossType>, loss_weights: Option<Vec<f64>>, label_smoothing: f64) -> Result<Self> {
        if !(beta > 0.0 && beta.is_finite()) {
            bail!("--beta must be a positive number, got {beta}");
        }
        if loss_type.is_empty() {
            bail!("--loss-type needs at least one loss type");
        }
        let loss_weights = loss_weights.unwrap_or_else(|| vec![1.0; loss_type.len()]);
        if loss_weights.len() != loss_type.len() {
            bail!("--loss-weights needs one weight per --loss-type: {} weights for {} loss types", loss_weights.len(), loss_type.len());
        }
        if let Some(w) = loss_weights.iter().find(|w| !w.is_finite()) {
            bail!("--loss-weights must be finite numbers, got {w}");
        }
        if label_smoothing != 0.0 && !loss_type.contains(&LossType::Robust) {
            bail!("--label-smoothing applies to --loss-type robust only (TRL's DPO ignores it elsewhere)");
        }
        if !(0.0..0.5).contains(&label_smoothing) {
            bail!("--label-smoothing must be in [0, 0.5), got {label_smoothing}");
        }
        Ok(Dpo { beta, loss_type, loss_weights, label_smoothing })
    }

    /// The per-pair loss of one loss type.
    fn term(&self, ty: LossType, policy: &PairLogps, chosen_ratio: &Tensor, rejected_ratio: &Tensor) -> Result<Tensor> {
        let beta = self.beta;
        let delta = (chosen_ratio - rejected_ratio)?;
        let sigmoid = |x: &Tensor| log_sigmoid(x)?.exp();
        let per_token = |ratio: &Tensor, n: &Tensor| ratio.broadcast_div(&n.clamp(1.0, f64::INFINITY)?);
        let per_token_delta = || per_token(chosen_ratio, &policy.chosen_tokens)? - per_token(rejected_ratio, &policy.rejected_tokens)?;
        Ok(match ty {
            LossType::Sigmoid => log_sigmoid(&(&delta * beta)?)?.neg()?,
            LossType::Hinge => (1.0 - (&delta * beta)?)?.relu()?,
            LossType::Ipo => (per_token_delta()? - 1.0 / (2.0 * beta))?.sqr()?,
            LossType::Robust => {
                let e = self.label_smoothing;
                let clean = (log_sigmoid(&(&delta * beta)?)? * -(1.0 - e))?;
                let flipped = (log_sigmoid(&(&delta * -beta)?)? * e)?;
                ((clean + flipped)? / (1.0 - 2.0 * e))?
            }
            LossType::SigmoidNorm => log_sigmoid(&(per_token_delta()? * beta)?)?.neg()?,
            LossType::ApoZero => ((1.0 - sigmoid(&(chosen_ratio * beta)?)?)? + sigmoid(&(rejected_ratio * beta)?)?)?,
            LossType::ApoDown => (sigmoid(&(chosen_ratio * beta)?)? + (1.0 - sigmoid(&(&delta * beta)?)?)?)?,
            LossType::BcoPair => (log_sigmoid(&(chosen_ratio * beta)?)? + log_sigmoid(&(rejected_ratio * -beta)?)?)?.neg()?,
            LossType::Sft => per_token(&policy.chosen, &policy.chosen_tokens)?.neg()?,
        })
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
        let chosen_ratio = (&policy.chosen - &reference.chosen)?;
        let rejected_ratio = (&policy.rejected - &reference.rejected)?;
        let mut losses: Option<Tensor> = None;
        let mut terms = Vec::new();
        for (&ty, &w) in self.loss_type.iter().zip(&self.loss_weights) {
            let term = self.term(ty, policy, &chosen_ratio, &rejected_ratio)?;
            let weighted = (&term * w)?;
            losses = Some(match losses {
                None => weighted,
                Some(sum) => (sum + weighted)?,
            });
            terms.push((term_metric(ty), term.detach()));
        }
        let losses = losses.context("no loss type")?;
        let rewards_chosen = (chosen_ratio.detach() * self.beta)?;
        let rewards_rejected = (rejected_ratio.detach() * self.beta)?;
        let mut metrics = reward_metrics(rewards_chosen, rewards_rejected, &policy.chosen, &policy.rejected)?;
        if terms.len() > 1 {
            metrics.extend(terms);
        }
        Ok(PairLosses { losses, metrics })
    }

    fn report_spec(&self) -> ReportSpec {
        ReportSpec {
            diagnose: over_optimization,
            ..pair_report_spec(
                "held-out DPO loss per pair",
                "DPO loss per pair",
                vec![q("loss", "train loss"), q("eval_loss", "eval loss"), q("loss_term_*", ""), q("eval_loss_term_*", "")],
                "Log-probs of the completions (policy, summed over tokens)",
            )
        }
    }
}

/// `loss_term_sigmoid`, ...: a term's mean before weighting, logged when there are several.
fn term_metric(ty: LossType) -> &'static str {
    match ty {
        LossType::Sigmoid => "loss_term_sigmoid",
        LossType::Ipo => "loss_term_ipo",
        LossType::Hinge => "loss_term_hinge",
        LossType::Robust => "loss_term_robust",
        LossType::SigmoidNorm => "loss_term_sigmoid_norm",
        LossType::ApoZero => "loss_term_apo_zero",
        LossType::ApoDown => "loss_term_apo_down",
        LossType::BcoPair => "loss_term_bco_pair",
        LossType::Sft => "loss_term_sft",
    }
}

/// How far (nats, summed over the completion) the held-out chosen log-prob may fall below
/// its best before it counts: e^1, the chosen answers ~2.7 times less likely.
pub const CHOSEN_DROP_NATS: f64 = 1.0;

/// DPO over-optimizing, read from the held-out rows: the chosen completions' log-prob fell
/// more than [`CHOSEN_DROP_NATS`] below its best evaluation while the reward margin grew
/// past its value there. The margin then grows by pushing the rejected side down faster
/// than the chosen one, and generations drift (the usual failure of DPO on small data).
pub fn over_optimization(rows: &[MetricsRow]) -> Vec<String> {
    let evals: Vec<(usize, f64, f64)> = rows
        .iter()
        .filter_map(|r| {
            let get = |k: &str| r.extra.get(k).and_then(|v| v.as_f64()).filter(|v| v.is_finite());
            Some((r.step, get("eval_logps_chosen")?, get("eval_rewards_margin")?))
        })
        .collect();
    let Some(&(step, chosen, margin)) = evals.last() else { return Vec::new() };
    let Some(&(best_step, best_chosen, best_margin)) = evals.iter().max_by(|a, b| a.1.total_cmp(&b.1)) else { return Vec::new() };
    if best_chosen - chosen <= CHOSEN_DROP_NATS || margin <= best_margin {
        return Vec::new();
    }
    vec![format!(
        "DPO is over-optimizing: on the held-out pairs the chosen completions' log-prob fell from {best_chosen:.2} (step {best_step}) to \
         {chosen:.2} (step {step}, {:.1}x less likely) while the reward margin grew from {best_margin:.3} to {margin:.3}; the margin now \
         grows by pushing both answers down, and generations degrade. Try a lower --learning-rate, a larger --beta, fewer --steps or \
         --epochs, or an SFT term on the chosen side (--loss-type sigmoid,sft --loss-weights 1,1).",
        (best_chosen - chosen).exp()
    )]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval_row(step: usize, chosen: f64, margin: f64) -> MetricsRow {
        let mut r = MetricsRow { step, eval_loss: Some(0.5), ..Default::default() };
        r.extra.insert("eval_logps_chosen".into(), serde_json::json!(chosen));
        r.extra.insert("eval_rewards_margin".into(), serde_json::json!(margin));
        r
    }

    #[test]
    fn over_optimization_is_a_falling_chosen_log_prob_under_a_growing_margin() {
        // Chosen rises, then falls by 10 nats while the margin keeps growing: warned.
        let rows = vec![eval_row(0, -50.0, 0.0), eval_row(10, -45.0, 2.0), MetricsRow { step: 11, loss: Some(0.3), ..Default::default() }, eval_row(20, -55.0, 9.0)];
        let w = over_optimization(&rows);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("-45.00 (step 10)") && w[0].contains("-55.00 (step 20"), "{}", w[0]);
        for remedy in ["--learning-rate", "--beta", "--steps", "sft"] {
            assert!(w[0].contains(remedy), "{}", w[0]);
        }
        // Chosen rising with the margin, a drop within the tolerance, or a shrinking margin: no warning.
        assert!(over_optimization(&[eval_row(0, -50.0, 0.0), eval_row(10, -40.0, 3.0)]).is_empty());
        assert!(over_optimization(&[eval_row(0, -50.0, 0.0), eval_row(10, -50.5, 3.0)]).is_empty());
        assert!(over_optimization(&[eval_row(0, -50.0, 4.0), eval_row(10, -60.0, 3.0)]).is_empty());
        assert!(over_optimization(&[]).is_empty());
    }

    #[test]
    fn loss_types_and_weights_are_checked() {
        assert!(Dpo::combined(0.1, vec![LossType::Sigmoid, LossType::Sft], Some(vec![1.0]), 0.0).unwrap_err().to_string().contains("one weight per"));
        assert!(Dpo::combined(0.1, vec![], None, 0.0).is_err());
        assert!(Dpo::combined(0.1, vec![LossType::Sigmoid], Some(vec![f64::NAN]), 0.0).is_err());
        assert!(Dpo::combined(0.1, vec![LossType::Sigmoid, LossType::Sft], None, 0.1).is_err());
        assert_eq!(Dpo::combined(0.1, vec![LossType::Robust, LossType::Sft], None, 0.1).unwrap().loss_weights, [1.0, 1.0]);
    }
}
