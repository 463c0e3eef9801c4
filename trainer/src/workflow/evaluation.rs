//! Phase `evaluation`, and the scoring the promotion gate shares with it: the held-out
//! split of a run's configuration, its validation loss through the base and through
//! adapters, and completions generated for its prompts scored by evaluators
//! (`--evaluator SPEC`, or `auto`: one chosen from the data).
use std::path::PathBuf;

use anyhow::{Context, Result};
use lora_datasets::{tokenize_prompt, Dataset, Role, Sample};
use lora_models::{LoadedModel, RolloutParams};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::TrainConfig;
use crate::data;
use crate::evaluators::{EvaluatorSet, Summary};
use crate::prompts::Prompt;
use crate::recipes::sft;

/// The held-out samples of `cfg` (`--eval-dataset`, or its `--eval-split` of the data).
pub fn held_out(cfg: &TrainConfig) -> Result<Option<Dataset>> {
    Ok(sft::load_split(cfg)?.1)
}

/// The conversation before a chat sample's final assistant message, and that message.
pub fn prompt_and_answer(s: &Sample) -> Option<(Vec<lora_datasets::Message>, String)> {
    let Sample::Chat(c) = s else { return None };
    let last = c.messages.iter().rposition(|m| m.role == Role::Assistant)?;
    Some((c.messages[..last].to_vec(), c.messages[last].content.clone()))
}

/// The reference answers of a sample: `ground_truth`, else the final assistant message.
pub fn truths(s: &Sample) -> Vec<String> {
    match s {
        Sample::Chat(c) => c.ground_truth.clone().unwrap_or_else(|| prompt_and_answer(s).map(|(_, a)| vec![a.trim().to_string()]).unwrap_or_default()),
        _ => Vec::new(),
    }
}

/// The first `limit` held-out samples as prompts to generate from, with their truths.
pub fn prompts(bundle: &lora_models::TokenizerBundle, ds: &Dataset, limit: usize) -> Result<Vec<Prompt>> {
    let template = crate::chat::template_for(bundle)?;
    let mut out = Vec::new();
    for (s, line) in ds.samples.iter().zip(&ds.lines).take(limit) {
        let Some((messages, _)) = prompt_and_answer(s) else { continue };
        let tools = match s {
            Sample::Chat(c) => c.tools.clone(),
            _ => None,
        };
        let ids = tokenize_prompt(&bundle.tokenizer, &template, &messages, tools.as_ref()).map_err(|e| anyhow::anyhow!("{}:{line}: {e}", ds.path.display()))?;
        let t = truths(s);
        out.push(Prompt {
            ids,
            messages: messages.iter().map(serde_json::to_value).collect::<Result<_, _>>()?,
            ground_truth: Some(if t.len() == 1 { Value::String(t[0].clone()) } else { Value::from(t) }),
            fields: Default::default(),
            tools,
        });
    }
    Ok(out)
}

/// `--evaluator auto`: an evaluator for objectively checkable answers, and why.
pub fn auto_evaluator(answers: &[String]) -> (Option<String>, String) {
    let n = answers.len();
    if n == 0 {
        return (None, "no answers to look at: validation loss only".into());
    }
    let trimmed: Vec<&str> = answers.iter().map(|a| a.trim()).collect();
    if trimmed.iter().all(|a| a.parse::<f64>().is_ok()) {
        return (Some("numeric".into()), "every answer is a number".into());
    }
    if trimmed.iter().all(|a| serde_json::from_str::<Value>(a).is_ok_and(|v| v.is_object())) {
        return (Some("json".into()), "every answer is a JSON object".into());
    }
    let mut distinct: Vec<&str> = trimmed.clone();
    distinct.sort();
    distinct.dedup();
    if distinct.len() <= 20 && distinct.len() * 2 <= n {
        return (Some("label".into()), format!("the answers are {} distinct labels", distinct.len()));
    }
    (None, "answers are free text: validation loss only".into())
}

/// A JSON schema the training answers (JSON objects) all satisfy: the keys every answer
/// has are required, and each key's type is the one its values have (several when they
/// differ; integers count as numbers when both occur). Other keys stay allowed.
pub fn infer_schema(objects: &[serde_json::Map<String, Value>]) -> Value {
    fn type_name(v: &Value) -> &'static str {
        match v {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        }
    }
    let mut keys: Vec<&String> = objects.iter().flat_map(|o| o.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut required = Vec::new();
    let mut properties = serde_json::Map::new();
    for k in keys {
        if objects.iter().all(|o| o.contains_key(k)) {
            required.push(Value::String(k.clone()));
        }
        let mut types: Vec<&str> = objects.iter().filter_map(|o| o.get(k)).map(type_name).collect();
        types.sort();
        types.dedup();
        if types.contains(&"number") {
            types.retain(|t| *t != "integer");
        }
        let t = if types.len() == 1 { Value::from(types[0]) } else { Value::from(types) };
        properties.insert(k.clone(), serde_json::json!({ "type": t }));
    }
    serde_json::json!({"type": "object", "required": required, "properties": properties})
}

/// The base and its adapters (loaded under their labels) on `cfg`'s device.
pub fn load_with_adapters(cfg: &TrainConfig, adapters: &[(String, PathBuf)]) -> Result<LoadedModel> {
    let (mut model, tokenizer, source) = sft::load_base(cfg)?;
    for (label, dir) in adapters {
        model.load_named_adapter(label, dir).with_context(|| format!("loading adapter {}", dir.display()))?;
    }
    Ok(LoadedModel { model, tokenizer, source })
}

/// Routes every row to adapter `name`, or to none (the base).
pub fn route(loaded: &LoadedModel, name: Option<&str>) -> Result<lora_models::RoutingGuard> {
    Ok(match name {
        Some(n) => loaded.model.route_all(n)?,
        None => loaded.model.adapters_off(),
    })
}

/// Validation loss of the model as routed by `name` on `ds`.
pub fn eval_loss(loaded: &LoadedModel, name: Option<&str>, ds: &Dataset, cfg: &TrainConfig) -> Result<f64> {
    let set = data::tokenize_dataset(&loaded.tokenizer, ds, cfg.max_sequence_length)?;
    let loader = data::eval_loader(&set, cfg.batch_size, cfg.max_sequence_length, data::pad_token_id(&loaded.tokenizer));
    let _route = route(loaded, name)?;
    Ok(data::evaluate(&loaded.model, &loader)?.eval_loss)
}

/// Evaluator scores of one side's greedy completions.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SideScores {
    pub reward_mean: Option<f64>,
    /// `Summary` of `eval --evaluator` (per evaluator, failures).
    pub summary: Value,
    /// The first completions, for the report.
    pub examples: Vec<(String, String)>,
}

/// Greedy completions of `prompts` through adapter `name` (or the base), scored.
pub fn generate_and_score(loaded: &LoadedModel, name: Option<&str>, prompts: &[Prompt], set: &EvaluatorSet, max_new_tokens: usize) -> Result<SideScores> {
    let params = RolloutParams { group: 1, max_new_tokens, temperature: 0.0, top_k: 0, top_p: 1.0 };
    let answers = {
        let _route = route(loaded, name)?;
        let bar = crate::sides::progress_bar(prompts.len(), name.unwrap_or("base"));
        let a = crate::sides::complete_one(loaded, prompts, &params, 0, 0, 8, &bar)?;
        bar.finish_and_clear();
        a
    };
    let samples: Vec<_> = prompts.iter().zip(&answers).enumerate().map(|(i, (p, a))| p.sample(format!("{}", i + 1), a.clone())).collect();
    let scores = set.score_batch(&samples);
    let summary = Summary::of(set, &samples, &scores);
    let examples = prompts
        .iter()
        .zip(&answers)
        .take(3)
        .map(|(p, a)| (p.ground_truth.as_ref().map_or(String::new(), |g| g.to_string()), a.clone()))
        .collect();
    Ok(SideScores { reward_mean: summary.reward_mean, summary: serde_json::to_value(&summary)?, examples })
}

/// The evaluator set of `specs` for these prompts (labels and a token counter filled in).
pub fn evaluator_set(specs: &[String], bundle: &lora_models::TokenizerBundle, prompts: &[Prompt]) -> Result<EvaluatorSet> {
    let mut ctx = crate::evaluators::Context::new(4, std::time::Duration::from_secs(30));
    crate::prompts::fill_context(&mut ctx, bundle, prompts.iter());
    EvaluatorSet::new(specs, None, &ctx)
}

/// Base against fine-tuned on the held-out split.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Comparison {
    pub held_out_samples: usize,
    pub base_eval_loss: Option<f64>,
    pub tuned_eval_loss: Option<f64>,
    pub evaluators: Vec<String>,
    /// Samples generated per side (the first `--eval-samples` held-out samples).
    pub generated: usize,
    pub base: Option<SideScores>,
    pub tuned: Option<SideScores>,
}

/// The `evaluation` phase of `run sft`: loss and evaluator scores, base against `adapter`.
pub fn compare(cfg: &TrainConfig, adapter: &std::path::Path, evaluators: &[String], eval_samples: usize, max_new_tokens: usize) -> Result<Comparison> {
    let Some(ds) = held_out(cfg)? else {
        tracing::warn!("no held-out data (--eval-split 0): base and fine-tuned are not compared");
        return Ok(Comparison { held_out_samples: 0, base_eval_loss: None, tuned_eval_loss: None, evaluators: evaluators.to_vec(), generated: 0, base: None, tuned: None });
    };
    const TUNED: &str = "fine-tuned";
    let loaded = load_with_adapters(cfg, &[(TUNED.to_string(), adapter.to_path_buf())])?;
    let base_eval_loss = Some(eval_loss(&loaded, None, &ds, cfg)?);
    let tuned_eval_loss = Some(eval_loss(&loaded, Some(TUNED), &ds, cfg)?);
    let (mut base, mut tuned, mut generated) = (None, None, 0);
    if !evaluators.is_empty() {
        let prompts = prompts(&loaded.tokenizer, &ds, eval_samples)?;
        let set = evaluator_set(evaluators, &loaded.tokenizer, &prompts)?;
        base = Some(generate_and_score(&loaded, None, &prompts, &set, max_new_tokens)?);
        tuned = Some(generate_and_score(&loaded, Some(TUNED), &prompts, &set, max_new_tokens)?);
        generated = prompts.len();
    }
    Ok(Comparison { held_out_samples: ds.len(), base_eval_loss, tuned_eval_loss, evaluators: evaluators.to_vec(), generated, base, tuned })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_picks_an_evaluator_from_the_answers() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(auto_evaluator(&s(&["1", " 2.5", "-3"])).0.as_deref(), Some("numeric"));
        assert_eq!(auto_evaluator(&s(&["{\"a\": 1}", "{}"])).0.as_deref(), Some("json"));
        assert_eq!(auto_evaluator(&s(&["pos", "neg", "pos", "neg"])).0.as_deref(), Some("label"));
        assert_eq!(auto_evaluator(&s(&["a long answer", "another one"])).0, None);
        assert_eq!(auto_evaluator(&[]).0, None);
    }

    #[test]
    fn the_inferred_schema_requires_the_common_keys_with_their_types() {
        let objs: Vec<serde_json::Map<String, Value>> = [r#"{"answer": 3, "topic": "math"}"#, r#"{"answer": 2.5, "topic": "math", "note": null}"#]
            .iter()
            .map(|s| serde_json::from_str(s).unwrap())
            .collect();
        let schema = infer_schema(&objs);
        assert_eq!(schema["required"], serde_json::json!(["answer", "topic"]));
        assert_eq!(schema["properties"]["answer"]["type"], "number");
        assert_eq!(schema["properties"]["topic"]["type"], "string");
        assert_eq!(schema["properties"]["note"]["type"], "null");
    }
}
