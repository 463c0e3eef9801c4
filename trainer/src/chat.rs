//! The chat template a model ships (or ChatML when it has none), ready to render.
use anyhow::{Context, Result};
use lora_datasets::{ChatTemplate, Message, Role};
use lora_models::TokenizerBundle;

pub fn template_for(bundle: &TokenizerBundle) -> Result<ChatTemplate> {
    match &bundle.chat_template {
        Some(src) => ChatTemplate::new(src, bundle.bos_token.as_deref(), bundle.eos_token.as_deref())
            .context("the model's chat template"),
        None => Ok(ChatTemplate::chatml()),
    }
}

pub fn message(role: Role, content: &str) -> Message {
    Message { role, content: content.to_string(), weight: None, tool_calls: None, tool_call_id: None, name: None }
}

/// Token ids of a one-turn conversation ready for the assistant's answer.
pub fn user_prompt_ids(bundle: &TokenizerBundle, template: &ChatTemplate, user_text: &str) -> Result<Vec<u32>> {
    let text = template.render(&[message(Role::User, user_text)], true, None)?;
    bundle.encode(&text)
}
