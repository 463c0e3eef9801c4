//! Phase `report`: `final_report.md` and the same data as `final_report.json`: the plan
//! against what happened (time and cost), the scoreboard, curves (SVG), base against
//! fine-tuned, where generated data came from, the promoted adapter, its check against
//! the hosting rules, and snippets to use it.
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::final_run::FinalRun;
use super::plan::Plan;
use super::plots::{self, Curve};
use super::promotion::{self, Promotion};
use super::{Generated, Workflow, REPORT_JSON, REPORT_MD};
use crate::engine::METRICS_FILE;
use crate::metrics::MetricsRow;
use crate::progress::fmt_duration;

pub const CURVES_FILE: &str = "curves.svg";

/// What a workflow hands the report besides its state.
pub struct ReportInput<'a> {
    pub title: &'a str,
    pub plan: &'a Plan,
    pub promotion: Option<&'a Promotion>,
    pub final_run: Option<&'a FinalRun>,
    /// The base-against-fine-tuned section (markdown) and its data.
    pub comparison_md: String,
    pub comparison: Value,
    pub generated: Vec<Generated>,
    /// Phases whose time counts as evaluation inference in "plan against actual".
    pub inference_phases: &'a [&'a str],
    /// The runs' eval loss is minus a reward (GRPO): plot the reward.
    pub eval_is_negative_reward: bool,
}

/// Writes the report files and returns the JSON.
pub fn write(wf: &Workflow, r: &ReportInput) -> Result<Value> {
    let dir = &wf.dir;
    let plan = r.plan;
    let mut md = String::new();
    let _ = writeln!(md, "# {}\n", r.title);
    let adapter = r.final_run.map(|f| f.adapter.clone());
    // The promoted adapter's base (a model sweep may promote another than --model).
    let model = r.final_run.map_or(plan.model.clone(), |f| f.config.model.clone());
    if let (Some(p), Some(a)) = (r.promotion, &adapter) {
        let _ = writeln!(md, "**Promoted adapter: `{}`** (candidate `{}`, {}), base model `{}`.\n", a.display(), p.winner, if r.final_run.is_some_and(|f| f.retrained) { "retrained on all the training data" } else { "as trained in the sweep" }, model);
    }

    // ---- plan against actual ----------------------------------------------------------
    let actual_sweep = wf.elapsed("sweep");
    let actual_final = wf.elapsed("final run");
    let actual_inf: f64 = r.inference_phases.iter().map(|p| wf.elapsed(p)).sum();
    let est_inf: f64 = plan.inference.iter().map(|c| c.seconds).sum();
    let actual_total: f64 = wf.state.phases.iter().map(|p| p.elapsed_s).sum();
    let cost = |s: f64| match (plan.gpu, plan.gpu_hour_price) {
        (true, Some(p)) => format!("${:.2}", p * s / 3600.0),
        _ => "-".into(),
    };
    let _ = writeln!(md, "## Plan against actual\n");
    let _ = writeln!(md, "| work | estimated | actual | est. cost | actual cost |\n| --- | ---: | ---: | ---: | ---: |");
    let mut rows = vec![("sweep", plan.sweep_seconds, actual_sweep)];
    if let Some(f) = &plan.final_run {
        rows.push(("final run", f.seconds, actual_final));
    }
    rows.push(("evaluation inference", est_inf, actual_inf));
    rows.push(("total (all phases)", plan.total_seconds, actual_total));
    for (what, est, act) in &rows {
        let _ = writeln!(md, "| {what} | {} | {} | {} | {} |", fmt_duration(*est), fmt_duration(*act), cost(*est), cost(*act));
    }
    let _ = writeln!(md, "\nDevice `{}`{}. The plan is in `plan.md`.\n", plan.device, if plan.gpu { "" } else { " (CPU: time, no price)" });

    // ---- scoreboard and curves ----------------------------------------------------------
    let mut curves = Vec::new();
    if let Some(p) = r.promotion {
        let _ = writeln!(md, "{}", promotion::render(&p.rows, &p.winner, &p.criterion));
        for row in &p.rows {
            let points = eval_points(&row.output, r.eval_is_negative_reward)?;
            if !points.is_empty() {
                curves.push(Curve { label: row.name.clone(), points });
            }
        }
    }
    if let Some(f) = r.final_run.filter(|f| f.retrained) {
        let run_dir = f.config.output.clone();
        let points = eval_points(&run_dir, r.eval_is_negative_reward)?;
        if !points.is_empty() {
            curves.push(Curve { label: "final run".into(), points });
        }
    }
    if !curves.is_empty() {
        let (title, y) = if r.eval_is_negative_reward { ("Held-out reward", "reward") } else { ("Eval loss (train loss without held-out data)", "loss") };
        let svg = plots::curves_svg(title, "step", y, &curves)?;
        crate::checkpoint::write_atomic(&dir.join(CURVES_FILE), svg.as_bytes())?;
        let _ = writeln!(md, "## Curves\n\n![{y} per step]({CURVES_FILE})\n");
    }

    // ---- base against fine-tuned ------------------------------------------------------
    let _ = writeln!(md, "## Base against fine-tuned\n\n{}\n", r.comparison_md);

    // ---- provenance ---------------------------------------------------------------------
    if !r.generated.is_empty() {
        let _ = writeln!(md, "## Generated data\n");
        for g in &r.generated {
            let _ = writeln!(md, "- `{}`: {} from `{}`", g.path.display(), g.what, g.from.display());
        }
        md.push('\n');
    }

    // ---- the adapter, hosting rules, snippets ------------------------------------------
    let mut hosting = Value::Null;
    if let Some(a) = &adapter {
        let (checks, text) = hosting_check(a)?;
        hosting = checks;
        md.push_str(&text);
        md.push_str(&snippets(a, &model, hosting["rank"].as_u64().unwrap_or(8)));
    }
    crate::checkpoint::write_atomic(&dir.join(REPORT_MD), md.as_bytes())?;
    let data = json!({
        "workflow": wf.state.workflow,
        "model": model,
        "adapter": adapter,
        "winner": r.promotion.map(|p| p.winner.clone()),
        "criterion": r.promotion.map(|p| p.criterion.clone()),
        "plan": plan,
        "actual": {
            "phases": wf.state.phases.iter().map(|p| json!({"name": p.name, "elapsed_s": p.elapsed_s, "attempts": p.attempts})).collect::<Vec<_>>(),
            "sweep_s": actual_sweep, "final_run_s": actual_final, "inference_s": actual_inf, "total_s": actual_total,
            "cost": plan.gpu_hour_price.filter(|_| plan.gpu).map(|p| p * actual_total / 3600.0),
        },
        "scoreboard": r.promotion.map(|p| &p.rows),
        "final_run": r.final_run,
        "comparison": r.comparison,
        "generated": r.generated,
        "hosting": hosting,
    });
    crate::checkpoint::write_atomic(&dir.join(REPORT_JSON), &serde_json::to_vec_pretty(&data)?)?;
    eprintln!("report: {}", dir.join(REPORT_MD).display());
    Ok(data)
}

/// (step, eval loss) of a run directory (minus it, the reward, for GRPO runs); its train
/// loss when it has no eval rows.
fn eval_points(run_dir: &Path, negate: bool) -> Result<Vec<(f64, f64)>> {
    let rows: Vec<MetricsRow> = crate::metrics::read_metrics_so_far(&run_dir.join(METRICS_FILE))?;
    let sign = if negate { -1.0 } else { 1.0 };
    let eval: Vec<(f64, f64)> = rows.iter().filter_map(|r| r.eval_loss.map(|v| (r.step as f64, sign * v))).collect();
    if !eval.is_empty() {
        return Ok(eval);
    }
    Ok(rows.iter().filter_map(|r| r.loss.map(|v| (r.step as f64, v))).collect())
}

/// The hosted services' rules for a LoRA upload: rank 4..64, only the supported target
/// modules (the seven projections), and a base model name the service can resolve.
pub fn hosting_check(adapter: &Path) -> Result<(Value, String)> {
    let path = adapter.join("adapter_config.json");
    let cfg: Value = serde_json::from_slice(&std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?).with_context(|| format!("{}: not JSON", path.display()))?;
    let rank = cfg["r"].as_u64().unwrap_or(0);
    let modules: Vec<String> = cfg["target_modules"].as_array().map(|a| a.iter().filter_map(|m| m.as_str().map(str::to_string)).collect()).unwrap_or_default();
    let base = cfg["base_model_name_or_path"].as_str().unwrap_or_default().to_string();
    let unsupported: Vec<&String> = modules.iter().filter(|m| !lora_models::ALL_TARGETS.contains(&m.as_str())).collect();
    let rank_ok = (4..=64).contains(&rank);
    let modules_ok = !modules.is_empty() && unsupported.is_empty();
    // A local path or a .gguf file is not a name the hosted service can look up.
    let base_ok = !base.is_empty() && !base.ends_with(".gguf") && !Path::new(&base).is_absolute() && !base.starts_with('.');
    let mut md = String::from("## Hosting rules\n\n");
    let mark = |ok: bool| if ok { "ok" } else { "FAILS" };
    let _ = writeln!(md, "| rule | adapter | check |\n| --- | --- | --- |");
    let _ = writeln!(md, "| rank in 4..64 | {rank} | {} |", mark(rank_ok));
    let _ = writeln!(md, "| target modules among {} | {} | {} |", lora_models::ALL_TARGETS.join(", "), modules.join(", "), mark(modules_ok));
    let _ = writeln!(
        md,
        "| base model is a hub name | `{base}` | {} |\n",
        if base_ok { "ok" } else { "FAILS: a local file or path; set `base_model_name_or_path` in adapter_config.json to the hub name of this base before uploading" }
    );
    let data = json!({"rank": rank, "rank_ok": rank_ok, "target_modules": modules, "target_modules_ok": modules_ok, "base_model": base, "base_model_ok": base_ok, "ok": rank_ok && modules_ok && base_ok});
    Ok((data, md))
}

fn snippets(adapter: &Path, model: &str, rank: u64) -> String {
    let a = adapter.display();
    format!(
        "## Use it\n\nPEFT (Python):\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\nfrom peft import PeftModel\n\nbase = AutoModelForCausalLM.from_pretrained(\"{model}\")\ntokenizer = AutoTokenizer.from_pretrained(\"{model}\")\nmodel = PeftModel.from_pretrained(base, \"{a}\")\n```\n\nvLLM:\n\n```sh\nvllm serve {model} --enable-lora --max-lora-rank {r} --lora-modules finetuned={a}\n```\n\nHosted (Fireworks) upload:\n\n```sh\nfirectl create model my-finetuned-lora {a}\n```\n\nHere:\n\n```sh\nlora-train generate --model {model} --adapter {a} --chat \"Hello\"\n```\n",
        r = rank.max(8).next_power_of_two()
    )
}
