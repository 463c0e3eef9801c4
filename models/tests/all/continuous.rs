//! Continuous batching on the tiny random Llama with three adapters: rows that join a
//! running batch at different steps, through different adapters (or none), greedy or
//! sampled, give exactly the tokens each gives decoded alone; the KV cache operations
//! behind it keep every row's keys and values.
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use lora_models::{load_model_mixed, DecodeBatch, KvCache, LoadedModel, LoraConfig, Model, RowFinish, RowSpec, SamplingParams};
use rand::{Rng, SeedableRng};

fn tiny_llama_with_adapters() -> Result<LoadedModel> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/golden/models/llama-tiny");
    let mut loaded = load_model_mixed(dir, &Device::Cpu, DType::F32, DType::F32)?;
    for (k, name) in ["a", "b", "c"].iter().enumerate() {
        let cfg = LoraConfig { rank: 4 + 2 * k, alpha: 16.0, ..Default::default() };
        loaded.model.add_adapter(name, &cfg, k as u64)?;
        // B starts at zero (PEFT init): give it values so the adapters differ from the base.
        let mut rng = rand::rngs::StdRng::seed_from_u64(100 + k as u64);
        for (key, var) in loaded.model.adapter_parameters(name)? {
            if key.contains("lora_B") {
                let values: Vec<f32> = (0..var.elem_count()).map(|_| rng.random_range(-0.3..0.3)).collect();
                var.set(&Tensor::from_vec(values, var.dims(), &Device::Cpu)?)?;
            }
        }
    }
    Ok(loaded)
}

fn spec(id: u64, prompt: &[u32], adapter: Option<&str>, temperature: f64, max_new_tokens: usize) -> RowSpec {
    RowSpec {
        id,
        prompt: prompt.to_vec(),
        adapter: adapter.map(str::to_string),
        temperature,
        top_k: 0,
        top_p: 1.0,
        seed: 1000 + id,
        max_new_tokens,
        stop_ids: vec![],
        top_logprobs: 2,
    }
}

/// Run `specs`, admitting spec i at step `arrivals[i]`; every row's tokens and log-probs.
fn run(model: &Model, specs: &[RowSpec], arrivals: &[usize]) -> Result<Vec<(Vec<u32>, Vec<f32>)>> {
    run_in(&mut DecodeBatch::new(), model, specs, arrivals)
}

/// [`run`] on a given batch (one with a prefix cache).
fn run_in(batch: &mut DecodeBatch, model: &Model, specs: &[RowSpec], arrivals: &[usize]) -> Result<Vec<(Vec<u32>, Vec<f32>)>> {
    let mut out = vec![(Vec::new(), Vec::new()); specs.len()];
    let mut step = 0;
    let mut finished = 0;
    while finished < specs.len() {
        let arriving: Vec<RowSpec> = specs.iter().zip(arrivals).filter(|(_, &a)| a == step).map(|(s, _)| s.clone()).collect();
        let errors = batch.admit(model, arriving)?;
        assert!(errors.is_empty(), "{errors:?}");
        let (tokens, errors) = batch.step(model)?;
        assert!(errors.is_empty(), "{errors:?}");
        for t in tokens {
            let o = &mut out[t.id as usize];
            o.0.push(t.token);
            o.1.push(t.logprob);
            assert_eq!(t.top.len(), 2);
            assert!(t.top[0].1 >= t.top[1].1);
            if let Some(f) = t.finish {
                assert_eq!(f, RowFinish::Length);
                finished += 1;
            }
        }
        step += 1;
        assert!(step < 1000);
    }
    assert!(batch.is_empty());
    Ok(out)
}

#[test]
fn a_continuous_batch_with_mixed_adapters_equals_each_row_alone() -> Result<()> {
    let loaded = tiny_llama_with_adapters()?;
    let m = &loaded.model;
    let tok = &loaded.tokenizer;
    let prompts = [
        tok.encode("The quick brown fox")?,
        tok.encode("Once upon a time there was a little")?,
        tok.encode("Hello")?,
        tok.encode("One two three four five six seven eight nine ten")?,
    ];
    let adapters = [None, Some("a"), Some("b"), Some("c")];
    let mut specs = Vec::new();
    for i in 0..10u64 {
        let temperature = if i % 3 == 2 { 0.9 } else { 0.0 };
        specs.push(spec(i, &prompts[i as usize % 4], adapters[(i as usize * 7 / 3) % 4], temperature, 6 + (i as usize % 5)));
    }
    let arrivals = [0, 0, 1, 1, 2, 5, 5, 6, 9, 12];
    let together = run(m, &specs, &arrivals)?;
    for (s, got) in specs.iter().zip(&together) {
        let alone = run(m, std::slice::from_ref(&RowSpec { id: 0, ..s.clone() }), &[0])?;
        assert_eq!(got.0, alone[0].0, "row {} ({:?}, T={}) differs from its solo run", s.id, s.adapter, s.temperature);
        for (x, y) in got.1.iter().zip(&alone[0].1) {
            assert!((x - y).abs() < 1e-4, "row {}: logprob {x} vs {y}", s.id);
        }
    }
    // The adapters matter: the same greedy prompt gives different answers through them.
    let texts: Vec<Vec<u32>> = [None, Some("a"), Some("b")]
        .iter()
        .map(|a| run(m, &[spec(0, &prompts[1], *a, 0.0, 8)], &[0]).map(|o| o[0].0.clone()))
        .collect::<Result<_>>()?;
    assert!(texts[0] != texts[1] || texts[1] != texts[2], "adapters with random B should change some greedy answer");
    Ok(())
}

#[test]
fn a_greedy_base_row_equals_generate_and_n_rows_share_a_prefill() -> Result<()> {
    let loaded = tiny_llama_with_adapters()?;
    let m = &loaded.model;
    let prompt = loaded.tokenizer.encode("Hello world")?;
    let gen = {
        let _route = m.route(&[lora_models::Route { rows: 1, adapter: None, dropout_seed: None }])?;
        m.generate(std::slice::from_ref(&prompt), &SamplingParams { max_new_tokens: 9, ..Default::default() }, &[])?
    };
    let mut batch = DecodeBatch::new();
    // Three rows of one prompt and adapter admitted together (one prefill), sampled with
    // different streams, plus the greedy base row.
    let mut specs: Vec<RowSpec> = (0..3).map(|i| RowSpec { seed: 7 + i, ..spec(i, &prompt, Some("b"), 1.0, 9) }).collect();
    specs.push(spec(3, &prompt, None, 0.0, 9));
    batch.admit(m, specs.clone())?;
    let mut out = vec![Vec::new(); 4];
    while !batch.is_empty() {
        for t in batch.step(m)?.0 {
            out[t.id as usize].push(t.token);
        }
    }
    assert_eq!(out[3], gen[0].tokens);
    for s in &specs[..3] {
        let alone = run(m, &[RowSpec { id: 0, ..s.clone() }], &[0])?;
        assert_eq!(out[s.id as usize], alone[0].0);
    }
    assert!(out[0] != out[1] || out[1] != out[2], "each row draws its own stream");
    Ok(())
}

/// Rows whose prompts begin with the same 40-token system prompt, through different
/// adapters, arriving one after another: with a prefix cache the later ones prefill only
/// what follows the cached blocks, and every row gives the tokens (and log-probs to float
/// rounding) it gives without one.
#[test]
fn prompts_sharing_a_system_prompt_prefill_only_the_rest_and_answer_the_same() -> Result<()> {
    let loaded = tiny_llama_with_adapters()?;
    let tok = &loaded.tokenizer;
    let system = tok.encode("You are a careful assistant. Answer in one short sentence, never more, and say when you do not know the answer to a question.")?;
    assert!(system.len() >= 2 * lora_models::prefix_cache::BLOCK_TOKENS, "{} tokens", system.len());
    let questions = ["What is the capital of France?", "Name a prime number.", "Hello", "Why is the sky blue? Explain briefly."];
    let prompts: Vec<Vec<u32>> = questions.iter().map(|q| Ok([system.clone(), tok.encode(q)?].concat())).collect::<Result<_>>()?;
    let adapters = [None, Some("a"), Some("a"), Some("b"), None, Some("a")];
    let specs: Vec<RowSpec> = (0..6u64).map(|i| spec(i, &prompts[i as usize % 4], adapters[i as usize], if i % 2 == 1 { 0.8 } else { 0.0 }, 5)).collect();
    let arrivals = [0, 1, 2, 3, 4, 7];
    let m = &loaded.model;
    let plain = run(m, &specs, &arrivals)?;
    let mut batch = DecodeBatch::with_prefix_cache(64 << 20);
    let cached = run_in(&mut batch, m, &specs, &arrivals)?;
    for (i, (a, b)) in plain.iter().zip(&cached).enumerate() {
        assert_eq!(a.0, b.0, "row {i}: tokens differ with the prefix cache");
        for (x, y) in a.1.iter().zip(&b.1) {
            assert!((x - y).abs() < 1e-4, "row {i}: logprob {x} vs {y}");
        }
    }
    let stats = batch.prefix_stats().expect("a prefix cache");
    let blocks = system.len() / lora_models::prefix_cache::BLOCK_TOKENS;
    // Rows 2 and 5 (adapter a) and row 4 (the base) find the system prompt's blocks; the
    // first row of each adapter and b's only row find nothing.
    assert_eq!((stats.lookups, stats.hits), (6, 3), "{stats:?}");
    assert!(stats.cached_tokens >= 3 * (blocks * lora_models::prefix_cache::BLOCK_TOKENS) as u64, "{stats:?}");

    // A row reports how much of its prompt came from the cache.
    batch.admit(m, vec![spec(9, &prompts[0], None, 0.0, 3)])?;
    assert!(batch.cached_prompt_tokens(9).unwrap() >= blocks * lora_models::prefix_cache::BLOCK_TOKENS);
    batch.cancel(&[9])?;

    // Adapter a's weights change: its kept blocks are stale until forgotten.
    for (key, var) in loaded.model.adapter_parameters("a")? {
        if key.contains("lora_B") {
            var.set(&var.as_tensor().affine(-2.0, 0.0)?)?;
        }
    }
    let m = &loaded.model;
    let one = [RowSpec { id: 0, ..specs[1].clone() }];
    let fresh = run(m, &one, &[0])?;
    batch.forget_prefixes(Some("a"));
    let after = run_in(&mut batch, m, &one, &[0])?;
    assert_eq!(after[0].0, fresh[0].0);
    for (x, y) in after[0].1.iter().zip(&fresh[0].1) {
        assert!((x - y).abs() < 1e-4, "after forgetting: logprob {x} vs {y}");
    }
    Ok(())
}

#[test]
fn cancelled_rows_leave_and_unknown_adapters_are_row_errors() -> Result<()> {
    let loaded = tiny_llama_with_adapters()?;
    let m = &loaded.model;
    let p = loaded.tokenizer.encode("Hello there")?;
    let mut batch = DecodeBatch::new();
    let errors = batch.admit(m, vec![spec(0, &p, Some("a"), 0.0, 50), spec(1, &p, Some("nope"), 0.0, 5), spec(2, &[], None, 0.0, 5)])?;
    assert_eq!(errors.iter().map(|e| e.id).collect::<Vec<_>>(), vec![1, 2]);
    assert!(errors[0].message.contains("nope"), "{}", errors[0].message);
    assert_eq!(batch.len(), 1);
    batch.step(m)?;
    batch.cancel(&[0])?;
    assert!(batch.is_empty());
    assert_eq!(batch.positions(), 0);
    Ok(())
}

#[test]
fn kv_cache_row_operations_keep_each_rows_values() -> Result<()> {
    let dev = Device::Cpu;
    let make = |rows: usize, len: usize, base: f32| -> Result<KvCache> {
        let mut c = KvCache::with_capacity(len + 2);
        let k = Tensor::arange(0f32, (rows * 2 * len * 3) as f32, &dev)?.affine(1.0, base as f64)?.reshape((rows, 2, len, 3))?;
        c.append(0, &k, &k.neg()?)?;
        Ok(c)
    };
    let mut a = make(2, 4, 0.0)?;
    let b = make(1, 2, 1000.0)?;
    let mut b4 = b;
    b4.pad_front(2)?;
    assert_eq!(b4.len(), 4);
    a.append_rows(b4)?;
    assert_eq!(a.rows(), 3);
    a.retain_rows(&[2, 0])?;
    a.drop_front(2)?;
    assert_eq!(a.len(), 2);
    // Row 0 is b's row (its two real positions), row 1 is a's first row, positions 2..4.
    let (k, v) = a.append(0, &Tensor::zeros((2, 2, 1, 3), DType::F32, &dev)?, &Tensor::zeros((2, 2, 1, 3), DType::F32, &dev)?)?;
    assert_eq!(k.dims(), &[2, 2, 3, 3]);
    assert_eq!(a.len(), 3);
    let v = v.narrow(2, 0, 2)?.neg()?;
    let got_b: Vec<f32> = v.narrow(0, 0, 1)?.flatten_all()?.to_vec1()?;
    let want_b: Vec<f32> = (0..12).map(|i| 1000.0 + i as f32).collect();
    assert_eq!(got_b, want_b);
    let got_a: Vec<f32> = v.narrow(0, 1, 1)?.narrow(2, 0, 2)?.flatten_all()?.to_vec1()?;
    let want_a: Vec<f32> = (0..2).flat_map(|h| (2..4).flat_map(move |p| (0..3).map(move |d| (h * 12 + p * 3 + d) as f32))).collect();
    assert_eq!(got_a, want_a);
    Ok(())
}
