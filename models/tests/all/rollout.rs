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
/// the very rollouts of the prompt copied into every row: tokens and stop flags exactly,
/// log-probs and entropies to 1e-5, greedy and sampled with the same seeds, with prompts of
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
        // 280 positions: past the first 256-key tile. No stop token, so every row runs
        // the whole way.
        RolloutParams { group: 2, max_new_tokens: 270, temperature: 1.0, top_k: 0, top_p: 1.0 },
    ];
    for (i, params) in cases.iter().enumerate() {
        let stop_ids: &[u32] = if i == 3 { &[] } else { &stop };
        let shared = m.rollouts_with(&prompts, &seeds, params, stop_ids, KvLayout::SharedPrompt)?;
        let copied = m.rollouts_with(&prompts, &seeds, params, stop_ids, KvLayout::CopiedPrompt)?;
        // Tokens and stops exactly; log-probs and entropies to float rounding (a key
        // tile ends where the shared prompt ends).
        for (a, b) in shared.iter().flatten().zip(copied.iter().flatten()) {
            assert_eq!((&a.tokens, a.stopped), (&b.tokens, b.stopped), "case {i}: {params:?}");
            for (x, y) in a.logprobs.iter().zip(&b.logprobs).chain(a.entropies.iter().zip(&b.entropies)) {
                assert!((x - y).abs() < 1e-5, "case {i}: {x} vs {y}");
            }
        }
        if i == 1 {
            let lengths: Vec<usize> = shared.iter().flatten().map(|c| c.tokens.len()).collect();
            assert!(lengths.iter().any(|&l| l < params.max_new_tokens), "some row stops early: {lengths:?}");
            assert!(lengths.iter().any(|&l| l != lengths[0]), "rows of different lengths: {lengths:?}");
        }
    }
    Ok(())
}

/// A shared-prompt cache holds each prompt once (its bytes: the prompts plus the rows' own
/// positions), and refuses the row operations of the copied layout with an error.
#[test]
fn shared_prompt_cache_holds_prompts_once_and_refuses_copied_layout_operations() -> Result<()> {
    use lora_models::KvCache;
    let loaded = tiny_llama()?;
    let m = &loaded.model;
    let _inference = m.inference();
    let prompt = loaded.tokenizer.encode("The quick brown fox")?;
    let n = prompt.len();
    let prefill = |cache: &mut KvCache| -> Result<()> {
        let input = Tensor::from_slice(&prompt, (1, n), &Device::Cpu)?;
        let positions: Vec<u32> = (0..n as u32).collect();
        m.forward_cached(&input, &positions, &vec![1; n], cache)?;
        Ok(())
    };
    let (mut copied, mut shared) = (KvCache::with_capacity(n + 8), KvCache::with_capacity(n));
    prefill(&mut copied)?;
    prefill(&mut shared)?;
    copied.repeat_rows(8)?;
    let mut shared = KvCache::share_prompts(shared, vec![0; 8], 8)?;
    assert_eq!((shared.rows(), shared.len()), (8, n));
    // One decode step allocates the rows' own buffers (8 positions each).
    let step = Tensor::from_slice(&[5u32; 8], (8, 1), &Device::Cpu)?;
    m.forward_cached(&step, &[n as u32; 8], &vec![1; 8 * (n + 1)], &mut shared)?;
    let per_position = copied.bytes() / (8 * (n + 8));
    assert_eq!(shared.bytes(), per_position * (n + 8 * 8), "the prompt once, 8 own positions per row");
    assert!(shared.repeat_rows(2).is_err());
    assert!(shared.pad_front(1).is_err());
    assert!(shared.drop_front(1).is_err());
    assert!(KvCache::share_prompts(copied, vec![99], 4).is_err(), "a row of a prompt that does not exist");
    Ok(())
}

/// Streamed rollouts (continuous batching of whole groups, at most `max_rows` rows at
/// once) give the completions of one fixed batch: the same tokens, greedy and sampled,
/// and log-probs to float rounding (the rows that share a GEMM differ), whatever the
/// row bound; every group is handed over once, as soon as it is done.
#[test]
fn streamed_rollouts_equal_batched_rollouts() -> Result<()> {
    let loaded = tiny_llama()?;
    let m = &loaded.model;
    let texts = ["The quick brown fox", "Once upon a time there was a", "Hi", "A long time ago in a galaxy far", "Hello world"];
    let prompts: Vec<Vec<u32>> = texts.iter().map(|t| loaded.tokenizer.encode(t)).collect::<Result<_>>()?;
    let seeds = [11, 22, 33, 44, 55];
    let stop = [loaded.tokenizer.eos_token_ids.clone(), vec![17, 40]].concat();
    for params in [
        RolloutParams { group: 3, max_new_tokens: 20, temperature: 0.0, top_k: 0, top_p: 1.0 },
        RolloutParams { group: 3, max_new_tokens: 20, temperature: 1.0, top_k: 0, top_p: 1.0 },
    ] {
        let batched = m.rollouts(&prompts, &seeds, &params, &stop)?;
        for max_rows in [1, 6, 7, 100] {
            let mut got: Vec<Option<Vec<lora_models::Completion>>> = vec![None; prompts.len()];
            let mut order = Vec::new();
            m.rollouts_streamed(&prompts, &seeds, &params, &stop, max_rows, |p, c| {
                assert!(got[p].is_none(), "prompt {p} handed over twice");
                order.push(p);
                got[p] = Some(c);
                Ok(())
            })?;
            for (p, (want, have)) in batched.iter().zip(&got).enumerate() {
                let have = have.as_ref().unwrap_or_else(|| panic!("prompt {p} never finished (max_rows {max_rows})"));
                assert_eq!(want.len(), have.len());
                for (w, h) in want.iter().zip(have) {
                    assert_eq!((&w.tokens, w.stopped), (&h.tokens, h.stopped), "prompt {p}, max_rows {max_rows}, {params:?}");
                    for (a, b) in w.logprobs.iter().zip(&h.logprobs) {
                        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
                    }
                }
            }
            if max_rows == 6 && params.temperature > 0.0 {
                eprintln!("groups finished in the order {order:?}");
            }
        }
    }
    Ok(())
}
