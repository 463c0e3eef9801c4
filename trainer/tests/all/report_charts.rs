//! Every method's report from metrics rows with the keys that method writes (negative
//! rewards, log-probs and losses included): each chart its method declares is rendered
//! with its own title, every plotted point lies inside the plot area (the axis range
//! covers every value), and the report opens with the method's own story, not another
//! method's quantities.
use std::path::Path;

use lora_train::metrics::MetricsRow;
use lora_train::recipes::dpo::{Dpo, LossType};
use lora_train::recipes::orpo::Orpo;
use lora_train::recipes::preference::PairObjective;
use lora_train::recipes::{grpo, sft};
use lora_train::report::{self, ReportSpec};

/// Rows of a 20-step run: `train` keys every step (value of key i at step s from `f`),
/// `eval` keys at steps 0, 10 and 20.
fn rows(train: &[&str], eval: &[&str], f: impl Fn(usize, usize) -> f64) -> Vec<MetricsRow> {
    (0..=20)
        .map(|s| {
            let mut r = MetricsRow { step: s, tokens: 100 * s as u64, ..Default::default() };
            let mut put = |k: &str, v: f64| {
                let mut row = serde_json::to_value(&r).unwrap();
                row[k] = serde_json::json!(v);
                r = serde_json::from_value(row).unwrap();
            };
            if s > 0 {
                for (i, k) in train.iter().enumerate() {
                    put(k, f(i, s));
                }
            }
            if s % 10 == 0 {
                for (i, k) in eval.iter().enumerate() {
                    put(k, f(i + train.len(), s));
                }
            }
            r
        })
        .collect()
}

/// The plot area `<rect ... fill="none" stroke="#333"/>` of a chart.
fn plot_area(svg: &str) -> (f64, f64, f64, f64) {
    let rect = svg.lines().find(|l| l.starts_with("<rect") && l.contains(r##"fill="none" stroke="#333""##)).expect("no plot area");
    let attr = |name: &str| -> f64 {
        let start = rect.find(&format!(" {name}=\"")).unwrap() + name.len() + 3;
        rect[start..].split('"').next().unwrap().parse().unwrap()
    };
    (attr("x"), attr("y"), attr("x") + attr("width"), attr("y") + attr("height"))
}

/// Every plotted point (polyline vertices and dots) of a chart.
fn plotted_points(svg: &str) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    for line in svg.lines() {
        if let Some(start) = line.find(" points=\"") {
            for pair in line[start + 9..].split('"').next().unwrap().split_whitespace() {
                let (x, y) = pair.split_once(',').unwrap();
                out.push((x.parse().unwrap(), y.parse().unwrap()));
            }
        }
        if line.starts_with("<circle") {
            let attr = |name: &str| -> f64 {
                let start = line.find(&format!(" {name}=\"")).unwrap() + name.len() + 3;
                line[start..].split('"').next().unwrap().parse().unwrap()
            };
            out.push((attr("cx"), attr("cy")));
        }
    }
    out
}

/// Writes the report; checks every chart with data; returns the report and the charts drawn.
fn render(dir: &Path, spec: &ReportSpec, rows: &[MetricsRow]) -> (String, Vec<String>) {
    report::write_report(dir, "RUN", spec, &[], &serde_json::json!({}), rows).unwrap();
    let md = std::fs::read_to_string(dir.join(report::REPORT_FILE)).unwrap();
    let mut drawn = Vec::new();
    for chart in &spec.charts {
        let path = dir.join(chart.file);
        let series = report::chart_series(chart, rows);
        if series.is_empty() {
            assert!(!md.contains(chart.file), "{} has no data but is linked", chart.file);
            continue;
        }
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains(&format!(">{}</text>", chart.title.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;"))), "{}: title", chart.file);
        assert!(md.contains(&format!("({})", chart.file)), "report does not show {}", chart.file);
        let (x0, y0, x1, y1) = plot_area(&svg);
        let points = plotted_points(&svg);
        let n: usize = series.iter().map(|s| s.points.len() * if s.markers { 2 } else { 1 }).sum();
        assert_eq!(points.len(), n, "{}: every value plotted", chart.file);
        for (x, y) in points {
            assert!((x0 - 0.1..=x1 + 0.1).contains(&x) && (y0 - 0.1..=y1 + 0.1).contains(&y), "{}: point ({x}, {y}) outside the plot area ({x0}, {y0})-({x1}, {y1})", chart.file);
        }
        drawn.push(chart.file.to_string());
    }
    (md, drawn)
}

/// Values spread over both signs and several magnitudes, key by key.
fn wavy(i: usize, s: usize) -> f64 {
    let scale = [1.0, 0.3, 60.0, 5.0, 0.05][i % 5];
    let sign = if i % 2 == 0 { -1.0 } else { 1.0 };
    sign * scale * (1.0 + (s as f64 * 0.7 + i as f64).sin() * 0.5)
}

#[test]
fn sft_report_is_loss_per_token_and_perplexity() {
    let tmp = tempfile::tempdir().unwrap();
    let rows = rows(&["loss"], &["eval_loss", "eval_perplexity"], |i, s| if i == 2 { 30.0 - s as f64 } else { 3.0 - 0.1 * s as f64 });
    let (md, drawn) = render(tmp.path(), &sft::report_spec(), &rows);
    assert_eq!(drawn, ["loss_curve.svg", "perplexity.svg"]);
    assert!(md.contains("> eval loss per token 3.0000 -> 1.0000 (better; lower is better)"), "{md}");
    assert!(md.contains("| step | train loss per token | eval loss per token | eval perplexity |"), "{md}");
    let svg = std::fs::read_to_string(tmp.path().join("loss_curve.svg")).unwrap();
    assert!(svg.contains(">Loss per loss token</text>"));
}

#[test]
fn dpo_and_orpo_reports_chart_rewards_margins_accuracy_and_log_probs() {
    let trl = ["rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy", "logps_chosen", "logps_rejected"];
    let mut train: Vec<&str> = vec!["loss", "loss_term_sigmoid", "loss_term_sft"];
    train.extend(trl);
    let eval_keys: Vec<String> = trl.iter().map(|k| format!("eval_{k}")).chain(["eval_loss".to_string()]).collect();
    let eval: Vec<&str> = eval_keys.iter().map(String::as_str).collect();
    let rows = rows(&train, &eval, wavy);
    let dpo = Dpo::combined(0.1, vec![LossType::Sigmoid, LossType::Sft], None, 0.0).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (md, drawn) = render(tmp.path(), &dpo.report_spec(), &rows);
    assert_eq!(drawn, ["loss_curve.svg", "rewards.svg", "accuracy.svg", "logps.svg"]);
    assert!(md.starts_with("# RUN\n\n> held-out DPO loss per pair "), "{md}");
    assert!(md.contains("eval_rewards/margins") && md.contains("eval_logps/chosen") && !md.contains("perplexity"), "{md}");
    let loss_svg = std::fs::read_to_string(tmp.path().join("loss_curve.svg")).unwrap();
    assert!(loss_svg.contains(">DPO loss per pair</text>") && loss_svg.contains(">loss_term_sft</text>"));

    let mut orpo_train = train.clone();
    orpo_train.extend(["nll_loss", "log_odds_ratio", "log_odds_chosen"]);
    let rows = self::rows(&orpo_train, &eval, wavy);
    let tmp = tempfile::tempdir().unwrap();
    let (md, drawn) = render(tmp.path(), &Orpo::new(0.1).unwrap().report_spec(), &rows);
    assert_eq!(drawn, ["loss_curve.svg", "rewards.svg", "accuracy.svg", "logps.svg", "odds_ratio.svg"]);
    assert!(md.contains("> held-out ORPO loss per pair "), "{md}");
}

#[test]
fn grpo_report_tells_the_reward_story_and_charts_every_rollout_family() {
    let train = [
        "loss",
        "reward",
        "reward_std",
        "rewards_numeric",
        "frac_reward_zero_std",
        "clipped_ratio",
        "completion_length_mean",
        "completion_length_max",
        "clip_ratio_low",
        "clip_ratio/region_mean",
        "entropy",
        "kl",
    ];
    let eval = ["eval_reward", "eval_reward_std", "eval_loss"];
    // Rewards in [0, 1] rising, the surrogate loss and eval_loss (minus the reward) negative.
    let f = |i: usize, s: usize| match i {
        0 => -0.02 * (s as f64).sin(),
        14 => -(0.344 + 0.0172 * s as f64),
        6 | 7 => 12.0 + s as f64,
        // Clip ratios that differ (a series equal to one already drawn is not drawn again).
        8 | 9 => 0.01 * i as f64 + 0.001 * s as f64,
        _ => 0.344 + 0.0172 * s as f64,
    };
    let rows = rows(&train, &eval, f);
    let tmp = tempfile::tempdir().unwrap();
    let (md, drawn) = render(tmp.path(), &grpo::report_spec(), &rows);
    assert_eq!(drawn, ["reward.svg", "rollout_fractions.svg", "completion_length.svg", "clip_ratio.svg", "kl.svg", "entropy.svg", "loss_curve.svg"]);
    assert!(md.contains("> held-out reward (greedy) 0.3440 -> 0.6880 (better; higher is better)"), "{md}");
    for wrong in ["perplexity", "eval loss", "| eval_loss"] {
        assert!(!md.contains(wrong), "GRPO report shows {wrong}: {md}");
    }
    let clip = std::fs::read_to_string(tmp.path().join("clip_ratio.svg")).unwrap();
    assert!(clip.contains(">clip_ratio_low</text>") && clip.contains(">clip_ratio/region_mean</text>"), "extra clip-ratio keys are charted");
    // Without KL (beta 0) there is no KL chart.
    let no_kl = self::rows(&train[..11], &eval, f);
    let tmp = tempfile::tempdir().unwrap();
    let (_, drawn) = render(tmp.path(), &grpo::report_spec(), &no_kl);
    assert!(!drawn.contains(&"kl.svg".to_string()));
}

#[test]
fn a_dpo_report_warns_when_the_chosen_log_prob_falls_as_the_margin_grows() {
    let spec = Dpo::new(0.1, LossType::Sigmoid, 0.0).unwrap().report_spec();
    // Held-out chosen log-prob -50 -> -48 -> -60 while the margin grows 0 -> 2 -> 9.
    let at = |i: usize, s: usize| match (i, s) {
        (0, _) => 0.5,
        (1, 0) => -50.0,
        (1, 10) => -48.0,
        (1, _) => -60.0,
        (_, s) => s as f64 * 0.45,
    };
    let over = rows(&["loss"], &["eval_logps_chosen", "eval_rewards_margin"], at);
    let tmp = tempfile::tempdir().unwrap();
    let (md, _) = render(tmp.path(), &spec, &over);
    let warning = md.split("## Warnings\n\n- ").nth(1).unwrap_or_else(|| panic!("no warning: {md}"));
    assert!(warning.starts_with("DPO is over-optimizing") && warning.contains("-48.00 (step 10)") && warning.contains("--beta"), "{warning}");
    // The chosen log-prob rising with the margin: no warning.
    let fine = rows(&["loss"], &["eval_logps_chosen", "eval_rewards_margin"], |i, s| if i == 1 { -50.0 + s as f64 * 0.1 } else { at(i, s) });
    let (md, _) = render(tmp.path(), &spec, &fine);
    assert!(!md.contains("## Warnings"), "{md}");
}
