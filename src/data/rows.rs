//! Reads user data files (.jsonl, .jsonl.gz, .json, .parquet) as JSON rows, each with a location
//! (file and line or row number) for error messages.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde_json::{Map, Value};

use crate::error::user;
use crate::user_bail;

/// Where a row came from, as a user would look for it.
#[derive(Debug, Clone)]
pub struct Location {
    pub file: PathBuf,
    /// 1-based line (JSON Lines) or row (JSON array, Parquet).
    pub index: usize,
    pub is_line: bool,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = if self.is_line { "line" } else { "row" };
        write!(f, "{} {what} {}", self.file.display(), self.index)
    }
}

/// Supported file types, by extension.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FileType {
    Jsonl,
    JsonlGz,
    Json,
    Parquet,
}

pub fn file_type(path: &Path) -> Result<FileType> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    Ok(
        if name.ends_with(".jsonl.gz") || name.ends_with(".ndjson.gz") {
            FileType::JsonlGz
        } else if name.ends_with(".jsonl") || name.ends_with(".ndjson") {
            FileType::Jsonl
        } else if name.ends_with(".json") {
            FileType::Json
        } else if name.ends_with(".parquet") {
            FileType::Parquet
        } else {
            user_bail!(
                "{}: unsupported file type (expected .parquet, .jsonl, .jsonl.gz or .json)",
                path.display()
            )
        },
    )
}

/// Expands a path that may be a glob into the files it names, sorted; a plain path must exist.
pub fn expand(pattern: &Path) -> Result<Vec<PathBuf>> {
    let s = pattern.to_string_lossy();
    if !s.contains(['*', '?', '[']) {
        if !pattern.exists() {
            user_bail!("{}: data file not found", pattern.display());
        }
        file_type(pattern)?;
        return Ok(vec![pattern.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = glob::glob(&s)
        .map_err(|e| user(format!("{s}: bad glob pattern: {e}")))?
        .filter_map(|r| r.ok())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    if files.is_empty() {
        user_bail!("{s}: the glob matches no file");
    }
    for f in &files {
        file_type(f)?;
    }
    Ok(files)
}

/// Calls `f` on every row of `path`, in file order.
pub fn for_each_row(path: &Path, f: impl FnMut(Location, Value) -> Result<()>) -> Result<()> {
    for_each_row_in(path, None, f)
}

/// [`for_each_row`] reading only `fields` where the file type allows it (Parquet: the other
/// columns are never decoded, so a column sepo cannot read does no harm unless it is used; see
/// [`super::parquet::read_rows`]). JSON rows keep every key.
pub fn for_each_row_in(
    path: &Path,
    fields: Option<&[&str]>,
    mut f: impl FnMut(Location, Value) -> Result<()>,
) -> Result<()> {
    let loc = |index, is_line| Location {
        file: path.to_path_buf(),
        index,
        is_line,
    };
    match file_type(path)? {
        FileType::Jsonl | FileType::JsonlGz => {
            let file = std::fs::File::open(path)
                .map_err(|e| user(format!("{}: cannot open: {e}", path.display())))?;
            let reader: Box<dyn Read> = if file_type(path)? == FileType::JsonlGz {
                Box::new(flate2::read::MultiGzDecoder::new(file))
            } else {
                Box::new(file)
            };
            for (i, line) in BufReader::new(reader).lines().enumerate() {
                let line =
                    line.map_err(|e| user(format!("{}: read error: {e}", loc(i + 1, true))))?;
                if line.trim().is_empty() {
                    continue;
                }
                let v: Value = serde_json::from_str(&line)
                    .map_err(|e| user(format!("{}: malformed JSON: {e}", loc(i + 1, true))))?;
                f(loc(i + 1, true), v)?;
            }
        }
        FileType::Json => {
            let bytes = std::fs::read(path)
                .map_err(|e| user(format!("{}: cannot read: {e}", path.display())))?;
            let v: Value = serde_json::from_slice(&bytes)
                .map_err(|e| user(format!("{}: malformed JSON: {e}", path.display())))?;
            let rows = match v {
                Value::Array(a) => a,
                // A column-oriented object ({"col": [..], ...}), as pandas' to_json(orient="list") writes.
                Value::Object(m) if m.values().all(Value::is_array) => columns_to_rows(m, path)?,
                _ => user_bail!("{}: expected a JSON array of objects", path.display()),
            };
            for (i, r) in rows.into_iter().enumerate() {
                f(loc(i + 1, false), r)?;
            }
        }
        FileType::Parquet => {
            for (i, r) in super::parquet::read_rows(path, fields)?
                .into_iter()
                .enumerate()
            {
                f(loc(i + 1, false), r)?;
            }
        }
    }
    Ok(())
}

fn columns_to_rows(m: Map<String, Value>, path: &Path) -> Result<Vec<Value>> {
    let n = m
        .values()
        .next()
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    if m.values().any(|v| v.as_array().map_or(0, Vec::len) != n) {
        user_bail!("{}: columns have different lengths", path.display());
    }
    Ok((0..n)
        .map(|i| Value::Object(m.iter().map(|(k, v)| (k.clone(), v[i].clone())).collect()))
        .collect())
}
