//! Token ids and loss masks (the rule: ARCHITECTURE.md, Loss mask).
//!
//! The conversation is rendered once and tokenized once without adding special tokens
//! (the template already wrote them). A token is a loss token when its first byte lies
//! inside the content of a trainable assistant message (not `weight: 0`), and so is the
//! end-of-turn token that closes that content: the first non-whitespace token at or
//! after the content's end, when it is a special token (`<|im_end|>`, `<|eot_id|>`).
//! An assistant turn with tool calls also learns the text its tool calls render to: the
//! span where the conversation's render differs from the same conversation rendered with
//! that turn's `tool_calls` removed, followed by the same end-of-turn rule.
//! `scripts/golden/datasets/make_golden.py` holds the Python reference of this rule
//! (`reference_mask`, `content_spans`, `thinking_span`), kept in step with this file.
use std::ops::Range;

use tokenizers::Tokenizer;

use crate::pairs::TokenizedPair;
use crate::sample::{Message, PreferenceSample, Role};
use crate::template::ChatTemplate;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TokenizedSample {
    pub input_ids: Vec<u32>,
    /// 1 = the token counts in the loss.
    pub loss_mask: Vec<u8>,
}

impl TokenizedSample {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
    pub fn loss_tokens(&self) -> usize {
        self.loss_mask.iter().filter(|&&m| m != 0).count()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MaskError {
    #[error("no token to learn from (no assistant content with weight 1 survives rendering)")]
    NoLossTokens,
    #[error("the chat template dropped or rewrote assistant message {0}: its content is not in the rendered text")]
    ContentNotFound(usize),
    #[error("the chat template does not render the tool calls of assistant message {0} (a model whose template supports tools is needed to learn them)")]
    ToolCallsNotRendered(usize),
    #[error(transparent)]
    Template(#[from] anyhow::Error),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

/// Render + tokenize a conversation and build its loss mask.
pub fn tokenize_chat(
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    messages: &[Message],
) -> Result<TokenizedSample, MaskError> {
    tokenize_chat_with_tools(tokenizer, template, messages, None)
}

/// `tokenize_chat` for a conversation that offers tools (the `tools` field).
pub fn tokenize_chat_with_tools(
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    messages: &[Message],
    tools: Option<&serde_json::Value>,
) -> Result<TokenizedSample, MaskError> {
    let rendered = template.render(messages, false, tools)?;
    let mut spans = trainable_content_spans(template, messages, tools, &rendered)?;
    spans.extend(tool_call_spans(template, messages, tools, &rendered)?);
    let encoding = tokenizer.encode(rendered.as_str(), false).map_err(|e| MaskError::Tokenizer(e.to_string()))?;
    let offsets = encoding.get_offsets();
    let ids = encoding.get_ids();

    let mut loss_mask = vec![0u8; ids.len()];
    for span in spans {
        // Offsets are sorted by start, so the tokens starting inside the span are a range.
        let first = offsets.partition_point(|&(start, _)| start < span.start);
        let past = offsets.partition_point(|&(start, _)| start < span.end);
        for t in first..past {
            if offsets[t].1 > offsets[t].0 {
                loss_mask[t] = 1;
            }
        }
        let closing = (past..ids.len()).find(|&t| {
            let (start, end) = offsets[t];
            !(end > start && rendered.get(start..end).is_some_and(|s| s.trim().is_empty()))
        });
        if let Some(t) = closing {
            if is_special_token(tokenizer, ids[t]) {
                loss_mask[t] = 1;
            }
        }
    }
    if !loss_mask.contains(&1) {
        return Err(MaskError::NoLossTokens);
    }
    Ok(TokenizedSample { input_ids: ids.to_vec(), loss_mask })
}

/// The chosen and rejected sequences of a preference pair; only the completion's
/// assistant turns count (assistant turns inside a multi-turn prompt do not).
pub fn tokenize_preference(
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    sample: &PreferenceSample,
) -> Result<TokenizedPair, MaskError> {
    let prompt: Vec<Message> = sample
        .prompt
        .iter()
        .map(|m| Message { weight: if m.role == Role::Assistant { Some(0.0) } else { m.weight }, ..m.clone() })
        .collect();
    let conversation = |completion: &[Message]| -> Vec<Message> { prompt.iter().chain(completion).cloned().collect() };
    let tools = sample.tools.as_ref();
    let chosen = tokenize_chat_with_tools(tokenizer, template, &conversation(&sample.chosen), tools)?;
    let rejected = tokenize_chat_with_tools(tokenizer, template, &conversation(&sample.rejected), tools)?;
    Ok(TokenizedPair { chosen, rejected })
}

/// Token ids of a prompt ready for generation (`add_generation_prompt`); `inspect` uses
/// it to count the tokens of prompt datasets.
pub fn tokenize_prompt(
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    messages: &[Message],
    tools: Option<&serde_json::Value>,
) -> Result<Vec<u32>, MaskError> {
    let rendered = template.render(messages, true, tools)?;
    let encoding = tokenizer.encode(rendered.as_str(), false).map_err(|e| MaskError::Tokenizer(e.to_string()))?;
    Ok(encoding.get_ids().to_vec())
}

/// An added token marked special (`<|im_end|>`, `<|eot_id|>`), as opposed to ordinary
/// vocabulary or non-special added tokens such as Qwen's `<tool_call>`.
fn is_special_token(tokenizer: &Tokenizer, id: u32) -> bool {
    let added = tokenizer.get_added_vocabulary();
    added.simple_id_to_token(id).is_some_and(|token| added.is_special_token(&token))
}

// Private-use characters no tokenizer or template gives meaning to.
const SPAN_OPEN: char = '\u{E000}';
const SPAN_CLOSE: char = '\u{E001}';

/// Byte spans of the trainable assistant contents inside `rendered`, in message order.
///
/// First choice: render again with each trainable content wrapped in two sentinels; when
/// deleting the sentinels gives back exactly `rendered`, they mark the spans, however
/// short or repetitive the content (a one-letter answer also occurs inside
/// `<|im_start|>`). When the template transforms the content (`| trim`, thinking
/// removal), fall back to finding each message's content, or its stripped form, left to
/// right (see `thinking_span` for reasoning templates).
fn trainable_content_spans(
    template: &ChatTemplate,
    messages: &[Message],
    tools: Option<&serde_json::Value>,
    rendered: &str,
) -> Result<Vec<Range<usize>>, MaskError> {
    let wanted = messages.iter().filter(|m| m.is_trainable()).count();
    let marked: Vec<Message> = messages
        .iter()
        .map(|m| {
            if m.is_trainable() {
                Message { content: format!("{SPAN_OPEN}{}{SPAN_CLOSE}", m.content), ..m.clone() }
            } else {
                m.clone()
            }
        })
        .collect();
    if let Ok(marked_render) = template.render(&marked, false, tools) {
        if let Some(spans) = spans_from_sentinels(&marked_render, rendered, wanted) {
            return Ok(spans);
        }
    }
    spans_by_search(messages, rendered)
}

fn spans_from_sentinels(marked_render: &str, rendered: &str, wanted: usize) -> Option<Vec<Range<usize>>> {
    let mut plain = String::with_capacity(rendered.len());
    let mut spans = Vec::with_capacity(wanted);
    let mut open_at = None;
    for c in marked_render.chars() {
        match c {
            SPAN_OPEN if open_at.is_none() => open_at = Some(plain.len()),
            SPAN_CLOSE => spans.push(open_at.take()?..plain.len()),
            SPAN_OPEN => return None,
            c => plain.push(c),
        }
    }
    (open_at.is_none() && spans.len() == wanted && plain == rendered).then_some(spans)
}

fn spans_by_search(messages: &[Message], rendered: &str) -> Result<Vec<Range<usize>>, MaskError> {
    let mut spans = Vec::new();
    let mut cursor = 0;
    for (i, message) in messages.iter().enumerate() {
        let found = [message.content.as_str(), message.content.trim()]
            .into_iter()
            .filter(|candidate| !candidate.is_empty())
            .find_map(|candidate| rendered[cursor..].find(candidate).map(|at| cursor + at..cursor + at + candidate.len()))
            .or_else(|| thinking_span(&message.content, rendered, cursor));
        match found {
            Some(span) => {
                cursor = span.end;
                if message.is_trainable() {
                    spans.push(span);
                }
            }
            // A template may drop non-trainable turns (e.g. an old system prompt), and some
            // (Llama 3.1) drop the content of a turn that calls tools: its tool-call span
            // (`tool_call_spans`) is what is learned then.
            None if !message.is_trainable() || message.learns_tool_calls() => {}
            None => return Err(MaskError::ContentNotFound(i)),
        }
    }
    Ok(spans)
}

/// Byte spans of the rendered tool calls of every assistant turn that learns them: where
/// `rendered` differs from the conversation rendered with that turn's `tool_calls` removed
/// (common prefix and suffix stripped). Robust to templates that re-render a turn
/// differently once later turns follow (Qwen3's reasoning blocks), which a prefix-of-render
/// rule is not.
fn tool_call_spans(
    template: &ChatTemplate,
    messages: &[Message],
    tools: Option<&serde_json::Value>,
    rendered: &str,
) -> Result<Vec<Range<usize>>, MaskError> {
    let mut spans = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        if !message.learns_tool_calls() {
            continue;
        }
        let mut without = messages.to_vec();
        without[i].tool_calls = None;
        let other = template.render(&without, false, tools)?;
        let span = differing_span(rendered, &other);
        if span.is_empty() {
            return Err(MaskError::ToolCallsNotRendered(i));
        }
        spans.push(span);
    }
    Ok(spans)
}

/// The byte range of `a` between its longest common suffix and then prefix with `b`, on
/// character boundaries. Suffix first: tool calls render right before the end-of-turn
/// token and often begin with the same character (`<tool_call>` before `<|im_end|>`), which
/// a greedy prefix would swallow.
fn differing_span(a: &str, b: &str) -> Range<usize> {
    let (x, y) = (a.as_bytes(), b.as_bytes());
    let mut suffix = x.iter().rev().zip(y.iter().rev()).take_while(|(p, q)| p == q).count();
    while !a.is_char_boundary(x.len() - suffix) || !b.is_char_boundary(y.len() - suffix) {
        suffix -= 1;
    }
    let room = x.len().min(y.len()) - suffix;
    let mut start = x.iter().zip(y).take(room).take_while(|(p, q)| p == q).count();
    while !a.is_char_boundary(start) {
        start -= 1;
    }
    start..x.len() - suffix
}

/// Reasoning templates (Qwen3) rewrite `<think>R</think>A`: they re-space the reasoning,
/// or drop it from earlier turns. The span then runs from the `<think>` tag written for
/// this turn (when it comes before the answer) to the end of the answer `A`.
fn thinking_span(content: &str, rendered: &str, cursor: usize) -> Option<Range<usize>> {
    let (_, answer) = content.rsplit_once("</think>")?;
    let answer = answer.trim();
    if answer.is_empty() {
        return None;
    }
    let answer_at = cursor + rendered[cursor..].find(answer)?;
    let think_at = rendered[cursor..].find("<think>").map(|t| cursor + t);
    let start = think_at.filter(|&t| t < answer_at).unwrap_or(answer_at);
    Some(start..answer_at + answer.len())
}
