//! Helpers shared by the end-to-end tests of the binary (tiny golden models, small
//! chat datasets, JSON output).
#![allow(dead_code)]
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};

pub fn bin() -> String {
    // Worktrees that share one target directory replace each other's binary there;
    // LORA_TRAIN_TEST_BIN points the tests at a copy of one's own build.
    std::env::var("LORA_TRAIN_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_lora-train").to_string())
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

pub fn tiny(arch: &str) -> String {
    repo().join("tests/golden/models").join(format!("{arch}-tiny")).display().to_string()
}

/// A small chat dataset with a fixed answer per question (easy to over-fit).
pub fn write_dataset(dir: &Path, name: &str, n: usize) -> PathBuf {
    let words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima"];
    let mut text = String::new();
    for i in 0..n {
        let w = words[i % words.len()];
        let q = format!("Say the code word number {i}.");
        let a = format!("The code word is {w} {w} {w}.");
        text.push_str(&serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}).to_string());
        text.push('\n');
    }
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

pub fn run(args: &[&str]) -> Output {
    // Every training command registers a job: keep the tests' jobs out of the user's store.
    Command::new(bin()).args(args).env("LORA_TRAIN_LOG", "warn").env("LORA_TRAIN_HOME", std::env::temp_dir().join("lora-train-tests-home")).output().expect("spawn lora-train")
}

pub fn ok(args: &[&str]) -> Output {
    let out = run(args);
    assert!(out.status.success(), "lora-train {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    out
}

pub fn stdout_json(out: &Output) -> serde_json::Value {
    let s = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "--json must print exactly one line on stdout, got {s:?}");
    serde_json::from_str(lines[0]).unwrap()
}

pub fn read_adapter(dir: &Path) -> HashMap<String, Vec<f32>> {
    let t = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &candle_core::Device::Cpu).unwrap();
    t.into_iter().map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap())).collect()
}

pub fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}


/// Copy the files of `src` (not recursive) into `dst`.
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

/// Spawn a server command (`serve`, `dashboard`) with `--port 0` among its args and wait
/// for its `BANNER http://ADDR` line on stderr; returns the child and the URL.
pub fn spawn_listening(mut cmd: Command, banner: &str) -> (Child, String) {
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn lora-train");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = String::new();
    let url = loop {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(addr) = line.strip_prefix(banner) {
                    break addr.trim().to_string();
                }
                seen.push_str(&line);
                seen.push('\n');
            }
            _ => panic!("the server exited before listening:\n{seen}"),
        }
    };
    // Keep draining stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, url)
}
