//! `ingest`: user preference data (UltraFeedback, HH-RLHF, flat preference rows) to `pairs.parquet`
//! ([`Pairs`], whose reader the stages downstream use).
//! The format parsers are in `ingest/parse.rs`, the tests in `ingest/tests.rs`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;

use anyhow::Result;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{
    BuildContext, RunContext, Stage, StageKind, params_schema, parse_config, resolve, to_params,
};
use crate::artifacts::Pairs;
pub use crate::artifacts::pairs::{Pair, read_pairs};
use crate::data::rows::{FileType, Location, expand, file_type, for_each_row_in};
use crate::user_bail;

// The row parsers of the three formats; the stage below reads files, counts what they drop and
// writes the artifact.
mod parse;

pub use parse::{Dropped, Reason, content_id, fields, normalize_role, parse_row, parse_transcript};
use parse::{format_name, required};

pub static KIND: StageKind = StageKind {
    kind: "ingest",
    // 2: odd rows (empty responses, ...) are dropped and counted; renamed ids stay unique.
    version: "2",
    roles: &[],
    uses_device: false,
    build,
    params_schema: params_schema::<IngestConfig>,
};

/// The layout of the rows read.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// HuggingFaceH4/ultrafeedback_binarized rows (`prompt` and message lists `chosen`,
    /// `rejected`), or trl-lib's with string messages.
    Ultrafeedback,
    /// Anthropic HH-RLHF transcripts (`chosen`, `rejected`: "\n\nHuman: ...\n\nAssistant: ...").
    HhRlhf,
    /// Flat `prompt`, `chosen`, `rejected` strings.
    Preference,
}

/// `ingest`: preference data (UltraFeedback, HH-RLHF or flat rows) to `pairs.parquet`; odd rows
/// are dropped and counted.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// The layout of the rows.
    pub format: Format,
    /// A file or a glob (.parquet, .jsonl, .jsonl.gz, .json), relative to the pipeline file.
    pub path: String,
    /// Fraction of rows (chosen by a hash of their id) put in the `test` split, in [0, 1); a
    /// `split` column in the data wins.
    #[serde(default)]
    #[schemars(range(min = 0), extend("exclusiveMaximum" = 1))]
    pub test_fraction: f64,
    /// Keep only the first N pairs (after dropping), for quick runs; null: all.
    #[serde(default)]
    pub limit: Option<usize>,
    /// The largest share of rows read that may be dropped as odd (empty response, last turn not
    /// the assistant's, ...) before the stage fails, in [0, 1]: a few odd rows are normal in real
    /// data, many mean the data or `format` is wrong.
    #[serde(default = "default_max_drop_fraction")]
    #[schemars(range(min = 0, max = 1))]
    pub max_drop_fraction: f64,
}

fn default_max_drop_fraction() -> f64 {
    0.05
}

struct Ingest {
    cfg: IngestConfig,
    base: PathBuf,
}

fn build(params: &Value, ctx: &BuildContext) -> Result<Box<dyn Stage>> {
    let cfg: IngestConfig = parse_config(params)?;
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
        Pairs::write(&pairs, ctx.out)?;
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

#[cfg(test)]
mod tests;
