//! DPO (every loss type, alone and combined with an `sft` term) and ORPO against TRL's own loss code on the tiny models
//! (`scripts/golden/make_preference_golden.py`, numbers in tests/golden/preference.json and
//! LoRA gradients in tests/golden/preference-{model}.safetensors): token ids and masks,
//! sequence log-probs, losses, TRL's metrics and every LoRA gradient within 1e-4 relative.
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use lora_datasets::{PairBatch, PairLimits, PairLoader};
use lora_models::{LoraConfig, Model, Route, DEFAULT_ADAPTER};
use lora_train::pair_data;
use lora_train::recipes::dpo::{Dpo, LossType};
use lora_train::recipes::orpo::Orpo;
use lora_train::recipes::preference::{PairLogps, PairObjective};

const TOL: f64 = 1e-4;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn golden() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(repo().join("tests/golden/preference.json")).unwrap()).unwrap()
}

fn close(what: &str, got: f64, want: f64) {
    close_at(what, got, want, 1e-6)
}

/// Relative to `want`, or to `scale` when `want` is a small difference of larger numbers
/// (a reward is beta times a difference of two log-probs of ~-60 computed in f32).
fn close_at(what: &str, got: f64, want: f64, scale: f64) {
    let err = (got - want).abs() / want.abs().max(scale);
    assert!(err <= TOL, "{what}: got {got}, TRL {want} (relative error {err:.2e})");
}

/// The model, its tokenizer, and the golden pairs as one batch of all pairs.
fn setup(name: &str) -> (Model, PairBatch) {
    let dir = repo().join("tests/golden/models").join(name);
    let loaded = lora_models::load_model_mixed(dir.to_str().unwrap(), &Device::Cpu, DType::F32, DType::F32).unwrap();
    let ds = lora_train::data::load_preference_dataset(&repo().join("tests/golden/preference_pairs.jsonl")).unwrap();
    let set = pair_data::tokenize_pairs(&loaded.tokenizer, &ds, &PairLimits { max_prompt_length: None, max_length: 4096 }).unwrap();
    let loader = PairLoader::new(&set.pairs, set.pairs.len(), lora_train::data::pad_token_id(&loaded.tokenizer), 0);
    let batch = loader.in_order().next().unwrap();
    (loaded.model, batch)
}

/// Policy rows then reference rows in ONE forward pass, routed as the engine routes them.
fn forward(model: &Model, b: &PairBatch) -> (Tensor, Tensor) {
    let t = lora_train::data::to_tensors(&b.rows, model.device()).unwrap();
    let twice = |x: &Tensor| Tensor::cat(&[x, x], 0).unwrap();
    let rows = b.rows.batch_size;
    let _route = model
        .route(&[Route { rows, adapter: Some(DEFAULT_ADAPTER), dropout_seed: None }, Route { rows, adapter: None, dropout_seed: None }])
        .unwrap();
    let hidden = model.forward_hidden(&twice(&t.input_ids), &twice(&t.position_ids), Some(&twice(&t.segment_ids))).unwrap();
    let policy = pair_data::sequence_logps(model, b, &hidden.narrow(0, 0, rows).unwrap()).unwrap();
    let reference = pair_data::sequence_logps(model, b, &hidden.narrow(0, rows, rows).unwrap()).unwrap().detach();
    (policy, reference)
}

/// The objective of a golden entry: `orpo`, one DPO loss type by its TRL name, or a
/// combination whose entry lists `loss_types` and `loss_weights`.
fn objective(loss: &str, entry: &serde_json::Value, beta: f64, smoothing: f64) -> Box<dyn Fn(&PairLogps, &PairLogps) -> lora_train::recipes::preference::PairLosses> {
    if loss == "orpo" {
        return Box::new(move |p, _| Orpo::new(beta).unwrap().losses(p, None).unwrap());
    }
    let types: Vec<LossType> = match entry.get("loss_types") {
        Some(list) => serde_json::from_value(list.clone()).unwrap(),
        None => vec![serde_json::from_value(serde_json::json!(loss)).unwrap()],
    };
    let weights: Option<Vec<f64>> = entry.get("loss_weights").map(|w| serde_json::from_value(w.clone()).unwrap());
    let e = if types.contains(&LossType::Robust) { smoothing } else { 0.0 };
    let dpo = Dpo::combined(beta, types, weights, e).unwrap();
    Box::new(move |p, r| dpo.losses(p, Some(r)).unwrap())
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

#[test]
fn dpo_and_orpo_match_trl_on_the_tiny_models() {
    let g = golden();
    let beta = g["beta"].as_f64().unwrap();
    let smoothing = g["robust_label_smoothing"].as_f64().unwrap();
    for (name, want) in g["models"].as_object().unwrap() {
        let (mut model, b) = setup(name);
        model.load_adapter(&repo().join("tests/golden/adapters").join(name)).unwrap();
        let k = b.pairs;
        // Same tokens and completion masks as the Python side.
        let t = b.rows.seq_len;
        for (row, seq) in want["sequences"].as_array().unwrap().iter().enumerate() {
            let ids: Vec<u32> = seq["input_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            let mask: Vec<f32> = seq["loss_mask"].as_array().unwrap().iter().enumerate().map(|(i, v)| if i > 0 && v.as_u64() == Some(1) { 1.0 } else { 0.0 }).collect();
            assert_eq!(&b.rows.input_ids[row * t..row * t + ids.len()], &ids[..], "{name} row {row} ids");
            assert_eq!(&b.rows.loss_mask[row * t..row * t + ids.len()], &mask[..], "{name} row {row} mask");
        }
        let tokens = pair_data::row_tokens(&b);
        let grads_file = candle_core::safetensors::load(repo().join(format!("tests/golden/preference-{name}.safetensors")), &Device::Cpu).unwrap();
        for required in ["sigmoid", "ipo", "hinge", "robust", "sigmoid_norm", "apo_zero", "apo_down", "bco_pair", "sft", "sigmoid+sft", "orpo"] {
            assert!(want["losses"].get(required).is_some(), "{name}: tests/golden/preference.json has no `{required}` (rerun make_preference_golden.py)");
        }
        for (loss_name, w) in want["losses"].as_object().unwrap() {
            let (policy, reference) = forward(&model, &b);
            if loss_name == "sigmoid" {
                for (what, got, want) in [("policy", &policy, &want["policy_logps"]), ("reference", &reference, &want["reference_logps"])] {
                    for (i, (x, y)) in got.to_vec1::<f32>().unwrap().iter().zip(want.as_array().unwrap()).enumerate() {
                        close(&format!("{name} {what} log-prob of row {i}"), *x as f64, y.as_f64().unwrap());
                    }
                }
            }
            let p = PairLogps::from_rows(&policy, &tokens).unwrap();
            let r = PairLogps::from_rows(&reference, &tokens).unwrap();
            let out = objective(loss_name, w, beta, smoothing)(&p, &r);
            let loss = (out.losses.sum_all().unwrap() / k as f64).unwrap();
            close(&format!("{name} {loss_name} loss"), scalar(&loss), w["loss"].as_f64().unwrap());
            let logp_scale = scalar(&policy.abs().unwrap().max(0).unwrap());
            for (metric, value) in &out.metrics {
                let scale = if metric.starts_with("rewards_") { beta * logp_scale } else { 1e-6 };
                close_at(&format!("{name} {loss_name} {metric}"), scalar(&value.mean_all().unwrap()), w[*metric].as_f64().unwrap(), scale);
            }
            let grads = loss.to_dtype(DType::F32).unwrap().backward().unwrap();
            for (key, var) in model.adapter_parameters(DEFAULT_ADAPTER).unwrap() {
                let got = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name} {loss_name}: no gradient for {key}"));
                let want = &grads_file[&format!("{loss_name}.{key}")];
                let scale = scalar(&want.abs().unwrap().max_all().unwrap());
                assert!(scale > 0.0 && scalar(&got.abs().unwrap().max_all().unwrap()) > 0.0, "{name} {loss_name}: zero gradient for {key}");
                let err = scalar(&(got - want).unwrap().abs().unwrap().max_all().unwrap()) / scale;
                assert!(err <= TOL, "{name} {loss_name} d/d {key}: max error {err:.2e} of the largest entry");
            }
        }
    }
}

/// With the adapter initialised as PEFT does (B = 0) the policy IS the reference, so the
/// first DPO loss is exactly ln 2, whatever the data.
#[test]
fn first_dpo_loss_is_ln2() {
    let (mut model, b) = setup("qwen2-tiny");
    let cfg = LoraConfig { rank: 4, alpha: 8.0, dropout: 0.0, use_rslora: false, target_modules: lora_models::ALL_TARGETS.iter().map(|s| s.to_string()).collect() };
    model.add_adapter(DEFAULT_ADAPTER, &cfg, 7).unwrap();
    let (policy, reference) = forward(&model, &b);
    let tokens = pair_data::row_tokens(&b);
    let out = Dpo::new(0.1, LossType::Sigmoid, 0.0)
        .unwrap()
        .losses(&PairLogps::from_rows(&policy, &tokens).unwrap(), Some(&PairLogps::from_rows(&reference, &tokens).unwrap()))
        .unwrap();
    let loss = scalar(&out.losses.mean_all().unwrap());
    assert_eq!(loss, std::f64::consts::LN_2, "first DPO loss {loss}");
}
