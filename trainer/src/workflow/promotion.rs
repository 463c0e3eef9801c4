//! Phase `promotion`: the scoreboard (validation loss, and evaluator scores of each
//! candidate's greedy answers when the plan has evaluators), the winner, and the gate: a
//! confirm on a terminal or `--yes`, else exit status 3 with `DIR/scoreboard.md` written.
use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::evaluation;
use super::plan::PlannedCandidate;
use super::sweep::SweepResult;
use super::Workflow;
use crate::config::TrainConfig;
use crate::engine::RunStatus;
use crate::progress::fmt_duration;

pub const SCOREBOARD_FILE: &str = "scoreboard.md";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Row {
    pub name: String,
    pub overrides: std::collections::BTreeMap<String, String>,
    pub status: RunStatus,
    pub eval_loss_before: Option<f64>,
    pub eval_loss: Option<f64>,
    pub train_loss: Option<f64>,
    pub elapsed_s: Option<f64>,
    pub est_seconds: f64,
    /// Mean evaluator reward of the candidate's answers (with evaluators).
    pub reward_mean: Option<f64>,
    pub output: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Promotion {
    pub winner: String,
    /// `reward` (evaluators), `eval_loss` or `train_loss`.
    pub criterion: String,
    pub rows: Vec<Row>,
    pub winner_dir: PathBuf,
    pub winner_config: TrainConfig,
    pub approved_by: String,
}

/// Scores the candidates, picks the winner and asks for the promotion.
/// `planned` gives each candidate's estimated time (calibrated); the sweep's own estimate
/// stands in for a candidate the plan lacks.
pub fn run(wf: &Workflow, sweep: &SweepResult, planned: &[PlannedCandidate], evaluators: &[String], eval_samples: usize, max_new_tokens: usize) -> Result<Promotion> {
    let mut rows: Vec<Row> = sweep
        .candidates
        .iter()
        .map(|c| Row {
            name: c.name.clone(),
            overrides: c.overrides.clone(),
            status: c.status,
            eval_loss_before: c.eval_loss_before,
            eval_loss: c.eval_loss,
            train_loss: c.train_loss,
            elapsed_s: c.elapsed_s,
            est_seconds: planned.iter().find(|p| p.name == c.name).map_or(c.est_seconds, |p| p.seconds),
            reward_mean: None,
            output: c.output.clone(),
        })
        .collect();
    let done: Vec<usize> = (0..rows.len()).filter(|&i| rows[i].status == RunStatus::Completed).collect();
    let mut criterion = sweep.criterion.clone();
    let mut winner = sweep.winner.clone().context("the sweep has no winner")?;
    if !evaluators.is_empty() {
        // Candidates on one base share one loaded copy of it (a model sweep has several).
        let mut bases: Vec<&str> = done.iter().map(|&i| sweep.candidates[i].config.model.as_str()).collect();
        bases.sort_unstable();
        bases.dedup();
        for base in bases {
            let group: Vec<usize> = done.iter().copied().filter(|&i| sweep.candidates[i].config.model == base).collect();
            let cfg = &sweep.candidates[group[0]].config;
            let Some(ds) = evaluation::held_out(cfg)? else { continue };
            let adapters: Vec<(String, PathBuf)> = group.iter().map(|&i| (rows[i].name.clone(), rows[i].output.clone())).collect();
            let loaded = evaluation::load_with_adapters(cfg, &adapters)?;
            let prompts = evaluation::prompts(&loaded.tokenizer, &ds, eval_samples)?;
            let set = evaluation::evaluator_set(evaluators, &loaded.tokenizer, &prompts)?;
            for &i in &group {
                eprintln!("promotion: scoring {} on {} held-out prompts", rows[i].name, prompts.len());
                rows[i].reward_mean = evaluation::generate_and_score(&loaded, Some(&rows[i].name), &prompts, &set, max_new_tokens)?.reward_mean;
            }
        }
        // Highest reward; equal rewards fall back to the lower validation loss.
        let best = done
            .iter()
            .copied()
            .filter(|&i| rows[i].reward_mean.is_some())
            .max_by(|&a, &b| {
                let (ra, rb) = (rows[a].reward_mean.unwrap_or(0.0), rows[b].reward_mean.unwrap_or(0.0));
                ra.total_cmp(&rb).then_with(|| rows[b].eval_loss.unwrap_or(f64::MAX).total_cmp(&rows[a].eval_loss.unwrap_or(f64::MAX)))
            });
        if let Some(b) = best {
            winner = rows[b].name.clone();
            criterion = "reward".into();
        }
    }
    let w = sweep.candidates.iter().find(|c| c.name == winner).context("winner not among the candidates")?;
    let text = render(&rows, &winner, &criterion);
    let path = wf.dir.join(SCOREBOARD_FILE);
    crate::checkpoint::write_atomic(&path, text.as_bytes())?;
    eprintln!("{text}");
    let approval = super::approval::require(wf, &format!("promotion of `{winner}`"), &path)?;
    Ok(Promotion { winner, criterion, rows, winner_dir: w.output.clone(), winner_config: w.config.clone(), approved_by: approval.by })
}

pub fn render(rows: &[Row], winner: &str, criterion: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "## Scoreboard\n\nWinner: `{winner}` (by {}).\n", criterion.replace('_', " "));
    let _ = writeln!(s, "| candidate | config | status | eval loss before | eval loss after | train loss | reward | time | est. time |");
    let _ = writeln!(s, "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    let f = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.4}"));
    for r in rows {
        let config: Vec<String> = r.overrides.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(
            s,
            "| {}`{}` | {} | {} | {} | {} | {} | {} | {} | {} |",
            if r.name == winner { "**winner** " } else { "" },
            r.name,
            config.join(", "),
            format!("{:?}", r.status).to_lowercase(),
            f(r.eval_loss_before),
            f(r.eval_loss),
            f(r.train_loss),
            f(r.reward_mean),
            r.elapsed_s.map_or("-".into(), fmt_duration),
            fmt_duration(r.est_seconds)
        );
    }
    s
}
