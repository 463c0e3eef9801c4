//! The sweep's `report.md` (plan, scoreboard, winner) and `eval_curves.svg` (every
//! candidate's eval loss against step).
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;

use super::plan::{Plan, GIB};
use super::{CandidateRecord, SweepRecord};
use crate::engine::{RunStatus, METRICS_FILE};
use crate::metrics::MetricsRow;
use crate::progress::fmt_duration;
use crate::report::{line_chart_svg, Series, PALETTE, REPORT_FILE};

pub const CURVES_FILE: &str = "eval_curves.svg";

/// The plan as a table: groups, devices, candidates, memory and time estimates.
pub fn plan_table(plan: &Plan, candidates: &[CandidateRecord]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "sweep plan: {} candidates in {} group(s), at most {} training at once", candidates.len(), plan.groups.len(), plan.max_parallel);
    for d in &plan.devices {
        let _ = writeln!(
            s,
            "  device {}: {:.1} GiB, {:.1} TFLOP/s assumed{}",
            d.name,
            d.memory_bytes as f64 / GIB,
            d.flops_per_s / 1e12,
            if d.simulated { " (simulated)" } else { "" }
        );
    }
    for (k, g) in plan.groups.iter().enumerate() {
        let _ = writeln!(s, "  group {k} on {}: {:.2} GiB, ~{}", g.device, g.memory_bytes as f64 / GIB, fmt_duration(g.est_seconds));
        for name in &g.candidates {
            if let Some(c) = candidates.iter().find(|c| &c.name == name) {
                let _ = writeln!(s, "    {name}: {} steps, ~{:.2} GiB alone, ~{}", c.total_steps, c.est_memory_bytes as f64 / GIB, fmt_duration(c.est_seconds));
            }
        }
    }
    let _ = writeln!(s, "  estimated wall time: ~{}", fmt_duration(plan.est_seconds));
    s
}

fn status_name(s: RunStatus) -> String {
    format!("{s:?}").to_lowercase()
}

/// `report.md` + `eval_curves.svg` in the sweep directory.
pub fn write(dir: &Path, record: &SweepRecord) -> Result<()> {
    let mut series = Vec::new();
    for (i, c) in record.candidates.iter().enumerate() {
        let rows: Vec<MetricsRow> = crate::metrics::read_metrics_so_far(&c.output.join(METRICS_FILE))?;
        let mut points: Vec<(f64, f64)> = rows.iter().filter_map(|r| r.eval_loss.filter(|v| v.is_finite()).map(|v| (r.step as f64, v))).collect();
        if points.is_empty() {
            points = rows.iter().filter_map(|r| r.loss.filter(|v| v.is_finite()).map(|v| (r.step as f64, v))).collect();
        }
        series.push(Series { label: c.name.clone(), color: PALETTE[i % PALETTE.len()].into(), points, markers: true });
    }
    let title = if record.criterion == "eval_loss" { "Eval loss per candidate" } else { "Train loss per candidate (no held-out data)" };
    crate::checkpoint::write_atomic(&dir.join(CURVES_FILE), line_chart_svg(title, "loss", &series).as_bytes())?;
    crate::checkpoint::write_atomic(&dir.join(REPORT_FILE), render(record).as_bytes())
}

pub fn render(record: &SweepRecord) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Sweep\n");
    match &record.winner {
        Some(w) => {
            let c = record.candidates.iter().find(|c| &c.name == w);
            let _ = writeln!(
                s,
                "**Winner: `{w}`** (lowest {}), adapter in `{}`.\n",
                record.criterion.replace('_', " "),
                c.map_or(String::new(), |c| c.output.display().to_string())
            );
        }
        None => {
            let _ = writeln!(s, "**No candidate completed.**\n");
        }
    }
    let _ = writeln!(s, "Wall time {} for {} candidates.\n", fmt_duration(record.wall_s), record.candidates.len());
    let _ = writeln!(s, "## Scoreboard\n");
    let _ = writeln!(s, "| rank | candidate | status | eval loss before | eval loss after | train loss | steps | time | est. time | device |");
    let _ = writeln!(s, "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |");
    let mut order: Vec<&CandidateRecord> = record.candidates.iter().collect();
    let key = |c: &CandidateRecord| if record.criterion == "eval_loss" { c.eval_loss } else { c.train_loss };
    order.sort_by(|a, b| {
        let (ka, kb) = (key(a).filter(|v| v.is_finite() && a.status == RunStatus::Completed), key(b).filter(|v| v.is_finite() && b.status == RunStatus::Completed));
        match (ka, kb) {
            (Some(x), Some(y)) => x.total_cmp(&y),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => a.name.cmp(&b.name),
        }
    });
    let f = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.4}"));
    for (i, c) in order.iter().enumerate() {
        let _ = writeln!(
            s,
            "| {} | `{}` | {} | {} | {} | {} | {}/{} | {} | {} | {} |",
            i + 1,
            c.name,
            status_name(c.status),
            f(c.eval_loss_before),
            f(c.eval_loss),
            f(c.train_loss),
            c.steps,
            c.total_steps,
            c.elapsed_s.map_or("-".into(), fmt_duration),
            fmt_duration(c.est_seconds),
            c.device.as_deref().unwrap_or("-"),
        );
    }
    let failures: Vec<&&CandidateRecord> = order.iter().filter(|c| c.error.is_some()).collect();
    if !failures.is_empty() {
        let _ = writeln!(s, "\n### Failures\n");
        for c in failures {
            let _ = writeln!(s, "- `{}`: {}", c.name, c.error.as_deref().unwrap_or_default());
        }
    }
    let _ = writeln!(s, "\n## Curves\n\n![eval loss per candidate]({CURVES_FILE})\n");
    let _ = writeln!(s, "## Memory: planned against measured\n");
    let _ = writeln!(s, "| group | device | candidates | planned GiB | measured peak RSS GiB |\n| ---: | --- | --- | ---: | ---: |");
    if let Ok(plan) = serde_json::from_value::<Plan>(record.plan.clone()) {
        for (k, g) in plan.groups.iter().enumerate() {
            let measured = record.candidates.iter().find(|c| c.group == Some(k)).and_then(|c| c.group_peak_rss_bytes);
            let _ = writeln!(
                s,
                "| {k} | {} | {} | {:.2} | {} |",
                g.device,
                g.candidates.join(", "),
                g.memory_bytes as f64 / GIB,
                measured.map_or("-".into(), |b| format!("{:.2}", b as f64 / GIB))
            );
        }
    }
    s.push('\n');
    let _ = writeln!(s, "## Candidates\n");
    for c in &record.candidates {
        let keys: Vec<String> = c.overrides.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(s, "- `{}`: {} (run directory `{}`, its own `report.md`)", c.name, keys.join(", "), c.output.display());
    }
    s
}
