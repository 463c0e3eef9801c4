//! A judge model comparing two answers with a pairwise rubric. Each pair is shown in both
//! orders (A = fine-tuned, then A = baseline), because judges favour a position; a win
//! counts only when both orders pick the same answer.
use lora_datasets::Message;
use serde::Serialize;
use serde_json::Value;

use crate::prompts::Prompt;

/// What the judge said about one ordering.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    A,
    B,
    Tie,
    /// No A, B or tie found in the reply; counts as a tie.
    Unparsed,
}

/// Reads the judge's reply: `tie` (or `equal`, `both`, `neither`) in any case, `A` / `B`
/// as a word in capitals, or `answer a` / `answer b` in any case, whichever comes first.
/// A lone lowercase `a` is the article, not a verdict.
pub fn parse_verdict(reply: &str) -> Verdict {
    let words: Vec<&str> = reply.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).collect();
    for (i, w) in words.iter().enumerate() {
        let lower = w.to_lowercase();
        if matches!(lower.as_str(), "tie" | "tied" | "equal" | "both" | "neither" | "draw") {
            return Verdict::Tie;
        }
        let after_answer = i > 0 && words[i - 1].eq_ignore_ascii_case("answer");
        match (*w, after_answer) {
            ("A", _) => return Verdict::A,
            ("B", _) => return Verdict::B,
            ("a", true) => return Verdict::A,
            ("b", true) => return Verdict::B,
            _ => {}
        }
    }
    Verdict::Unparsed
}

/// The outcome for the fine-tuned side from the two orders: `first` with the fine-tuned
/// answer as A, `second` with it as B.
pub fn combine(first: Verdict, second: Verdict) -> super::Outcome {
    match (first, second) {
        (Verdict::A, Verdict::B) => super::Outcome::Win,
        (Verdict::B, Verdict::A) => super::Outcome::Loss,
        _ => super::Outcome::Tie,
    }
}

/// A rubric for a test set without one: general criteria, plus a few of the set's own
/// prompts so the judge knows what kind of task it is grading (and the user, reading the
/// saved file, what the judge was told).
pub fn default_rubric(prompts: &[Prompt], has_references: bool) -> String {
    let mut r = String::from(
        "You are an impartial judge comparing two answers, A and B, to the same conversation.\n\
         Prefer the answer that is correct, does what the user asked, and is clear and concise.\n\
         Do not prefer an answer for its length or for its position.\n",
    );
    if has_references {
        r.push_str("A reference answer is given: prefer the answer that agrees with it.\n");
    }
    let examples: Vec<String> = prompts.iter().take(3).map(|p| shorten(&last_user(&p.messages), 160)).filter(|s| !s.is_empty()).collect();
    if !examples.is_empty() {
        r.push_str("The conversations come from a test set with requests such as:\n");
        for e in examples {
            r.push_str(&format!("- {e}\n"));
        }
    }
    r.push_str("Reply with exactly one word: A, B, or tie.\n");
    r
}

/// The judge's conversation for one ordering.
pub fn judge_messages(rubric: &str, prompt: &Prompt, a: &str, b: &str) -> Vec<Message> {
    let mut user = String::from("[Conversation]\n");
    for m in &prompt.messages {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
        let content = m.get("content").and_then(Value::as_str).unwrap_or("");
        user.push_str(&format!("{role}: {content}\n"));
    }
    if let Some(reference) = prompt.ground_truth.as_ref().and_then(reference_text) {
        user.push_str(&format!("\n[Reference answer]\n{reference}\n"));
    }
    user.push_str(&format!("\n[Answer A]\n{a}\n\n[Answer B]\n{b}\n\nWhich answer is better? Reply with one word: A, B, or tie."));
    vec![Message::system(rubric), Message::user(user)]
}

fn reference_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => items.first().and_then(reference_text),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The last user message of a prompt (what a report shows of it).
pub fn last_user(messages: &[Value]) -> String {
    messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .and_then(|m| m.get("content").and_then(Value::as_str))
        .unwrap_or("")
        .to_string()
}

/// At most `max` characters on one line, an ellipsis marking a cut.
pub fn shorten(s: &str, max: usize) -> String {
    let flat = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= max {
        return flat;
    }
    let mut cut: String = flat.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::Outcome;

    #[test]
    fn verdicts_parse_robustly() {
        for (reply, want) in [
            ("A", Verdict::A),
            (" B.", Verdict::B),
            ("[[A]]", Verdict::A),
            ("**B** is better", Verdict::B),
            ("Answer a is better", Verdict::A),
            ("answer B", Verdict::B),
            ("It's a tie.", Verdict::Tie),
            ("TIE", Verdict::Tie),
            ("Both are equally good", Verdict::Tie),
            ("a good question, hard to say", Verdict::Unparsed),
            ("", Verdict::Unparsed),
            ("A, although B is close", Verdict::A),
        ] {
            assert_eq!(parse_verdict(reply), want, "{reply:?}");
        }
    }

    #[test]
    fn a_win_needs_both_orders() {
        assert_eq!(combine(Verdict::A, Verdict::B), Outcome::Win);
        assert_eq!(combine(Verdict::B, Verdict::A), Outcome::Loss);
        assert_eq!(combine(Verdict::A, Verdict::A), Outcome::Tie, "position bias, not a preference");
        assert_eq!(combine(Verdict::Unparsed, Verdict::B), Outcome::Tie);
    }

    #[test]
    fn shorten_cuts_on_characters() {
        assert_eq!(shorten("a\n b", 10), "a b");
        assert_eq!(shorten("ééééé", 3), "éé…");
    }
}
