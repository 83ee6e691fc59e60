//! `ingest`: user preference data (UltraFeedback, HH-RLHF, flat preference rows) to `pairs.parquet`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::{BuildContext, RunContext, Stage, StageKind, parse_config, resolve, to_params};
use crate::data::parquet as pq;
use crate::data::rows::{FileType, Location, expand, file_type, for_each_row_in};
use crate::user_bail;

pub static KIND: StageKind = StageKind {
    kind: "ingest",
    // 2: odd rows (empty responses, ...) are dropped and counted; renamed ids stay unique.
    version: "2",
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
    /// The largest share of rows read that may be dropped as odd before the stage fails: a few odd
    /// rows are normal in real data, many mean the data or `format` is wrong.
    #[serde(default = "default_max_drop_fraction")]
    pub max_drop_fraction: f64,
}

fn default_max_drop_fraction() -> f64 {
    0.05
}

const KEYS: &[&str] = &[
    "format",
    "path",
    "test_fraction",
    "limit",
    "max_drop_fraction",
];

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
    if !(0.0..=1.0).contains(&cfg.max_drop_fraction) {
        user_bail!(
            "`max_drop_fraction` must be in [0, 1], got {}",
            cfg.max_drop_fraction
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

fn dropped(reason: Reason, detail: impl Into<String>) -> Dropped {
    Dropped {
        reason,
        detail: detail.into(),
    }
}

/// Drop counts by reason, with where and why the first row of each was dropped.
#[derive(Default)]
struct Drops(BTreeMap<Reason, (usize, String)>);

impl Drops {
    fn add(&mut self, d: Dropped, loc: &Location) {
        self.0
            .entry(d.reason)
            .or_insert_with(|| (0, format!("{loc}: {}", d.detail)))
            .0 += 1;
    }

    fn total(&self) -> usize {
        self.0.values().map(|(n, _)| n).sum()
    }

    /// Most frequent first (then by key), so a summary shows what matters.
    fn ranked(&self) -> Vec<(String, usize, &str)> {
        let mut v: Vec<_> = self
            .0
            .iter()
            .map(|(r, (n, first))| (r.key(), *n, first.as_str()))
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v
    }

    /// The top reasons with their counts and first example, for error messages.
    fn explain(&self, top: usize) -> String {
        let ranked = self.ranked();
        let mut parts: Vec<String> = ranked
            .iter()
            .take(top)
            .map(|(k, n, first)| format!("{n} {k} (first: {first})"))
            .collect();
        if ranked.len() > top {
            let rest: usize = ranked[top..].iter().map(|r| r.1).sum();
            parts.push(format!(
                "{rest} more for {} other reasons",
                ranked.len() - top
            ));
        }
        parts.join("; ")
    }
}

/// A share as a percentage that never rounds a non-zero share to 0.
fn percent(part: usize, whole: usize) -> String {
    let p = 100.0 * part as f64 / whole.max(1) as f64;
    if part > 0 && p < 0.1 {
        "<0.1%".into()
    } else {
        format!("{p:.1}%")
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
fn required(format: Format) -> &'static [&'static str] {
    match format {
        Format::Preference => &["prompt", "chosen", "rejected"],
        Format::Ultrafeedback | Format::HhRlhf => &["chosen", "rejected"],
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
        let format = self.cfg.format;
        let files = self.external_files()?;
        let mut pairs: Vec<Pair> = Vec::new();
        let mut drops = Drops::default();
        let mut read = 0usize;
        let bar = ctx.progress.bar(ctx.stage, 0, "rows");
        for file in &files {
            let source = file
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let mut rows_in_file = 0usize;
            let mut present: BTreeSet<&str> = BTreeSet::new();
            let mut first_keys: Option<Vec<String>> = None;
            for_each_row_in(file, Some(fields(format)), |loc, row| {
                read += 1;
                rows_in_file += 1;
                bar.inc(1);
                if let Some(obj) = row.as_object() {
                    first_keys.get_or_insert_with(|| obj.keys().cloned().collect());
                    present.extend(
                        required(format)
                            .iter()
                            .filter(|f| obj.get(**f).is_some_and(|v| !v.is_null())),
                    );
                }
                match parse_row(format, &row, &loc, &source)? {
                    Ok(p) => pairs.push(p),
                    Err(d) => drops.add(d, &loc),
                }
                Ok(())
            })?;
            let absent: Vec<String> = required(format)
                .iter()
                .filter(|f| !present.contains(**f))
                .map(|f| format!("`{f}`"))
                .collect();
            if rows_in_file > 0 && !absent.is_empty() {
                let has = match file_type(file)? {
                    FileType::Parquet => format!(
                        "its columns are: {}",
                        crate::data::parquet::column_names(file)?.join(", ")
                    ),
                    _ => format!(
                        "its first row has: {}",
                        first_keys.unwrap_or_default().join(", ")
                    ),
                };
                user_bail!(
                    "{}: no row has {} (format {} needs {}); {has}. Is `format` right?",
                    file.display(),
                    absent.join(" or "),
                    format_name(format),
                    required(format)
                        .iter()
                        .map(|f| format!("`{f}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        bar.finish();
        let n_dropped = drops.total();
        if pairs.is_empty() {
            if read == 0 {
                user_bail!("no usable rows in {}: it holds no rows", self.cfg.path);
            }
            user_bail!(
                "no usable rows in {}: all {read} rows were dropped: {}. Is `format` ({}) right?",
                self.cfg.path,
                drops.explain(5),
                format_name(format)
            );
        }
        if n_dropped as f64 > self.cfg.max_drop_fraction * read as f64 {
            user_bail!(
                "{n_dropped} of {read} rows of {} dropped ({}), more than `max_drop_fraction` {}: \
                 {}. Fix those rows, or raise `max_drop_fraction` to drop them",
                self.cfg.path,
                percent(n_dropped, read),
                self.cfg.max_drop_fraction,
                drops.explain(5)
            );
        }
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
        let mut df = to_frame(&pairs)?;
        pq::write(&mut df, &ctx.out.join("pairs.parquet"))?;
        let test = pairs.iter().filter(|p| p.split == "test").count();
        let ranked = drops.ranked();
        let dropped_text = if ranked.is_empty() {
            "none".to_string()
        } else {
            format!(
                "{n_dropped} ({}): {}",
                percent(n_dropped, read),
                ranked
                    .iter()
                    .map(|(k, n, _)| format!("{n} {k}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        ctx.progress.log(format!(
            "         {}: {} rows read, {} pairs ({} train, {} test), dropped {}",
            ctx.stage,
            read,
            pairs.len(),
            pairs.len() - test,
            test,
            dropped_text
        ));
        let counts: serde_json::Map<String, Value> = ranked
            .iter()
            .map(|(k, n, _)| (k.clone(), Value::from(*n)))
            .collect();
        let firsts: serde_json::Map<String, Value> = ranked
            .iter()
            .map(|(k, _, first)| (k.clone(), Value::from(*first)))
            .collect();
        Ok(json!({
            "rows_read": read,
            "pairs": pairs.len(),
            "train": pairs.len() - test,
            "test": test,
            "dropped": counts,
            "dropped_first": firsts,
        }))
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
    let mut ids: Vec<String> = pairs
        .iter_mut()
        .map(|p| std::mem::take(&mut p.id))
        .collect();
    unique_ids(&mut ids);
    for (p, id) in pairs.iter_mut().zip(ids) {
        p.id = id;
    }
}

/// Renames repeats to `id#n` with the smallest n >= 2 that no row holds, as its own id or as an
/// earlier renaming: `a, a, a#2` becomes `a, a#3, a#2`. The first row with an id keeps it, and a
/// row whose own id looks like a renaming (`a#2`) keeps it too, so ids the user wrote never move.
fn unique_ids(ids: &mut [String]) {
    let own: HashSet<String> = ids.iter().cloned().collect();
    let mut taken: HashSet<String> = HashSet::with_capacity(ids.len());
    let mut next: HashMap<String, usize> = HashMap::new();
    for id in ids.iter_mut() {
        if taken.insert(id.clone()) {
            continue;
        }
        let n = next.entry(id.clone()).or_insert(2);
        let renamed = loop {
            let candidate = format!("{id}#{n}");
            *n += 1;
            if !own.contains(&candidate) && !taken.contains(&candidate) {
                break candidate;
            }
        };
        taken.insert(renamed.clone());
        *id = renamed;
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn loc() -> Location {
        Location {
            file: "f.jsonl".into(),
            index: 3,
            is_line: true,
        }
    }

    fn parse(format: Format, row: Value) -> std::result::Result<Pair, Dropped> {
        parse_row(format, &row, &loc(), "x").unwrap()
    }

    fn reason(format: Format, row: Value) -> Reason {
        parse(format, row).unwrap_err().reason
    }

    #[test]
    fn transcript_turns() {
        let t = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant: See you";
        let turns = parse_transcript(t, "chosen").unwrap();
        assert_eq!(turns.len(), 4);
        assert_eq!(turns[0], ("user".into(), "Hi there".into()));
        assert_eq!(turns[3], ("assistant".into(), "See you".into()));
        assert_eq!(
            parse_transcript("Hello", "chosen").unwrap_err().reason,
            Reason::NotATranscript
        );
        assert_eq!(
            parse_transcript("  ", "chosen").unwrap_err().reason,
            Reason::EmptyConversation
        );
        // A copy that lost the leading blank line reads the same.
        assert_eq!(parse_transcript(t.trim_start(), "chosen").unwrap(), turns);
    }

    #[test]
    fn hh_row_shared_turns_become_the_prompt() {
        let row = json!({
            "chosen": "\n\nHuman: Q1\n\nAssistant: A1\n\nHuman: Q2\n\nAssistant: good",
            "rejected": "\n\nHuman: Q1\n\nAssistant: A1\n\nHuman: Q2\n\nAssistant: bad"
        });
        let p = parse(Format::HhRlhf, row).unwrap();
        assert_eq!(p.prompt.len(), 3);
        assert_eq!(p.prompt[1], ("assistant".into(), "A1".into()));
        assert_eq!((p.chosen.as_str(), p.rejected.as_str()), ("good", "bad"));
        let same = json!({"chosen": "\n\nHuman: Q\n\nAssistant: A", "rejected": "\n\nHuman: Q\n\nAssistant: A"});
        assert_eq!(reason(Format::HhRlhf, same), Reason::IdenticalResponses);
    }

    /// Every row-level problem of each format is a counted drop with a reason, never an error.
    #[test]
    fn odd_hh_rows_are_dropped_with_a_reason() {
        let hh = |c: &str, r: &str| json!({"chosen": c, "rejected": r});
        let cases = [
            // helpful-online: the transcript stops after the Human's turn.
            (
                hh(
                    "\n\nHuman: Q\n\nAssistant: A\n\nHuman: more?",
                    "\n\nHuman: Q\n\nAssistant: A\n\nHuman: more?",
                ),
                Reason::LastTurnNotAssistant,
            ),
            (hh("\n\nHuman: Q", "\n\nHuman: Q"), Reason::NoAssistantTurn),
            (
                hh("\n\nHuman: Q\n\nAssistant: A", "\n\nHuman: Q\n\nAssistant:"),
                Reason::EmptyResponse,
            ),
            (
                hh(
                    "\n\nHuman: Q\n\nAssistant: A",
                    "\n\nHuman: R\n\nAssistant: B",
                ),
                Reason::PromptMismatch,
            ),
            (hh("\n\nAssistant: A", "\n\nAssistant: B"), Reason::NoPrompt),
            (
                hh("", "\n\nHuman: Q\n\nAssistant: B"),
                Reason::EmptyConversation,
            ),
            (hh("plain text", "plain text 2"), Reason::NotATranscript),
            (
                json!({"chosen": "\n\nHuman: Q\n\nAssistant: A", "rejected": null}),
                Reason::Missing("rejected"),
            ),
            (
                json!({"chosen": 5, "rejected": "\n\nHuman: Q\n\nAssistant: A"}),
                Reason::WrongType("chosen"),
            ),
            (
                json!({"chosen": "\n\nHuman: Q\n\nAssistant: A", "rejected": "\n\nHuman: Q\n\nAssistant: B", "split": "validation"}),
                Reason::UnknownSplit,
            ),
            (
                json!({"chosen": "\n\nHuman: Q\n\nAssistant: A", "rejected": "\n\nHuman: Q\n\nAssistant: B", "score_chosen": "high"}),
                Reason::WrongType("score_chosen"),
            ),
        ];
        for (row, want) in cases {
            assert_eq!(reason(Format::HhRlhf, row.clone()), want, "{row}");
        }
        assert_eq!(
            Reason::Missing("rejected").key(),
            "missing_rejected",
            "manifest key"
        );
    }

    #[test]
    fn odd_ultrafeedback_and_preference_rows_are_dropped_with_a_reason() {
        let m = |role: &str, content: &str| json!({"role": role, "content": content});
        let uf = |c: Value, r: Value| json!({"chosen": c, "rejected": r});
        let ok = json!([m("user", "Q"), m("assistant", "A")]);
        let cases = [
            (
                uf(
                    json!([m("user", "Q"), m("assistant", "A"), m("user", "?")]),
                    ok.clone(),
                ),
                Reason::LastTurnNotAssistant,
            ),
            (
                uf(json!([m("user", "Q")]), ok.clone()),
                Reason::NoAssistantTurn,
            ),
            (uf(json!([]), ok.clone()), Reason::EmptyConversation),
            (
                uf(json!([m("assistant", "A")]), ok.clone()),
                Reason::NoPrompt,
            ),
            (
                uf(json!([m("user", "Q"), m("tool", "A")]), ok.clone()),
                Reason::UnknownRole,
            ),
            (
                uf(
                    json!([m("user", "Q"), {"role": "assistant", "content": null}]),
                    ok.clone(),
                ),
                Reason::BadMessage,
            ),
            (
                uf(ok.clone(), json!([m("user", "Q"), m("assistant", "  ")])),
                Reason::EmptyResponse,
            ),
            (
                uf(ok.clone(), json!([m("user", "Other"), m("assistant", "B")])),
                Reason::PromptMismatch,
            ),
            (uf(ok.clone(), json!("B")), Reason::MixedLayout),
            (uf(ok.clone(), json!(3)), Reason::WrongType("rejected")),
            (
                json!({"prompt": "p", "chosen": "c", "rejected": "r", "metadata": {"score_chosen": [1]}}),
                Reason::WrongType("score_chosen"),
            ),
            (
                json!({"chosen": "c", "rejected": "r"}),
                Reason::Missing("prompt"),
            ),
        ];
        for (row, want) in cases {
            assert_eq!(reason(Format::Ultrafeedback, row.clone()), want, "{row}");
        }
        let cases = [
            (
                json!({"prompt": "p", "chosen": "c"}),
                Reason::Missing("rejected"),
            ),
            (
                json!({"prompt": "", "chosen": "c", "rejected": "r"}),
                Reason::NoPrompt,
            ),
            (
                json!({"prompt": "p", "chosen": "", "rejected": "r"}),
                Reason::EmptyResponse,
            ),
            (
                json!({"prompt": ["p"], "chosen": "c", "rejected": "r"}),
                Reason::WrongType("prompt"),
            ),
        ];
        for (row, want) in cases {
            assert_eq!(reason(Format::Preference, row.clone()), want, "{row}");
        }
    }

    #[test]
    fn missing_field_names_the_field() {
        let d = parse(Format::Preference, json!({"prompt": "p", "chosen": "c"})).unwrap_err();
        assert_eq!(d.reason, Reason::Missing("rejected"));
        assert_eq!(d.detail, "missing field `rejected` (format preference)");
    }

    #[test]
    fn a_row_that_is_not_an_object_is_a_malformed_file() {
        let err = parse_row(Format::Preference, &json!([1, 2]), &loc(), "x").unwrap_err();
        assert!(crate::error::is_user_error(&err));
        assert_eq!(
            err.to_string(),
            "f.jsonl line 3: expected a JSON object, found a list"
        );
    }

    #[test]
    fn drop_summary_ranks_reasons_and_names_the_first_row() {
        let mut drops = Drops::default();
        let at = |i| Location {
            file: "d.jsonl".into(),
            index: i,
            is_line: true,
        };
        drops.add(dropped(Reason::EmptyResponse, "e"), &at(4));
        drops.add(dropped(Reason::Missing("rejected"), "m"), &at(2));
        drops.add(dropped(Reason::Missing("rejected"), "m"), &at(9));
        assert_eq!(drops.total(), 3);
        assert_eq!(
            drops.explain(5),
            "2 missing_rejected (first: d.jsonl line 2: m); 1 empty_response (first: d.jsonl line 4: e)"
        );
        assert_eq!(
            drops.explain(1),
            "2 missing_rejected (first: d.jsonl line 2: m); 1 more for 1 other reasons"
        );
        assert_eq!(percent(1, 2354), "<0.1%");
        assert_eq!(percent(3, 40), "7.5%");
    }

    #[test]
    fn ultrafeedback_string_layout_with_metadata_scores() {
        let row = json!({"prompt": "p", "chosen": "c", "rejected": "r", "metadata": {"score_chosen": 8.5, "score_rejected": 3.0}});
        let p = parse(Format::Ultrafeedback, row).unwrap();
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

    #[test]
    fn renamed_ids_do_not_collide_with_ids_already_there() {
        let mut ids: Vec<String> = ["a", "a", "a#2"].map(String::from).to_vec();
        unique_ids(&mut ids);
        assert_eq!(ids, ["a", "a#3", "a#2"]);
        let mut ids: Vec<String> = ["a", "a", "a", "b"].map(String::from).to_vec();
        unique_ids(&mut ids);
        assert_eq!(ids, ["a", "a#2", "a#3", "b"]);
    }

    proptest! {
        /// Whatever ids the rows carry (repeats, and ids that look like renamings), the ids
        /// after renaming are unique, every row's first occurrence keeps its id, and a renamed
        /// id is the original plus `#n`.
        #[test]
        fn ids_are_unique_after_renaming(raw in prop::collection::vec("[ab](#[1-4]){0,2}", 0..40)) {
            let mut ids = raw.clone();
            unique_ids(&mut ids);
            let set: HashSet<&String> = ids.iter().collect();
            prop_assert_eq!(set.len(), ids.len(), "{:?} -> {:?}", raw, ids);
            let mut seen = HashSet::new();
            for (before, after) in raw.iter().zip(&ids) {
                if seen.insert(before) {
                    prop_assert_eq!(before, after);
                } else {
                    let n = after.strip_prefix(&format!("{before}#")).and_then(|n| n.parse::<usize>().ok());
                    prop_assert!(n.is_some_and(|n| n >= 2), "{} -> {}", before, after);
                }
            }
        }
    }
}
