//! `ingest`: user preference data (UltraFeedback, HH-RLHF, flat preference rows) to `pairs.parquet`.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{BuildContext, RunContext, Stage, StageKind, parse_config, resolve, to_params};
use crate::data::parquet as pq;
use crate::data::rows::{Location, expand, for_each_row};
use crate::error::user;
use crate::user_bail;

pub static KIND: StageKind = StageKind {
    kind: "ingest",
    version: "1",
    roles: &[],
    build,
};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    Ultrafeedback,
    HhRlhf,
    Preference,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    pub format: Format,
    /// A file or a glob (.parquet, .jsonl, .jsonl.gz, .json), relative to the pipeline file.
    pub path: String,
    /// Fraction of rows (by a hash of their id) put in the `test` split.
    #[serde(default)]
    pub test_fraction: f64,
    /// Keep only the first N pairs (after dropping), for quick runs.
    #[serde(default)]
    pub limit: Option<usize>,
}

const KEYS: &[&str] = &["format", "path", "test_fraction", "limit"];

struct Ingest {
    cfg: IngestConfig,
    base: PathBuf,
}

fn build(params: &Value, ctx: &BuildContext) -> Result<Box<dyn Stage>> {
    let cfg: IngestConfig = parse_config(params, KEYS)?;
    if !(0.0..1.0).contains(&cfg.test_fraction) {
        user_bail!(
            "`test_fraction` must be in [0, 1), got {}",
            cfg.test_fraction
        );
    }
    Ok(Box::new(Ingest {
        cfg,
        base: ctx.base_dir.to_path_buf(),
    }))
}

/// One preference pair in the artifact's schema.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    pub id: String,
    pub split: String,
    pub prompt: Vec<(String, String)>,
    pub chosen: String,
    pub rejected: String,
    pub score_chosen: Option<f64>,
    pub score_rejected: Option<f64>,
    pub source: String,
}

/// Why a row was left out (counted in the manifest).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Drop {
    IdenticalResponses,
    PromptMismatch,
}

impl Drop {
    fn key(self) -> &'static str {
        match self {
            Drop::IdenticalResponses => "identical_responses",
            Drop::PromptMismatch => "prompt_mismatch",
        }
    }
}

impl Stage for Ingest {
    fn params(&self) -> Value {
        to_params(&self.cfg)
    }

    fn external_files(&self) -> Result<Vec<PathBuf>> {
        expand(&resolve(&self.base, &self.cfg.path))
    }

    fn run(&self, ctx: &RunContext) -> Result<Value> {
        let files = self.external_files()?;
        let mut pairs: Vec<Pair> = Vec::new();
        let mut dropped: HashMap<Drop, usize> = HashMap::new();
        let mut read = 0usize;
        let bar = ctx.progress.bar(ctx.stage, 0, "rows");
        for file in &files {
            let source = file
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            for_each_row(file, |loc, row| {
                read += 1;
                bar.inc(1);
                match parse_row(self.cfg.format, &row, &loc, &source)? {
                    Ok(p) => pairs.push(p),
                    Err(d) => *dropped.entry(d).or_default() += 1,
                }
                Ok(())
            })?;
        }
        bar.finish();
        if let Some(n) = self.cfg.limit {
            pairs.truncate(n);
        }
        dedupe_ids(&mut pairs);
        for p in &mut pairs {
            if p.split.is_empty() {
                p.split = if in_test(&p.id, self.cfg.test_fraction) {
                    "test"
                } else {
                    "train"
                }
                .into();
            }
        }
        if pairs.is_empty() {
            user_bail!("no usable rows in {}", self.cfg.path);
        }
        let mut df = to_frame(&pairs)?;
        pq::write(&mut df, &ctx.out.join("pairs.parquet"))?;
        let test = pairs.iter().filter(|p| p.split == "test").count();
        let drops: serde_json::Map<String, Value> = dropped
            .iter()
            .map(|(k, v)| (k.key().to_string(), Value::from(*v)))
            .collect();
        let mut dropped_text: Vec<String> = drops.iter().map(|(k, v)| format!("{v} {k}")).collect();
        dropped_text.sort();
        ctx.progress.log(format!(
            "         {}: {} rows read, {} pairs ({} train, {} test), dropped: {}",
            ctx.stage,
            read,
            pairs.len(),
            pairs.len() - test,
            test,
            if dropped_text.is_empty() {
                "none".to_string()
            } else {
                dropped_text.join(", ")
            }
        ));
        Ok(
            json!({"rows_read": read, "pairs": pairs.len(), "train": pairs.len() - test, "test": test, "dropped": drops}),
        )
    }
}

/// Whether `id` falls in the test split: a hash of the id alone decides, so adding rows never
/// moves old ones between splits.
pub fn in_test(id: &str, fraction: f64) -> bool {
    if fraction <= 0.0 {
        return false;
    }
    let h = blake3::hash(format!("sepo-split:{id}").as_bytes());
    let x = u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"));
    (x as f64 / (u64::MAX as f64 + 1.0)) < fraction
}

/// Ids must be unique for joins downstream; repeats get `#2`, `#3`, ... in file order.
fn dedupe_ids(pairs: &mut [Pair]) {
    let mut seen: HashMap<String, usize> = HashMap::new();
    for p in pairs.iter_mut() {
        let n = seen.entry(p.id.clone()).or_default();
        *n += 1;
        if *n > 1 {
            p.id = format!("{}#{}", p.id, n);
        }
    }
}

pub fn to_frame(pairs: &[Pair]) -> Result<polars::prelude::DataFrame> {
    pq::frame(vec![
        pq::utf8("id", pairs.iter().map(|p| p.id.clone()).collect()),
        pq::utf8("split", pairs.iter().map(|p| p.split.clone()).collect()),
        pq::messages(
            "prompt",
            &pairs.iter().map(|p| p.prompt.clone()).collect::<Vec<_>>(),
        )?,
        pq::utf8("chosen", pairs.iter().map(|p| p.chosen.clone()).collect()),
        pq::utf8(
            "rejected",
            pairs.iter().map(|p| p.rejected.clone()).collect(),
        ),
        pq::opt_f64(
            "score_chosen",
            pairs.iter().map(|p| p.score_chosen).collect(),
        ),
        pq::opt_f64(
            "score_rejected",
            pairs.iter().map(|p| p.score_rejected).collect(),
        ),
        pq::utf8("source", pairs.iter().map(|p| p.source.clone()).collect()),
    ])
}

/// Reads `pairs.parquet` back.
pub fn read_pairs(path: &std::path::Path) -> Result<Vec<Pair>> {
    let df = pq::read(path)?;
    let r = pq::Reader {
        df: &df,
        file: path,
    };
    let (id, split, prompt) = (r.strings("id")?, r.strings("split")?, r.messages("prompt")?);
    let (chosen, rejected) = (r.strings("chosen")?, r.strings("rejected")?);
    let (sc, sr, source) = (
        r.opt_f64("score_chosen")?,
        r.opt_f64("score_rejected")?,
        r.strings("source")?,
    );
    Ok((0..df.height())
        .map(|i| Pair {
            id: id[i].clone(),
            split: split[i].clone(),
            prompt: prompt[i].clone(),
            chosen: chosen[i].clone(),
            rejected: rejected[i].clone(),
            score_chosen: sc[i],
            score_rejected: sr[i],
            source: source[i].clone(),
        })
        .collect())
}

type RowResult = Result<std::result::Result<Pair, Drop>>;

/// Parses one row. Outer error: bad input (exit 2, names the row); inner: a counted drop.
pub fn parse_row(format: Format, row: &Value, loc: &Location, source: &str) -> RowResult {
    let obj = row
        .as_object()
        .ok_or_else(|| user(format!("{loc}: expected a JSON object")))?;
    let field = |name: &str| -> Result<&Value> {
        obj.get(name).filter(|v| !v.is_null()).ok_or_else(|| {
            user(format!(
                "{loc}: missing field `{name}` (format {})",
                format_name(format)
            ))
        })
    };
    let (prompt, chosen, rejected) = match format {
        Format::Preference => {
            let p = as_str(field("prompt")?, "prompt", loc)?;
            (
                vec![("user".to_string(), p)],
                as_str(field("chosen")?, "chosen", loc)?,
                as_str(field("rejected")?, "rejected", loc)?,
            )
        }
        Format::Ultrafeedback => {
            let (c, r) = (field("chosen")?, field("rejected")?);
            match (c, r) {
                (Value::Array(_), Value::Array(_)) => {
                    let cm = as_messages(c, "chosen", loc)?;
                    let rm = as_messages(r, "rejected", loc)?;
                    let (cp, ct) = split_last_assistant(cm, "chosen", loc)?;
                    let (rp, rt) = split_last_assistant(rm, "rejected", loc)?;
                    if cp != rp {
                        return Ok(Err(Drop::PromptMismatch));
                    }
                    (cp, ct, rt)
                }
                (Value::String(_), Value::String(_)) => {
                    let p = as_str(field("prompt")?, "prompt", loc)?;
                    (
                        vec![("user".to_string(), p)],
                        as_str(c, "chosen", loc)?,
                        as_str(r, "rejected", loc)?,
                    )
                }
                _ => user_bail!(
                    "{loc}: `chosen` and `rejected` must both be message lists or both strings"
                ),
            }
        }
        Format::HhRlhf => {
            let ct = parse_transcript(&as_str(field("chosen")?, "chosen", loc)?, "chosen", loc)?;
            let rt = parse_transcript(
                &as_str(field("rejected")?, "rejected", loc)?,
                "rejected",
                loc,
            )?;
            let (cp, c) = split_last_assistant(ct, "chosen", loc)?;
            let (rp, r) = split_last_assistant(rt, "rejected", loc)?;
            if cp != rp {
                return Ok(Err(Drop::PromptMismatch));
            }
            (cp, c, r)
        }
    };
    if chosen == rejected {
        return Ok(Err(Drop::IdenticalResponses));
    }
    let score = |name: &str| -> Result<Option<f64>> {
        let v = obj
            .get(name)
            .or_else(|| obj.get("metadata").and_then(|m| m.get(name)));
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(other) => user_bail!("{loc}: `{name}` must be a number, found {other}"),
        }
    };
    let id = match obj.get("id").or_else(|| obj.get("prompt_id")) {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => content_id(&prompt, &chosen, &rejected),
    };
    let split = match obj.get("split") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) if s.starts_with("train") => "train".into(),
        Some(Value::String(s)) if s.starts_with("test") => "test".into(),
        Some(other) => user_bail!("{loc}: `split` must be train or test, found {other}"),
    };
    let src = match obj.get("source") {
        Some(Value::String(s)) => s.clone(),
        _ => source.to_string(),
    };
    Ok(Ok(Pair {
        id,
        split,
        prompt,
        chosen,
        rejected,
        score_chosen: score("score_chosen")?,
        score_rejected: score("score_rejected")?,
        source: src,
    }))
}

fn format_name(f: Format) -> &'static str {
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

fn as_str(v: &Value, name: &str, loc: &Location) -> Result<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        other => user_bail!(
            "{loc}: `{name}` must be a string, found {}",
            type_name(other)
        ),
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

fn as_messages(v: &Value, name: &str, loc: &Location) -> Result<Vec<(String, String)>> {
    let Value::Array(items) = v else {
        user_bail!("{loc}: `{name}` must be a list of messages");
    };
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| user(format!("{loc}: `{name}[{i}]` has no `role` string")))?;
            let content = m
                .get("content")
                .and_then(Value::as_str)
                .ok_or_else(|| user(format!("{loc}: `{name}[{i}]` has no `content` string")))?;
            let role = normalize_role(role).ok_or_else(|| {
                user(format!(
                    "{loc}: `{name}[{i}]` has role `{role}` (expected system, user or assistant)"
                ))
            })?;
            Ok((role.to_string(), content.to_string()))
        })
        .collect()
}

fn split_last_assistant(
    mut msgs: Vec<(String, String)>,
    name: &str,
    loc: &Location,
) -> Result<(Vec<(String, String)>, String)> {
    match msgs.pop() {
        Some((role, content)) if role == "assistant" => {
            if msgs.is_empty() {
                user_bail!("{loc}: `{name}` has an assistant answer but no prompt before it");
            }
            Ok((msgs, content))
        }
        Some((role, _)) => {
            user_bail!("{loc}: `{name}` must end with an assistant turn, not `{role}`")
        }
        None => user_bail!("{loc}: `{name}` is an empty conversation"),
    }
}

/// Splits an Anthropic transcript ("\n\nHuman: ...\n\nAssistant: ...") into turns.
pub fn parse_transcript(t: &str, name: &str, loc: &Location) -> Result<Vec<(String, String)>> {
    const MARKERS: [(&str, &str); 2] = [("\n\nHuman:", "user"), ("\n\nAssistant:", "assistant")];
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
                user_bail!("{loc}: `{name}` must start with \"\\n\\nHuman:\"")
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
        user_bail!("{loc}: `{name}` holds no Human/Assistant turn");
    }
    Ok(turns)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc() -> Location {
        Location {
            file: "f.jsonl".into(),
            index: 3,
            is_line: true,
        }
    }

    #[test]
    fn transcript_turns() {
        let t = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant: See you";
        let turns = parse_transcript(t, "chosen", &loc()).unwrap();
        assert_eq!(turns.len(), 4);
        assert_eq!(turns[0], ("user".into(), "Hi there".into()));
        assert_eq!(turns[3], ("assistant".into(), "See you".into()));
        assert!(parse_transcript("Hello", "chosen", &loc()).is_err());
    }

    #[test]
    fn hh_row_shared_turns_become_the_prompt() {
        let row = json!({
            "chosen": "\n\nHuman: Q1\n\nAssistant: A1\n\nHuman: Q2\n\nAssistant: good",
            "rejected": "\n\nHuman: Q1\n\nAssistant: A1\n\nHuman: Q2\n\nAssistant: bad"
        });
        let p = parse_row(Format::HhRlhf, &row, &loc(), "x")
            .unwrap()
            .unwrap();
        assert_eq!(p.prompt.len(), 3);
        assert_eq!(p.prompt[1], ("assistant".into(), "A1".into()));
        assert_eq!((p.chosen.as_str(), p.rejected.as_str()), ("good", "bad"));
        let same = json!({"chosen": "\n\nHuman: Q\n\nAssistant: A", "rejected": "\n\nHuman: Q\n\nAssistant: A"});
        assert_eq!(
            parse_row(Format::HhRlhf, &same, &loc(), "x").unwrap(),
            Err(Drop::IdenticalResponses)
        );
    }

    #[test]
    fn missing_field_names_row_and_field() {
        let row = json!({"prompt": "p", "chosen": "c"});
        let err = parse_row(Format::Preference, &row, &loc(), "x").unwrap_err();
        assert!(crate::error::is_user_error(&err));
        assert_eq!(
            err.to_string(),
            "f.jsonl line 3: missing field `rejected` (format preference)"
        );
    }

    #[test]
    fn ultrafeedback_string_layout_with_metadata_scores() {
        let row = json!({"prompt": "p", "chosen": "c", "rejected": "r", "metadata": {"score_chosen": 8.5, "score_rejected": 3.0}});
        let p = parse_row(Format::Ultrafeedback, &row, &loc(), "x")
            .unwrap()
            .unwrap();
        assert_eq!(p.score_chosen, Some(8.5));
        assert_eq!(p.prompt, vec![("user".to_string(), "p".to_string())]);
    }

    #[test]
    fn split_is_stable_and_roughly_proportional() {
        let n = (0..10_000)
            .filter(|i| in_test(&format!("id{i}"), 0.1))
            .count();
        assert!((900..1100).contains(&n), "{n}");
        assert!(!in_test("anything", 0.0));
    }
}
