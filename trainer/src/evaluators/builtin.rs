//! The built-in evaluators: pure functions of the completion and the ground truth, so they
//! run in-process and cannot fail the way external ones do (only a missing ground truth).
use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};

use anyhow::{anyhow, bail, Context as _, Result};
use regex::Regex;
use serde_json::Value;

use super::schema::Schema;
use super::spec::Spec;
use super::{ground_truths, Context, FailureKind, Outcome, Sample, Score};

pub(crate) enum Builtin {
    Exact { ignore_case: bool },
    Numeric { tolerance: f64 },
    Regex(Regex),
    Json,
    JsonSchema(Schema),
    Label(BTreeSet<String>),
    Contains { ignore_case: bool },
    Length { min: usize, max: usize, count: Arc<dyn Fn(&str) -> usize + Send + Sync> },
}

impl Builtin {
    pub fn new(spec: Spec, ctx: &Context) -> Result<Self> {
        Ok(match spec {
            Spec::Exact { ignore_case } => Builtin::Exact { ignore_case },
            Spec::Numeric { tolerance } => Builtin::Numeric { tolerance },
            Spec::Regex(pattern) => Builtin::Regex(Regex::new(&pattern).map_err(|e| anyhow!("bad pattern: {e}"))?),
            Spec::Json => Builtin::Json,
            Spec::JsonSchema(file) => Builtin::JsonSchema(Schema::load(&file)?),
            Spec::Label => {
                let labels: BTreeSet<String> = ctx.labels.iter().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect();
                if labels.is_empty() {
                    bail!("`label` takes its labels from the dataset's ground truths, and there are none");
                }
                Builtin::Label(labels)
            }
            Spec::Contains { ignore_case } => Builtin::Contains { ignore_case },
            Spec::Length { min, max } => {
                let count = ctx.count_tokens.clone().context("`length` counts tokens, and this command has no tokenizer to count with")?;
                Builtin::Length { min, max, count }
            }
            Spec::Cmd(_) | Spec::Py { .. } => bail!("external evaluators are not built-ins"),
        })
    }

    pub fn score(&self, sample: &Sample) -> Outcome {
        let answer = sample.completion.as_str();
        let truths = || ground_truths(sample).ok_or_else(|| Outcome::failed(FailureKind::NoGroundTruth, "the sample has no ground_truth"));
        let scored = match self {
            Builtin::Exact { ignore_case } => truths().map(|t| {
                let fold = |s: &str| if *ignore_case { s.trim().to_lowercase() } else { s.trim().to_string() };
                let a = fold(answer);
                Score::pass(t.iter().any(|t| fold(t) == a), || "the answer differs from the ground truth".into())
            }),
            Builtin::Numeric { tolerance } => numeric(answer, sample, *tolerance),
            Builtin::Regex(re) => Ok(Score::pass(re.is_match(answer), || "the pattern does not match".into())),
            Builtin::Json => Ok(match extract_json(answer) {
                Some(Value::Object(_)) => Score::of(1.0),
                Some(_) => Score::pass(false, || "the JSON is not an object".into()),
                None => Score::pass(false, || "the answer is not JSON".into()),
            }),
            Builtin::JsonSchema(schema) => Ok(match extract_json(answer) {
                Some(v) => match schema.validate(&v) {
                    Ok(()) => Score::of(1.0),
                    Err(why) => Score::pass(false, || why),
                },
                None => Score::pass(false, || "the answer is not JSON".into()),
            }),
            Builtin::Label(labels) => truths().map(|t| {
                let a = answer.trim();
                if !labels.contains(a) {
                    Score::pass(false, || format!("`{a}` is not one of the {} labels", labels.len()))
                } else {
                    Score::pass(t.iter().any(|t| t.trim() == a), || "wrong label".into())
                }
            }),
            Builtin::Contains { ignore_case } => truths().map(|t| {
                let fold = |s: &str| if *ignore_case { s.to_lowercase() } else { s.to_string() };
                let a = fold(answer);
                // An empty ground truth would be in every answer: it never counts.
                Score::pass(t.iter().map(|t| fold(t.trim())).any(|t| !t.is_empty() && a.contains(&t)), || "the ground truth is not in the answer".into())
            }),
            Builtin::Length { min, max, count } => {
                let n = count(answer);
                Ok(Score::pass((*min..=*max).contains(&n), || format!("{n} tokens, outside {min}-{max}")).with_metric("tokens", n as f64))
            }
        };
        scored.map(Outcome::Scored).unwrap_or_else(|failed| failed)
    }
}

fn numeric(answer: &str, sample: &Sample, tolerance: f64) -> Result<Score, Outcome> {
    let truths = ground_truths(sample).ok_or_else(|| Outcome::failed(FailureKind::NoGroundTruth, "the sample has no ground_truth"))?;
    let expected: Vec<f64> = truths.iter().filter_map(|t| last_number(t)).collect();
    if expected.is_empty() {
        return Err(Outcome::failed(FailureKind::NoGroundTruth, format!("no number in the ground truth {truths:?}")));
    }
    let Some(got) = last_number(answer) else {
        return Ok(Score::pass(false, || "no number in the answer".into()));
    };
    // Relative tolerance, absolute below 1 so that a ground truth of 0 can be matched.
    let ok = expected.iter().any(|e| (got - e).abs() <= tolerance * e.abs().max(1.0));
    Ok(Score::pass(ok, || format!("{got} is not {}", expected[0])))
}

/// The last number in the text: an optional sign (`-` or U+2212, not after a letter or
/// digit, so "3-5" ends in 5), digits with optional thousands separators ("1,234"), an
/// optional fraction and exponent. A trailing "%" is ignored (50% reads as 50), on the
/// answer and the ground truth alike.
pub(crate) fn last_number(text: &str) -> Option<f64> {
    static NUMBER: OnceLock<Regex> = OnceLock::new();
    let re = NUMBER.get_or_init(|| Regex::new(r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|\.\d+").expect("a valid literal pattern"));
    let m = re.find_iter(text).last()?;
    let value: f64 = m.as_str().replace(',', "").parse().ok()?;
    let mut before = text[..m.start()].chars().rev();
    let negative = matches!(before.next(), Some('-' | '\u{2212}')) && !before.next().is_some_and(|c| c.is_alphanumeric());
    Some(if negative { -value } else { value })
}

/// The answer as JSON: the whole trimmed text, else the first ``` fenced block (with or
/// without a language tag) that parses.
pub(crate) fn extract_json(text: &str) -> Option<Value> {
    if let Ok(v) = serde_json::from_str(text.trim()) {
        return Some(v);
    }
    let mut rest = text;
    while let Some(open) = rest.find("```") {
        let after = &rest[open + 3..];
        // The language tag, if any, runs to the end of the opening line.
        let body_start = after.find('\n').map_or(after.len(), |i| i + 1);
        let body = &after[body_start..];
        let close = body.find("```")?;
        if let Ok(v) = serde_json::from_str(body[..close].trim()) {
            return Some(v);
        }
        rest = &body[close + 3..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample(completion: &str, truth: Option<Value>) -> Sample {
        Sample { id: "s".into(), completion: completion.into(), ground_truth: truth, ..Default::default() }
    }

    fn ctx() -> Context {
        Context {
            labels: vec!["positive".into(), "negative".into(), "neutral".into()],
            count_tokens: Some(Arc::new(|s: &str| s.split_whitespace().count())),
            ..Default::default()
        }
    }

    /// The score, or the failure kind's name for samples with none.
    fn run(spec: &str, completion: &str, truth: Option<Value>) -> Result<f64, &'static str> {
        let b = Builtin::new(super::super::parse_spec(spec).unwrap(), &ctx()).unwrap();
        match b.score(&sample(completion, truth)) {
            Outcome::Scored(s) => Ok(s.score.unwrap()),
            Outcome::Failed { kind, .. } => Err(kind.name()),
        }
    }

    #[test]
    fn last_number_reads_signs_separators_and_percent() {
        assert_eq!(last_number("The answer is -3.5"), Some(-3.5));
        assert_eq!(last_number("1,000 apples"), Some(1000.0));
        assert_eq!(last_number("$1,234,567.25 total"), Some(1234567.25));
        assert_eq!(last_number("about 50%."), Some(50.0));
        assert_eq!(last_number("pages 3-5"), Some(5.0));
        assert_eq!(last_number("x = \u{2212}7"), Some(-7.0));
        assert_eq!(last_number("first 12 then 7, finally 42."), Some(42.0));
        assert_eq!(last_number("1e-3"), Some(0.001));
        assert_eq!(last_number(".5"), Some(0.5));
        assert_eq!(last_number("1,2,3"), Some(3.0));
        assert_eq!(last_number("no digits here"), None);
    }

    #[test]
    fn numeric_compares_the_last_number() {
        assert_eq!(run("numeric", "so 17 * 3 = 51", Some(json!("51"))), Ok(1.0));
        assert_eq!(run("numeric", "-3.5", Some(json!("-3.5"))), Ok(1.0));
        assert_eq!(run("numeric", "3.5", Some(json!("-3.5"))), Ok(0.0));
        assert_eq!(run("numeric", "It costs 1,000 dollars", Some(json!("1000"))), Ok(1.0));
        assert_eq!(run("numeric", "#### 1000", Some(json!(1000))), Ok(1.0));
        assert_eq!(run("numeric", "I don't know", Some(json!("4"))), Ok(0.0));
        assert_eq!(run("numeric", "0.333", Some(json!("1/3 = 0.3333"))), Ok(0.0));
        assert_eq!(run("numeric:0.001", "0.333", Some(json!("0.3333"))), Ok(1.0));
        assert_eq!(run("numeric", "0", Some(json!("0"))), Ok(1.0));
        assert_eq!(run("numeric", "either 5", Some(json!(["4", "5"]))), Ok(1.0));
        assert_eq!(run("numeric", "5", None), Err("no_ground_truth"));
        assert_eq!(run("numeric", "5", Some(json!("five"))), Err("no_ground_truth"));
    }

    #[test]
    fn exact_and_contains() {
        assert_eq!(run("exact", "  Paris\n", Some(json!("Paris"))), Ok(1.0));
        assert_eq!(run("exact", "paris", Some(json!("Paris"))), Ok(0.0));
        assert_eq!(run("exact:ci", "paris", Some(json!("Paris"))), Ok(1.0));
        assert_eq!(run("exact", "Lyon", Some(json!(["Paris", "Lyon"]))), Ok(1.0));
        assert_eq!(run("exact", "Paris", None), Err("no_ground_truth"));
        assert_eq!(run("contains", "It is Paris.", Some(json!("Paris"))), Ok(1.0));
        assert_eq!(run("contains", "It is paris.", Some(json!("Paris"))), Ok(0.0));
        assert_eq!(run("contains:ci", "It is paris.", Some(json!("Paris"))), Ok(1.0));
        assert_eq!(run("contains", "anything", Some(json!("  "))), Ok(0.0));
    }

    #[test]
    fn regex_searches_the_answer() {
        assert_eq!(run("regex:<answer>\\d+</answer>", "so <answer>42</answer>", None), Ok(1.0));
        assert_eq!(run("regex:^\\d+$", "so 42", None), Ok(0.0));
        let err = Builtin::new(super::super::parse_spec("regex:(unclosed").unwrap(), &ctx()).err().unwrap();
        assert!(err.to_string().contains("bad pattern"), "{err}");
    }

    #[test]
    fn json_accepts_objects_and_fenced_blocks() {
        assert_eq!(run("json", r#" {"a": 1} "#, None), Ok(1.0));
        assert_eq!(run("json", "Here it is:\n```json\n{\"a\": [1, 2]}\n```\nDone.", None), Ok(1.0));
        assert_eq!(run("json", "```\n{\"a\": 1}\n```", None), Ok(1.0));
        assert_eq!(run("json", "```json\n{broken\n```", None), Ok(0.0));
        assert_eq!(run("json", "[1, 2]", None), Ok(0.0));
        assert_eq!(run("json", "{\"a\": 1", None), Ok(0.0));
        assert_eq!(run("json", "```json\n{\"a\": 1}", None), Ok(0.0));
    }

    #[test]
    fn label_needs_a_known_label_equal_to_the_truth() {
        assert_eq!(run("label", " positive\n", Some(json!("positive"))), Ok(1.0));
        assert_eq!(run("label", "negative", Some(json!("positive"))), Ok(0.0));
        assert_eq!(run("label", "great", Some(json!("great"))), Ok(0.0), "not in the label set");
        assert_eq!(run("label", "positive", None), Err("no_ground_truth"));
        let err = Builtin::new(Spec::Label, &Context::default()).err().unwrap();
        assert!(err.to_string().contains("ground truths"), "{err}");
    }

    #[test]
    fn length_counts_tokens_with_the_callers_tokenizer() {
        assert_eq!(run("length:2-3", "one two", None), Ok(1.0));
        assert_eq!(run("length:2-3", "one", None), Ok(0.0));
        assert_eq!(run("length:2-3", "a b c d", None), Ok(0.0));
        let b = Builtin::new(Spec::Length { min: 1, max: 5 }, &ctx()).unwrap();
        match b.score(&sample("a b c", None)) {
            Outcome::Scored(s) => assert_eq!(s.metrics["tokens"], 3.0),
            Outcome::Failed { .. } => panic!("length never fails"),
        }
        assert!(Builtin::new(Spec::Length { min: 1, max: 5 }, &Context::default()).is_err());
    }
}
