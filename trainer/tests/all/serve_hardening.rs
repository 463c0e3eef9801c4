//! `serve` against what clients send: every prompt length through every path that
//! prefills (equal to `generate`), internal errors that reveal nothing (an injected panic
//! in the scheduler), OpenAI parity (prompt lists, echo, stop lists, refused fields), a
//! fuzz of malformed bodies and a soak of concurrent, partly abandoned streams.
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use lora_models::rollout::RolloutParams;
use lora_models::SamplingParams;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::common::*;
use crate::serve_e2e::{agent, chat_body, post, sse_events, start_with_adapters, text_of, write_adapters, Server, KEY};

const MAX_NEW: usize = 5;

/// Greedy `generate` (and greedy `rollouts`, which must agree) for each prompt, through
/// adapter `adapter` (None: the base): the reference answers, as text.
fn reference_answers(model_dir: &str, adapter: Option<&Path>, prompts: &[Vec<u32>]) -> Vec<String> {
    let mut loaded = lora_models::load_model_mixed(model_dir, &Device::Cpu, DType::F32, DType::F32).unwrap();
    if let Some(dir) = adapter {
        loaded.model.load_adapter(dir).unwrap();
    }
    let (model, bundle) = (&loaded.model, &loaded.tokenizer);
    let stop = &bundle.eos_token_ids;
    let params = SamplingParams { max_new_tokens: MAX_NEW, temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 };
    let rollout = RolloutParams { group: 1, max_new_tokens: MAX_NEW, temperature: 0.0, top_k: 0, top_p: 1.0 };
    prompts
        .iter()
        .map(|p| {
            let g = model.generate(std::slice::from_ref(p), &params, stop).unwrap_or_else(|e| panic!("generate, prompt of {} tokens: {e:#}", p.len())).remove(0);
            let r = model.rollouts(std::slice::from_ref(p), &[0], &rollout, stop).unwrap_or_else(|e| panic!("rollouts, prompt of {} tokens: {e:#}", p.len())).remove(0).remove(0);
            let r_text: Vec<u32> = r.tokens.iter().copied().filter(|t| !stop.contains(t)).collect();
            assert_eq!(r_text, g.tokens, "rollouts and generate disagree on a prompt of {} tokens", p.len());
            bundle.decode(&g.tokens, true).unwrap()
        })
        .collect()
}

/// The text a completions request answered, whole or streamed.
fn completion_text(url: &str, body: &Value) -> String {
    let r = agent().post(url).header("Authorization", format!("Bearer {KEY}")).send_json(body).unwrap();
    let status = r.status().as_u16();
    let text = r.into_body().read_to_string().unwrap();
    assert_eq!(status, 200, "{body} -> {text}");
    if body["stream"] == true {
        let events = sse_events(&text);
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
        events[..events.len() - 1].iter().map(|e| serde_json::from_str::<Value>(e).unwrap()).filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string)).collect()
    } else {
        let v: Value = serde_json::from_str(&text).unwrap();
        v["choices"][0]["text"].as_str().unwrap().to_string()
    }
}

#[test]
fn every_prompt_length_answers_what_generate_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, base) = start_with_adapters(tmp.path(), &[]);
    let url = format!("{}/v1/completions", server.url);
    // Lengths 1 to 70: one token, across the KV headroom and the attention's 64-row tiles.
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let prompts: Vec<Vec<u32>> = (1..=70).map(|len| (0..len).map(|_| rng.random_range(3..200u32)).collect()).collect();
    for (model, adapter) in [(base.as_str(), None), ("a", Some(tmp.path().join("a")))] {
        let want = reference_answers(&base, adapter.as_deref(), &prompts);
        let got: Vec<(String, String)> = std::thread::scope(|s| {
            let handles: Vec<_> = prompts
                .iter()
                .map(|p| {
                    let url = &url;
                    s.spawn(move || {
                        let body = json!({"model": model, "prompt": p, "max_tokens": MAX_NEW, "temperature": 0});
                        let mut streamed = body.clone();
                        streamed["stream"] = json!(true);
                        (completion_text(url, &body), completion_text(url, &streamed))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (i, (w, (whole, streamed))) in want.iter().zip(&got).enumerate() {
            assert_eq!(whole, w, "{model}: prompt of {} tokens", i + 1);
            assert_eq!(streamed, w, "{model}: streamed prompt of {} tokens", i + 1);
        }
    }
    // The report's case: a one-word prompt as text.
    let (s, v) = post(&url, &json!({"model": base, "prompt": "Once", "max_tokens": 3}));
    assert_eq!(s, 200, "{v}");
}

#[test]
fn a_panic_in_the_scheduler_fails_its_requests_with_a_bare_500_and_the_server_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs = write_adapters(tmp.path());
    let model = tiny("llama");
    let adapter = format!("a={}", dirs[0]);
    let server = Server::start_with_env(&["--model", &model, "--api-key", KEY, "--adapter", &adapter, "--max-model-len", "200"], &[("LORA_TRAIN_SERVE_PANIC_AT_MAX_TOKENS", "77")]);
    let url = format!("{}/v1/chat/completions", server.url);
    let (s, before) = post(&url, &chat_body("a", "Tell me a story", 8));
    assert_eq!(s, 200, "{before}");

    let r = agent().post(&url).header("Authorization", format!("Bearer {KEY}")).send_json(chat_body("a", "Tell me a story", 77)).unwrap();
    assert_eq!(r.status().as_u16(), 500);
    let id = r.headers().get("x-request-id").expect("x-request-id").to_str().unwrap().to_string();
    let body = r.into_body().read_to_string().unwrap();
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v, json!({"error": {"message": "internal error", "type": "server_error", "param": null, "code": "internal_error", "request_id": id}}));
    // The log has the detail under the same id.
    let start = Instant::now();
    while !server.log.lock().unwrap().lines().any(|l| l.contains(&id) && l.contains("injected failure")) {
        assert!(start.elapsed() < Duration::from_secs(10), "no log line with {id}:\n{}", server.log.lock().unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }

    // Streamed: the error arrives as an event with the same bare body.
    let mut body = chat_body("a", "Tell me a story", 77);
    body["stream"] = json!(true);
    let r = agent().post(&url).header("Authorization", format!("Bearer {KEY}")).send_json(&body).unwrap();
    let id = r.headers().get("x-request-id").unwrap().to_str().unwrap().to_string();
    let events = sse_events(&r.into_body().read_to_string().unwrap());
    let error: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(error["error"]["message"], "internal error");
    assert_eq!(error["error"]["request_id"], id.as_str());

    // The server goes on, and answers as before.
    let (s, after) = post(&url, &chat_body("a", "Tell me a story", 8));
    assert_eq!(s, 200, "{after}");
    assert_eq!(text_of(&after), text_of(&before));
}

#[test]
fn prompt_lists_echo_stop_lists_and_refused_fields_behave_as_openai() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, base) = start_with_adapters(tmp.path(), &[]);
    let u = |p: &str| format!("{}{p}", server.url);
    let one = |prompt: &str| {
        let (s, v) = post(&u("/v1/completions"), &json!({"model": "b", "prompt": prompt, "max_tokens": 6, "temperature": 0}));
        assert_eq!(s, 200, "{v}");
        v["choices"][0]["text"].as_str().unwrap().to_string()
    };
    let prompts = ["Once upon a time", "x", "The capital of France is"];
    let alone: Vec<String> = prompts.iter().map(|p| one(p)).collect();

    // A list of prompts: one choice per prompt and n, prompt-major, in index order.
    let (s, v) = post(&u("/v1/completions"), &json!({"model": "b", "prompt": prompts, "max_tokens": 6, "temperature": 0, "n": 2}));
    assert_eq!(s, 200, "{v}");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 6);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["text"].as_str().unwrap(), alone[i / 2], "choice {i}");
    }
    // Streamed: each chunk names its choice; every choice's text adds up the same.
    let body = json!({"model": "b", "prompt": prompts, "max_tokens": 6, "temperature": 0, "n": 2, "stream": true});
    let r = agent().post(&u("/v1/completions")).header("Authorization", format!("Bearer {KEY}")).send_json(&body).unwrap();
    let mut streamed = vec![String::new(); 6];
    for e in sse_events(&r.into_body().read_to_string().unwrap()).iter().filter(|e| *e != "[DONE]") {
        let c: Value = serde_json::from_str(e).unwrap();
        streamed[c["choices"][0]["index"].as_u64().unwrap() as usize].push_str(c["choices"][0]["text"].as_str().unwrap());
    }
    assert_eq!(streamed, (0..6).map(|i| alone[i / 2].clone()).collect::<Vec<_>>());
    // Token-id lists too, and echo puts each prompt before its answer.
    let (_, ids) = post(&u("/v1/completions"), &json!({"model": base, "prompt": [[5, 6, 7], [9]], "max_tokens": 2, "temperature": 0, "echo": true}));
    assert_eq!(ids["choices"].as_array().unwrap().len(), 2, "{ids}");
    let (_, echoed) = post(&u("/v1/completions"), &json!({"model": "b", "prompt": [prompts[0]], "max_tokens": 6, "temperature": 0, "echo": true}));
    assert_eq!(echoed["choices"][0]["text"].as_str().unwrap(), format!("{}{}", prompts[0], alone[0]));

    // Several stop strings: the earliest match cuts.
    let full = &alone[0];
    let words: Vec<&str> = full.split_whitespace().filter(|w| w.len() >= 2 && !w.contains('\u{FFFD}')).collect();
    if words.len() >= 2 {
        let (s, v) = post(&u("/v1/completions"), &json!({"model": "b", "prompt": prompts[0], "max_tokens": 6, "temperature": 0, "stop": [words[1], words[0]]}));
        assert_eq!(s, 200, "{v}");
        let cut = full.find(words[0]).unwrap().min(full.find(words[1]).unwrap());
        assert_eq!(v["choices"][0]["text"].as_str().unwrap(), &full[..cut]);
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
    }

    // Chat log-probs as OpenAI shapes them.
    let mut body = chat_body("c", "Hello", 3);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(2);
    let (_, v) = post(&u("/v1/chat/completions"), &body);
    let lp = &v["choices"][0]["logprobs"];
    assert!(lp["refusal"].is_null(), "{lp}");
    for t in lp["content"].as_array().unwrap() {
        assert!(t["token"].is_string() && t["logprob"].is_number() && t["bytes"].is_array(), "{t}");
        assert_eq!(t["top_logprobs"].as_array().unwrap().len(), 2);
    }

    // What the server does not implement is a 400 naming the field.
    let refused = [
        ("/v1/completions", json!({"model": "b", "prompt": "x", "best_of": 3}), "best_of"),
        ("/v1/completions", json!({"model": "b", "prompt": "x", "suffix": "y"}), "suffix"),
        ("/v1/completions", json!({"model": "b", "prompt": "x", "echo": true, "logprobs": 1}), "echo"),
        ("/v1/chat/completions", json!({"model": "b", "messages": [{"role": "user", "content": "x"}], "min_p": 0.1}), "min_p"),
        ("/v1/chat/completions", json!({"model": "b", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}), "top_logprobs"),
        ("/v1/chat/completions", json!({"model": "b", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}), "response_format"),
        (
            "/v1/chat/completions",
            json!({"model": "b", "messages": [{"role": "user", "content": "x"}], "tool_choice": "required", "tools": [{"type": "function", "function": {"name": "f"}}]}),
            "tool_choice",
        ),
        // The tiny model's template has no tool-call format and serve runs with `auto`.
        ("/v1/chat/completions", json!({"model": "b", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}]}), "tools"),
    ];
    for (route, body, field) in refused {
        let (s, e) = post(&u(route), &body);
        assert_eq!((s, e["error"]["param"].as_str()), (400, Some(field)), "{body} -> {e}");
    }
    // Fields that change nothing are accepted.
    let (s, e) = post(&u("/v1/completions"), &json!({"model": "b", "prompt": "x", "max_tokens": 2, "user": "someone"}));
    assert_eq!(s, 200, "{e}");
}

#[test]
fn with_a_tool_call_parser_chat_requests_with_tools_are_served() {
    let model = tiny("qwen2");
    let server = Server::start(&["--model", &model, "--api-key", KEY, "--max-model-len", "200", "--tool-call-parser", "hermes"]);
    let url = format!("{}/v1/chat/completions", server.url);
    let mut body = chat_body(&model, "What is the weather in Paris?", 6);
    body["tools"] = json!([{"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    for stream in [false, true] {
        body["stream"] = json!(stream);
        let r = agent().post(&url).header("Authorization", format!("Bearer {KEY}")).send_json(&body).unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let text = r.into_body().read_to_string().unwrap();
        // The tiny model writes no call: plain text, finish_reason stop or length.
        assert!(!text.contains("tool_calls\":[{"), "{text}");
    }
}

/// A request the fuzz starts from and mutates.
fn seeds(model: &str) -> Vec<Value> {
    vec![
        json!({"model": model, "prompt": "Once upon a time", "max_tokens": 3, "temperature": 0.7, "seed": 1, "n": 2, "stop": ["a", "b"], "logprobs": 2}),
        json!({"model": model, "messages": [{"role": "system", "content": "Be brief"}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "max_tokens": 3, "top_p": 0.9, "top_k": 5, "stream": true, "stream_options": {"include_usage": true}, "logprobs": true, "top_logprobs": 1}),
    ]
}

/// One random change to a JSON value: a wrong type, a huge or negative number, deep
/// nesting, an unknown field, a removed field, a long string.
fn mutate(v: &mut Value, rng: &mut rand::rngs::StdRng, depth: usize) {
    let strange = |rng: &mut rand::rngs::StdRng| -> Value {
        match rng.random_range(0..12) {
            0 => json!(null),
            1 => json!(-1),
            2 => json!(1e300),
            3 => json!(u64::MAX),
            4 => json!(i64::MIN),
            5 => json!("x".repeat(rng.random_range(0..3000))),
            6 => json!([]),
            7 => json!({}),
            8 => json!(true),
            9 => json!(0.5),
            10 => json!([[[[[[[[1]]]]]]]]),
            _ => json!("\u{0}\u{FFFD}\u{1F600}"),
        }
    };
    match v {
        Value::Object(map) if !map.is_empty() && depth < 3 && rng.random_bool(0.5) => {
            let keys: Vec<String> = map.keys().cloned().collect();
            let k = &keys[rng.random_range(0..keys.len())];
            mutate(map.get_mut(k).unwrap(), rng, depth + 1);
        }
        Value::Object(map) => match rng.random_range(0..3) {
            0 => {
                let keys: Vec<String> = map.keys().cloned().collect();
                if let Some(k) = keys.get(rng.random_range(0..keys.len().max(1))) {
                    map.remove(k);
                }
            }
            1 => {
                map.insert(format!("unknown_{}", rng.random_range(0..5)), strange(rng));
            }
            _ => {
                let keys: Vec<String> = map.keys().cloned().collect();
                if let Some(k) = keys.get(rng.random_range(0..keys.len().max(1))) {
                    map.insert(k.clone(), strange(rng));
                }
            }
        },
        Value::Array(items) if !items.is_empty() && depth < 3 && rng.random_bool(0.5) => {
            let i = rng.random_range(0..items.len());
            mutate(&mut items[i], rng, depth + 1);
        }
        _ => *v = strange(rng),
    }
}

/// Send raw bytes as a POST body (declaring `declared` bytes) on a fresh connection;
/// the status line's code, or None when the server answered nothing.
fn raw_post(addr: &str, path: &str, body: &[u8], declared: usize) -> Option<u16> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let head =
        format!("POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\nConnection: close\r\n\r\n");
    s.write_all(head.as_bytes()).unwrap();
    let _ = s.write_all(body);
    if declared > body.len() {
        // The body ends early: the server sees the connection's end. (Closing our side
        // after a whole body would let the server drop the connection before answering.)
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    text.strip_prefix("HTTP/1.1 ").and_then(|t| t.get(..3)).and_then(|c| c.parse().ok())
}

#[test]
fn fuzzed_request_bodies_never_get_a_5xx() {
    let model = tiny("llama");
    let server = Server::start(&["--model", &model, "--api-key", KEY, "--max-model-len", "128", "--max-tokens-limit", "8", "--max-body-bytes", "65536"]);
    let addr = server.url.trim_start_matches("http://").to_string();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let start = Instant::now();
    let mut statuses = std::collections::BTreeMap::new();
    for i in 0..600 {
        let mut body = seeds(&model).swap_remove(i % 2);
        let path = if body.get("prompt").is_some() { "/v1/completions" } else { "/v1/chat/completions" };
        for _ in 0..rng.random_range(1..4) {
            mutate(&mut body, &mut rng, 0);
        }
        let mut bytes = serde_json::to_vec(&body).unwrap();
        let mut declared = bytes.len();
        match i % 8 {
            // Invalid UTF-8 inside a string.
            5 => {
                let at = rng.random_range(0..bytes.len());
                bytes.insert(at, 0xff);
                declared += 1;
            }
            // Truncated: the declared length is longer than what is sent.
            6 => {
                let keep = rng.random_range(0..bytes.len());
                bytes.truncate(keep);
            }
            // Nesting far deeper than any parser's recursion limit.
            7 => {
                bytes = format!("{{\"model\": \"{model}\", \"prompt\": {}1{}}}", "[".repeat(5000), "]".repeat(5000)).into_bytes();
                declared = bytes.len();
            }
            _ => {}
        }
        let status = raw_post(&addr, path, &bytes, declared);
        *statuses.entry(status).or_insert(0) += 1;
        assert!(status.is_none_or(|s| s < 500), "{status:?} for {}", String::from_utf8_lossy(&bytes));
        assert!(status.is_some() || i % 8 == 6, "no answer to {}", String::from_utf8_lossy(&bytes));
    }
    // Still serving.
    let (s, v) = post(&format!("{}/v1/completions", server.url), &json!({"model": model, "prompt": "hi", "max_tokens": 2}));
    assert_eq!(s, 200, "{v}");
    eprintln!("fuzz: statuses {statuses:?} in {:?}", start.elapsed());
    assert!(statuses.contains_key(&Some(200)) && statuses.contains_key(&Some(400)), "{statuses:?}");
    assert!(start.elapsed() < Duration::from_secs(120), "the fuzz took {:?}", start.elapsed());
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse().ok()).unwrap()
}

#[test]
fn a_soak_of_concurrent_and_abandoned_requests_stays_correct_and_gives_memory_back() {
    let tmp = tempfile::tempdir().unwrap();
    // Without the prefix cache: this measures the batch's memory. The cache legitimately
    // holds what it keeps (bounded by its budget: `prefix_cache` unit tests), and its
    // prefills allocate other sizes, which moved this RSS check past its 10% once in CI
    // (73.6 -> 81.8 MB under a loaded machine).
    let (server, base) = start_with_adapters(tmp.path(), &["--prefix-cache-mb", "0"]);
    let url = format!("{}/v1/chat/completions", server.url);
    let models = [base.as_str(), "a", "b", "c"];
    let requests: Vec<Value> = (0..12).map(|i| chat_body(models[i % 4], &format!("Request {i}: tell me about {}", ["cats", "rain", "numbers"][i % 3]), 4 + i % 5)).collect();
    let answers: Vec<String> = requests.iter().map(|b| text_of(&post(&url, b).1)).collect();
    // A first round of the same soak brings the server to its working size: the allocator
    // keeps pages for the peak batch, which depends on how the 16 connections interleave
    // (measured: a 64-request warm-up left 8-12% to grow; after a full round, six more
    // rounds left the RSS flat). A leak would still grow round after round.
    let total = 320;
    soak(&url, &requests, &answers, total);
    std::thread::sleep(Duration::from_millis(500));
    let rss_start = rss_kib(server.child.id());
    let start = Instant::now();
    soak(&url, &requests, &answers, total);
    let elapsed = start.elapsed();
    // The abandoned rows leave at the scheduler's next step; give it a moment.
    std::thread::sleep(Duration::from_millis(1000));
    let rss_end = rss_kib(server.child.id());
    let (s, _) = post(&url, &requests[0]);
    assert_eq!(s, 200);
    eprintln!("soak: {total} requests in {elapsed:?}; server RSS {rss_start} KiB -> {rss_end} KiB");
    assert!((rss_end as f64) <= rss_start as f64 * 1.10, "server RSS grew from {rss_start} KiB to {rss_end} KiB");
}

/// `total` requests over 16 connections; every fifth streamed and dropped after its first
/// bytes, the others checked against `answers`.
fn soak(url: &str, requests: &[Value], answers: &[String], total: usize) {
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..16 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let k = i % requests.len();
                if i % 5 == 0 {
                    let mut body = requests[k].clone();
                    body["stream"] = json!(true);
                    body["max_tokens"] = json!(60);
                    let r = agent().post(url).header("Authorization", format!("Bearer {KEY}")).send_json(&body).unwrap();
                    assert_eq!(r.status().as_u16(), 200);
                    let mut reader = r.into_body().into_reader();
                    let mut first = [0u8; 32];
                    let _ = reader.read(&mut first).unwrap();
                    drop(reader);
                } else {
                    let (s, v) = post(url, &requests[k]);
                    assert_eq!(s, 200, "{v}");
                    assert_eq!(text_of(&v), answers[k], "request {k} answered differently under load");
                }
            });
        }
    });
}
