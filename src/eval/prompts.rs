//! Extra prompts for `evaluate` to answer (`prompts: FILE`), beside the test split: a JSON array
//! or JSON lines of AlpacaEval items (`{"instruction": ...}`, other keys ignored) or plain
//! strings. Each becomes a one-turn user prompt, rendered and encoded exactly as the `tokenize`
//! stage behind the data renders its prompts (same template, same BOS rule).

use std::path::Path;

use anyhow::Result;
use serde_json::Value;

use crate::template::{Template, TemplateName};
use crate::tokenizer::HfTokenizer;
use crate::user_bail;

/// The instructions of a prompt file, in order. A row that is neither a string nor an object
/// with a string `instruction` is an error naming the file and the row.
pub fn read(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| crate::error::user(format!("{}: cannot read: {e}", path.display())))?;
    let rows: Vec<(usize, Value)> = if text.trim_start().starts_with('[') {
        let v: Vec<Value> = serde_json::from_str(&text).map_err(|e| {
            crate::error::user(format!("{}: not a JSON array: {e}", path.display()))
        })?;
        v.into_iter().enumerate().map(|(i, x)| (i + 1, x)).collect()
    } else {
        let mut rows = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(line).map_err(|e| {
                crate::error::user(format!("{}: line {}: not JSON: {e}", path.display(), i + 1))
            })?;
            rows.push((i + 1, v));
        }
        rows
    };
    let mut out = Vec::with_capacity(rows.len());
    for (n, v) in rows {
        match v {
            Value::String(s) => out.push(s),
            Value::Object(o) => match o.get("instruction") {
                Some(Value::String(s)) => out.push(s.clone()),
                _ => user_bail!(
                    "{}: row {n}: an object needs a string `instruction` (AlpacaEval's format)",
                    path.display()
                ),
            },
            _ => user_bail!(
                "{}: row {n}: expected a string or an object with `instruction`",
                path.display()
            ),
        }
    }
    if out.is_empty() {
        user_bail!("{}: no prompts", path.display());
    }
    Ok(out)
}

/// Each instruction as a one-turn user prompt, rendered with `template` and encoded with the
/// tokenizer's special tokens (unless the template wrote BOS itself), as `tokenize` does.
pub fn encode(
    instructions: &[String],
    template: TemplateName,
    hf: &HfTokenizer,
) -> Result<Vec<Vec<u32>>> {
    let t = Template::new(template, hf.config())?;
    let bos = hf.special_token("bos_token");
    instructions
        .iter()
        .map(|inst| {
            let text = t.render(&[("user".to_string(), inst.clone())])?;
            let special = !bos
                .as_deref()
                .is_some_and(|b| !b.is_empty() && text.starts_with(b));
            let enc = hf
                .tokenizer()
                .encode(text.as_str(), special)
                .map_err(|e| anyhow::anyhow!("encoding a prompt: {e}"))?;
            Ok(enc.get_ids().to_vec())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_alpacaeval_items_strings_and_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.json");
        std::fs::write(&a, r#"[{"instruction": "Hi?", "dataset": "x"}, "Bye?"]"#).unwrap();
        assert_eq!(read(&a).unwrap(), ["Hi?", "Bye?"]);
        let b = dir.path().join("b.jsonl");
        std::fs::write(&b, "{\"instruction\": \"One\"}\n\n\"Two\"\n").unwrap();
        assert_eq!(read(&b).unwrap(), ["One", "Two"]);
        std::fs::write(&b, "{\"instruction\": \"One\"}\n{\"prompt\": 3}\n").unwrap();
        let e = read(&b).unwrap_err().to_string();
        assert!(e.contains("row 2") && e.contains("instruction"), "{e}");
        std::fs::write(&b, "").unwrap();
        assert!(read(&b).unwrap_err().to_string().contains("no prompts"));
    }
}
