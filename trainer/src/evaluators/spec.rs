//! The evaluator spec syntax, `KIND[:ARGUMENT]`, shared by every command.
use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};

pub const KNOWN: &str = "exact, exact:ci, numeric[:TOL], regex:PATTERN, json, json-schema:FILE, label, \
contains, contains:ci, length:MIN-MAX, cmd:COMMAND, py:FILE.py[:FUNCTION]";

/// A parsed spec; files are checked when the evaluator is built, not here.
#[derive(Debug, Clone, PartialEq)]
pub enum Spec {
    /// The trimmed answer equals a ground truth (trimmed).
    Exact { ignore_case: bool },
    /// The last number in the answer is within `tolerance` (relative, absolute below 1)
    /// of the ground truth's number.
    Numeric { tolerance: f64 },
    /// The pattern matches somewhere in the answer (anchor with ^ and $ for the whole).
    Regex(String),
    /// The answer (or its ```json fenced block) is a JSON object.
    Json,
    /// The answer's JSON validates against the schema in the file.
    JsonSchema(PathBuf),
    /// The trimmed answer is one of the dataset's labels and equals the ground truth.
    Label,
    /// The answer contains a ground truth.
    Contains { ignore_case: bool },
    /// The answer has MIN..=MAX tokens.
    Length { min: usize, max: usize },
    /// An external process speaking JSON lines (run with `sh -c`).
    Cmd(String),
    /// A Python function called through the shipped shim.
    Py { file: PathBuf, function: String },
}

pub const DEFAULT_TOLERANCE: f64 = 1e-6;

pub fn parse_spec(spec: &str) -> Result<Spec> {
    let (kind, arg) = match spec.split_once(':') {
        Some((k, a)) => (k.trim(), Some(a)),
        None => (spec.trim(), None),
    };
    let need = |what: &str| arg.filter(|a| !a.trim().is_empty()).ok_or_else(|| anyhow!("`{kind}` needs {what}, as in `{kind}:{what}`"));
    let none = |s: Spec| match arg {
        None => Ok(s),
        Some(a) => Err(anyhow!("`{kind}` takes no argument, got `{a}`")),
    };
    let case = |s: fn(bool) -> Spec| match arg.map(str::trim) {
        None => Ok(s(false)),
        Some("ci") => Ok(s(true)),
        Some(a) => Err(anyhow!("`{kind}` takes only `:ci` (ignore case), got `:{a}`")),
    };
    let parsed = match kind {
        "exact" => case(|ignore_case| Spec::Exact { ignore_case })?,
        "contains" => case(|ignore_case| Spec::Contains { ignore_case })?,
        "numeric" => {
            let tolerance = match arg {
                None => DEFAULT_TOLERANCE,
                Some(a) => a.trim().parse::<f64>().ok().filter(|t| t.is_finite() && *t >= 0.0).ok_or_else(|| {
                    anyhow!("`numeric:{a}`: the tolerance must be a number >= 0, as in `numeric:0.01`")
                })?,
            };
            Spec::Numeric { tolerance }
        }
        "regex" => Spec::Regex(need("PATTERN")?.to_string()),
        "json" => none(Spec::Json)?,
        "json-schema" => Spec::JsonSchema(PathBuf::from(need("FILE")?.trim())),
        "label" => none(Spec::Label)?,
        "length" => parse_length(need("MIN-MAX")?)?,
        "cmd" => Spec::Cmd(need("COMMAND")?.to_string()),
        "py" => parse_py(need("FILE.py")?)?,
        other => bail!("unknown evaluator kind `{other}` (known: {KNOWN})"),
    };
    Ok(parsed)
}

fn parse_length(arg: &str) -> Result<Spec> {
    let bad = || anyhow!("`length:{arg}`: expected token counts MIN-MAX with MIN <= MAX, as in `length:10-200`");
    let (min, max) = arg.trim().split_once('-').ok_or_else(bad)?;
    let (min, max) = (min.trim().parse::<usize>().map_err(|_| bad())?, max.trim().parse::<usize>().map_err(|_| bad())?);
    if min > max {
        return Err(bad());
    }
    Ok(Spec::Length { min, max })
}

/// `FILE.py` or `FILE.py:FUNCTION`: the last `:` splits only when what follows is a Python
/// identifier, so paths holding `:` still work.
fn parse_py(arg: &str) -> Result<Spec> {
    let is_ident = |s: &str| s.chars().next().is_some_and(|c| c.is_alphabetic() || c == '_') && s.chars().all(|c| c.is_alphanumeric() || c == '_');
    let (file, function) = match arg.rsplit_once(':') {
        Some((file, f)) if is_ident(f) && file.ends_with(".py") => (file, f),
        _ => (arg, "evaluate"),
    };
    if !file.ends_with(".py") {
        bail!("`py:{arg}`: expected a Python file ending in .py, optionally followed by :FUNCTION");
    }
    Ok(Spec::Py { file: PathBuf::from(file), function: function.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_parses() {
        assert_eq!(parse_spec("exact").unwrap(), Spec::Exact { ignore_case: false });
        assert_eq!(parse_spec("exact:ci").unwrap(), Spec::Exact { ignore_case: true });
        assert_eq!(parse_spec("numeric").unwrap(), Spec::Numeric { tolerance: 1e-6 });
        assert_eq!(parse_spec("numeric:0.01").unwrap(), Spec::Numeric { tolerance: 0.01 });
        assert_eq!(parse_spec("regex:^a:b$").unwrap(), Spec::Regex("^a:b$".into()));
        assert_eq!(parse_spec("json").unwrap(), Spec::Json);
        assert_eq!(parse_spec("json-schema:s.json").unwrap(), Spec::JsonSchema("s.json".into()));
        assert_eq!(parse_spec("label").unwrap(), Spec::Label);
        assert_eq!(parse_spec("contains:ci").unwrap(), Spec::Contains { ignore_case: true });
        assert_eq!(parse_spec("length:10-200").unwrap(), Spec::Length { min: 10, max: 200 });
        assert_eq!(parse_spec("cmd:python3 e.py --x 1").unwrap(), Spec::Cmd("python3 e.py --x 1".into()));
        assert_eq!(parse_spec("py:r.py").unwrap(), Spec::Py { file: "r.py".into(), function: "evaluate".into() });
        assert_eq!(parse_spec("py:dir/r.py:score_fn").unwrap(), Spec::Py { file: "dir/r.py".into(), function: "score_fn".into() });
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        let err = |s: &str| format!("{:#}", parse_spec(s).unwrap_err());
        assert!(err("bleu").contains("unknown evaluator kind `bleu`"), "{}", err("bleu"));
        assert!(err("numeric:abc").contains("tolerance"));
        assert!(err("numeric:-1").contains("tolerance"));
        assert!(err("length:9-3").contains("MIN <= MAX"));
        assert!(err("length:10").contains("MIN-MAX"));
        assert!(err("regex:").contains("needs PATTERN"));
        assert!(err("cmd").contains("needs COMMAND"));
        assert!(err("exact:xx").contains(":ci"));
        assert!(err("json:x").contains("no argument"));
        assert!(err("py:r.txt").contains(".py"));
    }
}
