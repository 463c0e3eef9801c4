//! Inference mode (no autograd graph) and the preallocated KV cache, on the tiny
//! random Llama committed under tests/golden/ with a non-zero LoRA adapter.
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use lora_models::{load_model_mixed, KvCache, LoadedModel, LoraConfig, Model};
use rand::{Rng, SeedableRng};

fn tiny_llama(compute: DType) -> Result<LoadedModel> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/golden/models/llama-tiny");
    load_model_mixed(dir, &Device::Cpu, compute, DType::F32)
}

/// Adapters on every projection with random B (PEFT's zero init would make LoRA a
/// no-op and the checks below vacuous).
fn with_adapter(m: &mut Model, dropout: f64) -> Result<()> {
    m.add_lora(&LoraConfig { rank: 4, alpha: 8.0, dropout, ..Default::default() }, 7)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    for (_, var) in m.lora_parameters() {
        let values: Vec<f32> = (0..var.elem_count()).map(|_| rng.random_range(-0.2f32..0.2)).collect();
        var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu)?)?;
    }
    Ok(())
}

fn logits(m: &Model, ids: &[u32]) -> Result<Tensor> {
    let input = Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?;
    let pos = Tensor::arange(0u32, ids.len() as u32, &Device::Cpu)?.unsqueeze(0)?;
    Ok(m.logits(&m.forward_hidden(&input, &pos, None)?)?)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?)
}

/// Leaves the scope through `?` while a guard is alive.
fn fails_inside_inference(m: &Model) -> Result<()> {
    let _guard = m.inference();
    assert!(m.is_inference());
    Err(anyhow::anyhow!("early exit"))?;
    Ok(())
}

#[test]
fn inference_guard_builds_no_graph_and_restores_the_flag() -> Result<()> {
    let mut loaded = tiny_llama(DType::F32)?;
    let m = &mut loaded.model;
    with_adapter(m, 0.0)?;
    let ids = loaded.tokenizer.encode("The quick brown fox jumps")?;

    let tracked = logits(m, &ids)?;
    assert!(tracked.track_op(), "with a LoRA Var the training forward must be tracked");
    assert!(!m.is_inference());
    let untracked = {
        let _guard = m.inference();
        assert!(m.is_inference());
        logits(m, &ids)?
    };
    assert!(!untracked.track_op(), "inference forward recorded an autograd op");
    assert_eq!(max_abs_diff(&tracked, &untracked)?, 0.0);
    assert!(!m.is_inference(), "guard drop must restore training mode");

    assert!(fails_inside_inference(m).is_err());
    assert!(!m.is_inference(), "an early `?` return must restore the flag");

    // Nested or already-on: the guard restores what was there, not `false`.
    m.set_inference(true);
    drop(m.inference());
    assert!(m.is_inference());
    m.set_inference(false);
    Ok(())
}

#[test]
fn inference_mode_drops_lora_dropout() -> Result<()> {
    let mut loaded = tiny_llama(DType::F32)?;
    let m = &mut loaded.model;
    with_adapter(m, 0.3)?;
    let ids = loaded.tokenizer.encode("How many legs does a spider have?")?;
    let without_dropout = logits(m, &ids)?;
    m.set_dropout_seed(Some(5));
    let with_dropout = logits(m, &ids)?;
    assert!(max_abs_diff(&without_dropout, &with_dropout)? > 0.0, "dropout seed had no effect");
    let inference = {
        let _guard = m.inference();
        logits(m, &ids)?
    };
    assert_eq!(max_abs_diff(&without_dropout, &inference)?, 0.0);
    Ok(())
}

/// Prefill a left-padded batch into `cache`, then feed `steps` fixed tokens; returns
/// the last-position logits [b, vocab] after the prefill and after every step.
fn decode_logits(m: &Model, prompts: &[Vec<u32>], steps: usize, cache: &mut KvCache) -> Result<Vec<Tensor>> {
    let longest = prompts.iter().map(Vec::len).max().unwrap();
    let (mut ids, mut positions, mut segments) = (vec![], vec![], vec![]);
    for p in prompts {
        let pad = longest - p.len();
        ids.extend(std::iter::repeat(0).take(pad).chain(p.iter().copied()));
        positions.extend((0..longest).map(|i| i.saturating_sub(pad) as u32));
        segments.push((0..longest).map(|i| u32::from(i >= pad)).collect::<Vec<u32>>());
    }
    let last = |h: Tensor| -> Result<Tensor> { Ok(m.logits(&h.narrow(1, h.dim(1)? - 1, 1)?.squeeze(1)?)?) };
    let flat = |s: &Vec<Vec<u32>>| s.iter().flatten().copied().collect::<Vec<u32>>();
    let input = Tensor::from_vec(ids, (prompts.len(), longest), &Device::Cpu)?;
    let mut out = vec![last(m.forward_cached(&input, &positions, &flat(&segments), cache)?)?];
    let mut next_pos: Vec<u32> = prompts.iter().map(|p| p.len() as u32).collect();
    for step in 0..steps {
        segments.iter_mut().for_each(|s| s.push(1));
        let tokens: Vec<u32> = (0..prompts.len() as u32).map(|r| 5 + 3 * step as u32 + r).collect();
        let input = Tensor::from_vec(tokens, (prompts.len(), 1), &Device::Cpu)?;
        out.push(last(m.forward_cached(&input, &next_pos, &flat(&segments), cache)?)?);
        next_pos.iter_mut().for_each(|p| *p += 1);
    }
    Ok(out)
}

fn preallocated_matches_concatenated(compute: DType) -> Result<()> {
    let mut loaded = tiny_llama(compute)?;
    let m = &mut loaded.model;
    with_adapter(m, 0.0)?;
    let prompts = vec![
        loaded.tokenizer.encode("How many legs does a spider have? The quick")?,
        loaded.tokenizer.encode("The quick brown fox")?,
    ];
    assert_ne!(prompts[0].len(), prompts[1].len());
    let steps = 6;
    let _guard = m.inference();
    let concatenated = decode_logits(m, &prompts, steps, &mut KvCache::new())?;
    let capacity = prompts[0].len() + steps + 3;
    let mut cache = KvCache::with_capacity(capacity);
    let preallocated = decode_logits(m, &prompts, steps, &mut cache)?;
    assert_eq!(cache.len(), prompts[0].len() + steps);
    for (step, (c, p)) in concatenated.iter().zip(&preallocated).enumerate() {
        assert_eq!(c.dims(), &[2, m.config().vocab_size]);
        assert_eq!(max_abs_diff(c, p)?, 0.0, "{compute:?} logits differ at step {step}");
    }
    Ok(())
}

#[test]
fn preallocated_and_concatenated_caches_give_identical_logits() -> Result<()> {
    preallocated_matches_concatenated(DType::F32)
}

#[test]
fn preallocated_cache_is_read_in_place_in_bf16_too() -> Result<()> {
    preallocated_matches_concatenated(DType::BF16)
}

#[test]
fn preallocated_cache_errors_clearly() -> Result<()> {
    let mut loaded = tiny_llama(DType::F32)?;
    let m = &mut loaded.model;
    with_adapter(m, 0.0)?;
    let prompt = vec![loaded.tokenizer.encode("The quick brown fox")?];
    // Full: one position short of prefill + 2 steps.
    let mut cache = KvCache::with_capacity(prompt[0].len() + 1);
    let err = {
        let _guard = m.inference();
        decode_logits(m, &prompt, 2, &mut cache).unwrap_err().to_string()
    };
    assert!(err.contains("KV cache full") && err.contains("capacity"), "{err}");
    // Tracked (training mode with an adapter): in-place writes would cut the graph.
    let err = decode_logits(m, &prompt, 1, &mut KvCache::with_capacity(64)).unwrap_err().to_string();
    assert!(err.contains("Model::inference"), "{err}");
    // The concatenating cache stays differentiable.
    let tracked = decode_logits(m, &prompt, 1, &mut KvCache::new())?;
    assert!(tracked.iter().all(|t| t.track_op()));
    Ok(())
}
