//! Which runs (a sweep's candidates) can share something: a loaded base, a tokenized data set, a
//! step count. One rule instead of three hand-written keys (one of which forgot `packing`,
//! so `--grid packing=true,false` gave the second candidate the first one's step count):
//! a key is the candidate's [`TrainConfig`] as JSON, reduced to the fields that decide
//! the shared thing.
//!
//! The data and step keys keep every field EXCEPT those listed as unable to change what is
//! shared: a field added to `TrainConfig` later splits the cache until someone decides it
//! may be shared, instead of handing a candidate another candidate's data. The base key is
//! the other way round (the fields the loaded model depends on), since every training
//! field (learning rate, rank, ...) must be free to differ within one packed group.
use serde_json::Value;

use crate::config::TrainConfig;

/// What a candidate shares with the others that have an equal key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ShareKey(String);

/// Fields that change neither the tokenized data nor how it is batched.
const TRAINING_ONLY: &[&str] = &[
    "output",
    "steps",
    "epochs",
    "learning_rate",
    "lr_scheduler",
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "use_rslora",
    "checkpoint_interval",
    "save_total_limit",
    "eval_interval",
    "report_to",
    // The model is loaded once per group; these decide the base, not the data.
    "dtype",
    "base_dtype",
    "base_quant",
    "gradient_checkpointing",
    "device",
];

/// Fields that decide how the tokenized data is batched, not the tokens themselves.
const BATCHING: &[&str] = &["packing", "group_by_length", "batch_size", "gradient_accumulation_steps"];

/// Fields the loaded base depends on (candidates packed onto one model share it).
const BASE: &[&str] = &["model", "dtype", "base_dtype", "base_quant", "gradient_checkpointing", "device", "max_sequence_length"];

impl ShareKey {
    /// Candidates with equal keys tokenize the same data (the sweep worker shares it).
    pub fn data(cfg: &TrainConfig) -> Self {
        Self::without(cfg, &[TRAINING_ONLY, BATCHING].concat())
    }

    /// Candidates with equal keys have the same steps per epoch and tokens (the planner's
    /// estimate is computed once per key).
    pub fn steps(cfg: &TrainConfig) -> Self {
        Self::without(cfg, TRAINING_ONLY)
    }

    /// Candidates with equal keys can be packed over one loaded base.
    pub fn base(cfg: &TrainConfig) -> Self {
        let all = to_map(cfg);
        let kept: serde_json::Map<String, Value> = BASE.iter().map(|k| (k.to_string(), all.get(*k).cloned().unwrap_or(Value::Null))).collect();
        ShareKey(Value::Object(kept).to_string())
    }

    pub fn into_string(self) -> String {
        self.0
    }

    fn without(cfg: &TrainConfig, ignored: &[&str]) -> Self {
        let mut all = to_map(cfg);
        for k in ignored {
            all.remove(*k);
        }
        ShareKey(Value::Object(all).to_string())
    }
}

fn to_map(cfg: &TrainConfig) -> serde_json::Map<String, Value> {
    match serde_json::to_value(cfg) {
        Ok(Value::Object(m)) => m,
        // TrainConfig is a plain struct of plain fields: it always serialises to an object.
        _ => serde_json::Map::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> TrainConfig {
        crate::config::TrainOptions { model: Some("m".into()), dataset: Some("d.jsonl".into()), output: Some("o".into()), ..Default::default() }.resolve().unwrap()
    }

    #[test]
    fn packing_changes_the_step_key_but_not_the_data_key() {
        let (a, b) = (cfg(), TrainConfig { packing: true, ..cfg() });
        assert_eq!(ShareKey::data(&a), ShareKey::data(&b));
        assert_ne!(ShareKey::steps(&a), ShareKey::steps(&b), "packing changes the step count");
        assert_eq!(ShareKey::base(&a), ShareKey::base(&b));
    }

    #[test]
    fn training_fields_share_everything_and_base_fields_share_nothing_of_the_base() {
        let (a, b) = (cfg(), TrainConfig { learning_rate: 1.0, lora_rank: 64, output: "elsewhere".into(), ..cfg() });
        assert_eq!((ShareKey::data(&a), ShareKey::steps(&a), ShareKey::base(&a)), (ShareKey::data(&b), ShareKey::steps(&b), ShareKey::base(&b)));
        let c = TrainConfig { gradient_checkpointing: crate::config::CheckpointingArg::On, ..cfg() };
        assert_ne!(ShareKey::base(&a), ShareKey::base(&c), "checkpointing is set on the loaded model");
        let d = TrainConfig { dataset: "other.jsonl".into(), ..cfg() };
        assert_ne!(ShareKey::data(&a), ShareKey::data(&d));
        assert_ne!(ShareKey::steps(&a), ShareKey::steps(&d));
    }

    #[test]
    fn every_listed_field_exists() {
        let all = to_map(&cfg());
        for k in TRAINING_ONLY.iter().chain(BATCHING).chain(BASE) {
            assert!(all.contains_key(*k), "{k} is not a TrainConfig field (renamed?)");
        }
    }
}
