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
