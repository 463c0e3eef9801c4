//! Reading a JSONL file: every line is parsed and checked, and every problem of every
//! line is collected before anything is returned.
use std::path::Path;

use rayon::prelude::*;
use serde_json::Value;

use crate::format::{line_shape, majority_format, mixed_format_problem, LineShape};
use crate::parse::{kind, parse_sample};
use crate::problems::{DatasetError, LineProblems, Problem};
use crate::sample::{Dataset, Format, Sample};

/// Load and validate a JSONL dataset. `format` overrides detection (`--format`).
pub fn load_dataset(path: &Path, format: Option<Format>) -> Result<Dataset, DatasetError> {
    let bytes = std::fs::read(path).map_err(|e| DatasetError::file(path, format!("cannot read: {e}")))?;
    parse_jsonl(path, &bytes, format)
}

/// A line that parsed as a JSON object, with its 1-based line number.
struct JsonLine {
    line: usize,
    object: serde_json::Map<String, Value>,
}

/// Validate JSONL `bytes` (named `path` in messages). Never panics, whatever the bytes.
pub fn parse_jsonl(path: &Path, bytes: &[u8], format: Option<Format>) -> Result<Dataset, DatasetError> {
    let explicit_format = format.is_some();
    let mut problems: Vec<Problem> = Vec::new();

    // 1. Split and decode. Blank lines are skipped (a trailing newline is common).
    let raw_lines: Vec<(usize, &[u8])> = bytes
        .split(|&b| b == b'\n')
        .enumerate()
        .map(|(i, l)| (i + 1, l.strip_suffix(b"\r").unwrap_or(l)))
        .filter(|(_, l)| !l.iter().all(u8::is_ascii_whitespace))
        .collect();
    let decoded: Vec<Result<JsonLine, Problem>> = raw_lines.par_iter().map(|&(line, raw)| decode_line(line, raw)).collect();
    let mut lines = Vec::with_capacity(decoded.len());
    for result in decoded {
        match result {
            Ok(line) => lines.push(line),
            Err(problem) => problems.push(problem),
        }
    }

    // 2. The file's format: given, or the majority of the recognisable lines.
    let shapes: Vec<LineShape> = lines.iter().map(|l| line_shape(&l.object)).collect();
    let detected = majority_format(&shapes);
    let format = match format.or(detected) {
        Some(format) => format,
        None => {
            for l in &lines {
                problems.push(Problem {
                    line: Some(l.line),
                    message: "cannot tell the format: expected `messages` (chat / prompts), or \
                              `chosen`/`rejected` / `preferred_output`/`non_preferred_output` (preference)"
                        .into(),
                });
            }
            if raw_lines.is_empty() {
                problems.push(Problem { line: None, message: "no samples (the file is empty)".into() });
            }
            return Err(sorted(path, problems));
        }
    };

    // 3. Validate every line against that format.
    let checked: Vec<(usize, Result<Sample, Vec<String>>)> = lines
        .par_iter()
        .zip(shapes.par_iter())
        .map(|(l, &shape)| {
            let mut line_problems = LineProblems::default();
            // With --format every line is checked as that format (its field errors say
            // more than "mixed formats"); detection reports the odd lines out instead.
            let mixed = if explicit_format { None } else { mixed_format_problem(shape, format) };
            if let Some(message) = mixed {
                return (l.line, Err(vec![message]));
            }
            match parse_sample(&l.object, format, &mut line_problems) {
                Some(sample) => (l.line, Ok(sample)),
                None => (l.line, Err(line_problems.messages)),
            }
        })
        .collect();
    let mut samples = Vec::with_capacity(checked.len());
    let mut sample_lines = Vec::with_capacity(checked.len());
    for (line, result) in checked {
        match result {
            Ok(sample) => {
                samples.push(sample);
                sample_lines.push(line);
            }
            Err(messages) => {
                problems.extend(messages.into_iter().map(|message| Problem { line: Some(line), message }))
            }
        }
    }

    problems.extend(missing_label_problems(&samples, &sample_lines));
    if problems.is_empty() && samples.is_empty() {
        problems.push(Problem { line: None, message: "no samples (the file is empty)".into() });
    }
    if !problems.is_empty() {
        return Err(sorted(path, problems));
    }
    Ok(Dataset { path: path.to_path_buf(), format, samples, lines: sample_lines })
}

fn decode_line(line: usize, raw: &[u8]) -> Result<JsonLine, Problem> {
    let problem = |message: String| Problem { line: Some(line), message };
    let text = std::str::from_utf8(raw).map_err(|e| problem(format!("not valid UTF-8 ({e})")))?;
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(object)) => Ok(JsonLine { line, object }),
        Ok(other) => Err(problem(format!("a line must be a JSON object, got {}", kind(&other)))),
        Err(e) => {
            // serde_json says "at line 1 column N"; within one JSONL line only the column means anything.
            let text = e.to_string();
            let reason = text.rsplit_once(" at line ").map_or(text.as_str(), |(reason, _)| reason);
            Err(problem(format!("invalid JSON at column {}: {reason}", e.column())))
        }
    }
}

/// Labels are all-or-nothing: when some samples carry `ground_truth`, the ones without
/// are reported (an evaluator or a stratified split would silently skip them).
fn missing_label_problems(samples: &[Sample], lines: &[usize]) -> Vec<Problem> {
    let has_truth = |s: &Sample| match s {
        Sample::Chat(c) => c.ground_truth.is_some(),
        Sample::Prompts(p) => p.extra.get("ground_truth").is_some_and(|v| !v.is_null()),
        Sample::Preference(_) => true,
    };
    let with = samples.iter().filter(|s| has_truth(s)).count();
    if with == 0 || with == samples.len() {
        return Vec::new();
    }
    samples
        .iter()
        .zip(lines)
        .filter(|(s, _)| !has_truth(s))
        .map(|(_, &line)| Problem {
            line: Some(line),
            message: format!("missing `ground_truth` ({with} of {} samples have one)", samples.len()),
        })
        .collect()
}

fn sorted(path: &Path, mut problems: Vec<Problem>) -> DatasetError {
    // Stable: whole-file problems first, then by line, keeping each line's own order.
    problems.sort_by_key(|p| p.line.unwrap_or(0));
    DatasetError { path: path.to_path_buf(), problems }
}
