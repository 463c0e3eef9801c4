//! Model config and tokenizer from GGUF metadata (llama.cpp's key names).
use crate::config::{Architecture, ModelConfig};
use crate::tokenizer::TokenizerBundle;
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

fn meta<'a>(c: &'a Content, key: &str) -> Option<&'a Value> {
    c.metadata.get(key)
}

fn meta_u64(c: &Content, key: &str) -> Option<u64> {
    meta(c, key).and_then(|v| match v {
        Value::U8(x) => Some(*x as u64),
        Value::U16(x) => Some(*x as u64),
        Value::U32(x) => Some(*x as u64),
        Value::U64(x) => Some(*x),
        Value::I32(x) => Some(*x as u64),
        Value::I64(x) => Some(*x as u64),
        _ => None,
    })
}

fn meta_f64(c: &Content, key: &str) -> Option<f64> {
    meta(c, key).and_then(|v| match v {
        Value::F32(x) => Some(*x as f64),
        Value::F64(x) => Some(*x),
        _ => None,
    })
}

fn meta_str<'a>(c: &'a Content, key: &str) -> Option<&'a str> {
    meta(c, key).and_then(|v| v.to_string().ok()).map(String::as_str)
}

pub fn config_from_gguf(c: &Content) -> Result<ModelConfig> {
    let arch_name = meta_str(c, "general.architecture").context("missing `general.architecture`")?;
    let Some(architecture) = Architecture::from_model_type(arch_name) else {
        bail!("unsupported GGUF architecture `{arch_name}` (supported: llama, qwen2, qwen3)")
    };
    let key = |k: &str| format!("{arch_name}.{k}");
    let need = |k: &str| meta_u64(c, &key(k)).map(|v| v as usize).with_context(|| format!("missing `{}`", key(k)));
    let hidden_size = need("embedding_length")?;
    let num_attention_heads = need("attention.head_count")?;
    let vocab_size = match meta_u64(c, &key("vocab_size")) {
        Some(v) => v as usize,
        None => meta(c, "tokenizer.ggml.tokens").and_then(|v| v.to_vec().ok()).map(Vec::len).context("unknown vocab size")?,
    };
    Ok(ModelConfig {
        architecture,
        vocab_size,
        hidden_size,
        intermediate_size: need("feed_forward_length")?,
        num_hidden_layers: need("block_count")?,
        num_attention_heads,
        num_key_value_heads: meta_u64(c, &key("attention.head_count_kv")).map(|v| v as usize).unwrap_or(num_attention_heads),
        head_dim: meta_u64(c, &key("attention.key_length")).map(|v| v as usize).unwrap_or(hidden_size / num_attention_heads),
        rms_norm_eps: meta_f64(c, &key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-6),
        rope_theta: meta_f64(c, &key("rope.freq_base")).unwrap_or(10_000.0),
        rope_llama3: None,
        max_position_embeddings: meta_u64(c, &key("context_length")).map(|v| v as usize).unwrap_or(4096),
        tie_word_embeddings: !c.tensor_infos.contains_key("output.weight"),
        attention_bias: architecture == Architecture::Qwen2,
        qk_norm: architecture == Architecture::Qwen3,
        bos_token_id: meta_u64(c, "tokenizer.ggml.bos_token_id").map(|v| v as u32),
        eos_token_ids: meta_u64(c, "tokenizer.ggml.eos_token_id").map(|v| vec![v as u32]).unwrap_or_default(),
        raw: None,
    })
}

fn string_array(c: &Content, key: &str) -> Result<Vec<String>> {
    let arr = meta(c, key).with_context(|| format!("missing `{key}`"))?.to_vec().with_context(|| format!("`{key}` is not an array"))?;
    arr.iter().map(|v| Ok(v.to_string().with_context(|| format!("`{key}` holds a non-string"))?.clone())).collect()
}

// The pre-tokenizer regexes llama.cpp names by `tokenizer.ggml.pre` (as in the
// original tokenizer.json files).
const REGEX_QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const REGEX_LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper> {
    let split = |re: &str| -> Result<PreTokenizerWrapper> {
        Ok(Split::new(SplitPattern::Regex(re.into()), SplitDelimiterBehavior::Isolated, false)
            .map_err(anyhow::Error::msg)?
            .into())
    };
    Ok(match pre {
        // SmolLM2: digits one by one, then GPT-2 byte-level with its regex.
        "smollm" => Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]).into(),
        "qwen2" => Sequence::new(vec![split(REGEX_QWEN2)?, ByteLevel::new(false, true, false).into()]).into(),
        "llama-bpe" | "llama3" | "smaug-bpe" => Sequence::new(vec![split(REGEX_LLAMA3)?, ByteLevel::new(false, true, false).into()]).into(),
        "gpt2" | "default" => ByteLevel::new(false, true, true).into(),
        other => bail!("unsupported GGUF pre-tokenizer `{other}` (supported: smollm, qwen2, llama-bpe, gpt2)"),
    })
}

pub fn tokenizer_from_gguf(c: &Content) -> Result<TokenizerBundle> {
    let model = meta_str(c, "tokenizer.ggml.model").unwrap_or("");
    if model != "gpt2" {
        bail!("unsupported GGUF tokenizer model `{model}` (only byte-level BPE, `gpt2`)");
    }
    let tokens = string_array(c, "tokenizer.ggml.tokens")?;
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let merges = string_array(c, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())).with_context(|| format!("invalid merge `{m}`")))
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(anyhow::Error::msg)?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer(meta_str(c, "tokenizer.ggml.pre").unwrap_or("gpt2"))?));
    tokenizer.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::new(true, true, true)));
    tokenizer.with_post_processor(Some(ByteLevel::new(true, false, true)));
    // Control / user-defined tokens (llama.cpp token types 3 and 4) are added tokens
    // matched before BPE, as in the original tokenizer.json.
    if let Some(Value::Array(types)) = meta(c, "tokenizer.ggml.token_type") {
        let specials: Vec<AddedToken> = types
            .iter()
            .enumerate()
            .filter(|(_, t)| matches!(t, Value::I32(3) | Value::I32(4) | Value::U32(3) | Value::U32(4)))
            .filter_map(|(i, _)| tokens.get(i))
            .map(|t| AddedToken::from(t.clone(), true))
            .collect();
        tokenizer.add_special_tokens(specials).map_err(anyhow::Error::msg)?;
    }
    let tok_of = |key: &str| meta_u64(c, key).and_then(|id| tokens.get(id as usize)).cloned();
    let eos_ids = meta_u64(c, "tokenizer.ggml.eos_token_id").map(|v| vec![v as u32]).unwrap_or_default();
    Ok(TokenizerBundle::new(
        tokenizer,
        meta_str(c, "tokenizer.chat_template").map(String::from),
        tok_of("tokenizer.ggml.bos_token_id"),
        tok_of("tokenizer.ggml.eos_token_id"),
        eos_ids,
    ))
}
