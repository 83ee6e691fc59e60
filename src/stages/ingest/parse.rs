//! The `ingest` row parsers: one JSON row (a JSONL line, a Parquet row as JSON) of a format to a
//! [`Pair`], or the reason it is dropped.

use anyhow::Result;
use serde_json::{Map, Value, json};

use super::{Format, Pair};
use crate::data::rows::Location;
use crate::user_bail;

/// Why a row was left out; counted under [`Reason::key`] in the manifest's `dropped`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    IdenticalResponses,
    PromptMismatch,
    EmptyResponse,
    /// The conversation ends with a user (Human) turn, after some assistant turn.
    LastTurnNotAssistant,
    NoAssistantTurn,
    /// An assistant answer with nothing before it, or an empty `prompt` string.
    NoPrompt,
    EmptyConversation,
    /// HH-RLHF text that is not a `\n\nHuman:` / `\n\nAssistant:` transcript.
    NotATranscript,
    /// A message that is not `{role, content}` with two strings.
    BadMessage,
    UnknownRole,
    /// `chosen` and `rejected` are one a message list, the other a string.
    MixedLayout,
    UnknownSplit,
    /// The field is absent or null in this row.
    Missing(&'static str),
    WrongType(&'static str),
}

impl Reason {
    pub fn key(self) -> String {
        match self {
            Reason::IdenticalResponses => "identical_responses".into(),
            Reason::PromptMismatch => "prompt_mismatch".into(),
            Reason::EmptyResponse => "empty_response".into(),
            Reason::LastTurnNotAssistant => "last_turn_not_assistant".into(),
            Reason::NoAssistantTurn => "no_assistant_turn".into(),
            Reason::NoPrompt => "no_prompt".into(),
            Reason::EmptyConversation => "empty_conversation".into(),
            Reason::NotATranscript => "not_a_transcript".into(),
            Reason::BadMessage => "bad_message".into(),
            Reason::UnknownRole => "unknown_role".into(),
            Reason::MixedLayout => "mixed_layout".into(),
            Reason::UnknownSplit => "unknown_split".into(),
            Reason::Missing(f) => format!("missing_{f}"),
            Reason::WrongType(f) => format!("wrong_type_{f}"),
        }
    }
}

/// A row left out: why, and what exactly was wrong with it (shown for the first of each reason).
#[derive(Debug, Clone, PartialEq)]
pub struct Dropped {
    pub reason: Reason,
    pub detail: String,
}

pub(super) fn dropped(reason: Reason, detail: impl Into<String>) -> Dropped {
    Dropped {
        reason,
        detail: detail.into(),
    }
}

/// The fields [`parse_row`] reads for `format`; a Parquet file is read for these columns only.
pub fn fields(format: Format) -> &'static [&'static str] {
    match format {
        Format::Ultrafeedback | Format::Preference => &[
            "prompt",
            "chosen",
            "rejected",
            "id",
            "prompt_id",
            "split",
            "source",
            "score_chosen",
            "score_rejected",
            "metadata.score_chosen",
            "metadata.score_rejected",
        ],
        Format::HhRlhf => &[
            "chosen",
            "rejected",
            "id",
            "prompt_id",
            "split",
            "source",
            "score_chosen",
            "score_rejected",
            "metadata.score_chosen",
            "metadata.score_rejected",
        ],
    }
}

/// Fields every row of `format` needs: a file where one of them is in no row is the wrong format
/// (or the wrong file), not a file of odd rows.
pub(super) fn required(format: Format) -> &'static [&'static str] {
    match format {
        Format::Preference => &["prompt", "chosen", "rejected"],
        Format::Ultrafeedback | Format::HhRlhf => &["chosen", "rejected"],
    }
}

type RowResult = Result<std::result::Result<Pair, Dropped>>;

/// Parses one row. Outer error: the file is not what a data file must be (a row that is not a
/// JSON object), exit 2 naming the row; inner: an odd row, dropped and counted.
pub fn parse_row(format: Format, row: &Value, loc: &Location, source: &str) -> RowResult {
    let Some(obj) = row.as_object() else {
        user_bail!("{loc}: expected a JSON object, found {}", type_name(row));
    };
    Ok(parse_object(format, obj, source))
}

fn parse_object(
    format: Format,
    obj: &Map<String, Value>,
    source: &str,
) -> std::result::Result<Pair, Dropped> {
    let field = |name: &'static str| -> std::result::Result<&Value, Dropped> {
        obj.get(name).filter(|v| !v.is_null()).ok_or_else(|| {
            dropped(
                Reason::Missing(name),
                format!("missing field `{name}` (format {})", format_name(format)),
            )
        })
    };
    let text = |name: &'static str| field(name).and_then(|v| as_str(v, name));
    let single_prompt = |name: &'static str| -> std::result::Result<_, Dropped> {
        let p = text(name)?;
        if p.trim().is_empty() {
            return Err(dropped(Reason::NoPrompt, format!("`{name}` is empty")));
        }
        Ok(vec![("user".to_string(), p)])
    };
    let (prompt, chosen, rejected) = match format {
        Format::Preference => (single_prompt("prompt")?, text("chosen")?, text("rejected")?),
        Format::Ultrafeedback => {
            let (c, r) = (field("chosen")?, field("rejected")?);
            match (c, r) {
                (Value::Array(_), Value::Array(_)) => {
                    let (cp, ct) = split_last_assistant(as_messages(c, "chosen")?, "chosen")?;
                    let (rp, rt) = split_last_assistant(as_messages(r, "rejected")?, "rejected")?;
                    if cp != rp {
                        return Err(prompt_mismatch());
                    }
                    (cp, ct, rt)
                }
                (Value::String(c), Value::String(r)) => {
                    (single_prompt("prompt")?, c.clone(), r.clone())
                }
                (Value::Array(_) | Value::String(_), Value::Array(_) | Value::String(_)) => {
                    return Err(dropped(
                        Reason::MixedLayout,
                        format!(
                            "`chosen` is {} but `rejected` {}: both must be message lists or both strings",
                            type_name(c),
                            type_name(r)
                        ),
                    ));
                }
                (Value::Array(_) | Value::String(_), other) => {
                    return Err(wrong_type("rejected", "a message list or a string", other));
                }
                (other, _) => {
                    return Err(wrong_type("chosen", "a message list or a string", other));
                }
            }
        }
        Format::HhRlhf => {
            let ct = parse_transcript(&text("chosen")?, "chosen")?;
            let rt = parse_transcript(&text("rejected")?, "rejected")?;
            let (cp, c) = split_last_assistant(ct, "chosen")?;
            let (rp, r) = split_last_assistant(rt, "rejected")?;
            if cp != rp {
                return Err(prompt_mismatch());
            }
            (cp, c, r)
        }
    };
    for (name, response) in [("chosen", &chosen), ("rejected", &rejected)] {
        if response.trim().is_empty() {
            return Err(dropped(
                Reason::EmptyResponse,
                format!("the `{name}` response is empty"),
            ));
        }
    }
    if chosen == rejected {
        return Err(dropped(
            Reason::IdenticalResponses,
            "`chosen` and `rejected` are the same answer",
        ));
    }
    let score = |name: &'static str| -> std::result::Result<Option<f64>, Dropped> {
        let v = obj
            .get(name)
            .or_else(|| obj.get("metadata").and_then(|m| m.get(name)));
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(other) => Err(wrong_type(name, "a number", other)),
        }
    };
    let (score_chosen, score_rejected) = (score("score_chosen")?, score("score_rejected")?);
    let id = match obj.get("id").or_else(|| obj.get("prompt_id")) {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => content_id(&prompt, &chosen, &rejected),
    };
    let split = match obj.get("split") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) if s.starts_with("train") => "train".into(),
        Some(Value::String(s)) if s.starts_with("test") => "test".into(),
        Some(other) => {
            return Err(dropped(
                Reason::UnknownSplit,
                format!("`split` is {other}, not train or test"),
            ));
        }
    };
    let src = match obj.get("source") {
        Some(Value::String(s)) => s.clone(),
        _ => source.to_string(),
    };
    Ok(Pair {
        id,
        split,
        prompt,
        chosen,
        rejected,
        score_chosen,
        score_rejected,
        source: src,
    })
}

fn prompt_mismatch() -> Dropped {
    dropped(
        Reason::PromptMismatch,
        "`chosen` and `rejected` differ before their last assistant turn",
    )
}

fn wrong_type(name: &'static str, expected: &str, found: &Value) -> Dropped {
    dropped(
        Reason::WrongType(name),
        format!("`{name}` must be {expected}, found {}", type_name(found)),
    )
}

pub(super) fn format_name(f: Format) -> &'static str {
    match f {
        Format::Ultrafeedback => "ultrafeedback",
        Format::HhRlhf => "hh-rlhf",
        Format::Preference => "preference",
    }
}

/// A stable id from the content, for rows that carry none.
pub fn content_id(prompt: &[(String, String)], chosen: &str, rejected: &str) -> String {
    let v = json!({"prompt": prompt, "chosen": chosen, "rejected": rejected});
    blake3::hash(v.to_string().as_bytes()).to_hex()[..16].to_string()
}

fn as_str(v: &Value, name: &'static str) -> std::result::Result<String, Dropped> {
    match v {
        Value::String(s) => Ok(s.clone()),
        other => Err(wrong_type(name, "a string", other)),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

pub fn normalize_role(role: &str) -> Option<&'static str> {
    match role.to_ascii_lowercase().as_str() {
        "system" => Some("system"),
        "user" | "human" => Some("user"),
        "assistant" | "gpt" | "bot" => Some("assistant"),
        _ => None,
    }
}

fn as_messages(v: &Value, name: &str) -> std::result::Result<Vec<(String, String)>, Dropped> {
    let Value::Array(items) = v else {
        return Err(dropped(
            Reason::BadMessage,
            format!("`{name}` must be a list of messages"),
        ));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let get = |key: &str| {
                m.get(key).and_then(Value::as_str).ok_or_else(|| {
                    dropped(
                        Reason::BadMessage,
                        format!("`{name}[{i}]` has no `{key}` string"),
                    )
                })
            };
            let (role, content) = (get("role")?, get("content")?);
            let role = normalize_role(role).ok_or_else(|| {
                dropped(
                    Reason::UnknownRole,
                    format!("`{name}[{i}]` has role `{role}` (expected system, user or assistant)"),
                )
            })?;
            Ok((role.to_string(), content.to_string()))
        })
        .collect()
}

/// Splits a conversation into its prompt (every turn but the last) and the final assistant
/// answer.
fn split_last_assistant(
    mut msgs: Vec<(String, String)>,
    name: &str,
) -> std::result::Result<(Vec<(String, String)>, String), Dropped> {
    match msgs.pop() {
        Some((role, content)) if role == "assistant" => {
            if msgs.is_empty() {
                return Err(dropped(
                    Reason::NoPrompt,
                    format!("`{name}` has an assistant answer but no prompt before it"),
                ));
            }
            Ok((msgs, content))
        }
        Some((role, _)) if msgs.iter().any(|m| m.0 == "assistant") => Err(dropped(
            Reason::LastTurnNotAssistant,
            format!("`{name}` ends with a `{role}` turn, not an assistant answer"),
        )),
        Some(_) => Err(dropped(
            Reason::NoAssistantTurn,
            format!("`{name}` has no assistant turn"),
        )),
        None => Err(dropped(
            Reason::EmptyConversation,
            format!("`{name}` is an empty conversation"),
        )),
    }
}

/// Splits an Anthropic transcript ("\n\nHuman: ...\n\nAssistant: ...") into turns.
pub fn parse_transcript(
    t: &str,
    name: &str,
) -> std::result::Result<Vec<(String, String)>, Dropped> {
    const MARKERS: [(&str, &str); 2] = [("\n\nHuman:", "user"), ("\n\nAssistant:", "assistant")];
    // Some copies of the data strip the leading "\n\n"; the first turn is a turn all the same.
    let start = t.trim_start();
    let restored;
    let t = if start.starts_with("Human:") || start.starts_with("Assistant:") {
        restored = format!("\n\n{start}");
        restored.as_str()
    } else {
        t
    };
    let mut turns: Vec<(String, String)> = Vec::new();
    let mut rest = t;
    let mut current: Option<&str> = None;
    loop {
        let next = MARKERS
            .iter()
            .filter_map(|(m, role)| rest.find(m).map(|i| (i, *m, *role)))
            .min_by_key(|x| x.0);
        let (end, marker, role) = match next {
            Some(x) => x,
            None => (rest.len(), "", ""),
        };
        match current {
            Some(r) => turns.push((r.to_string(), rest[..end].trim().to_string())),
            None if !rest[..end].trim().is_empty() => {
                return Err(dropped(
                    Reason::NotATranscript,
                    format!("`{name}` does not start with \"\\n\\nHuman:\""),
                ));
            }
            None => {}
        }
        if marker.is_empty() {
            break;
        }
        current = Some(role);
        rest = &rest[end + marker.len()..];
    }
    if turns.is_empty() {
        return Err(dropped(
            Reason::EmptyConversation,
            format!("`{name}` holds no Human/Assistant turn"),
        ));
    }
    Ok(turns)
}
