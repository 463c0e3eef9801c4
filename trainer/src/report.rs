//! `RUN/report.md` (configuration, summary, eval table) and `RUN/loss_curve.svg` (train and
//! eval loss against step), both written by hand: no plotting dependency.
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;

use crate::metrics::MetricsRow;

pub const SVG_FILE: &str = "loss_curve.svg";
pub const REPORT_FILE: &str = "report.md";

fn nice_step(range: f64, target_ticks: usize) -> f64 {
    let raw = range / target_ticks.max(1) as f64;
    if raw.is_nan() || raw <= 0.0 || !raw.is_finite() {
        return 1.0;
    }
    let mag = 10f64.powf(raw.log10().floor());
    let r = raw / mag;
    let m = if r <= 1.0 { 1.0 } else if r <= 2.0 { 2.0 } else if r <= 5.0 { 5.0 } else { 10.0 };
    m * mag
}

fn fmt_tick(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 { 0 } else { (-step.log10().floor()) as usize };
    format!("{v:.decimals$}")
}

/// One line of a chart.
pub struct Series {
    pub label: String,
    pub color: String,
    pub points: Vec<(f64, f64)>,
    /// Dots at the points (sparse series such as evaluations).
    pub markers: bool,
}

/// Distinct colors for many series (the Tableau 10 palette).
pub const PALETTE: [&str; 10] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];

/// An SVG line chart of train loss (every logged step) and eval loss (eval points).
pub fn loss_curve_svg(rows: &[MetricsRow]) -> String {
    let train = rows.iter().filter_map(|r| r.loss.filter(|l| l.is_finite()).map(|l| (r.step as f64, l))).collect();
    let eval = rows.iter().filter_map(|r| r.eval_loss.filter(|l| l.is_finite()).map(|l| (r.step as f64, l))).collect();
    line_chart_svg(
        "Loss per loss token",
        "loss",
        &[
            Series { label: "train loss".into(), color: PALETTE[0].into(), points: train, markers: false },
            Series { label: "eval loss".into(), color: PALETTE[1].into(), points: eval, markers: true },
        ],
    )
}

/// A line chart of several series against step, drawn by hand (no plotting dependency).
pub fn line_chart_svg(title: &str, y_label: &str, series: &[Series]) -> String {
    let (w, h) = (720.0f64, 400.0f64);
    let (ml, mr, mt, mb) = (64.0, 20.0, 36.0, 48.0);
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in series.iter().flat_map(|s| &s.points) {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{}" y="20" text-anchor="middle" font-size="14">{}</text>"#, w / 2.0, xml_escape(title));
    if x0 > x1 {
        let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle">no data</text></svg>"#, w / 2.0, h / 2.0);
        return s;
    }
    if x1 - x0 < 1.0 {
        x1 = x0 + 1.0;
    }
    x0 = x0.min(0.0);
    let ystep = nice_step((y1 - y0).max(1e-3), 5);
    y0 = ((y0 / ystep).floor() * ystep).max(0.0);
    y1 = (y1 / ystep).ceil() * ystep;
    if y1 <= y0 {
        y1 = y0 + ystep;
    }
    let (pw, ph) = (w - ml - mr, h - mt - mb);
    let px = |x: f64| ml + (x - x0) / (x1 - x0) * pw;
    let py = |y: f64| mt + (1.0 - (y - y0) / (y1 - y0)) * ph;
    // Grid and axes.
    let mut y = y0;
    while y <= y1 + ystep * 0.5 {
        let _ = writeln!(s, r##"<line x1="{ml}" x2="{}" y1="{:.1}" y2="{:.1}" stroke="#ddd"/>"##, ml + pw, py(y), py(y));
        let _ = writeln!(s, r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#, ml - 6.0, py(y) + 4.0, fmt_tick(y, ystep));
        y += ystep;
    }
    let xstep = nice_step(x1 - x0, 8).max(1.0);
    let mut x = (x0 / xstep).ceil() * xstep;
    while x <= x1 + 1e-9 {
        let _ = writeln!(s, r##"<line x1="{:.1}" x2="{:.1}" y1="{mt}" y2="{}" stroke="#eee"/>"##, px(x), px(x), mt + ph);
        let _ = writeln!(s, r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#, px(x), mt + ph + 16.0, fmt_tick(x, xstep));
        x += xstep;
    }
    let _ = writeln!(s, r##"<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##);
    let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle">step</text>"#, ml + pw / 2.0, h - 8.0);
    let _ = writeln!(s, r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">{y_label}</text>"#, mt + ph / 2.0, mt + ph / 2.0);
    // Series.
    let poly = |pts: &[(f64, f64)]| pts.iter().map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect::<Vec<_>>().join(" ");
    for sr in series.iter().filter(|sr| !sr.points.is_empty()) {
        let width = if sr.markers { 2.0 } else { 1.5 };
        let _ = writeln!(s, r#"<polyline fill="none" stroke="{}" stroke-width="{width}" points="{}"/>"#, sr.color, poly(&sr.points));
        if sr.markers {
            for &(x, y) in &sr.points {
                let _ = writeln!(s, r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{}"/>"#, px(x), py(y), sr.color);
            }
        }
    }
    // Legend.
    let longest = series.iter().map(|sr| sr.label.chars().count()).max().unwrap_or(0) as f64;
    let lw = 46.0 + 7.0 * longest;
    let lx = ml + pw - lw - 8.0;
    let _ = writeln!(s, r##"<rect x="{lx}" y="{}" width="{lw}" height="{}" fill="white" stroke="#999"/>"##, mt + 6.0, 8.0 + 18.0 * series.len() as f64);
    for (i, sr) in series.iter().enumerate() {
        let ly = mt + 20.0 + 18.0 * i as f64;
        let _ = writeln!(s, r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{}" stroke-width="2"/>"#, lx + 8.0, lx + 32.0, sr.color);
        let _ = writeln!(s, r#"<text x="{}" y="{}">{}</text>"#, lx + 38.0, ly + 4.0, xml_escape(&sr.label));
    }
    s.push_str("</svg>\n");
    s
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn json_scalar(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// The markdown report: summary lines, eval table, the loss curve, and the configuration.
pub fn render_report(title: &str, summary: &[(String, String)], config: &serde_json::Value, rows: &[MetricsRow]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# {title}\n");
    if !summary.is_empty() {
        let _ = writeln!(s, "## Summary\n\n| | |\n| --- | --- |");
        for (k, v) in summary {
            let _ = writeln!(s, "| {k} | {v} |");
        }
        s.push('\n');
    }
    let evals: Vec<&MetricsRow> = rows.iter().filter(|r| r.eval_loss.is_some()).collect();
    let _ = writeln!(s, "## Evaluation\n");
    if evals.is_empty() {
        let _ = writeln!(s, "No evaluation was run (no `--eval-dataset` / `--eval-split`).\n");
    } else {
        let _ = writeln!(s, "| step | train loss | eval loss | eval perplexity | eval loss tokens |\n| ---: | ---: | ---: | ---: | ---: |");
        for r in &evals {
            let f = |x: Option<f64>| x.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} |",
                r.step,
                f(r.loss),
                f(r.eval_loss),
                f(r.eval_perplexity),
                r.eval_tokens.map(|t| t.to_string()).unwrap_or_else(|| "-".into())
            );
        }
        s.push('\n');
        method_eval_table(&mut s, &evals);
    }
    let _ = writeln!(s, "## Loss curve\n\n![train and eval loss]({SVG_FILE})\n");
    let _ = writeln!(s, "## Configuration\n\n| key | value |\n| --- | --- |");
    if let serde_json::Value::Object(map) = config {
        for (k, v) in map {
            let _ = writeln!(s, "| `{k}` | `{}` |", json_scalar(v).replace('|', "\\|"));
        }
    }
    s
}

/// The evaluation numbers a method adds (`eval_<name>` in `metrics.jsonl`, e.g. DPO's
/// `eval_rewards_accuracy`), one column each.
fn method_eval_table(s: &mut String, evals: &[&MetricsRow]) {
    let mut names: Vec<&str> = evals.iter().flat_map(|r| r.extra.keys()).filter(|k| k.starts_with("eval_")).map(String::as_str).collect();
    names.sort_unstable();
    names.dedup();
    if names.is_empty() {
        return;
    }
    let _ = writeln!(s, "| step | {} |\n| ---: |{}", names.join(" | "), " ---: |".repeat(names.len()));
    for r in evals {
        let cells: Vec<String> = names.iter().map(|k| r.extra.get(*k).and_then(|v| v.as_f64()).map_or("-".into(), |v| format!("{v:.4}"))).collect();
        let _ = writeln!(s, "| {} | {} |", r.step, cells.join(" | "));
    }
    s.push('\n');
}

/// Write `report.md` and `loss_curve.svg` into the run directory (atomically).
pub fn write_report(run_dir: &Path, title: &str, summary: &[(String, String)], config: &serde_json::Value, rows: &[MetricsRow]) -> Result<()> {
    crate::checkpoint::write_atomic(&run_dir.join(SVG_FILE), loss_curve_svg(rows).as_bytes())?;
    crate::checkpoint::write_atomic(&run_dir.join(REPORT_FILE), render_report(title, summary, config, rows).as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_and_report_contain_both_series() {
        let mut rows = vec![MetricsRow { step: 0, eval_loss: Some(3.2), ..Default::default() }];
        for s in 1..=20 {
            rows.push(MetricsRow { step: s, loss: Some(3.0 - 0.1 * s as f64), ..Default::default() });
        }
        rows[10].eval_loss = Some(2.4);
        let svg = loss_curve_svg(&rows);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 2);
        let md = render_report("SFT run", &[("final eval loss".into(), "2.4".into())], &serde_json::json!({"lora_rank": 8}), &rows);
        assert!(md.contains("| 10 | 2.0000 | 2.4000 |"), "{md}");
        assert!(md.contains("`lora_rank`"));
        assert!(loss_curve_svg(&[]).contains("no data"));
    }
}
