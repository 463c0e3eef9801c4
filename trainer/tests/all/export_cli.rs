//! `lora-train export` and the model card, end to end on the tiny golden models: a trained
//! run directory holds a README.md whose front matter is valid YAML with PEFT's keys; the
//! adapter exports as a llama.cpp LoRA GGUF; bad input gives clear errors.
use crate::common::*;
use candle_core::quantized::gguf_file::Content;
use yaml_rust2::{Yaml, YamlLoader};

fn train(model: &str, dir: &std::path::Path) -> std::path::PathBuf {
    let data = write_dataset(dir, "train.jsonl", 8);
    let out = dir.join("run");
    let (d, o) = (data.display().to_string(), out.display().to_string());
    ok(&["sft", "--model", model, "--dataset", &d, "--output", &o, "--device", "cpu", "--steps", "3", "--eval-split", "2", "--json"]);
    out
}

#[test]
fn a_finished_run_has_a_model_card_and_exports_as_a_gguf_lora() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tiny("llama");
    let run_dir = train(&m, tmp.path());

    let card = std::fs::read_to_string(run_dir.join("README.md")).unwrap();
    let yaml = card.strip_prefix("---\n").and_then(|r| r.split_once("\n---\n")).map(|(y, _)| y).expect("front matter");
    let y = &YamlLoader::load_from_str(yaml).unwrap()[0];
    assert_eq!(y["library_name"].as_str(), Some("peft"));
    // The tiny model is a local directory: no `base_model` (the hub wants a hub id there).
    assert!(y["base_model"].is_badvalue());
    let tags: Vec<&str> = y["tags"].as_vec().unwrap().iter().filter_map(Yaml::as_str).collect();
    assert_eq!(tags, ["lora", "sft", "lora-train"]);
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run_dir.join("run.json")).unwrap()).unwrap();
    let eval_after = summary["summary"]["eval_loss"].as_f64().unwrap();
    assert!(card.contains(&format!("| after training | {eval_after:.4} |")), "{card}");
    assert!(card.contains("| data fingerprint | `") && card.contains("(loss_curve.svg)"), "{card}");

    let gguf = tmp.path().join("lora.gguf");
    let (r, g) = (run_dir.display().to_string(), gguf.display().to_string());
    let out = stdout_json(&ok(&["export", "--model", &m, "--adapter", &r, "--format", "gguf-lora", "-o", &g, "--json"]));
    assert_eq!(out["format"], "gguf-lora");
    let c = Content::read(&mut std::fs::File::open(&gguf).unwrap()).unwrap();
    assert_eq!(c.metadata["general.type"].to_string().unwrap(), "adapter");
    // 2 layers x 7 modules x (A, B).
    assert_eq!(c.tensor_infos.len(), 28);
    assert!(c.tensor_infos.contains_key("blk.1.ffn_gate.weight.lora_b"));
}

#[test]
fn bad_export_requests_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let llama = tiny("llama");
    let run_dir = train(&llama, tmp.path());
    let (r, o) = (run_dir.display().to_string(), tmp.path().join("x.gguf").display().to_string());
    let err = |args: &[&str]| {
        let out = run(args);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(!std::path::Path::new(&o).exists(), "a failed export leaves no file");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = err(&["export", "--model", &llama, "--adapter", &r, "--format", "gguf", "-o", &o]);
    assert!(e.contains("convert_hf_to_gguf") && e.contains("gguf-lora"), "{e}");
    let e = err(&["export", "--model", &llama, "--adapter", &r, "--format", "gguf-lora", "--quant", "q3_k", "-o", &o]);
    assert!(e.contains("q3_k") && e.contains("q4_k_m"), "{e}");
    let e = err(&["export", "--model", &llama, "--adapter", &r, "--format", "gguf-lora", "--quant", "q8_0", "-o", &o]);
    assert!(e.contains("f32 or f16"), "{e}");
    let e = err(&["export", "--model", &llama, "--format", "gguf-lora", "-o", &o]);
    assert!(e.contains("--adapter"), "{e}");
    let e = err(&["export", "--model", &tiny("qwen3"), "--adapter", &r, "--format", "gguf-lora", "-o", &o]);
    assert!(e.contains("another base model"), "{e}");
}
