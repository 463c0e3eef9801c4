//! External evaluators (`cmd:`, `py:`): a crash, hang or garbage reply costs only that
//! sample its score, the pool recovers for the samples after it, and `py:` accepts every
//! return form of the hosted service's reward functions.
use std::path::Path;
use std::time::{Duration, Instant};

use lora_train::evaluators::{Context, Evaluator, EvaluatorSet, Sample};
use serde_json::{json, Value};

/// A JSON-lines evaluator in Python: 1 when the completion equals the ground truth, and
/// misbehaving on the ids that name a failure.
const SCRIPT: &str = r#"
import json, os, sys, time
for line in sys.stdin:
    req = json.loads(line)
    rid = req["id"]
    if rid == "crash":
        sys.exit(1)
    if rid == "hang":
        with open(os.environ["PIDFILE"], "w") as f:
            f.write(str(os.getpid()))
        time.sleep(1000)
    if rid == "garbage":
        print("this is not json", flush=True)
        continue
    if rid == "wrong-id":
        print(json.dumps({"id": "someone-else", "score": 1}), flush=True)
        continue
    if rid == "no-score-key":
        print(json.dumps({"id": rid}), flush=True)
        continue
    if rid == "string-score":
        print(json.dumps({"id": rid, "score": "high"}), flush=True)
        continue
    if rid == "null-score":
        print(json.dumps({"id": rid, "score": None, "reason": "cannot judge"}), flush=True)
        continue
    if rid == "too-high":
        print(json.dumps({"id": rid, "score": 1.5}), flush=True)
        continue
    score = 1.0 if req["completion"] == req["ground_truth"] else 0.0
    print(json.dumps({"id": rid, "score": score, "metrics": {"len": len(req["completion"]), "level": req.get("level", 0)}}), flush=True)
"#;

fn sample(id: &str, completion: &str, truth: &str) -> Sample {
    Sample {
        id: id.into(),
        messages: vec![json!({"role": "user", "content": "Say the word."})],
        completion: completion.into(),
        ground_truth: Some(Value::String(truth.into())),
        ..Default::default()
    }
}

fn ctx(workers: usize, timeout_s: f64) -> Context {
    Context::new(workers, Duration::from_secs_f64(timeout_s))
}

fn script(dir: &Path) -> String {
    let path = dir.join("eval.py");
    std::fs::write(&path, SCRIPT).unwrap();
    format!("cmd:python3 {}", path.display())
}

fn scores(e: &Evaluator, samples: &[Sample]) -> Vec<Option<f64>> {
    e.score_batch(samples).into_iter().map(|s| s.score).collect()
}

#[test]
fn cmd_scores_in_order_on_several_workers() {
    let dir = tempfile::tempdir().unwrap();
    let e = Evaluator::new(&script(dir.path()), &ctx(3, 10.0)).unwrap();
    let samples: Vec<Sample> = (0..10).map(|i| sample(&format!("s{i}"), if i % 2 == 0 { "yes" } else { "no" }, "yes")).collect();
    let expected: Vec<Option<f64>> = (0..10).map(|i| Some(if i % 2 == 0 { 1.0 } else { 0.0 })).collect();
    assert_eq!(scores(&e, &samples), expected);
    let mut with_field = sample("f", "abcd", "abcd");
    with_field.fields.insert("level".into(), json!(3));
    let got = e.score_batch(&[with_field]);
    assert_eq!(got[0].metrics["len"], 4.0);
    assert_eq!(got[0].metrics["level"], 3.0, "the sample's other fields reach the evaluator");
    assert!(e.failures().is_empty());
}

#[test]
fn a_crash_costs_one_sample_and_the_worker_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let e = Evaluator::new(&script(dir.path()), &ctx(1, 10.0)).unwrap();
    let samples = [sample("a", "yes", "yes"), sample("crash", "yes", "yes"), sample("b", "yes", "yes"), sample("crash", "yes", "yes"), sample("c", "no", "yes")];
    assert_eq!(scores(&e, &samples), [Some(1.0), None, Some(1.0), None, Some(0.0)]);
    assert_eq!(e.failures(), [("crash".to_string(), 2)].into());
    let reason = e.score_batch(&samples[1..2])[0].reason.clone().unwrap();
    assert!(reason.contains("exited"), "{reason}");
}

#[test]
fn a_hang_times_out_kills_the_process_group_and_the_pool_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    // `cd ... &&` keeps `sh` as the parent of python: the kill must reach the whole group.
    let spec = format!("cmd:cd {} && PIDFILE={} python3 eval.py", dir.path().display(), pidfile.display());
    std::fs::write(dir.path().join("eval.py"), SCRIPT).unwrap();
    let e = Evaluator::new(&spec, &ctx(1, 1.0)).unwrap();
    let start = Instant::now();
    let samples = [sample("a", "yes", "yes"), sample("hang", "yes", "yes"), sample("b", "yes", "yes")];
    assert_eq!(scores(&e, &samples), [Some(1.0), None, Some(1.0)]);
    assert!(start.elapsed() < Duration::from_secs(8), "took {:?}", start.elapsed());
    assert_eq!(e.failures(), [("timeout".to_string(), 1)].into());
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Gone, or a zombie waiting for a reaper: either way no longer sleeping.
    let state = stat.rsplit(") ").next().and_then(|s| s.chars().next());
    assert!(matches!(state, None | Some('Z') | Some('X')), "the hung evaluator {pid} still runs: {stat}");
}

#[test]
fn garbage_replies_cost_one_sample_each() {
    let dir = tempfile::tempdir().unwrap();
    let e = Evaluator::new(&script(dir.path()), &ctx(1, 10.0)).unwrap();
    let ids = ["garbage", "a", "wrong-id", "b", "no-score-key", "c", "string-score", "d"];
    let samples: Vec<Sample> = ids.iter().map(|id| sample(id, "yes", "yes")).collect();
    assert_eq!(scores(&e, &samples), [None, Some(1.0), None, Some(1.0), None, Some(1.0), None, Some(1.0)]);
    assert_eq!(e.failures(), [("garbage".to_string(), 4)].into());
}

#[test]
fn null_scores_keep_the_worker_and_high_scores_are_clamped() {
    let dir = tempfile::tempdir().unwrap();
    let e = Evaluator::new(&script(dir.path()), &ctx(1, 10.0)).unwrap();
    let got = e.score_batch(&[sample("null-score", "x", "y"), sample("too-high", "x", "y")]);
    assert_eq!(got[0].score, None);
    assert_eq!(got[0].reason.as_deref(), Some("cannot judge"));
    assert_eq!(got[1].score, Some(1.0));
    assert_eq!(e.failures(), [("no_score".to_string(), 1)].into());
}

#[test]
fn a_command_that_cannot_run_only_costs_scores() {
    let e = Evaluator::new("cmd:/nonexistent/evaluator --flag", &ctx(2, 5.0)).unwrap();
    assert_eq!(scores(&e, &[sample("a", "x", "x"), sample("b", "x", "x")]), [None, None]);
    assert_eq!(e.failures(), [("crash".to_string(), 2)].into());
}

const PY: &str = r#"
class Result:
    def __init__(self, score, reason):
        self.score = score
        self.reason = reason

def evaluate(messages, ground_truth=None, **kwargs):
    assert messages[-1]["role"] == "assistant"
    assert messages[0]["role"] == "user"
    return 1.0 if messages[-1]["content"].strip() == ground_truth else 0.0

def as_dict(messages, ground_truth=None, **kwargs):
    return {"score": 0.5, "reason": "half", "metrics": {"m": 2, "sub": {"score": 0.25}}}

def as_object(messages, ground_truth=None, **kwargs):
    return Result(0.75, "three quarters")

def raising(messages, ground_truth=None, **kwargs):
    if messages[-1]["content"] == "boom":
        raise ValueError("bad answer")
    return 1

def with_fields(messages, ground_truth=None, level=0, **kwargs):
    print("noise on stdout must not break the protocol")
    return level / 10
"#;

fn py_file(dir: &Path) -> String {
    let path = dir.join("rewards.py");
    std::fs::write(&path, PY).unwrap();
    path.display().to_string()
}

#[test]
fn py_accepts_float_dict_and_object_results() {
    let dir = tempfile::tempdir().unwrap();
    let file = py_file(dir.path());
    let c = ctx(2, 10.0);
    let default = Evaluator::new(&format!("py:{file}"), &c).unwrap();
    assert_eq!(default.short_name(), "evaluate");
    assert_eq!(scores(&default, &[sample("a", " Paris ", "Paris"), sample("b", "Lyon", "Paris")]), [Some(1.0), Some(0.0)]);

    let d = Evaluator::new(&format!("py:{file}:as_dict"), &c).unwrap().score_batch(&[sample("a", "x", "y")]).remove(0);
    assert_eq!((d.score, d.reason.as_deref()), (Some(0.5), Some("half")));
    assert_eq!(d.metrics, [("m".to_string(), 2.0), ("sub".to_string(), 0.25)].into());

    let o = Evaluator::new(&format!("py:{file}:as_object"), &c).unwrap().score_batch(&[sample("a", "x", "y")]).remove(0);
    assert_eq!((o.score, o.reason.as_deref()), (Some(0.75), Some("three quarters")));

    let mut s = sample("a", "x", "y");
    s.fields.insert("level".into(), json!(4));
    assert_eq!(scores(&Evaluator::new(&format!("py:{file}:with_fields"), &c).unwrap(), &[s]), [Some(0.4)]);
}

#[test]
fn py_exceptions_cost_one_sample_with_the_error_as_reason() {
    let dir = tempfile::tempdir().unwrap();
    let file = py_file(dir.path());
    let e = Evaluator::new(&format!("py:{file}:raising"), &ctx(1, 10.0)).unwrap();
    let got = e.score_batch(&[sample("a", "boom", "y"), sample("b", "fine", "y")]);
    assert_eq!(got[0].score, None);
    assert_eq!(got[0].reason.as_deref(), Some("ValueError: bad answer"));
    assert_eq!(got[1].score, Some(1.0));
    assert_eq!(e.failures(), [("no_score".to_string(), 1)].into());
}

#[test]
fn py_load_errors_name_the_spec() {
    let dir = tempfile::tempdir().unwrap();
    let file = py_file(dir.path());
    let err = |spec: &str| format!("{:#}", Evaluator::new(spec, &ctx(1, 5.0)).err().expect(spec));
    let missing_fn = err(&format!("py:{file}:nope"));
    assert!(missing_fn.contains(&format!("evaluator `py:{file}:nope`")) && missing_fn.contains("no function `nope`"), "{missing_fn}");
    assert!(err("py:/nonexistent/r.py").contains("no Python file"));
    let broken = dir.path().join("broken.py");
    std::fs::write(&broken, "def evaluate(:\n").unwrap();
    assert!(err(&format!("py:{}", broken.display())).contains("SyntaxError"));
}

#[test]
fn a_set_mixes_builtins_and_processes() {
    let dir = tempfile::tempdir().unwrap();
    let specs = vec!["exact".to_string(), script(dir.path())];
    let set = EvaluatorSet::new(&specs, Some(&[1.0, 0.5]), &ctx(2, 10.0)).unwrap();
    assert_eq!(set.names(), ["exact", "cmd"]);
    let out = set.score_batch(&[sample("a", "yes", "yes"), sample("crash", "yes", "yes"), sample("b", "no", "yes")]);
    assert_eq!(out.rewards, [Some(1.5), Some(1.0), Some(0.0)]);
    assert_eq!(out.per_evaluator[1][1].score, None);
    assert_eq!(set.failure_count(), 1);
}
