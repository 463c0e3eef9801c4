//! Which format a line looks like, and which format a whole file is.
//!
//! Detection looks at keys only (full validation comes after, in `parse.rs`), so a chat
//! line with a mistake in it is still recognised as chat and gets a precise message
//! instead of "unknown format".
use serde_json::{Map, Value};

use crate::sample::Format;

/// What one line's keys say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LineShape {
    /// Fireworks (`input`/`preferred_output`/`non_preferred_output`) or TRL
    /// (`chosen`/`rejected`) keys.
    Preference,
    /// A `messages` list; `has_assistant` tells chat from prompts-only.
    Messages { has_assistant: bool },
    /// Nothing we recognise.
    Unknown,
}

const PREFERENCE_KEYS: [&str; 4] = ["preferred_output", "non_preferred_output", "chosen", "rejected"];

pub(crate) fn line_shape(object: &Map<String, Value>) -> LineShape {
    if PREFERENCE_KEYS.iter().any(|k| object.contains_key(*k)) {
        return LineShape::Preference;
    }
    match object.get("messages") {
        Some(Value::Array(messages)) => LineShape::Messages {
            has_assistant: messages
                .iter()
                .any(|m| m.get("role").and_then(Value::as_str) == Some("assistant")),
        },
        Some(_) => LineShape::Messages { has_assistant: false },
        None => LineShape::Unknown,
    }
}

/// The file's format by majority of the recognisable lines (a file with one stray line
/// is reported as "this line is not like the others", not the other way round).
/// `None` when no line is recognisable.
pub(crate) fn majority_format(shapes: &[LineShape]) -> Option<Format> {
    let preference = shapes.iter().filter(|s| **s == LineShape::Preference).count();
    let with_assistant = shapes.iter().filter(|s| **s == LineShape::Messages { has_assistant: true }).count();
    let without_assistant = shapes.iter().filter(|s| **s == LineShape::Messages { has_assistant: false }).count();
    let messages = with_assistant + without_assistant;
    if preference == 0 && messages == 0 {
        return None;
    }
    if preference > messages {
        return Some(Format::Preference);
    }
    // A chat file may hold a few conversations without an assistant turn (an error we
    // report per line); a prompts file is one where most lines have none.
    Some(if with_assistant >= without_assistant { Format::Chat } else { Format::Prompts })
}

/// Why a line of the wrong shape does not belong in a file of `format`, or `None` when
/// it fits (or is unrecognisable, which the parser reports more precisely).
pub(crate) fn mixed_format_problem(shape: LineShape, format: Format) -> Option<String> {
    let line_kind = match shape {
        LineShape::Preference if format != Format::Preference => "a preference pair",
        LineShape::Messages { .. } if format == Format::Preference => "a chat/prompts sample (`messages`)",
        _ => return None,
    };
    Some(format!(
        "this line is {line_kind} but most of the file is {format}; a file must hold one format \
         (or pass --format to choose)"
    ))
}
