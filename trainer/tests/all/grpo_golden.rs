//! GRPO loss and advantages against TRL's own code (tests/golden/grpo.json, written by
//! scripts/golden/make_grpo_golden.py): the loss of every loss type, with and without
//! the KL term, its gradient with respect to the policy log-probs, the clip ratios, and
//! the advantages for every reward scaling, at 1e-5.
use candle_core::{Device, Var};
use lora_train::recipes::grpo::advantages::{advantages, ScaleRewards};
use lora_train::recipes::grpo::loss::{denominator, micro_loss, LossTerms, LossType, PolicyTokens};
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

#[test]
fn loss_and_gradient_match_trl_for_every_loss_type() {
    let g = golden();
    let mask = matrix(&g["mask"]);
    let (logps, old, reference) = (matrix(&g["logps"]), matrix(&g["old_logps"]), matrix(&g["ref_logps"]));
    let adv: Vec<f32> = g["advantages"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    let lengths: Vec<usize> = mask.iter().map(|r| r.iter().filter(|&&m| m > 0.0).count()).collect();
    // The unmasked tokens, row by row (mask rows are prefixes).
    let flat = |m: &[Vec<f64>]| -> Vec<f32> { m.iter().zip(&lengths).flat_map(|(r, &n)| r[..n].iter().map(|&x| x as f32)).collect() };
    let (lp, old_lp, ref_lp) = (flat(&logps), flat(&old), flat(&reference));
    let cases = g["losses"].as_array().unwrap();
    assert_eq!(cases.len(), 16);
    for case in cases {
        let loss_type = match case["loss_type"].as_str().unwrap() {
            "dapo" => LossType::Dapo,
            "grpo" => LossType::Grpo,
            "bnpo" => LossType::Bnpo,
            "dr_grpo" => LossType::DrGrpo,
            other => panic!("{other}"),
        };
        let terms = LossTerms {
            loss_type,
            epsilon_low: case["epsilon_low"].as_f64().unwrap(),
            epsilon_high: case["epsilon_high"].as_f64().unwrap(),
            beta: case["beta"].as_f64().unwrap(),
            max_completion_length: g["max_completion_length"].as_u64().unwrap() as usize,
        };
        let what = format!("{} beta {} eps_high {}", case["loss_type"], terms.beta, terms.epsilon_high);
        let leaf = Var::from_slice(&lp, lp.len(), &Device::Cpu).unwrap();
        let tokens = PolicyTokens { logp: leaf.as_tensor(), old_logp: Some(&old_lp), ref_logp: Some(&ref_lp), advantages: &adv, lengths: &lengths };
        let (sum, stats) = micro_loss(&tokens, &terms).unwrap();
        let loss = (sum / denominator(loss_type, 1, lp.len())).unwrap();
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
        close(stats.clip_ratio_low, case["clip_ratio_low"].as_f64().unwrap(), &format!("{what}: clip low"));
        close(stats.clip_ratio_high, case["clip_ratio_high"].as_f64().unwrap(), &format!("{what}: clip high"));
        close(stats.clip_ratio_region, case["clip_ratio_region"].as_f64().unwrap(), &format!("{what}: clip region"));
        if let Some(kl) = case["kl"].as_f64() {
            close(stats.kl, kl, &format!("{what}: kl"));
        }
        assert!(stats.clip_ratio_region > 0.0, "the golden must exercise clipping");
    }
}

#[test]
fn advantages_match_trl_including_an_all_equal_group_and_missing_rewards() {
    let g = golden();
    let rewards: Vec<Option<f64>> = g["rewards"].as_array().unwrap().iter().map(Value::as_f64).collect();
    let group = g["num_generations"].as_u64().unwrap() as usize;
    for case in g["advantage_cases"].as_array().unwrap() {
        let scale = match case["scale_rewards"].as_str().unwrap() {
            "group" => ScaleRewards::Group,
            "batch" => ScaleRewards::Batch,
            _ => ScaleRewards::None,
        };
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
