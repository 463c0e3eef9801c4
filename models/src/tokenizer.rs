//! The tokenizer, its special tokens and the chat template, from a Hugging Face
//! directory or from GGUF metadata.
use anyhow::{Context, Result};
use serde_json::Value;
use std::path::Path;
use tokenizers::Tokenizer;

/// Everything about text <-> ids that a recipe needs besides the weights.
#[derive(Clone)]
pub struct TokenizerBundle {
    pub tokenizer: Tokenizer,
    /// Jinja source of the model's chat template (None: the caller falls back to ChatML).
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Ids that end generation: the EOS id(s) plus the template's end-of-turn token.
    pub eos_token_ids: Vec<u32>,
}

/// End-of-turn markers of the common chat templates; generation stops on any present.
const END_OF_TURN_TOKENS: &[&str] = &["<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>", "<end_of_turn>"];

impl TokenizerBundle {
    pub fn new(tokenizer: Tokenizer, chat_template: Option<String>, bos: Option<String>, eos: Option<String>, mut eos_ids: Vec<u32>) -> Self {
        if let Some(id) = eos.as_deref().and_then(|e| tokenizer.token_to_id(e)) {
            eos_ids.push(id);
        }
        for tok in END_OF_TURN_TOKENS {
            if let Some(id) = tokenizer.token_to_id(tok) {
                // Only tokens the tokenizer treats as special; a plain word never stops generation.
                if tokenizer.get_added_vocabulary().is_special_token(tok) {
                    eos_ids.push(id);
                }
            }
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        Self { tokenizer, chat_template, bos_token: bos, eos_token: eos, eos_token_ids: eos_ids }
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.tokenizer.encode(text, false).map_err(anyhow::Error::msg)?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.tokenizer.decode(ids, skip_special).map_err(anyhow::Error::msg)
    }
}

/// `"<s>"` or `{"content": "<s>", ...}` as tokenizer_config.json writes special tokens.
fn special_token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(String::from),
        _ => None,
    }
}

fn ids_of(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
        _ => vec![],
    }
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    Ok(Some(serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?))
}

/// A template field is a string, or a list of `{name, template}` (pick "default").
fn template_from_value(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .or_else(|| list.first())
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(String::from),
        _ => None,
    }
}

pub fn load_from_hf_dir(dir: &Path) -> Result<TokenizerBundle> {
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.exists() {
        anyhow::bail!("{}: missing tokenizer.json", dir.display());
    }
    let tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| anyhow::anyhow!("{}: {e}", tok_path.display()))?;
    let tcfg = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
    let jinja = dir.join("chat_template.jinja");
    let chat_template = if jinja.exists() {
        Some(std::fs::read_to_string(&jinja).with_context(|| format!("{}: cannot read", jinja.display()))?)
    } else if let Some(json) = read_json(&dir.join("chat_template.json"))? {
        json.get("chat_template").and_then(template_from_value)
    } else {
        tcfg.get("chat_template").and_then(template_from_value)
    };
    let mut eos_ids = ids_of(read_json(&dir.join("generation_config.json"))?.as_ref().and_then(|g| g.get("eos_token_id")));
    eos_ids.extend(ids_of(read_json(&dir.join("config.json"))?.as_ref().and_then(|c| c.get("eos_token_id"))));
    Ok(TokenizerBundle::new(
        tokenizer,
        chat_template,
        special_token_string(tcfg.get("bos_token")),
        special_token_string(tcfg.get("eos_token")),
        eos_ids,
    ))
}
