//! `RUN/report.md` and its charts, rendered from what the method declares in its
//! [`ReportSpec`] (`Method::report_spec`): the headline number and which way is better,
//! the summary lines, the progress-line and evaluation quantities, one chart per family of
//! quantities (`metrics.jsonl` keys), and the warnings it reads from the metric rows. The
//! charts are SVG drawn by hand: no plotting dependency.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;

use crate::metrics::MetricsRow;

pub const REPORT_FILE: &str = "report.md";
/// The chart of the loss (every method's first chart keeps this name).
pub const SVG_FILE: &str = "loss_curve.svg";

/// One quantity of a run: its `metrics.jsonl` key (`eval_` prefixed for evaluations) and
/// the words the report, the progress line and the summary use for it. A key with one `*`
/// stands for every key of the rows that matches it (`clip_ratio*`, `completions/*_length`:
/// families that grow, such as one reward per evaluator); each is labelled with its own key.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Quantity {
    pub key: &'static str,
    pub label: &'static str,
}

pub const fn q(key: &'static str, label: &'static str) -> Quantity {
    Quantity { key, label }
}

/// A chart of one family of quantities against step, written as `file` next to the report.
/// A chart none of whose keys occur in the rows is left out.
#[derive(Clone, Debug, PartialEq)]
pub struct ChartSpec {
    pub file: &'static str,
    pub title: &'static str,
    pub y_label: &'static str,
    /// Train keys are drawn as lines, `eval_` keys as lines with dots.
    pub series: Vec<Quantity>,
}

/// What a method's report, progress line and summary show (see the module comment).
#[derive(Clone, Debug)]
pub struct ReportSpec {
    /// The number a user of the method watches (an `eval_` key), compared before -> after.
    pub headline: Quantity,
    pub higher_is_better: bool,
    /// What the training `loss` of the method is, for the progress line and the tables
    /// (`loss per token`, `loss per pair`, ...).
    pub loss_label: &'static str,
    /// Train keys shown on the progress line after the loss.
    pub progress: Vec<Quantity>,
    /// Keys of an evaluation: its line on the progress output, the columns of the report's
    /// evaluation table, and (with their first and last values) the summary.
    pub eval: Vec<Quantity>,
    pub charts: Vec<ChartSpec>,
    /// Warnings the method reads from the rows written so far (e.g. DPO over-optimizing):
    /// printed when they first appear and listed in the report.
    pub diagnose: fn(&[MetricsRow]) -> Vec<String>,
}

fn no_warnings(_: &[MetricsRow]) -> Vec<String> {
    Vec::new()
}

impl ReportSpec {
    /// The report of a method that declares nothing of its own: its loss, train and eval.
    pub fn loss_only() -> Self {
        ReportSpec {
            headline: q("eval_loss", "eval loss"),
            higher_is_better: false,
            loss_label: "loss",
            progress: Vec::new(),
            eval: vec![q("eval_loss", "eval loss")],
            charts: vec![ChartSpec { file: SVG_FILE, title: "Loss", y_label: "loss", series: vec![q("loss", "train loss"), q("eval_loss", "eval loss")] }],
            diagnose: no_warnings,
        }
    }

    /// The headline's before -> after over `rows` (first and last evaluation).
    pub fn story(&self, rows: &[MetricsRow]) -> Option<Story> {
        let values = row_values(rows);
        let (before, after) = first_last(&values, self.headline.key)?;
        Some(Story { label: self.headline.label.to_string(), before, after, higher_is_better: self.higher_is_better })
    }

    /// `eval reward 0.3440, eval reward std 0.2100` for an evaluation row.
    pub fn eval_line(&self, row: &MetricsRow) -> String {
        let values = values_of(row);
        let parts: Vec<String> = self.eval.iter().filter_map(|qt| values.get(qt.key).map(|v| format!("{} {}", qt.label, fmt_value(*v)))).collect();
        parts.join(", ")
    }

    /// The progress line's method quantities of a train row.
    pub fn progress_line(&self, values: &BTreeMap<String, f64>) -> String {
        let parts: Vec<String> = self.progress.iter().filter_map(|qt| values.get(qt.key).map(|v| format!("{} {}", qt.label, fmt_value(*v)))).collect();
        parts.join(" ")
    }
}

/// The one-line story of a run: the headline before and after training.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Story {
    pub label: String,
    pub before: f64,
    pub after: f64,
    pub higher_is_better: bool,
}

impl std::fmt::Display for Story {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let better = if self.higher_is_better { self.after > self.before } else { self.after < self.before };
        let verdict = match (self.after == self.before, better) {
            (true, _) => "unchanged",
            (false, true) => "better",
            (false, false) => "worse",
        };
        let dir = if self.higher_is_better { "higher" } else { "lower" };
        write!(f, "{} {} -> {} ({verdict}; {dir} is better)", self.label, fmt_value(self.before), fmt_value(self.after))
    }
}

/// Four significant decimals for small numbers, fewer for large ones.
pub fn fmt_value(v: f64) -> String {
    if v.abs() >= 1000.0 {
        format!("{v:.1}")
    } else if v.abs() >= 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

/// Every number of a row by its `metrics.jsonl` key.
fn values_of(row: &MetricsRow) -> BTreeMap<String, f64> {
    match serde_json::to_value(row) {
        Ok(serde_json::Value::Object(map)) => map.into_iter().filter_map(|(k, v)| v.as_f64().filter(|x| x.is_finite()).map(|x| (k, x))).collect(),
        _ => BTreeMap::new(),
    }
}

/// (step, values) of each row.
fn row_values(rows: &[MetricsRow]) -> Vec<(usize, BTreeMap<String, f64>)> {
    rows.iter().map(|r| (r.step, values_of(r))).collect()
}

fn first_last(values: &[(usize, BTreeMap<String, f64>)], key: &str) -> Option<(f64, f64)> {
    let mut it = values.iter().filter_map(|(_, v)| v.get(key).copied());
    let first = it.next()?;
    Some((first, it.last().unwrap_or(first)))
}

/// The keys `qt` stands for in these rows, with their labels (a `*` key expands to every
/// matching key present, in key order).
fn expand(qt: &Quantity, values: &[(usize, BTreeMap<String, f64>)]) -> Vec<(String, String)> {
    match qt.key.split_once('*') {
        None => vec![(qt.key.to_string(), qt.label.to_string())],
        Some((prefix, suffix)) => {
            let matches = |k: &&String| k.len() >= prefix.len() + suffix.len() && k.starts_with(prefix) && k.ends_with(suffix);
            let mut keys: Vec<&String> = values.iter().flat_map(|(_, v)| v.keys()).filter(matches).collect();
            keys.sort_unstable();
            keys.dedup();
            keys.into_iter().map(|k| (k.clone(), k.clone())).collect()
        }
    }
}

/// The series of `chart` over the rows; empty when none of its keys occur.
pub fn chart_series(chart: &ChartSpec, rows: &[MetricsRow]) -> Vec<Series> {
    let values = row_values(rows);
    let mut out = Vec::new();
    for qt in &chart.series {
        for (key, label) in expand(qt, &values) {
            let points: Vec<(f64, f64)> = values.iter().filter_map(|(step, v)| v.get(&key).map(|y| (*step as f64, *y))).collect();
            // A series equal to one already drawn (one evaluator's reward is the mean
            // reward) would hide under it and only lengthen the legend.
            if points.is_empty() || out.iter().any(|s: &Series| s.label == label || s.points == points) {
                continue;
            }
            let color = PALETTE[out.len() % PALETTE.len()].to_string();
            out.push(Series { label, color, points, markers: key.starts_with("eval_") });
        }
    }
    out
}

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
    // The axis covers every value, negative ones included (a reward or log-prob curve).
    y0 = (y0 / ystep).floor() * ystep;
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

/// The markdown report: the headline's story, the method's warnings, the summary (the
/// run's lines, then the method's quantities first -> last), the evaluation table, the
/// charts and the configuration.
pub fn render_report(title: &str, spec: &ReportSpec, run_lines: &[(String, String)], config: &serde_json::Value, rows: &[MetricsRow]) -> String {
    let values = row_values(rows);
    let mut s = String::new();
    let _ = writeln!(s, "# {title}\n");
    if let Some(story) = spec.story(rows) {
        let _ = writeln!(s, "> {story}\n");
    }
    let warnings = (spec.diagnose)(rows);
    if !warnings.is_empty() {
        let _ = writeln!(s, "## Warnings\n");
        for w in &warnings {
            let _ = writeln!(s, "- {w}");
        }
        s.push('\n');
    }
    let mut summary: Vec<(String, String)> = run_lines.to_vec();
    if let Some(last) = values.iter().rev().find_map(|(_, v)| v.get("loss")) {
        summary.push((format!("final train {}", spec.loss_label), fmt_value(*last)));
    }
    for qt in &spec.eval {
        for (key, label) in expand(qt, &values) {
            if let Some((first, last)) = first_last(&values, &key) {
                summary.push((format!("{label}: first -> last evaluation"), format!("{} -> {}", fmt_value(first), fmt_value(last))));
            }
        }
    }
    if !summary.is_empty() {
        let _ = writeln!(s, "## Summary\n\n| | |\n| --- | --- |");
        for (k, v) in &summary {
            let _ = writeln!(s, "| {k} | {v} |");
        }
        s.push('\n');
    }
    let _ = writeln!(s, "## Evaluation\n");
    let evals: Vec<&(usize, BTreeMap<String, f64>)> = values.iter().filter(|(_, v)| v.keys().any(|k| k.starts_with("eval_"))).collect();
    if evals.is_empty() {
        let _ = writeln!(s, "No evaluation was run (no `--eval-dataset` / `--eval-split`).\n");
    } else {
        eval_table(&mut s, spec, &values, &evals);
    }
    let _ = writeln!(s, "## Charts\n");
    for chart in spec.charts.iter().filter(|c| !chart_series(c, rows).is_empty()) {
        let _ = writeln!(s, "![{}]({})\n", chart.title, chart.file);
    }
    let _ = writeln!(s, "## Configuration\n\n| key | value |\n| --- | --- |");
    if let serde_json::Value::Object(map) = config {
        for (k, v) in map {
            let _ = writeln!(s, "| `{k}` | `{}` |", json_scalar(v).replace('|', "\\|"));
        }
    }
    s
}

/// One row per evaluation: the train loss of that step, the method's evaluation
/// quantities, then any other `eval_` number the rows hold (labelled by its key).
fn eval_table(s: &mut String, spec: &ReportSpec, values: &[(usize, BTreeMap<String, f64>)], evals: &[&(usize, BTreeMap<String, f64>)]) {
    let mut cols: Vec<(String, String)> = vec![("loss".into(), format!("train {}", spec.loss_label))];
    for qt in &spec.eval {
        cols.extend(expand(qt, values));
    }
    // What the engine writes for every method is shown only where the method declares it
    // (GRPO's eval_loss is minus its reward, a perplexity exists for SFT only).
    const ENGINE_EVAL_KEYS: [&str; 3] = ["eval_loss", "eval_perplexity", "eval_tokens"];
    let mut others: Vec<&String> = evals.iter().flat_map(|(_, v)| v.keys()).filter(|k| k.starts_with("eval_") && !ENGINE_EVAL_KEYS.contains(&k.as_str())).collect();
    others.sort_unstable();
    others.dedup();
    for k in others {
        if !cols.iter().any(|(key, _)| key == k) {
            cols.push((k.clone(), k.clone()));
        }
    }
    let labels: Vec<&str> = cols.iter().map(|(_, l)| l.as_str()).collect();
    let _ = writeln!(s, "| step | {} |\n| ---: |{}", labels.join(" | "), " ---: |".repeat(cols.len()));
    for (step, v) in evals {
        let cells: Vec<String> = cols.iter().map(|(k, _)| v.get(k).map_or("-".into(), |x| fmt_value(*x))).collect();
        let _ = writeln!(s, "| {step} | {} |", cells.join(" | "));
    }
    s.push('\n');
}

/// Write `report.md` and the charts with data into the run directory (atomically).
pub fn write_report(run_dir: &Path, title: &str, spec: &ReportSpec, run_lines: &[(String, String)], config: &serde_json::Value, rows: &[MetricsRow]) -> Result<()> {
    for chart in &spec.charts {
        let series = chart_series(chart, rows);
        if !series.is_empty() {
            crate::checkpoint::write_atomic(&run_dir.join(chart.file), line_chart_svg(chart.title, chart.y_label, &series).as_bytes())?;
        }
    }
    crate::checkpoint::write_atomic(&run_dir.join(REPORT_FILE), render_report(title, spec, run_lines, config, rows).as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows() -> Vec<MetricsRow> {
        let mut rows = vec![MetricsRow { step: 0, eval_loss: Some(3.2), ..Default::default() }];
        for s in 1..=20 {
            rows.push(MetricsRow { step: s, loss: Some(3.0 - 0.1 * s as f64), ..Default::default() });
        }
        rows[10].eval_loss = Some(2.4);
        rows
    }

    #[test]
    fn svg_and_report_contain_both_series() {
        let rows = rows();
        let spec = ReportSpec::loss_only();
        let svg = line_chart_svg("Loss", "loss", &chart_series(&spec.charts[0], &rows));
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 2);
        let md = render_report("SFT run", &spec, &[("model".into(), "m".into())], &serde_json::json!({"lora_rank": 8}), &rows);
        assert!(md.contains("| 10 | 2.0000 | 2.4000 |"), "{md}");
        assert!(md.contains("> eval loss 3.2000 -> 2.4000 (better; lower is better)"), "{md}");
        assert!(md.contains("`lora_rank`") && md.contains("](loss_curve.svg)"));
        assert!(line_chart_svg("Loss", "loss", &[]).contains("no data"));
    }

    #[test]
    fn a_star_key_charts_every_key_of_its_family_and_absent_keys_leave_no_chart() {
        let mut rows = rows();
        rows[3].extra.insert("clip_ratio/low_mean".into(), serde_json::json!(0.1));
        rows[4].extra.insert("clip_ratio_region".into(), serde_json::json!(0.2));
        let chart = ChartSpec { file: "c.svg", title: "Clip", y_label: "fraction", series: vec![q("clip_ratio*", "")] };
        let labels: Vec<String> = chart_series(&chart, &rows).into_iter().map(|s| s.label).collect();
        assert_eq!(labels, ["clip_ratio/low_mean", "clip_ratio_region"]);
        let absent = ChartSpec { series: vec![q("kl", "KL")], ..chart };
        assert!(chart_series(&absent, &rows).is_empty());
    }

    #[test]
    fn a_series_equal_to_one_already_drawn_is_not_drawn_again() {
        let mut rows = rows();
        for r in rows.iter_mut().skip(1) {
            let reward = r.step as f64 / 20.0;
            r.extra.insert("reward".into(), serde_json::json!(reward));
            r.extra.insert("rewards_numeric".into(), serde_json::json!(reward)); // the only evaluator
            r.extra.insert("rewards_format".into(), serde_json::json!(1.0 - reward));
        }
        let chart = ChartSpec { file: "r.svg", title: "Reward", y_label: "reward", series: vec![q("reward", "reward (mean)"), q("rewards_*", "")] };
        let labels: Vec<String> = chart_series(&chart, &rows).into_iter().map(|s| s.label).collect();
        assert_eq!(labels, ["reward (mean)", "rewards_format"]);
    }
}
