//! Sweep candidates: `--candidate rank=8,lr=1.5e-4` (any shared training flag as
//! key=value), `--grid rank=8,16 --grid lr=1e-4,5e-5` (their Cartesian product), or the
//! hosted services' three defaults. A candidate is the shared options with its keys
//! overlaid, so it resolves exactly as the same `sft` command line would.
use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};

use crate::config::TrainOptions;

/// The default candidates (rank, learning rate), alpha = 2 x rank.
pub const DEFAULT_CANDIDATES: [(usize, &str); 3] = [(8, "1.5e-4"), (16, "1e-4"), (32, "5e-5")];

/// Keys a candidate may not set: they are the sweep's, not a candidate's.
const SWEEP_OWNED: [&str; 6] = ["model", "dataset", "eval_dataset", "eval_split", "output", "device"];

#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    /// Readable and unique: `r8-lr1.5e-4`.
    pub name: String,
    /// The keys it sets, as given (canonical option names).
    pub overrides: BTreeMap<String, String>,
}

/// Short names users type, to the option names of [`TrainOptions`].
fn canonical_key(key: &str) -> String {
    match key.trim() {
        "lr" => "learning_rate".into(),
        "rank" | "r" => "lora_rank".into(),
        "alpha" => "lora_alpha".into(),
        "dropout" => "lora_dropout".into(),
        k => k.replace('-', "_"),
    }
}

/// The short label of a key in a candidate name.
fn name_label(key: &str) -> String {
    match key {
        "lora_rank" => "r".into(),
        "learning_rate" => "lr".into(),
        "lora_alpha" => "alpha".into(),
        k => k.replace('_', "-"),
    }
}

/// `rank=8,lr=1.5e-4` -> {lora_rank: 8, learning_rate: 1.5e-4}.
pub fn parse_candidate(spec: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').with_context(|| format!("--candidate `{spec}`: `{part}` is not key=value"))?;
        out.insert(canonical_key(k), v.trim().to_string());
    }
    if out.is_empty() {
        bail!("--candidate `{spec}` sets nothing");
    }
    Ok(out)
}

/// `rank=8,16` -> (lora_rank, [8, 16]).
pub fn parse_grid(spec: &str) -> Result<(String, Vec<String>)> {
    let (k, vs) = spec.split_once('=').with_context(|| format!("--grid `{spec}`: expected key=v1,v2,..."))?;
    let values: Vec<String> = vs.split(',').map(|v| v.trim().to_string()).filter(|v| !v.is_empty()).collect();
    if values.is_empty() {
        bail!("--grid `{spec}` lists no values");
    }
    Ok((canonical_key(k), values))
}

/// Explicit candidates, then the grid's product, or the defaults when neither is given.
/// Every candidate is checked against the shared options now, so a typo fails before any
/// training starts.
pub fn build(base: &TrainOptions, explicit: &[String], grid: &[String]) -> Result<Vec<Candidate>> {
    let mut sets: Vec<BTreeMap<String, String>> = explicit.iter().map(|c| parse_candidate(c)).collect::<Result<_>>()?;
    if !grid.is_empty() {
        let mut product: Vec<BTreeMap<String, String>> = vec![BTreeMap::new()];
        for g in grid {
            let (key, values) = parse_grid(g)?;
            product = product
                .into_iter()
                .flat_map(|set| {
                    let key = &key;
                    values.iter().map(move |v| {
                        let mut s = set.clone();
                        s.insert(key.clone(), v.clone());
                        s
                    })
                })
                .collect();
        }
        sets.extend(product);
    }
    if sets.is_empty() {
        sets = DEFAULT_CANDIDATES
            .iter()
            .map(|(r, lr)| BTreeMap::from([("lora_rank".to_string(), r.to_string()), ("learning_rate".to_string(), lr.to_string())]))
            .collect();
    }
    let mut out: Vec<Candidate> = Vec::new();
    for overrides in sets {
        apply(base, &overrides)?;
        // Rank and learning rate lead the name, as people say them: `r8-lr1.5e-4`.
        let mut keys: Vec<&String> = overrides.keys().collect();
        keys.sort_by_key(|k| (k.as_str() != "lora_rank", k.as_str() != "learning_rate", k.as_str()));
        let mut name: String = keys.iter().map(|k| format!("{}{}", name_label(k), overrides[*k])).collect::<Vec<_>>().join("-");
        name.retain(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+'));
        let base_name = name.clone();
        let mut n = 2;
        while out.iter().any(|c| c.name == name) {
            name = format!("{base_name}-{n}");
            n += 1;
        }
        out.push(Candidate { name, overrides });
    }
    Ok(out)
}

/// The shared options with a candidate's keys overlaid. Values parse as JSON numbers or
/// booleans when they look like one, else as strings (so `target_modules=q,v` works).
pub fn apply(base: &TrainOptions, overrides: &BTreeMap<String, String>) -> Result<TrainOptions> {
    let mut v = serde_json::to_value(base)?;
    let map = v.as_object_mut().context("options are an object")?;
    for (k, raw) in overrides {
        if SWEEP_OWNED.contains(&k.as_str()) {
            bail!("a candidate cannot set `{k}`: it is shared by the whole sweep (give it as --{})", k.replace('_', "-"));
        }
        if !map.contains_key(k) {
            bail!("unknown candidate key `{k}` (use a training flag name such as lr, rank, alpha, epochs, batch_size, warmup_ratio)");
        }
        // Commas separate a candidate's keys, so a list value joins with `+`.
        let raw = &if k == "target_modules" { raw.replace('+', ",") } else { raw.clone() };
        let value = serde_json::from_str::<serde_json::Value>(raw).ok().filter(|j| j.is_number() || j.is_boolean()).unwrap_or(serde_json::Value::String(raw.clone()));
        map.insert(k.clone(), value);
    }
    serde_json::from_value(v).map_err(|e| anyhow::anyhow!("candidate {}: {e}", overrides.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> TrainOptions {
        TrainOptions { model: Some("m".into()), dataset: Some("d.jsonl".into()), output: Some("o".into()), ..Default::default() }
    }

    #[test]
    fn defaults_are_the_three_hosted_configurations_with_readable_names() {
        let c = build(&base(), &[], &[]).unwrap();
        let names: Vec<&str> = c.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["r8-lr1.5e-4", "r16-lr1e-4", "r32-lr5e-5"]);
        let cfg = apply(&base(), &c[2].overrides).unwrap().resolve().unwrap();
        assert_eq!((cfg.lora_rank, cfg.lora_alpha, cfg.learning_rate), (32, 64.0, 5e-5));
    }

    #[test]
    fn grid_is_the_cartesian_product_and_candidates_come_first() {
        let c = build(&base(), &["rank=4,lr=1e-3".into()], &["rank=8,16".into(), "lr=1e-4,5e-5".into()]).unwrap();
        assert_eq!(c.len(), 5);
        assert_eq!(c[0].overrides["lora_rank"], "4");
        let cfg = apply(&base(), &c[4].overrides).unwrap().resolve().unwrap();
        assert_eq!((cfg.lora_rank, cfg.learning_rate), (16, 5e-5));
    }

    #[test]
    fn any_training_flag_is_a_key_and_mistakes_are_errors() {
        assert!(parse_candidate("target_modules=q,v").is_err(), "a comma separates keys; modules join with +");
        let o = apply(&base(), &parse_candidate("target_modules=q+v").unwrap()).unwrap().resolve().unwrap();
        assert_eq!(o.target_modules, ["q_proj", "v_proj"]);
        assert_eq!(apply(&base(), &parse_candidate("lr=1e+3").unwrap()).unwrap().learning_rate, Some(1e3));
        let o = apply(&base(), &parse_candidate("epochs=2,warmup-ratio=0.1,lr_scheduler=linear").unwrap()).unwrap().resolve().unwrap();
        assert_eq!((o.epochs, o.warmup_ratio), (Some(2), 0.1));
        assert!(format!("{:#}", build(&base(), &["lerning_rate=1".into()], &[]).unwrap_err()).contains("lerning_rate"));
        assert!(format!("{:#}", build(&base(), &["dataset=x".into()], &[]).unwrap_err()).contains("shared by the whole sweep"));
        assert!(build(&base(), &["rank=abc".into()], &[]).is_err());
        let dup = build(&base(), &["rank=8".into(), "r=8".into()], &[]).unwrap();
        assert_eq!(dup[1].name, "r8-2");
    }
}
