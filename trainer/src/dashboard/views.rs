//! What the dashboard shows of a directory, read from the files the commands write: a
//! training run (`run.json`, `metrics.jsonl`), a sweep (`sweep.json` and its candidates'
//! metrics), a workflow (`workflow.json`, `final_report.md`, `final_report.json`), a
//! `compare` result (`compare.json`). Everything is read, nothing written; paths from the
//! URL are resolved by [`resolve`] and never leave their root.
use std::path::{Component, Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::engine::{METRICS_FILE, RUN_FILE};
use crate::sweep::{CANDIDATES_DIR, SWEEP_FILE};
use crate::workflow::{REPORT_JSON, REPORT_MD, STATE_FILE as WORKFLOW_FILE};

pub const COMPARE_FILE: &str = "compare.json";

/// Why a URL path names nothing to show (the HTTP status follows from it).
#[derive(Debug)]
pub enum Refused {
    /// A path that could only escape its root or name a hidden file: 400.
    BadPath(String),
    /// Nothing there (no such job, directory or file): 404.
    Missing(String),
}

/// `sub` (the URL path after the root) inside `root`. Only plain names are accepted (no
/// `..`, no absolute path, nothing hidden), and the target, symbolic links followed, must
/// still lie inside the root.
pub fn resolve(root: &Path, sub: &str) -> Result<PathBuf, Refused> {
    let rel = Path::new(sub.trim_matches('/'));
    for c in rel.components() {
        match c {
            Component::Normal(name) if !name.to_string_lossy().starts_with('.') => {}
            _ => return Err(Refused::BadPath(format!("`{sub}`: only plain names inside the run directory are allowed"))),
        }
    }
    let root = root.canonicalize().map_err(|_| Refused::Missing(format!("{} does not exist (yet)", root.display())))?;
    let target = root.join(rel).canonicalize().map_err(|_| Refused::Missing(format!("no `{sub}` in {}", root.display())))?;
    if !target.starts_with(&root) {
        return Err(Refused::BadPath(format!("`{sub}` leads outside {}", root.display())));
    }
    Ok(target)
}

/// The kind of directory, by the file that marks it.
pub fn kind(dir: &Path) -> &'static str {
    if dir.join(WORKFLOW_FILE).is_file() {
        "workflow"
    } else if dir.join(SWEEP_FILE).is_file() {
        "sweep"
    } else if dir.join(COMPARE_FILE).is_file() {
        "compare"
    } else if dir.join(RUN_FILE).is_file() || dir.join(METRICS_FILE).is_file() {
        "run"
    } else {
        "directory"
    }
}

/// The view of `dir` (`sub` is its path under the root, for links): its kind, its data,
/// and the directories under it that have a view of their own. `since`: a run's rows
/// after that step only (the page polls with the last step it has; `metrics_total` and
/// `since_row` let it see when the file was rewritten, a resumed run, and fetch it whole).
pub fn view(dir: &Path, sub: &str, since: Option<u64>) -> Value {
    let kind = kind(dir);
    let mut v = Map::new();
    v.insert("kind".into(), json!(kind));
    v.insert("path".into(), json!(sub.trim_matches('/')));
    match kind {
        "run" => {
            v.insert("run".into(), read_json(&dir.join(RUN_FILE)));
            let rows = match read_rows(&dir.join(METRICS_FILE)) {
                Ok(rows) => rows,
                Err(e) => {
                    v.insert("metrics_error".into(), json!(format!("{e:#}")));
                    Vec::new()
                }
            };
            v.insert("metrics_total".into(), json!(rows.len()));
            // The page checks it against the row it holds (a resumed run rewrites the rows
            // after its checkpoint, with another elapsed_s).
            let at_since = since.and_then(|s| rows.iter().find(|r| r["step"].as_u64() == Some(s)).cloned());
            v.insert("since_row".into(), at_since.unwrap_or(Value::Null));
            let newer: Vec<Value> = rows.into_iter().filter(|r| since.is_none_or(|s| r["step"].as_u64().is_some_and(|step| step > s))).collect();
            v.insert("metrics".into(), Value::Array(newer));
        }
        "sweep" => {
            let sweep = read_json(&dir.join(SWEEP_FILE));
            let mut curves = Map::new();
            for name in sweep["candidates"].as_array().into_iter().flatten().filter_map(|c| c["name"].as_str()) {
                // The candidate's run directory under the sweep's (where `sweep` puts it).
                let cand = dir.join(CANDIDATES_DIR).join(name);
                if name.contains(['/', '\\']) || name.starts_with('.') || !cand.is_dir() {
                    continue;
                }
                let (metrics, error) = match read_rows(&cand.join(METRICS_FILE)) {
                    Ok(rows) => (rows, None),
                    Err(e) => (Vec::new(), Some(format!("{e:#}"))),
                };
                curves.insert(name.into(), json!({"path": join(sub, &format!("{CANDIDATES_DIR}/{name}")), "metrics": metrics, "metrics_error": error}));
            }
            v.insert("sweep".into(), sweep);
            v.insert("candidates".into(), Value::Object(curves));
        }
        "workflow" => {
            v.insert("workflow".into(), read_json(&dir.join(WORKFLOW_FILE)));
            v.insert("report_md".into(), std::fs::read_to_string(dir.join(REPORT_MD)).map_or(Value::Null, Value::String));
            v.insert("report".into(), read_json(&dir.join(REPORT_JSON)));
            v.insert("images".into(), json!(svg_files(dir)));
        }
        "compare" => {
            let mut compare = read_json(&dir.join(COMPARE_FILE));
            // The examples can be long: the summary is what the page shows.
            if let Some(m) = compare.as_object_mut() {
                m.remove("examples");
            }
            v.insert("compare".into(), compare);
        }
        _ => {}
    }
    v.insert("children".into(), json!(children(dir, sub)));
    Value::Object(v)
}

fn join(sub: &str, name: &str) -> String {
    let sub = sub.trim_matches('/');
    if sub.is_empty() { name.to_string() } else { format!("{sub}/{name}") }
}

/// A JSON file, or null when it is missing or being rewritten (the page polls again).
fn read_json(path: &Path) -> Value {
    std::fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or(Value::Null)
}

/// The rows of a `metrics.jsonl` being written ([`crate::metrics::read_metrics_so_far`]:
/// a half-written last line is left for the next poll, a damaged one before it is an
/// error the page shows). Rows are kept as JSON so that a method's own keys reach the
/// page without this module knowing them.
pub fn read_rows(path: &Path) -> anyhow::Result<Vec<Value>> {
    let rows: Vec<Value> = crate::metrics::read_metrics_so_far(path)?;
    Ok(rows.into_iter().filter(|v| v.get("step").is_some()).collect())
}

fn svg_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(".svg") && !n.starts_with('.'))
        .collect();
    names.sort();
    names
}

/// Directories one or two levels down that have a view of their own (a workflow's sweep,
/// final run and compare results; a sweep's candidates), except a run's own internals.
fn children(dir: &Path, sub: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for (rel, path) in subdirs(dir, "") {
        match kind(&path) {
            "directory" => {
                for (rel2, path2) in subdirs(&path, &rel) {
                    let k = kind(&path2);
                    if k != "directory" {
                        out.push(json!({"name": rel2, "path": join(sub, &rel2), "kind": k}));
                    }
                }
            }
            k => out.push(json!({"name": rel, "path": join(sub, &rel), "kind": k})),
        }
    }
    out
}

fn subdirs(dir: &Path, prefix: &str) -> Vec<(String, PathBuf)> {
    const SKIP: [&str; 3] = [crate::checkpoint::CHECKPOINTS_DIR, crate::tensorboard::RUNS_DIR, "data"];
    let mut out: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
        .filter(|(n, _)| !n.starts_with('.') && !SKIP.contains(&n.as_str()))
        .map(|(n, p)| (if prefix.is_empty() { n } else { format!("{prefix}/{n}") }, p))
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sweep_shows_its_candidates_curves_and_a_workflow_its_parts() {
        let tmp = tempfile::tempdir().unwrap();
        let wf = tmp.path();
        std::fs::write(wf.join(WORKFLOW_FILE), r#"{"phases": [{"name": "inspect", "status": "done"}]}"#).unwrap();
        std::fs::write(wf.join(REPORT_MD), "# Final report").unwrap();
        std::fs::write(wf.join("curves.svg"), "<svg/>").unwrap();
        let sweep = wf.join("sweep");
        std::fs::create_dir_all(sweep.join("candidates/a/checkpoints/step-1")).unwrap();
        std::fs::create_dir_all(sweep.join("candidates/b")).unwrap();
        std::fs::write(sweep.join(SWEEP_FILE), r#"{"candidates": [{"name": "a"}, {"name": "b"}, {"name": "../x"}], "winner": "a"}"#).unwrap();
        std::fs::write(sweep.join("candidates/a").join(RUN_FILE), "{}").unwrap();
        // The last line is being written: it is left for the next poll.
        std::fs::write(sweep.join("candidates/a").join(METRICS_FILE), "{\"step\": 0, \"eval_loss\": 2.0}\n{\"step\": 1, \"loss\": 1.5}\n{\"step\": 2, \"lo").unwrap();

        let v = view(wf, "", None);
        assert_eq!(v["kind"], "workflow");
        assert_eq!(v["report_md"], "# Final report");
        assert_eq!(v["images"], json!(["curves.svg"]));
        assert_eq!(v["children"], json!([{"name": "sweep", "path": "sweep", "kind": "sweep"}]));

        let v = view(&sweep, "sweep", None);
        assert_eq!(v["kind"], "sweep");
        assert_eq!(v["candidates"]["a"]["metrics"].as_array().unwrap().len(), 2);
        assert_eq!(v["candidates"]["a"]["path"], "sweep/candidates/a");
        assert_eq!(v["candidates"]["b"]["metrics"], json!([]));
        assert!(v["candidates"].get("../x").is_none());
        let kids: Vec<&str> = v["children"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(kids, ["candidates/a"], "a run's checkpoints are not listed; b has no run yet");

        // A damaged line before the last is shown as an error naming FILE:LINE, not as no rows.
        std::fs::write(sweep.join("candidates/a").join(METRICS_FILE), "{\"step\": 0}\n{\"step\": oops\n{\"step\": 2}\n").unwrap();
        let v = view(&sweep, "sweep", None);
        let err = v["candidates"]["a"]["metrics_error"].as_str().unwrap_or_default().to_string();
        assert!(err.contains(&format!("{}:2:", sweep.join("candidates/a").join(METRICS_FILE).display())), "{err}");
    }

    #[test]
    fn a_compare_result_shows_its_summary_without_the_examples() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join(COMPARE_FILE), r#"{"summary": {"win_rate": 0.75}, "settings": {"n": 4}, "examples": [{"prompt": "long"}]}"#).unwrap();
        let v = view(tmp.path(), "compare/a", None);
        assert_eq!(v["kind"], "compare");
        assert_eq!(v["compare"]["summary"]["win_rate"], 0.75);
        assert!(v["compare"].get("examples").is_none());
        assert_eq!(v["path"], "compare/a");
    }

    #[test]
    fn resolve_stays_inside_the_root() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("run");
        std::fs::create_dir_all(root.join("candidates/a")).unwrap();
        std::fs::write(tmp.path().join("secret"), "x").unwrap();
        assert!(resolve(&root, "candidates/a").is_ok());
        assert!(resolve(&root, "").is_ok());
        for bad in ["..", "../secret", "candidates/../../secret", ".hidden", "candidates/.x"] {
            assert!(matches!(resolve(&root, bad), Err(Refused::BadPath(_))), "{bad} was accepted");
        }
        // A leading slash is the root's own child, never the file system's root.
        for missing in ["nope", "/etc/passwd"] {
            assert!(matches!(resolve(&root, missing), Err(Refused::Missing(_))), "{missing}");
        }
        // A symbolic link out of the root is refused even though its name is plain.
        std::os::unix::fs::symlink(tmp.path(), root.join("escape")).unwrap();
        assert!(matches!(resolve(&root, "escape/secret"), Err(Refused::BadPath(_))));
    }
}
