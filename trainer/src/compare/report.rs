//! `compare.md`: the summary, then a table of examples.
use super::{judge::shorten, Example, Summary};

/// Markdown for people; `compare.json` holds every example in full.
pub fn markdown(s: &Summary, examples: &[Example], max_examples: usize) -> String {
    let mut md = format!(
        "# compare\n\n| | |\n| --- | --- |\n| fine-tuned | `{}` |\n| baseline | `{}` |\n| judged by | `{}` |\n| prompts | {} |\n| wins / losses / ties | {} / {} / {} |\n| win rate | {:.3} (95% CI {:.3} to {:.3}, Wilson) |\n",
        s.finetuned, s.baseline, s.judged_by, s.n, s.wins, s.losses, s.ties, s.win_rate, s.ci95[0], s.ci95[1]
    );
    if s.unscored > 0 {
        md.push_str(&format!("| unscored (ties) | {} |\n", s.unscored));
    }
    if s.unparsed > 0 || s.order_disagreements > 0 {
        md.push_str(&format!("| judge replies without a verdict | {} |\n| orders disagreeing (ties) | {} |\n", s.unparsed, s.order_disagreements));
    }
    let shown = examples.len().min(max_examples);
    md.push_str(&format!("\n## Examples ({shown} of {})\n\n| line | prompt | fine-tuned | baseline | outcome | detail |\n| --- | --- | --- | --- | --- | --- |\n", examples.len()));
    for e in &examples[..shown] {
        let detail = match (&e.scores, &e.judge) {
            (Some(sc), _) => format!("scores {} vs {}", score(sc.finetuned), score(sc.baseline)),
            (_, Some(j)) => format!("judge {:?} / {:?}", j.finetuned_first.verdict, j.baseline_first.verdict),
            _ => String::new(),
        };
        md.push_str(&format!(
            "| {} | {} | {} | {} | {:?} | {} |\n",
            e.line,
            cell(&e.prompt),
            cell(&e.finetuned),
            cell(&e.baseline),
            e.outcome,
            detail
        ));
    }
    md
}

fn score(x: Option<f64>) -> String {
    x.map_or("-".into(), |v| format!("{v:.3}"))
}

/// One table cell: one line, pipes escaped, at most 120 characters.
fn cell(s: &str) -> String {
    shorten(s, 120).replace('|', "\\|")
}
