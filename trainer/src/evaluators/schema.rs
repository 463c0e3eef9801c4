//! A JSON Schema subset for `json-schema:FILE`. The full validators on crates.io pull in
//! URL, IDNA and HTTP stacks that would double this crate's build; structured-output
//! checks need only the keywords below. A schema using any other validation keyword is
//! refused when loaded, so no constraint is silently ignored.
//!
//! Supported: `type` (a name or a list; "integer" is a number with no fraction),
//! `properties`, `required`, `additionalProperties` (bool or schema), `items` (one schema),
//! `enum`, `const`, `minLength`/`maxLength` (characters), `pattern` (the `regex` crate),
//! `minimum`/`maximum`/`exclusiveMinimum`/`exclusiveMaximum` (numbers), `minItems`/
//! `maxItems`, `anyOf`/`allOf`/`oneOf`, and `true`/`false` schemas. Annotations (`$schema`,
//! `$id`, `title`, `description`, `default`, `examples`, `$comment`, `format`) are ignored.
use std::path::Path;

use anyhow::{anyhow, bail, Context as _, Result};
use regex::Regex;
use serde_json::{Map, Value};

const ANNOTATIONS: &[&str] = &["$schema", "$id", "title", "description", "default", "examples", "$comment", "format"];
const KEYWORDS: &[&str] = &[
    "type", "properties", "required", "additionalProperties", "items", "enum", "const", "minLength", "maxLength", "pattern",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minItems", "maxItems", "anyOf", "allOf", "oneOf",
];

/// A checked schema with its patterns compiled.
pub(crate) enum Schema {
    Bool(bool),
    Object { keywords: Map<String, Value>, pattern: Option<Regex>, children: Vec<(String, Schema)> },
}

impl Schema {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading the schema {}", path.display()))?;
        let value: Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
        Schema::compile(&value, "#").with_context(|| format!("schema {}", path.display()))
    }

    /// Checks every keyword and compiles sub-schemas; `at` is the JSON pointer for errors.
    pub fn compile(value: &Value, at: &str) -> Result<Self> {
        let obj = match value {
            Value::Bool(b) => return Ok(Schema::Bool(*b)),
            Value::Object(o) => o,
            other => bail!("{at}: a schema must be an object or a boolean, got {other}"),
        };
        let mut children = Vec::new();
        for (key, v) in obj {
            let here = format!("{at}/{key}");
            match key.as_str() {
                k if ANNOTATIONS.contains(&k) => {}
                "properties" => {
                    let props = v.as_object().ok_or_else(|| anyhow!("{here}: must be an object"))?;
                    for (name, sub) in props {
                        children.push((format!("properties/{name}"), Schema::compile(sub, &format!("{here}/{name}"))?));
                    }
                }
                "additionalProperties" | "items" => children.push((key.clone(), Schema::compile(v, &here)?)),
                "anyOf" | "allOf" | "oneOf" => {
                    let list = v.as_array().filter(|l| !l.is_empty()).ok_or_else(|| anyhow!("{here}: must be a non-empty list"))?;
                    for (i, sub) in list.iter().enumerate() {
                        children.push((format!("{key}/{i}"), Schema::compile(sub, &format!("{here}/{i}"))?));
                    }
                }
                k if KEYWORDS.contains(&k) => {}
                other => bail!("{here}: the keyword `{other}` is not supported (supported: {})", KEYWORDS.join(", ")),
            }
        }
        let pattern = match obj.get("pattern") {
            None => None,
            Some(Value::String(p)) => Some(Regex::new(p).map_err(|e| anyhow!("{at}/pattern: {e}"))?),
            Some(_) => bail!("{at}/pattern: must be a string"),
        };
        Ok(Schema::Object { keywords: obj.clone(), pattern, children })
    }

    /// `Err` says the first violation found, with its JSON pointer in the instance.
    pub fn validate(&self, v: &Value) -> Result<(), String> {
        self.check(v, "")
    }

    fn child(&self, name: &str) -> Option<&Schema> {
        match self {
            Schema::Bool(_) => None,
            Schema::Object { children, .. } => children.iter().find(|(n, _)| n == name).map(|(_, s)| s),
        }
    }

    fn check(&self, v: &Value, at: &str) -> Result<(), String> {
        let (kw, pattern) = match self {
            Schema::Bool(true) => return Ok(()),
            Schema::Bool(false) => return Err(format!("{}: no value is allowed here", pointer(at))),
            Schema::Object { keywords, pattern, .. } => (keywords, pattern),
        };
        let fail = |what: String| Err(format!("{}: {what}", pointer(at)));
        if let Some(t) = kw.get("type") {
            let names: Vec<&str> = match t {
                Value::String(s) => vec![s.as_str()],
                Value::Array(l) => l.iter().filter_map(Value::as_str).collect(),
                _ => vec![],
            };
            if !names.iter().any(|n| has_type(v, n)) {
                return fail(format!("expected {}, got {}", names.join(" or "), type_name(v)));
            }
        }
        if let Some(Value::Array(allowed)) = kw.get("enum") {
            if !allowed.contains(v) {
                return fail(format!("{v} is not one of {}", Value::Array(allowed.clone())));
            }
        }
        if let Some(c) = kw.get("const") {
            if c != v {
                return fail(format!("expected {c}, got {v}"));
            }
        }
        match v {
            Value::String(s) => {
                let n = s.chars().count() as f64;
                if kw.get("minLength").and_then(Value::as_f64).is_some_and(|m| n < m) {
                    return fail(format!("shorter than minLength {}", kw["minLength"]));
                }
                if kw.get("maxLength").and_then(Value::as_f64).is_some_and(|m| n > m) {
                    return fail(format!("longer than maxLength {}", kw["maxLength"]));
                }
                if pattern.as_ref().is_some_and(|re| !re.is_match(s)) {
                    return fail(format!("does not match the pattern {}", kw["pattern"]));
                }
            }
            Value::Number(n) => {
                let x = n.as_f64().unwrap_or(f64::NAN);
                let bound = |k: &str| kw.get(k).and_then(Value::as_f64);
                let broken = [
                    ("minimum", bound("minimum").is_some_and(|b| x < b)),
                    ("maximum", bound("maximum").is_some_and(|b| x > b)),
                    ("exclusiveMinimum", bound("exclusiveMinimum").is_some_and(|b| x <= b)),
                    ("exclusiveMaximum", bound("exclusiveMaximum").is_some_and(|b| x >= b)),
                ];
                if let Some((k, _)) = broken.iter().find(|(_, b)| *b) {
                    return fail(format!("{x} breaks {k} {}", kw[*k]));
                }
            }
            Value::Array(items) => {
                let n = items.len() as f64;
                if kw.get("minItems").and_then(Value::as_f64).is_some_and(|m| n < m) {
                    return fail(format!("fewer than minItems {}", kw["minItems"]));
                }
                if kw.get("maxItems").and_then(Value::as_f64).is_some_and(|m| n > m) {
                    return fail(format!("more than maxItems {}", kw["maxItems"]));
                }
                if let Some(item) = self.child("items") {
                    for (i, x) in items.iter().enumerate() {
                        item.check(x, &format!("{at}/{i}"))?;
                    }
                }
            }
            Value::Object(obj) => {
                if let Some(Value::Array(required)) = kw.get("required") {
                    if let Some(missing) = required.iter().filter_map(Value::as_str).find(|k| !obj.contains_key(*k)) {
                        return fail(format!("missing required property `{missing}`"));
                    }
                }
                for (key, x) in obj {
                    let here = format!("{at}/{key}");
                    match self.child(&format!("properties/{key}")) {
                        Some(prop) => prop.check(x, &here)?,
                        None => {
                            if let Some(extra) = self.child("additionalProperties") {
                                extra.check(x, &here).map_err(|e| format!("{e} (property `{key}` is not in properties)"))?;
                            }
                        }
                    }
                }
            }
            _ => {}
        }
        self.check_combinators(v, at)
    }

    fn check_combinators(&self, v: &Value, at: &str) -> Result<(), String> {
        let Schema::Object { children, .. } = self else { return Ok(()) };
        let group = |name: &str| -> Vec<&Schema> {
            children.iter().filter(|(n, _)| n.split_once('/').is_some_and(|(k, _)| k == name)).map(|(_, s)| s).collect()
        };
        for sub in group("allOf") {
            sub.check(v, at)?;
        }
        let any = group("anyOf");
        if !any.is_empty() && !any.iter().any(|s| s.check(v, at).is_ok()) {
            return Err(format!("{}: matches none of anyOf", pointer(at)));
        }
        let one = group("oneOf");
        if !one.is_empty() {
            let n = one.iter().filter(|s| s.check(v, at).is_ok()).count();
            if n != 1 {
                return Err(format!("{}: matches {n} of oneOf, not exactly one", pointer(at)));
            }
        }
        Ok(())
    }
}

fn pointer(at: &str) -> String {
    if at.is_empty() { "the answer".to_string() } else { format!("the answer at {at}") }
}

fn has_type(v: &Value, name: &str) -> bool {
    match name {
        "integer" => v.as_f64().is_some_and(|x| x.fract() == 0.0),
        other => type_name(v) == other,
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Schema {
        Schema::compile(
            &json!({
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "type": "object",
                "required": ["name", "age"],
                "properties": {
                    "name": {"type": "string", "minLength": 1, "pattern": "^[A-Z]"},
                    "age": {"type": "integer", "minimum": 0},
                    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
                    "kind": {"anyOf": [{"const": "x"}, {"type": "null"}]}
                },
                "additionalProperties": false
            }),
            "#",
        )
        .unwrap()
    }

    #[test]
    fn valid_instances_pass() {
        let s = schema();
        assert_eq!(s.validate(&json!({"name": "Ann", "age": 3})), Ok(()));
        assert_eq!(s.validate(&json!({"name": "Ann", "age": 3.0, "tags": ["a", "b"], "kind": null})), Ok(()));
    }

    #[test]
    fn violations_name_the_place() {
        let s = schema();
        let err = |v: Value| s.validate(&v).unwrap_err();
        assert!(err(json!({"name": "Ann"})).contains("missing required property `age`"));
        assert!(err(json!({"name": "ann", "age": 1})).contains("/name: does not match"));
        assert!(err(json!({"name": "Ann", "age": 1.5})).contains("/age: expected integer"));
        assert!(err(json!({"name": "Ann", "age": -1})).contains("minimum"));
        assert!(err(json!({"name": "Ann", "age": 1, "tags": ["c"]})).contains("/tags/0"));
        assert!(err(json!({"name": "Ann", "age": 1, "tags": ["a", "a", "a"]})).contains("maxItems"));
        assert!(err(json!({"name": "Ann", "age": 1, "kind": "y"})).contains("anyOf"));
        assert!(err(json!({"name": "Ann", "age": 1, "extra": 1})).contains("`extra` is not in properties"));
        assert!(err(json!([1])).contains("expected object, got array"));
    }

    #[test]
    fn unsupported_keywords_are_refused() {
        let err = Schema::compile(&json!({"properties": {"a": {"$ref": "#/defs/x"}}}), "#").err().unwrap();
        assert!(err.to_string().contains("#/properties/a/$ref"), "{err}");
        assert!(Schema::compile(&json!({"pattern": "("}), "#").is_err());
    }
}
