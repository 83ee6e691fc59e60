//! Chat templates: how a prompt's messages become the text the model sees before its answer.

use std::path::Path;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::error::user;

/// A chat template, by the name a `tokenize` stage's `template` gives.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, schemars::JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TemplateName {
    /// The turns' text joined by a blank line, no markup.
    None,
    /// `<|im_start|>role\ncontent<|im_end|>\n` per turn, then `<|im_start|>assistant\n`.
    Chatml,
    /// The `chat_template` of the tokenizer_config.json beside tokenizer.json (Jinja).
    Hf,
    /// Anthropic HH-RLHF's transcript format: `\n\nHuman: ...` / `\n\nAssistant: ...` per turn
    /// (a system message first, as its own paragraph), then `\n\nAssistant:`.
    Hh,
}

/// A ready-to-render template.
pub enum Template {
    None,
    Chatml,
    Hh,
    Hf {
        env: Box<minijinja::Environment<'static>>,
        bos: String,
        eos: String,
    },
}

impl Template {
    /// `hf` needs the tokenizer_config.json contents.
    pub fn new(
        name: TemplateName,
        tokenizer_config: Option<&serde_json::Value>,
    ) -> Result<Template> {
        Ok(match name {
            TemplateName::None => Template::None,
            TemplateName::Chatml => Template::Chatml,
            TemplateName::Hh => Template::Hh,
            TemplateName::Hf => {
                let cfg = tokenizer_config.ok_or_else(|| {
                    user("template `hf` needs a tokenizer_config.json beside tokenizer.json")
                })?;
                let source = chat_template_source(cfg).ok_or_else(|| {
                    user("template `hf`: tokenizer_config.json has no `chat_template`")
                })?;
                let mut env = minijinja::Environment::new();
                // transformers compiles chat templates with trim_blocks and lstrip_blocks.
                env.set_trim_blocks(true);
                env.set_lstrip_blocks(true);
                minijinja_contrib::add_to_environment(&mut env);
                env.set_unknown_method_callback(
                    minijinja_contrib::pycompat::unknown_method_callback,
                );
                env.add_function(
                    "raise_exception",
                    |msg: String| -> Result<String, minijinja::Error> {
                        Err(minijinja::Error::new(
                            minijinja::ErrorKind::InvalidOperation,
                            msg,
                        ))
                    },
                );
                env.add_template_owned("chat", source).map_err(|e| {
                    user(format!("template `hf`: chat_template does not parse: {e}"))
                })?;
                Template::Hf {
                    env: Box::new(env),
                    bos: special_token(cfg, "bos_token").unwrap_or_default(),
                    eos: special_token(cfg, "eos_token").unwrap_or_default(),
                }
            }
        })
    }

    /// Renders the prompt turns, ending where the assistant's answer begins.
    pub fn render(&self, messages: &[(String, String)]) -> Result<String> {
        Ok(match self {
            Template::None => messages
                .iter()
                .map(|m| m.1.as_str())
                .collect::<Vec<_>>()
                .join("\n\n"),
            Template::Chatml => {
                let mut s = String::new();
                for (role, content) in messages {
                    s.push_str(&format!("<|im_start|>{role}\n{content}<|im_end|>\n"));
                }
                s.push_str("<|im_start|>assistant\n");
                s
            }
            Template::Hh => {
                let mut s = String::new();
                for (role, content) in messages {
                    match role.as_str() {
                        "user" => s.push_str(&format!("\n\nHuman: {content}")),
                        "assistant" => s.push_str(&format!("\n\nAssistant: {content}")),
                        _ => s.push_str(&format!("\n\n{content}")),
                    }
                }
                s.push_str("\n\nAssistant:");
                s
            }
            Template::Hf { env, bos, eos } => {
                let msgs: Vec<serde_json::Value> = messages
                    .iter()
                    .map(|(r, c)| serde_json::json!({"role": r, "content": c}))
                    .collect();
                let t = env.get_template("chat").expect("added above");
                t.render(minijinja::context! {
                    messages => msgs,
                    add_generation_prompt => true,
                    bos_token => bos,
                    eos_token => eos,
                })
                .map_err(|e| user(format!("template `hf`: rendering failed: {e}")))?
            }
        })
    }
}

/// The Jinja source of a tokenizer_config.json: a string, or the `default` of a named list.
pub fn chat_template_source(cfg: &serde_json::Value) -> Option<String> {
    match cfg.get("chat_template")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(items) => items
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .or_else(|| items.first())
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(str::to_string),
        _ => None,
    }
}

/// Reads a tokenizer_config.json: `None` when there is no such file, a user error (exit 2)
/// naming the file when it is not JSON or not a JSON object. Every reader goes through here, so
/// code that indexes the config by key (`cfg["eos_token"] = ...`) can never meet an array or a
/// number and panic.
pub fn read_tokenizer_config(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let bytes =
        std::fs::read(path).map_err(|e| user(format!("{}: cannot read: {e}", path.display())))?;
    let v: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| user(format!("{}: not valid JSON: {e}", path.display())))?;
    if !v.is_object() {
        return Err(user(format!(
            "{}: must be a JSON object (like {{\"eos_token\": \"</s>\"}}), found {}",
            path.display(),
            json_type(&v)
        )));
    }
    Ok(Some(v))
}

fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// A special token of tokenizer_config.json: either a string or `{"content": ...}`.
pub fn special_token(cfg: &serde_json::Value, key: &str) -> Option<String> {
    match cfg.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs() -> Vec<(String, String)> {
        vec![
            ("system".into(), "Be brief.".into()),
            ("user".into(), "Hi?".into()),
        ]
    }

    #[test]
    fn none_and_chatml() {
        assert_eq!(Template::None.render(&msgs()).unwrap(), "Be brief.\n\nHi?");
        assert_eq!(
            Template::Chatml.render(&msgs()).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn hh_template_keeps_the_transcript_format() {
        let msgs = vec![
            ("user".to_string(), "Hi?".to_string()),
            ("assistant".to_string(), "Hello.".to_string()),
            ("user".to_string(), "Bye?".to_string()),
        ];
        assert_eq!(
            Template::Hh.render(&msgs).unwrap(),
            "\n\nHuman: Hi?\n\nAssistant: Hello.\n\nHuman: Bye?\n\nAssistant:"
        );
    }

    #[test]
    fn hf_template_with_python_methods() {
        // Zephyr's template (HuggingFaceH4/zephyr-7b-beta), which uses Python string methods.
        let cfg = serde_json::json!({
            "eos_token": "</s>",
            "bos_token": {"content": "<s>"},
            "chat_template": "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
        });
        let t = Template::new(TemplateName::Hf, Some(&cfg)).unwrap();
        assert_eq!(
            t.render(&msgs()).unwrap(),
            "<|system|>\nBe brief.</s>\n<|user|>\nHi?</s>\n<|assistant|>\n"
        );
        let strip = serde_json::json!({"chat_template": "{{ messages[0]['content'].strip().upper() }}{% if messages|length > 5 %}{{ raise_exception('too long') }}{% endif %}"});
        let t = Template::new(TemplateName::Hf, Some(&strip)).unwrap();
        assert_eq!(t.render(&[("user".into(), "  hi ".into())]).unwrap(), "HI");
        assert!(Template::new(TemplateName::Hf, Some(&serde_json::json!({}))).is_err());
    }
}
