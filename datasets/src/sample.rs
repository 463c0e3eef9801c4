//! The in-memory shape of a dataset: messages, the three sample kinds, and the dataset
//! itself. Parsing from JSON lives in `parse.rs`; these types only hold checked data.
use std::path::PathBuf;

use serde::Serialize;

/// The dataset format of a whole file (ARCHITECTURE.md, Datasets).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// `{"messages": [...]}` with at least one assistant turn to learn from.
    Chat,
    /// Chosen/rejected completions (Fireworks or TRL form).
    Preference,
    /// System/user messages only, plus extra fields kept for an evaluator
    /// (`inspect` validates it; no training command reads it yet).
    Prompts,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Chat => "chat",
            Format::Preference => "preference",
            Format::Prompts => "prompts",
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "chat" | "sft" | "messages" => Ok(Format::Chat),
            "preference" | "dpo" | "pairs" => Ok(Format::Preference),
            "prompts" | "prompt" | "rft" => Ok(Format::Prompts),
            other => Err(format!("unknown dataset format `{other}` (expected chat, preference or prompts)")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::System, Role::User, Role::Assistant, Role::Tool];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// One chat message. `content` is a plain string (an assistant turn that only calls tools
/// has an empty one).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
    /// Assistant turns only: `Some(0.0)` excludes the turn from the loss.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<f32>,
    /// Assistant turns only: OpenAI-form tool calls, passed to the template unchanged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    /// Tool turns: which call this answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Message { role, content: content.into(), weight: None, tool_calls: None, tool_call_id: None, name: None }
    }

    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }

    /// An assistant turn whose content tokens count in the loss.
    pub fn is_trainable(&self) -> bool {
        self.role == Role::Assistant && self.weight != Some(0.0) && !self.content.is_empty()
    }

    /// An assistant turn whose rendered tool calls count in the loss (DESIGN: tool calls are
    /// learned as content is).
    pub fn learns_tool_calls(&self) -> bool {
        self.role == Role::Assistant
            && self.weight != Some(0.0)
            && self.tool_calls.as_ref().is_some_and(|c| c.as_array().is_some_and(|a| !a.is_empty()))
    }

    /// Anything of this turn counts in the loss (its content or its tool calls).
    pub fn is_learned(&self) -> bool {
        self.is_trainable() || self.learns_tool_calls()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatSample {
    pub messages: Vec<Message>,
    /// `ground_truth` as given (a string becomes a one-element list).
    pub ground_truth: Option<Vec<String>>,
    /// OpenAI-form tool schemas offered in this conversation (`tools` field).
    pub tools: Option<serde_json::Value>,
}

/// A prompt with a preferred and a dispreferred completion. TRL's string form is
/// normalised to messages (prompt string -> one user message, completion -> one
/// assistant message).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PreferenceSample {
    pub prompt: Vec<Message>,
    pub chosen: Vec<Message>,
    pub rejected: Vec<Message>,
    pub tools: Option<serde_json::Value>,
}

impl PreferenceSample {
    pub fn chosen_conversation(&self) -> Vec<Message> {
        self.prompt.iter().chain(&self.chosen).cloned().collect()
    }
    pub fn rejected_conversation(&self) -> Vec<Message> {
        self.prompt.iter().chain(&self.rejected).cloned().collect()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PromptSample {
    pub messages: Vec<Message>,
    /// Every other field of the line (e.g. `ground_truth`), for evaluators.
    pub extra: serde_json::Map<String, serde_json::Value>,
    pub tools: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Sample {
    Chat(ChatSample),
    Preference(PreferenceSample),
    Prompts(PromptSample),
}

impl Sample {
    pub fn format(&self) -> Format {
        match self {
            Sample::Chat(_) => Format::Chat,
            Sample::Preference(_) => Format::Preference,
            Sample::Prompts(_) => Format::Prompts,
        }
    }

    /// Every message of the sample (for preference: prompt, chosen, rejected).
    pub fn messages(&self) -> Box<dyn Iterator<Item = &Message> + '_> {
        match self {
            Sample::Chat(c) => Box::new(c.messages.iter()),
            Sample::Preference(p) => Box::new(p.prompt.iter().chain(&p.chosen).chain(&p.rejected)),
            Sample::Prompts(p) => Box::new(p.messages.iter()),
        }
    }

    /// The class label of the sample, for stratified splits and label statistics:
    /// `ground_truth` when given (a list is joined with `|`), otherwise, for chat data,
    /// the content of the final assistant message. Preference samples carry none.
    pub fn label(&self) -> Option<String> {
        match self {
            Sample::Chat(c) => match &c.ground_truth {
                Some(truths) => Some(truths.join("|")),
                None => c
                    .messages
                    .iter()
                    .rev()
                    .find(|m| m.role == Role::Assistant)
                    .map(|m| m.content.trim().to_string()),
            },
            Sample::Prompts(p) => p.extra.get("ground_truth").and_then(label_of_json),
            Sample::Preference(_) => None,
        }
    }
}

fn label_of_json(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(items) => {
            let parts: Vec<String> = items.iter().filter_map(label_of_json).collect();
            (!parts.is_empty()).then(|| parts.join("|"))
        }
        serde_json::Value::Null => None,
        other => Some(other.to_string()),
    }
}

/// A loaded, fully validated dataset.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub path: PathBuf,
    pub format: Format,
    pub samples: Vec<Sample>,
    /// 1-based source line of each sample (blank lines are skipped), for messages.
    pub lines: Vec<usize>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.samples.len()
    }
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The samples at `indices` (e.g. from `split_eval`), keeping their source lines.
    pub fn select(&self, indices: &[usize]) -> Dataset {
        Dataset {
            path: self.path.clone(),
            format: self.format,
            samples: indices.iter().map(|&i| self.samples[i].clone()).collect(),
            lines: indices.iter().map(|&i| self.lines[i]).collect(),
        }
    }

    pub fn labels(&self) -> Vec<Option<String>> {
        self.samples.iter().map(Sample::label).collect()
    }
}
