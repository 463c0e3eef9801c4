//! A recipe: a training method as something that starts on a base that is already loaded.
//! `sft`, `dpo`, `orpo` and `grpo` alone ([`run_alone`]: load the base, start one run,
//! train it) and a sweep worker (load the base once, start every candidate, train them
//! packed in one forward pass: `sweep/worker.rs`) drive the same four steps:
//!
//! 1. [`Recipe::prepare`]: checks and adjustments of the configuration (nothing read yet),
//!    shared flags the method does not use refused ([`Recipe::unused_settings`]);
//! 2. the run directory: fresh, or `--resume` with the same configuration and the same
//!    method options ([`Recipe::options`], kept in `run.json`);
//! 3. [`Recipe::read`]: the data files, read and checked before the model loads (cheaper);
//! 4. [`Recipe::build`]: the method over the loaded base (tokenized data, evaluators,
//!    reference log-probs), then `Run::start` attaches the run's adapter and
//!    [`Recipe::attached`] finishes what needs it (DPO's copy of its starting adapter).
use anyhow::Result;
use lora_models::{Model, TokenizerBundle};
use serde_json::Value;

use crate::config::{CheckpointingArg, TrainConfig, TrainOptions};
use crate::engine::{self, Method, Run, RunOptions, RunSummary};
use crate::placement::PlacementArgs;

pub trait Recipe {
    type Method: Method;
    /// The data files as read and checked before the model loads.
    type Data;

    /// The command (`sft`, `dpo`, ...), for messages.
    fn name(&self) -> &'static str;
    /// The method's own options (not in `TrainConfig`): written to `run.json`, equal on
    /// `--resume`. The method built from this recipe reports the same (`Method::options`).
    fn options(&self) -> Value;
    /// `TrainConfig` fields this method does not use: a run that sets one (to other than
    /// its default) is refused with the flag's name instead of silently ignoring it.
    fn unused_settings(&self) -> &'static [&'static str] {
        &[]
    }
    /// Checks and adjustments of `cfg` before anything is read or written.
    fn prepare(&self, _cfg: &mut TrainConfig) -> Result<()> {
        Ok(())
    }
    /// Read and check the run's data (before the model loads).
    fn read(&self, cfg: &TrainConfig) -> Result<Self::Data>;
    /// The method of the run whose adapter will be `name`, over `model`; and the data's
    /// fingerprint (a resumed run refuses other data).
    fn build(&self, data: Self::Data, model: &mut Model, bundle: &TokenizerBundle, cfg: &TrainConfig, name: &str) -> Result<(Self::Method, String)>;
    /// After `Run::start` attached adapter `name` (`fresh`: a new adapter, not a resumed one).
    fn attached(&self, _model: &Model, _cfg: &TrainConfig, _name: &str, _fresh: bool) -> Result<()> {
        Ok(())
    }
}

/// Train one adapter with `recipe` as `cfg` says; the summary `--json` prints.
pub fn run_alone<R: Recipe>(recipe: &R, cfg: &TrainConfig, opts: &RunOptions) -> Result<RunSummary> {
    let cfg = prepared(recipe, cfg)?;
    let resume_from = engine::prepare_run_dir(&cfg.output, &cfg, &recipe.options(), opts.resume)?;
    let data = recipe.read(&cfg)?;
    let (mut model, bundle, base_source) = load_base(&cfg)?;
    let name = lora_models::DEFAULT_ADAPTER;
    let (method, fingerprint) = recipe.build(data, &mut model, &bundle, &cfg, name)?;
    let fresh = resume_from.is_none();
    let run = Run::start(&mut model, name, cfg.clone(), method, fingerprint, resume_from, &base_source, opts)?;
    recipe.attached(&model, &cfg, name, fresh)?;
    engine::train_one(&model, run)
}

/// `cfg` after the recipe's checks (unused shared flags refused) and adjustments.
pub fn prepared<R: Recipe>(recipe: &R, cfg: &TrainConfig) -> Result<TrainConfig> {
    refuse_unused(recipe.unused_settings(), cfg, recipe.name())?;
    let mut cfg = cfg.clone();
    recipe.prepare(&mut cfg)?;
    Ok(cfg)
}

/// Refuse the shared settings in `unused` that `cfg` sets to other than their defaults.
pub fn refuse_unused(unused: &[&str], cfg: &TrainConfig, method: &str) -> Result<()> {
    if unused.is_empty() {
        return Ok(());
    }
    let defaults = TrainOptions { model: Some(cfg.model.clone()), dataset: Some(cfg.dataset.clone()), output: Some(cfg.output.clone()), ..Default::default() }.resolve()?;
    let (now, default) = (serde_json::to_value(cfg)?, serde_json::to_value(&defaults)?);
    let set: Vec<String> = unused.iter().filter(|k| now.get(**k) != default.get(**k)).map(|k| format!("--{}", k.replace('_', "-"))).collect();
    if !set.is_empty() {
        anyhow::bail!("{} does not apply to {method} (it would be ignored); leave it out", set.join(", "));
    }
    Ok(())
}

/// The frozen base model of a run on its device, its tokenizer, and where it came from
/// (written into the adapter's `base_model_name_or_path`). The one loader of every
/// training command, sweep worker and data-parallel replica.
pub fn load_base(cfg: &TrainConfig) -> Result<(Model, TokenizerBundle, String)> {
    load_base_on(cfg, &cfg.device)
}

/// [`load_base`] on `device` (one replica of a data-parallel run, a sweep group's device).
pub fn load_base_on(cfg: &TrainConfig, device: &str) -> Result<(Model, TokenizerBundle, String)> {
    tracing::info!("loading {} ({device}, compute {:?}, base weights {:?}, base quantization {})", cfg.model, cfg.dtype, cfg.base_dtype, cfg.base_quant);
    let loaded = PlacementArgs::of_run(cfg, device).load(&cfg.model)?;
    // `auto` is decided by the engine's memory check before step 1.
    loaded.model.set_gradient_checkpointing(cfg.gradient_checkpointing == CheckpointingArg::On);
    Ok((loaded.model, loaded.tokenizer, loaded.source))
}
