//! `lora-train dashboard` end to end: the routes over a real job store and run directory
//! (4xx pages for missing runs and bad paths, no path traversal, the API key), and the
//! page in a real browser: headless Chromium loads it while an `sft` run trains and the
//! rendered DOM has the job's row and a loss curve with as many points as steps so far,
//! and a sweep's page its scoreboard and every candidate's curve on one chart.
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::*;
use crate::jobs_e2e::{lt_ok, wait_for};

/// A running `dashboard`; killed when dropped.
struct Dashboard {
    child: Child,
    url: String,
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dashboard(home: &Path, args: &[&str]) -> Dashboard {
    let mut cmd = Command::new(bin());
    cmd.args(["dashboard", "--port", "0"]).args(args).env("LORA_TRAIN_HOME", home).env("LORA_TRAIN_LOG", "warn").env_remove("LORA_TRAIN_API_KEY");
    let (child, url) = spawn_listening(cmd, "lora-train dashboard: listening on ");
    Dashboard { child, url }
}

struct Reply {
    status: u16,
    head: String,
    body: String,
}

/// A raw HTTP/1.1 GET: the path goes out exactly as given (no client normalizes `..`).
fn get(url: &str, path: &str, headers: &[&str]) -> Reply {
    let addr = url.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Reply { status, head: head.to_string(), body: body.to_string() }
}

fn sft_args(model: &str, data: &str, out: &str, steps: &str) -> Vec<String> {
    ["sft", "--model", model, "--dataset", data, "--output", out, "--device", "cpu", "--steps", steps, "--warmup-ratio", "0", "--eval-interval", "3"].map(String::from).to_vec()
}

#[test]
fn routes_answer_4xx_for_missing_runs_and_bad_paths_and_need_the_key_off_loopback() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let data = write_dataset(tmp.path(), "train.jsonl", 12);
    let out = tmp.path().join("run");
    std::fs::write(tmp.path().join("secret.svg"), "<svg/>").unwrap();
    let args = sft_args(&tiny("llama"), &data.display().to_string(), &out.display().to_string(), "4");
    lt_ok(&home, &args.iter().map(String::as_str).collect::<Vec<_>>());
    let d = dashboard(&home, &["--dir", &out.display().to_string()]);

    let index = get(&d.url, "/", &[]);
    assert_eq!(index.status, 200);
    assert!(index.body.contains("/assets/app.js"));
    assert!(get(&d.url, "/assets/app.js", &[]).head.contains("text/javascript"));
    let jobs: serde_json::Value = serde_json::from_str(&get(&d.url, "/api/jobs", &[]).body).unwrap();
    assert_eq!(jobs["jobs"][0]["id"], 1, "{jobs}");
    assert_eq!(jobs["jobs"][0]["status"], "completed", "{jobs}");
    assert_eq!(jobs["dirs"][0]["root"], "dir-0", "{jobs}");
    let view: serde_json::Value = serde_json::from_str(&get(&d.url, "/api/view/job-1", &[]).body).unwrap();
    assert_eq!(view["kind"], "run", "{view}");
    assert_eq!(view["metrics"].as_array().unwrap().len(), 5, "step 0 and 4 steps: {view}");
    assert_eq!(view["run"]["status"], "completed");
    // The page's polls ask only for the rows after the last step they have.
    let newer: serde_json::Value = serde_json::from_str(&get(&d.url, "/api/view/job-1?since=2", &[]).body).unwrap();
    let steps: Vec<u64> = newer["metrics"].as_array().unwrap().iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!((steps, newer["metrics_total"].as_u64()), (vec![3, 4], Some(5)));
    assert_eq!(newer["since_row"], view["metrics"][2], "the row the page holds, to check it is unchanged");
    assert_eq!(get(&d.url, "/api/view/job-1?since=x", &[]).status, 400);
    assert_eq!(get(&d.url, "/view/job-1", &[]).status, 200);
    assert_eq!(get(&d.url, "/view/dir-0", &[]).status, 200);
    let svg = get(&d.url, "/files/job-1/loss_curve.svg", &[]);
    assert_eq!(svg.status, 200);
    assert!(svg.head.to_ascii_lowercase().contains("content-type: image/svg+xml"), "{}", svg.head);

    // Missing things: 404 pages that say what is missing.
    for (path, says) in [("/view/job-99", "no job 99"), ("/view/job-1/nope", "no `nope`"), ("/view/dir-7", "no directory"), ("/nowhere", "no page")] {
        let r = get(&d.url, path, &[]);
        assert_eq!(r.status, 404, "{path}: {}", r.head);
        assert!(r.body.contains(says) && r.body.contains("<h1"), "{path}: {}", r.body);
    }
    assert_eq!(get(&d.url, "/api/view/job-99", &[]).status, 404);
    // Bad paths: 400, never a file outside the run directory.
    for path in [
        "/view/job-1/../../secret.svg",
        "/view/job-1/..",
        "/api/view/job-1/%2e%2e",
        "/api/view/job-1/checkpoints/..%2F..%2F..",
        "/files/job-1/..%2Fsecret.svg",
        "/files/job-1/%2e%2e/secret.svg",
        "/files/dir-0/..%2fsecret.svg",
        "/files/job-1/run.json",
        "/view/bogus",
    ] {
        let r = get(&d.url, path, &[]);
        assert!(r.status == 400 || r.status == 404, "{path}: {}", r.head);
        assert!(!r.body.contains("<svg/>"), "{path} served a file outside the run");
    }
    assert_eq!(get(&d.url, "/files/job-1/..%2Fsecret.svg", &[]).status, 400);
    drop(d);

    // Off loopback the key is required; with one, every request needs it.
    let refused = Command::new(bin()).args(["dashboard", "--host", "0.0.0.0", "--port", "0"]).env("LORA_TRAIN_HOME", &home).env_remove("LORA_TRAIN_API_KEY").output().unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--api-key"), "{}", String::from_utf8_lossy(&refused.stderr));
    let d = dashboard(&home, &["--api-key", "k3y"]);
    assert_eq!(get(&d.url, "/api/jobs", &[]).status, 401);
    assert_eq!(get(&d.url, "/", &[]).status, 401);
    assert_eq!(get(&d.url, "/api/jobs", &["Authorization: Bearer wrong"]).status, 401);
    assert_eq!(get(&d.url, "/api/jobs", &["Authorization: Bearer k3y"]).status, 200);
    let first = get(&d.url, "/?key=k3y", &[]);
    assert_eq!(first.status, 200);
    assert!(first.head.contains("lora_train_dashboard_key=k3y"), "{}", first.head);
    assert_eq!(get(&d.url, "/api/jobs", &["Cookie: lora_train_dashboard_key=k3y"]).status, 200);
}

/// Chromium from `CHROMIUM`, else `chromium` / `chromium-browser` / `google-chrome` on PATH.
pub fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser", "google-chrome"].iter().flat_map(|n| std::env::split_paths(&path).map(move |d| d.join(n))).find(|p| p.is_file())
}

/// The DOM of `url` after headless Chromium ran its scripts for `budget_ms` of virtual time.
pub fn dump_dom(chromium: &Path, url: &str, budget_ms: u32) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(chromium)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--virtual-time-budget={budget_ms}"))
        .args(["--dump-dom", url])
        .stdin(Stdio::null())
        .output()
        .expect("run chromium");
    assert!(out.status.success(), "chromium failed on {url}:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The train steps written so far (rows with a train loss).
fn train_rows(run: &Path) -> usize {
    std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default().lines().filter(|l| l.contains("\"loss\"")).count()
}

#[test]
fn chromium_shows_a_training_run_live() {
    let Some(chromium) = chromium() else {
        eprintln!("SKIPPED chromium_shows_a_training_run_live: no chromium found (set CHROMIUM, or apt-get install chromium; scripts/ci/chromium.sh)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let data = write_dataset(tmp.path(), "train.jsonl", 12);
    let (m, d) = (tiny("llama"), data.display().to_string());
    // Job 1: a finished sweep of two candidates (evaluated at steps 0, 2 and 4).
    let sweep = tmp.path().join("sweep").display().to_string();
    lt_ok(&home, &["sweep", "--model", &m, "--dataset", &d, "-o", &sweep, "--device", "cpu", "--steps", "4", "--eval-interval", "2", "--grid", "lr=1e-3,3e-4"]);
    // Job 2: an sft that trains until the test stops it.
    let out = tmp.path().join("live");
    let args = sft_args(&m, &d, &out.display().to_string(), "1000000");
    let mut train = Command::new(bin()).args(&args).env("LORA_TRAIN_HOME", &home).env("LORA_TRAIN_LOG", "warn").stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    wait_for(120, "the first steps", || train_rows(&out) >= 5);
    let dash = dashboard(&home, &[]);

    let jobs = dump_dom(&chromium, &format!("{}/", dash.url), 3000);
    let status = |id: u32| {
        let row = regex::Regex::new(&format!(r#"<tr data-job-id="{id}" data-status="([a-z]+)">"#)).unwrap();
        row.captures(&jobs).unwrap_or_else(|| panic!("no row of job {id} in the rendered jobs page:\n{jobs}"))[1].to_string()
    };
    assert_eq!((status(1).as_str(), status(2).as_str()), ("completed", "running"));

    let before = train_rows(&out);
    let page = dump_dom(&chromium, &format!("{}/view/job-2", dash.url), 3000);
    let after = train_rows(&out);
    let curve = regex::Regex::new(r#"<polyline [^>]*data-series="loss" data-points="(\d+)""#).unwrap();
    let points: usize = curve.captures(&page).unwrap_or_else(|| panic!("no train-loss curve in the rendered run page:\n{page}"))[1].parse().unwrap();
    assert!((before..=after).contains(&points), "the curve has {points} points; the run had {before} steps before the page loaded and {after} after");
    assert!(page.contains(r#"data-chart="loss""#) && page.contains(r#"data-series="eval_loss""#), "{page}");

    // The sweep: its scoreboard, and both candidates' eval curves (3 points each) on one chart.
    let page = dump_dom(&chromium, &format!("{}/view/job-1", dash.url), 3000);
    assert!(page.contains(r#"id="scoreboard""#) && page.contains(r#"class="winner""#), "{page}");
    let chart = &page[page.find(r#"data-chart="sweep_eval_loss""#).unwrap_or_else(|| panic!("no sweep chart:\n{page}"))..];
    let chart = &chart[..chart.find("</svg>").unwrap()];
    for name in ["lr1e-3", "lr3e-4"] {
        assert!(chart.contains(&format!(r#"data-series="{name}" data-points="3""#)), "{name}: {chart}");
    }

    assert!(Command::new("kill").args(["-TERM", &train.id().to_string()]).status().unwrap().success());
    let _ = train.wait();
}
