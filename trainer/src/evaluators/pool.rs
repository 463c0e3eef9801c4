//! External evaluators: a pool of processes speaking JSON lines on stdin/stdout.
//!
//! Request `{"id", "messages", "completion", "ground_truth", ...fields}`, one per line;
//! reply `{"id", "score", "reason"?, "metrics"?}`, one per line, for that id. Each worker
//! holds one request at a time, so a reply is matched to its request by position and
//! checked by id. A crash, a reply later than the timeout, or a garbage line costs that
//! one sample: the worker is killed (its whole process group) and a fresh one takes the
//! next sample. `"score": null` is a deliberate "no score" and keeps the worker.
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use serde_json::{Map, Value};

use super::{FailureKind, Outcome, Sample, Score};

/// How to start one worker.
#[derive(Debug, Clone)]
pub(crate) struct Launch {
    pub program: String,
    pub args: Vec<String>,
}

impl Launch {
    /// `cmd:COMMAND` runs through `sh -c`, so pipes, quoting and `cd x &&` work as typed.
    pub fn shell(command: &str) -> Self {
        Launch { program: "sh".into(), args: vec!["-c".into(), command.into()] }
    }
}

pub(crate) struct Pool {
    launch: Launch,
    timeout: Duration,
    /// `None` where a worker was killed; it is started again on its next sample.
    slots: Vec<Mutex<Option<Worker>>>,
}

impl Pool {
    /// Starts every worker now, so a command that cannot start is an error before any
    /// training (a command that starts and then dies shows up as crashes instead).
    pub fn new(launch: Launch, workers: usize, timeout: Duration) -> Result<Self> {
        ensure!(workers >= 1, "--evaluator-workers must be at least 1");
        ensure!(!timeout.is_zero(), "--evaluator-timeout must be positive");
        let slots = (0..workers).map(|_| Worker::start(&launch).map(|w| Mutex::new(Some(w)))).collect::<Result<_>>()?;
        Ok(Pool { launch, timeout, slots })
    }

    /// Scores the samples on up to `workers` processes at once; results in sample order.
    pub fn score_batch(&self, samples: &[Sample]) -> Vec<Outcome> {
        let next = AtomicUsize::new(0);
        let results: Vec<Mutex<Option<Outcome>>> = samples.iter().map(|_| Mutex::new(None)).collect();
        std::thread::scope(|scope| {
            for slot in self.slots.iter().take(samples.len()) {
                let (next, results) = (&next, &results);
                scope.spawn(move || {
                    let mut worker = slot.lock().unwrap_or_else(|e| e.into_inner());
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(sample) = samples.get(i) else { break };
                        let outcome = self.score_one(&mut worker, sample);
                        *results[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
                    }
                });
            }
        });
        results
            .into_iter()
            .map(|r| r.into_inner().unwrap_or_else(|e| e.into_inner()).unwrap_or_else(|| Outcome::failed(FailureKind::Crash, "the scoring thread stopped")))
            .collect()
    }

    fn score_one(&self, slot: &mut Option<Worker>, sample: &Sample) -> Outcome {
        if slot.is_none() {
            match Worker::start(&self.launch) {
                Ok(w) => *slot = Some(w),
                Err(e) => return Outcome::failed(FailureKind::Spawn, format!("{e:#}")),
            }
        }
        let Some(worker) = slot.as_mut() else { return Outcome::failed(FailureKind::Spawn, "no worker") };
        match worker.ask(&request_line(sample), &sample.id, self.timeout) {
            Ok(Reply::Scored(score)) => Outcome::Scored(score),
            Ok(Reply::NoScore(reason)) => Outcome::Failed {
                kind: FailureKind::NoScore,
                detail: format!("the evaluator gave no score ({})", reason.as_deref().unwrap_or("no reason given")),
                reason,
            },
            Err((kind, detail)) => {
                // Dropping the worker kills it; the next sample starts a fresh one.
                *slot = None;
                Outcome::failed(kind, format!("{detail}; worker restarted"))
            }
        }
    }
}

/// The request line for a sample: the sample's other fields first, so that the protocol
/// keys (`id`, `messages`, `completion`, `ground_truth`) always win over a field of the
/// same name.
pub(crate) fn request_line(sample: &Sample) -> String {
    let mut m = Map::new();
    m.insert("id".into(), Value::String(sample.id.clone()));
    m.insert("messages".into(), Value::Array(sample.messages.clone()));
    m.insert("completion".into(), Value::String(sample.completion.clone()));
    m.insert("ground_truth".into(), sample.ground_truth.clone().unwrap_or(Value::Null));
    for (k, v) in &sample.fields {
        if !m.contains_key(k) {
            m.insert(k.clone(), v.clone());
        }
    }
    let mut line = Value::Object(m).to_string();
    line.push('\n');
    line
}

pub(crate) enum Reply {
    Scored(Score),
    NoScore(Option<String>),
}

/// Parses a reply line for request `id`; `Err` is garbage, with what was wrong.
pub(crate) fn parse_reply(line: &str, id: &str) -> Result<Reply, String> {
    let shown = || {
        let t = line.trim();
        if t.chars().count() > 200 { format!("{}...", t.chars().take(200).collect::<String>()) } else { t.to_string() }
    };
    let Ok(Value::Object(reply)) = serde_json::from_str::<Value>(line) else {
        return Err(format!("the reply is not a JSON object: {}", shown()));
    };
    match reply.get("id") {
        Some(Value::String(got)) if got == id => {}
        Some(other) => return Err(format!("a reply for id {other} while waiting for \"{id}\"")),
        None => return Err(format!("the reply has no id: {}", shown())),
    }
    let reason = match reply.get("reason") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => Some(other.to_string()),
    };
    let score = match reply.get("score") {
        None => return Err(format!("the reply has no score: {}", shown())),
        Some(Value::Null) => return Ok(Reply::NoScore(reason)),
        Some(Value::Number(n)) => n.as_f64().filter(|x| x.is_finite()).ok_or_else(|| format!("the score {n} is not finite"))?,
        Some(other) => return Err(format!("the score {other} is not a number")),
    };
    // Metrics are extras: values that are not numbers are dropped rather than costing the score.
    let metrics: BTreeMap<String, f64> = match reply.get("metrics") {
        Some(Value::Object(m)) => m.iter().filter_map(|(k, v)| v.as_f64().map(|x| (k.clone(), x))).collect(),
        _ => BTreeMap::new(),
    };
    Ok(Reply::Scored(Score { score: Some(score), reason, metrics }))
}

/// One running evaluator process. Requests go through a writer thread and replies come
/// from a reader thread, so neither a process that stops reading stdin nor one that
/// floods stdout can block the caller past its timeout.
struct Worker {
    child: Child,
    requests: Option<Sender<String>>,
    lines: Receiver<String>,
}

impl Worker {
    fn start(launch: &Launch) -> Result<Self> {
        let mut command = Command::new(&launch.program);
        command.args(&launch.args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit());
        // Its own process group, so that a kill also reaches what `sh -c` started.
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = command.spawn().with_context(|| format!("starting {} {:?}", launch.program, launch.args))?;
        let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("the evaluator process has no stdin/stdout pipes");
        };
        let (request_tx, request_rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in request_rx {
                if stdin.write_all(line.as_bytes()).and_then(|()| stdin.flush()).is_err() {
                    break;
                }
            }
        });
        let (line_tx, line_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        // Invalid UTF-8 becomes replacement characters, then fails as JSON.
                        if line_tx.send(String::from_utf8_lossy(&buf).into_owned()).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        Ok(Worker { child, requests: Some(request_tx), lines: line_rx })
    }

    fn ask(&mut self, request: &str, id: &str, timeout: Duration) -> Result<Reply, (FailureKind, String)> {
        let deadline = Instant::now() + timeout;
        let sent = self.requests.as_ref().is_some_and(|tx| tx.send(request.to_string()).is_ok());
        if !sent {
            return Err((FailureKind::Crash, self.exit_detail()));
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                // Blank lines carry nothing; everything else must be this request's reply.
                Ok(line) if line.trim().is_empty() => continue,
                Ok(line) => return parse_reply(&line, id).map_err(|why| (FailureKind::Garbage, why)),
                Err(RecvTimeoutError::Timeout) => {
                    return Err((FailureKind::Timeout, format!("no reply within {:.3}s", timeout.as_secs_f64())));
                }
                Err(RecvTimeoutError::Disconnected) => return Err((FailureKind::Crash, self.exit_detail())),
            }
        }
    }

    /// How the process ended, waiting briefly for it to finish exiting after closing stdout.
    fn exit_detail(&mut self) -> String {
        for _ in 0..50 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return format!("the process exited ({status}) before replying");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        "the process closed its stdout before replying".into()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Closing stdin ends the writer thread; the kill ends the reader at EOF.
        self.requests = None;
        #[cfg(unix)]
        {
            // The group id is the child's pid (process_group(0) above).
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", self.child.id())])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn garbage(line: &str) -> String {
        match parse_reply(line, "7") {
            Err(why) => why,
            Ok(_) => panic!("{line} was accepted"),
        }
    }

    #[test]
    fn replies_are_checked() {
        match parse_reply(r#"{"id": "7", "score": 0.5, "reason": "half", "metrics": {"a": 1, "b": "x"}}"#, "7") {
            Ok(Reply::Scored(s)) => {
                assert_eq!(s.score, Some(0.5));
                assert_eq!(s.reason.as_deref(), Some("half"));
                assert_eq!(s.metrics, BTreeMap::from([("a".to_string(), 1.0)]));
            }
            _ => panic!("a good reply was refused"),
        }
        assert!(matches!(parse_reply(r#"{"id": "7", "score": null, "reason": "boom"}"#, "7"), Ok(Reply::NoScore(Some(r))) if r == "boom"));
        assert!(garbage("hello").contains("not a JSON object"));
        assert!(garbage("[1]").contains("not a JSON object"));
        assert!(garbage(r#"{"id": "8", "score": 1}"#).contains("waiting for \"7\""));
        assert!(garbage(r#"{"id": 7, "score": 1}"#).contains("waiting for"));
        assert!(garbage(r#"{"score": 1}"#).contains("no id"));
        assert!(garbage(r#"{"id": "7"}"#).contains("no score"));
        assert!(garbage(r#"{"id": "7", "score": "1"}"#).contains("not a number"));
    }

    #[test]
    fn request_keeps_protocol_keys_over_fields() {
        let mut fields = Map::new();
        fields.insert("id".into(), json!("spoof"));
        fields.insert("difficulty".into(), json!(3));
        let s = Sample {
            id: "a".into(),
            messages: vec![json!({"role": "user", "content": "hi"})],
            completion: "yo".into(),
            ground_truth: Some(json!("yo")),
            fields,
        };
        let line = request_line(&s);
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v, json!({"id": "a", "messages": [{"role": "user", "content": "hi"}], "completion": "yo", "ground_truth": "yo", "difficulty": 3}));
    }
}
