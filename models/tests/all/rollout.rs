//! Rollouts on the tiny random Llama: a completion depends on its own seed only, the
//! log-probabilities are those of a plain forward pass, and greedy rollouts equal
//! `generate` (plus the stop token).
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use lora_models::{load_model_mixed, LoadedModel, Model, RolloutParams, SamplingParams};

fn tiny_llama() -> Result<LoadedModel> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/golden/models/llama-tiny");
    load_model_mixed(dir, &Device::Cpu, DType::F32, DType::F32)
}

fn sampled(group: usize) -> RolloutParams {
    RolloutParams { group, max_new_tokens: 12, temperature: 1.0, top_k: 0, top_p: 1.0 }
}

/// log-softmax of the logits a full forward pass gives each completion token.
fn forward_logprobs(m: &Model, prompt: &[u32], completion: &[u32]) -> Result<Vec<f32>> {
    let ids: Vec<u32> = prompt.iter().chain(completion).copied().collect();
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let pos = Tensor::arange(0u32, ids.len() as u32, &Device::Cpu)?.unsqueeze(0)?;
    let logits = m.logits(&m.forward_hidden(&input, &pos, None)?)?.squeeze(0)?;
    let rows = logits.to_vec2::<f32>()?;
    let logp = |row: &[f32], t: u32| {
        let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let lse = row.iter().map(|&v| ((v - max) as f64).exp()).sum::<f64>().ln() as f32 + max;
        row[t as usize] - lse
    };
    Ok(completion.iter().enumerate().map(|(i, &t)| logp(&rows[prompt.len() + i - 1], t)).collect())
}

#[test]
fn completions_do_not_depend_on_the_batch_and_logprobs_match_a_forward() -> Result<()> {
    let loaded = tiny_llama()?;
    let m = &loaded.model;
    let a = loaded.tokenizer.encode("The quick brown fox")?;
    let b = loaded.tokenizer.encode("Once upon a time there was a")?;
    let stop = [loaded.tokenizer.eos_token_ids.clone(), vec![17]].concat();
    let both = m.rollouts(&[a.clone(), b.clone()], &[11, 22], &sampled(3), &stop)?;
    let alone = m.rollouts(std::slice::from_ref(&b), &[22], &sampled(3), &stop)?;
    assert_eq!(both[1].iter().map(|c| &c.tokens).collect::<Vec<_>>(), alone[0].iter().map(|c| &c.tokens).collect::<Vec<_>>());
    assert_ne!(both[1][0].tokens, both[1][1].tokens, "the G rows of a prompt draw different streams");
    for (prompt, group) in [(&a, &both[0]), (&b, &both[1])] {
        for c in group {
            assert_eq!(c.tokens.len(), c.logprobs.len());
            assert_eq!(c.stopped, stop.contains(c.tokens.last().unwrap()), "the stop token ends the completion");
            let reference = forward_logprobs(m, prompt, &c.tokens)?;
            for (x, y) in c.logprobs.iter().zip(&reference) {
                assert!((x - y).abs() < 1e-4, "rollout logprob {x} vs forward {y}");
            }
        }
    }
    Ok(())
}

#[test]
fn greedy_rollouts_equal_generate() -> Result<()> {
    let loaded = tiny_llama()?;
    let m = &loaded.model;
    let prompt = loaded.tokenizer.encode("Hello world")?;
    let greedy = RolloutParams { temperature: 0.0, ..sampled(2) };
    let out = m.rollouts(std::slice::from_ref(&prompt), &[0], &greedy, &[])?;
    let gen = m.generate(&[prompt], &SamplingParams { max_new_tokens: 12, ..Default::default() }, &[])?;
    assert_eq!(out[0][0].tokens, gen[0].tokens);
    assert_eq!(out[0][1].tokens, gen[0].tokens);
    Ok(())
}

/// The prompts' keys and values held once per prompt (read in place by its G rows) give
/// the very rollouts of the prompt copied into every row: tokens, log-probs, entropies
/// and stop flags bit for bit, greedy and sampled with the same seeds, with prompts of
/// different lengths (left padding), rows that stop early while others go on, and
/// completions long enough that a key tile straddles prompt and completion.
#[test]
fn shared_prompt_rollouts_equal_copied_prompt_rollouts() -> Result<()> {
    use lora_models::KvLayout;
    let loaded = tiny_llama()?;
    let m = &loaded.model;
    let prompts = vec![
        loaded.tokenizer.encode("The quick brown fox")?,
        loaded.tokenizer.encode("Once upon a time there was a")?,
        loaded.tokenizer.encode("Hi")?,
    ];
    let seeds = [11, 22, 33];
    let stop = [loaded.tokenizer.eos_token_ids.clone(), vec![17, 40]].concat();
    let cases = [
        RolloutParams { group: 4, max_new_tokens: 24, temperature: 0.0, top_k: 0, top_p: 1.0 },
        RolloutParams { group: 4, max_new_tokens: 24, temperature: 1.0, top_k: 0, top_p: 1.0 },
        RolloutParams { group: 3, max_new_tokens: 20, temperature: 0.8, top_k: 20, top_p: 0.9 },
        // 280 positions: the first 256-key tile holds the prompt and the start of the
        // completion. No stop token, so every row runs the whole way.
        RolloutParams { group: 2, max_new_tokens: 270, temperature: 1.0, top_k: 0, top_p: 1.0 },
    ];
    for (i, params) in cases.iter().enumerate() {
        let stop_ids: &[u32] = if i == 3 { &[] } else { &stop };
        let shared = m.rollouts_with(&prompts, &seeds, params, stop_ids, KvLayout::SharedPrompt)?;
        let copied = m.rollouts_with(&prompts, &seeds, params, stop_ids, KvLayout::CopiedPrompt)?;
        assert_eq!(shared, copied, "case {i}: {params:?}");
        if i == 1 {
            let lengths: Vec<usize> = shared.iter().flatten().map(|c| c.tokens.len()).collect();
            assert!(lengths.iter().any(|&l| l < params.max_new_tokens), "some row stops early: {lengths:?}");
            assert!(lengths.iter().any(|&l| l != lengths[0]), "rows of different lengths: {lengths:?}");
        }
    }
    Ok(())
}
