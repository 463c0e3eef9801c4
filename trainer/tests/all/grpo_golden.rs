//! GRPO loss and advantages against TRL's own code (tests/golden/grpo.json, written by
//! scripts/golden/make_grpo_golden.py): the loss of every loss type at both
//! importance-sampling levels, with and without the KL term, with `delta` and the
//! high-entropy mask, its gradient with respect to the policy log-probs, every metric TRL
//! logs for it (under TRL's names), and the advantages for every reward scaling, at 1e-5.
use candle_core::{Device, Var};
use clap::ValueEnum;
use lora_train::recipes::grpo::advantages::{advantages, ScaleRewards};
use lora_train::recipes::grpo::loss::{denominator, micro_loss, ImportanceSamplingLevel, LossTerms, LossType, PolicyTokens, VespoParams};
use serde_json::Value;

fn golden() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/golden/grpo.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn matrix(v: &Value) -> Vec<Vec<f64>> {
    v.as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()).collect()
}

fn close(a: f64, b: f64, what: &str) {
    assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{what}: {a} vs TRL {b}");
}

fn terms_of(case: &Value, max_completion_length: usize) -> LossTerms {
    let f = |k: &str| case[k].as_f64().unwrap_or_else(|| panic!("{k} missing in {case}"));
    LossTerms {
        loss_type: LossType::from_str(case["loss_type"].as_str().unwrap(), false).unwrap(),
        importance_sampling_level: ImportanceSamplingLevel::from_str(case["importance_sampling_level"].as_str().unwrap(), false).unwrap(),
        epsilon_low: f("epsilon_low"),
        epsilon_high: f("epsilon_high"),
        delta: case["delta"].as_f64(),
        beta: f("beta"),
        max_completion_length,
        sapo_temperature_pos: f("sapo_temperature_pos"),
        sapo_temperature_neg: f("sapo_temperature_neg"),
        vespo: VespoParams { k_pos: f("vespo_k_pos"), lambda_pos: f("vespo_lambda_pos"), k_neg: f("vespo_k_neg"), lambda_neg: f("vespo_lambda_neg") },
        top_entropy_quantile: f("top_entropy_quantile"),
    }
}

#[test]
fn loss_gradient_and_metrics_match_trl_for_every_loss_variant() {
    let g = golden();
    let mask = matrix(&g["mask"]);
    let (logps, old, reference, entropies) = (matrix(&g["logps"]), matrix(&g["old_logps"]), matrix(&g["ref_logps"]), matrix(&g["entropies"]));
    let adv: Vec<f32> = g["advantages"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    let lengths: Vec<usize> = mask.iter().map(|r| r.iter().filter(|&&m| m > 0.0).count()).collect();
    assert!(lengths.contains(&0), "the golden has a fully masked completion");
    // The unmasked tokens, row by row (mask rows are prefixes).
    let flat = |m: &[Vec<f64>]| -> Vec<f32> { m.iter().zip(&lengths).flat_map(|(r, &n)| r[..n].iter().map(|&x| x as f32)).collect() };
    let (lp, old_lp, ref_lp, h) = (flat(&logps), flat(&old), flat(&reference), flat(&entropies));
    let cases = g["losses"].as_array().unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for case in cases {
        let terms = terms_of(case, g["max_completion_length"].as_u64().unwrap() as usize);
        let what = format!(
            "{} {:?} beta {} eps {}/{} delta {:?} q {}",
            case["loss_type"], terms.importance_sampling_level, terms.beta, terms.epsilon_low, terms.epsilon_high, terms.delta, terms.top_entropy_quantile
        );
        seen.insert((case["loss_type"].as_str().unwrap().to_string(), format!("{:?}", terms.importance_sampling_level)));
        let leaf = Var::from_slice(&lp, lp.len(), &Device::Cpu).unwrap();
        let tokens =
            PolicyTokens { logp: leaf.as_tensor(), old_logp: Some(&old_lp), ref_logp: Some(&ref_lp), advantages: &adv, lengths: &lengths, entropies: Some(&h) };
        let (sum, metrics) = micro_loss(&tokens, &terms).unwrap();
        let loss = (sum / denominator(terms.loss_type, 1, lp.len())).unwrap();
        close(loss.to_scalar::<f32>().unwrap() as f64, case["loss"].as_f64().unwrap(), &format!("{what}: loss"));
        let grads = loss.backward().unwrap();
        let grad = grads.get(leaf.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        let expected = flat(&matrix(&case["grad"]));
        for (i, (a, b)) in grad.iter().zip(&expected).enumerate() {
            close(*a as f64, *b as f64, &format!("{what}: d loss / d logp[{i}]"));
        }
        // Masked positions get no gradient in TRL either.
        let trl_grad = matrix(&case["grad"]);
        for (r, &n) in lengths.iter().enumerate() {
            assert!(trl_grad[r][n..].iter().all(|&x| x == 0.0));
        }
        // The same metrics under the same names, nothing more, nothing less.
        let trl: &serde_json::Map<String, Value> = case["metrics"].as_object().unwrap();
        let ours: Vec<&String> = metrics.keys().collect();
        assert_eq!(ours, trl.keys().collect::<std::collections::BTreeSet<_>>().into_iter().collect::<Vec<_>>(), "{what}: metric names");
        for (name, v) in trl {
            close(metrics[name], v.as_f64().unwrap(), &format!("{what}: {name}"));
        }
    }
    for loss_type in LossType::value_variants() {
        let name = loss_type.to_possible_value().unwrap().get_name().to_string();
        assert!(seen.iter().any(|(t, _)| *t == name), "no golden case for --loss-type {name}");
    }
    assert!(seen.iter().any(|(_, level)| level == "Sequence"));
    let clipped = cases.iter().filter(|c| c["metrics"]["clip_ratio/region_mean"].as_f64().is_some_and(|v| v > 0.0)).count();
    assert!(clipped > 10, "the golden must exercise clipping");
}

#[test]
fn advantages_match_trl_including_an_all_equal_group_and_missing_rewards() {
    let g = golden();
    let rewards: Vec<Option<f64>> = g["rewards"].as_array().unwrap().iter().map(Value::as_f64).collect();
    let group = g["num_generations"].as_u64().unwrap() as usize;
    for case in g["advantage_cases"].as_array().unwrap() {
        // The value as TRL's config was given it: a string, or a boolean (the CLI's aliases).
        let given = match &case["scale_rewards"] {
            Value::Bool(b) => b.to_string(),
            v => v.as_str().unwrap().to_string(),
        };
        let scale = ScaleRewards::from_str(&given, false).unwrap();
        assert_eq!(Some(scale), ScaleRewards::from_str(case["resolved"].as_str().unwrap(), false).ok(), "{given}");
        let out = advantages(&rewards, group, scale);
        let expected: Vec<f64> = case["advantages"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        for (i, (a, b)) in out.values.iter().zip(&expected).enumerate() {
            close(*a, *b, &format!("{scale:?}: advantage {i}"));
        }
        close(out.frac_reward_zero_std, case["frac_reward_zero_std"].as_f64().unwrap(), &format!("{scale:?}: frac_reward_zero_std"));
    }
    // The all-equal group (rewards 1, 1, 1, 1) carries no signal under any scaling.
    let group_scaled = advantages(&rewards, group, ScaleRewards::Group);
    assert_eq!(&group_scaled.values[4..8], &[0.0; 4]);
    // A completion without a reward gets advantage 0.
    assert_eq!(group_scaled.values[9], 0.0);
}
