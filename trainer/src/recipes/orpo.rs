//! ORPO's per-pair loss (Hong et al. 2024; the odds-ratio term as TRL 1.16's
//! `ORPOTrainer.odds_ratio_loss` writes it), no reference model:
//!
//! - m_w, m_l = mean per-token log-probs of the chosen and rejected completions
//! - log_odds = (m_w - m_l) - (log(1 - exp(m_w)) - log(1 - exp(m_l)))
//! - L = -m_w - beta * log sigmoid(log_odds); the batch loss is the mean over pairs
//!
//! TRL averages its NLL term over all chosen tokens of a batch (longer answers weigh
//! more); here it is the per-pair mean, so that a batch is the mean of its pairs and
//! gradient accumulation is exact. The two agree when chosen lengths are equal.
//!
//! Metrics (TRL's): rewards = beta * m (detached), accuracy, margin, logps = m,
//! `nll_loss` = -m_w, `log_odds_ratio` = log sigmoid(log_odds), `log_odds_chosen` = log_odds.
use anyhow::{bail, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::dpo::log_sigmoid;
use super::preference::{pair_report_spec, reward_metrics, PairLogps, PairLosses, PairObjective};
use crate::report::{q, ChartSpec, ReportSpec};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Orpo {
    pub beta: f64,
}

impl Orpo {
    pub fn new(beta: f64) -> Result<Self> {
        if !(beta >= 0.0 && beta.is_finite()) {
            bail!("--beta must be a number >= 0, got {beta}");
        }
        Ok(Orpo { beta })
    }
}

/// log(1 - exp(m)) for m < 0 (f64: exact enough down to |m| ~ 1e-12).
fn log1mexp(m: &Tensor) -> candle_core::Result<Tensor> {
    (1.0 - m.exp()?)?.log()
}

impl PairObjective for Orpo {
    fn name(&self) -> &'static str {
        "orpo"
    }

    fn uses_reference(&self) -> bool {
        false
    }

    fn losses(&self, policy: &PairLogps, _reference: Option<&PairLogps>) -> Result<PairLosses> {
        let m_w = (&policy.chosen / &policy.chosen_tokens.clamp(1.0, f64::INFINITY)?)?;
        let m_l = (&policy.rejected / &policy.rejected_tokens.clamp(1.0, f64::INFINITY)?)?;
        let log_odds = ((&m_w - &m_l)? - (log1mexp(&m_w)? - log1mexp(&m_l)?)?)?;
        let ratio = log_sigmoid(&log_odds)?;
        let nll = m_w.neg()?;
        let losses = (&nll - (&ratio * self.beta)?)?;
        let rewards_chosen = (m_w.detach() * self.beta)?;
        let rewards_rejected = (m_l.detach() * self.beta)?;
        let mut metrics = reward_metrics(rewards_chosen, rewards_rejected, &m_w, &m_l)?;
        metrics.extend([("nll_loss", nll.detach()), ("log_odds_ratio", ratio.detach()), ("log_odds_chosen", log_odds.detach())]);
        Ok(PairLosses { losses, metrics })
    }

    fn report_spec(&self) -> ReportSpec {
        let mut spec = pair_report_spec(
            "held-out ORPO loss per pair",
            "ORPO loss per pair",
            vec![q("loss", "train loss"), q("eval_loss", "eval loss")],
            "Log-probs of the completions (mean per token)",
        );
        spec.charts.push(ChartSpec {
            file: "odds_ratio.svg",
            title: "ORPO's terms: NLL of the chosen answer and the odds ratio",
            y_label: "nats",
            series: vec![
                q("nll_loss", "nll_loss"),
                q("log_odds_ratio", "log_odds_ratio"),
                q("log_odds_chosen", "log_odds_chosen"),
                q("eval_nll_loss", "eval_nll_loss"),
                q("eval_log_odds_ratio", "eval_log_odds_ratio"),
                q("eval_log_odds_chosen", "eval_log_odds_chosen"),
            ],
        });
        spec
    }
}
