//! Several generating "sides" over as few loaded models as possible: `pairs` (strong and
//! weak sampler) and `compare` (fine-tuned, baseline, judge). A side is a base model plus
//! at most one adapter, named `MODEL[+ADAPTER]`. Sides that name the same base share one
//! loaded copy (the base is the memory; an adapter is a few MB), each side holding its
//! adapter under its own name and routing every row to it while it generates.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lora_models::{LoadedModel, RolloutParams, RoutingGuard};
use serde::Serialize;

use crate::placement::PlacementArgs;
use crate::prompts::Prompt;
use crate::recipes::grpo::rollouts::prompt_seed;

/// `MODEL[+ADAPTER]`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelRef {
    pub model: String,
    pub adapter: Option<PathBuf>,
}

impl ModelRef {
    /// A string that names an existing path is a model (paths may contain `+`);
    /// otherwise the text after the last `+` is the adapter directory.
    pub fn parse(s: &str) -> Result<Self> {
        if s.is_empty() {
            bail!("empty model reference (expected MODEL or MODEL+ADAPTER)");
        }
        if Path::new(s).exists() {
            return Ok(ModelRef { model: s.to_string(), adapter: None });
        }
        match s.rsplit_once('+') {
            Some((m, a)) if m.is_empty() || a.is_empty() => bail!("`{s}`: expected MODEL or MODEL+ADAPTER"),
            Some((m, a)) => Ok(ModelRef { model: m.to_string(), adapter: Some(PathBuf::from(a)) }),
            None => Ok(ModelRef { model: s.to_string(), adapter: None }),
        }
    }

    /// `MODEL` or `MODEL+ADAPTER`, for reports.
    pub fn display(&self) -> String {
        match &self.adapter {
            Some(a) => format!("{}+{}", self.model, a.display()),
            None => self.model.clone(),
        }
    }
}

/// One side: which loaded model, and the adapter name it routes to (none = the base).
#[derive(Clone, Debug)]
pub struct Side {
    pub label: String,
    pub spec: ModelRef,
    model: usize,
    adapter: Option<String>,
}

/// The loaded models, one per distinct base.
#[derive(Default)]
pub struct Models {
    loaded: Vec<(String, LoadedModel)>,
}

impl Models {
    /// Adds a side, loading its base unless an earlier side already did. `label` names the
    /// adapter inside the model, so it must be unique among the sides.
    pub fn add(&mut self, label: &str, spec: &ModelRef, placement: &PlacementArgs) -> Result<Side> {
        let index = match self.loaded.iter().position(|(m, _)| m == &spec.model) {
            Some(i) => i,
            None => {
                self.loaded.push((spec.model.clone(), placement.load(&spec.model)?));
                self.loaded.len() - 1
            }
        };
        if let Some(dir) = &spec.adapter {
            self.loaded[index].1.model.load_named_adapter(label, dir).with_context(|| format!("{label}: loading adapter {}", dir.display()))?;
        }
        Ok(Side { label: label.to_string(), spec: spec.clone(), model: index, adapter: spec.adapter.as_ref().map(|_| label.to_string()) })
    }

    pub fn get(&self, side: &Side) -> &LoadedModel {
        &self.loaded[side.model].1
    }

    /// Routes every row of the side's model to the side's adapter (or to none) until the
    /// guard drops.
    pub fn route(&self, side: &Side) -> Result<RoutingGuard> {
        let model = &self.get(side).model;
        match &side.adapter {
            Some(name) => model.route_all(name),
            None => Ok(model.adapters_off()),
        }
    }

    /// How many bases are in memory (shared sides load one).
    pub fn count(&self) -> usize {
        self.loaded.len()
    }
}

/// `params.group` decoded completions per prompt, decoded as a stream of at most
/// `batch_size` prompts' rows: a prompt joins as soon as another has finished
/// (`Model::rollouts_streamed`), so no prompt waits for the longest answer of a fixed
/// batch. Prompt i of stream `stream` draws from `prompt_seed(seed, stream, i)`, so an
/// answer depends on its index and seed only, never on its batch-mates; different
/// streams (the sides of `pairs`) never share a random sequence.
pub fn complete(loaded: &LoadedModel, prompts: &[Prompt], params: &RolloutParams, seed: u64, stream: usize, batch_size: usize, bar: &ProgressBar) -> Result<Vec<Vec<String>>> {
    let bundle = &loaded.tokenizer;
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
    let seeds: Vec<u64> = (0..prompts.len()).map(|i| prompt_seed(seed, stream, i)).collect();
    let mut out: Vec<Vec<String>> = vec![Vec::new(); prompts.len()];
    let rows = batch_size.max(1) * params.group.max(1);
    loaded.model.rollouts_streamed(&ids, &seeds, params, &bundle.eos_token_ids, rows, |i, group| {
        out[i] = group.iter().map(|c| bundle.decode(&c.tokens, true)).collect::<Result<Vec<_>>>()?;
        bar.inc(1);
        Ok(())
    })?;
    Ok(out)
}

/// One answer per prompt (`params.group` is taken as 1).
pub fn complete_one(loaded: &LoadedModel, prompts: &[Prompt], params: &RolloutParams, seed: u64, stream: usize, batch_size: usize, bar: &ProgressBar) -> Result<Vec<String>> {
    let one = RolloutParams { group: 1, ..params.clone() };
    let groups = complete(loaded, prompts, &one, seed, stream, batch_size, bar)?;
    Ok(groups.into_iter().map(|g| g.into_iter().next().unwrap_or_default()).collect())
}

/// A progress bar on stderr for `len` items, hidden when stderr is not a terminal (logs
/// of batch jobs get the log lines instead).
pub fn progress_bar(len: usize, prefix: &str) -> ProgressBar {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len as u64), ProgressDrawTarget::stderr());
    bar.set_style(ProgressStyle::with_template("{prefix} [{bar:30.cyan/blue}] {pos}/{len} ETA {eta}").unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> "));
    bar.set_prefix(prefix.to_string());
    bar
}

/// The sampling flags of the commands that generate one answer setting for every side
/// (`eval --evaluator`, `compare`); `pairs` has a set per side instead.
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct GenerationArgs {
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Keep the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling mass (1.0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Seeds the random stream of every prompt (prompt i draws from (seed, i)).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl GenerationArgs {
    /// `group` answers per prompt with these settings, checked.
    pub fn params(&self, group: usize) -> Result<RolloutParams> {
        let p = RolloutParams { group, max_new_tokens: self.max_new_tokens, temperature: self.temperature, top_k: self.top_k, top_p: self.top_p };
        check_params("--", &p)?;
        Ok(p)
    }
}

/// Sampling flags checked the same way everywhere (`what` names the flags' side).
pub fn check_params(what: &str, p: &RolloutParams) -> Result<()> {
    // NaN fails every comparison, so it is refused too.
    if p.temperature.is_nan() || p.temperature < 0.0 {
        bail!("{what}temperature must be >= 0, got {}", p.temperature);
    }
    if p.top_p.is_nan() || p.top_p <= 0.0 || p.top_p > 1.0 {
        bail!("{what}top-p must be in (0, 1], got {}", p.top_p);
    }
    if p.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_refs() {
        let r = ModelRef::parse("Org/Model+runs/a").unwrap();
        assert_eq!(r, ModelRef { model: "Org/Model".into(), adapter: Some("runs/a".into()) });
        assert_eq!(r.display(), "Org/Model+runs/a");
        assert_eq!(ModelRef::parse("Org/Model").unwrap().adapter, None);
        assert!(ModelRef::parse("m+").is_err() && ModelRef::parse("+a").is_err() && ModelRef::parse("").is_err());
        // An existing path with a `+` in its name is a model, not MODEL+ADAPTER.
        let dir = tempfile::tempdir().unwrap();
        let odd = dir.path().join("owner+name");
        std::fs::create_dir(&odd).unwrap();
        let s = odd.display().to_string();
        assert_eq!(ModelRef::parse(&s).unwrap(), ModelRef { model: s.clone(), adapter: None });
    }
}
