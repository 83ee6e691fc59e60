//! The pipeline YAML: parsing, `--set` overrides and the checks that need no stage code.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{Map, Value};

use crate::error::{clip, user};
use crate::user_bail;
use crate::util::suggest;

/// The keys a pipeline file may have at its top level.
pub const TOP_LEVEL_KEYS: &[&str] = &["name", "cache", "device", "seed", "stages"];

/// Where an input role points: one stage or a list of stages.
#[derive(Debug, Clone, PartialEq)]
pub enum InputRef {
    One(String),
    Many(Vec<String>),
}

impl InputRef {
    pub fn stages(&self) -> Vec<&str> {
        match self {
            InputRef::One(s) => vec![s.as_str()],
            InputRef::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

/// One stage as declared in the YAML, before its kind validates the parameters.
#[derive(Debug, Clone)]
pub struct StageDecl {
    pub name: String,
    pub kind: String,
    pub inputs: BTreeMap<String, InputRef>,
    /// Everything but `kind`, `inputs` and `matrix`, as written (plus `--set` overrides).
    pub params: Map<String, Value>,
    /// `matrix:` as written (plus `--set S.matrix...`): the parameters this stage is expanded
    /// over, in the order written. Empty once the pipeline is expanded (see [`super::matrix`]).
    pub matrix: Vec<Axis>,
    /// For a stage made by expanding a matrix: which stage, with which values.
    pub instance: Option<Instance>,
}

/// One key of a `matrix:`: a parameter and the values it takes, in the order written.
#[derive(Debug, Clone, PartialEq)]
pub struct Axis {
    pub key: String,
    pub values: Vec<Value>,
}

/// What makes a matrix instance: its base stage and its matrix values, as its name shows them
/// (`base@key=value,...`); own keys (set as parameters) and keys inherited from matrix inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    pub base: String,
    pub values: Vec<(String, Value)>,
}

/// A parsed pipeline file.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// The YAML file, as given on the command line.
    pub file: PathBuf,
    /// Its folder: relative paths resolve against it.
    pub dir: PathBuf,
    pub name: String,
    pub cache: PathBuf,
    pub device: String,
    pub seed: u64,
    /// In file order; matrix stages expanded in place once planned ([`super::matrix::expand`]).
    pub stages: Vec<StageDecl>,
    /// Each matrix stage's name (declared, or made a matrix by its inputs) to its instances'
    /// names, in order: filled by [`super::matrix::expand`].
    pub matrices: BTreeMap<String, Vec<String>>,
    /// `--set` assignments addressed to one matrix instance (`S@k=v.key=value`): instances exist
    /// only once the matrix is expanded, which applies them.
    pub instance_sets: Vec<String>,
}

impl Pipeline {
    /// Reads and parses a pipeline file. Every problem is a user error naming the file.
    pub fn load(file: &Path) -> Result<Pipeline> {
        let text = std::fs::read_to_string(file).map_err(|e| {
            user(format!(
                "{}: cannot read pipeline file: {e}",
                file.display()
            ))
        })?;
        Self::parse(&text, file)
    }

    /// Reads a pipeline file as a command does: `cache` (`--cache`) overrides the YAML's cache,
    /// which must be a folder or a place to make one, then each `set` (`--set`) is applied.
    pub fn load_with(file: &Path, cache: Option<&Path>, set: &[String]) -> Result<Pipeline> {
        let mut pipeline = Self::load(file)?;
        if let Some(c) = cache {
            pipeline.cache = c.to_path_buf();
        }
        let from = if cache.is_some() {
            "--cache"
        } else {
            "`cache`"
        };
        check_cache_path(&pipeline.cache, from)?;
        for s in set {
            pipeline.apply_set(s)?;
        }
        Ok(pipeline)
    }

    /// Parses YAML text as if read from `file`.
    pub fn parse(text: &str, file: &Path) -> Result<Pipeline> {
        let fname = file.display().to_string();
        let doc: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| {
            let loc = e
                .location()
                .map(|l| format!(" at line {} column {}", l.line(), l.column()))
                .unwrap_or_default();
            user(format!("{fname}: YAML syntax error{loc}: {e}"))
        })?;
        let serde_yaml::Value::Mapping(top) = doc else {
            user_bail!("{fname}: the pipeline must be a YAML mapping with a `stages` key");
        };
        let mut name = None;
        let mut cache = None;
        let mut device = None;
        let mut seed = None;
        let mut stages_val = None;
        for (k, v) in top {
            let key = yaml_key(&k, &fname, "top level")?;
            match key.as_str() {
                "name" => name = Some(yaml_string(&v, &fname, "name")?),
                "cache" => cache = Some(yaml_string(&v, &fname, "cache")?),
                "device" => device = Some(yaml_string(&v, &fname, "device")?),
                "seed" => {
                    seed = Some(v.as_u64().ok_or_else(|| {
                        user(format!("{fname}: `seed` must be a non-negative integer"))
                    })?)
                }
                "stages" => stages_val = Some(v),
                other => user_bail!(
                    "{fname}: unknown top-level key `{}`{} (expected one of: {})",
                    clip(other),
                    suggest(other, TOP_LEVEL_KEYS),
                    TOP_LEVEL_KEYS.join(", ")
                ),
            }
        }
        let dir = file
            .parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                }
            })
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let name = name.unwrap_or_else(|| {
            file.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        let cache = normalize(&dir.join(cache.unwrap_or_else(|| "cache".into())));
        let Some(stages_val) = stages_val else {
            user_bail!("{fname}: missing `stages`");
        };
        let serde_yaml::Value::Mapping(stage_map) = stages_val else {
            user_bail!("{fname}: `stages` must be a mapping from stage name to stage");
        };
        let mut stages = Vec::new();
        for (k, v) in stage_map {
            let sname = yaml_key(&k, &fname, "stages")?;
            stages.push(parse_stage(&sname, v, &fname)?);
        }
        if stages.is_empty() {
            user_bail!("{fname}: `stages` is empty");
        }
        Ok(Pipeline {
            file: file.to_path_buf(),
            dir,
            name,
            cache,
            device: device.unwrap_or_else(|| "auto".into()),
            seed: seed.unwrap_or(42),
            stages,
            matrices: BTreeMap::new(),
            instance_sets: Vec::new(),
        })
    }

    /// The stage declared as `name`. A linear scan: code that looks up many stages (planning)
    /// builds a name index instead, so that planning stays linear in the stage count.
    pub fn stage(&self, name: &str) -> Option<&StageDecl> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// Applies `--set stage.key=value` (value parsed as YAML; `key` may be dotted for nesting).
    /// `stage` is a stage as declared (for a matrix stage: every instance), or one matrix
    /// instance (`S@k=v,...`, applied when the matrix is expanded); `stage.matrix.K=[...]`
    /// replaces (or adds) the values of matrix key `K`, `stage.matrix={...}` the whole matrix.
    pub fn apply_set(&mut self, assignment: &str) -> Result<()> {
        let fname = self.file.display().to_string();
        // The assignment is echoed in every error below; a huge value must not come back whole.
        let shown = clip(assignment);
        let declared = addressed_stage(&self.stages, assignment, |_| true);
        let Some(i) = declared else {
            let stage = match assignment.split_once('=') {
                Some((lhs, _)) => match lhs.split_once('.') {
                    Some((stage, _)) => stage,
                    None if lhs.contains('@') => lhs,
                    None => user_bail!("--set `{shown}`: expected STAGE.KEY=VALUE"),
                },
                None => user_bail!("--set `{shown}`: expected STAGE.KEY=VALUE"),
            };
            if stage.contains('@') {
                // Maybe a matrix instance: checked when the matrix is expanded.
                self.instance_sets.push(assignment.to_string());
                return Ok(());
            }
            // Only on the error path: edit distances to every stage name are not free.
            let names: Vec<&str> = self.stages.iter().map(|s| s.name.as_str()).collect();
            user_bail!(
                "--set `{shown}`: {fname} has no stage `{}`{}",
                clip(stage),
                suggest(stage, &names)
            );
        };
        let rest = &assignment[self.stages[i].name.len() + 1..];
        let Some((key, rhs)) = rest.split_once('=') else {
            user_bail!("--set `{shown}`: expected STAGE.KEY=VALUE");
        };
        let value = set_value(rhs, &shown, &fname)?;
        let decl = &mut self.stages[i];
        if key == "matrix" || key.starts_with("matrix.") {
            let what = format!("--set `{shown}`");
            match key.strip_prefix("matrix.") {
                None => decl.matrix = parse_matrix(&value, &fname, &what)?,
                Some(k) => {
                    let axes = parse_matrix(&serde_json::json!({ k: value }), &fname, &what)?;
                    for axis in axes {
                        match decl.matrix.iter_mut().find(|a| a.key == axis.key) {
                            Some(a) => *a = axis,
                            None => decl.matrix.push(axis),
                        }
                    }
                }
            }
            return Ok(());
        }
        set_param(&mut decl.params, key, value, &shown)
    }
}

/// The value of a `--set` assignment: YAML, as JSON.
pub(crate) fn set_value(rhs: &str, shown: &str, fname: &str) -> Result<Value> {
    let yaml: serde_yaml::Value = serde_yaml::from_str(rhs)
        .map_err(|e| user(format!("--set `{shown}`: value is not valid YAML: {e}")))?;
    yaml_to_json(&yaml, fname)
}

/// Sets parameter `key` (dotted for nesting) of a stage's `params` to `value`, as `--set` does.
pub(crate) fn set_param(
    params: &mut Map<String, Value>,
    key: &str,
    value: Value,
    shown: &str,
) -> Result<()> {
    if key.is_empty() || key == "kind" || key == "inputs" || key.starts_with("inputs.") {
        user_bail!(
            "--set `{shown}`: only parameters can be overridden, not `{}`",
            clip(key)
        );
    }
    let parts: Vec<&str> = key.split('.').collect();
    let mut map = params;
    for part in &parts[..parts.len() - 1] {
        let entry = map
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if !entry.is_object() {
            *entry = Value::Object(Map::new());
        }
        map = entry.as_object_mut().expect("just made an object");
    }
    map.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

/// A `matrix:` mapping (as JSON) as its axes, in the order written. Only the shape is checked
/// here; what needs the stage kind or `--set` applied first (unknown keys, empty or repeated
/// values) is checked when the matrix is expanded.
pub(crate) fn parse_matrix(v: &Value, fname: &str, what: &str) -> Result<Vec<Axis>> {
    let Value::Object(m) = v else {
        user_bail!(
            "{fname}: {what}: `matrix` must map parameters to lists of values, e.g. `matrix: {{seed: [1, 2, 3]}}`"
        );
    };
    m.iter()
        .map(|(key, values)| match values {
            Value::Array(values) => Ok(Axis {
                key: key.clone(),
                values: values.clone(),
            }),
            _ => Err(user(format!(
                "{fname}: {what}: matrix.{} must be a list of values, e.g. `{}: [1, 2]`",
                clip(key),
                clip(key)
            ))),
        })
        .collect()
}

/// The cache must be a folder or a path where one can be made. A regular file there (or above
/// it) is the user's mistake, said plainly by every command instead of a failed `mkdir` in
/// `run` or an all-stale `status`.
fn check_cache_path(cache: &Path, from: &str) -> Result<()> {
    for a in cache.ancestors() {
        if a.as_os_str().is_empty() || !a.exists() {
            continue;
        }
        if a.is_dir() {
            return Ok(());
        }
        if a == cache {
            user_bail!(
                "{from} {}: is a file; the cache must be a folder (it holds the artifacts)",
                cache.display()
            );
        }
        user_bail!(
            "{from} {}: {} is a file, so no cache folder can be made there",
            cache.display(),
            a.display()
        );
    }
    Ok(())
}

/// Removes `.` and `name/..` pairs without touching the file system, so paths print cleanly.
pub fn normalize(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out: Vec<Component> = Vec::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir if matches!(out.last(), Some(Component::Normal(_))) => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    if out.is_empty() {
        PathBuf::from(".")
    } else {
        out.iter().collect()
    }
}

fn parse_stage(full_name: &str, v: serde_yaml::Value, fname: &str) -> Result<StageDecl> {
    // `name` is what the messages below show: clipped, since a stage name is any YAML key.
    let shown = clip(full_name);
    if full_name.is_empty() || full_name.contains(['/', '\\', ' ']) {
        user_bail!("{fname}: stage name `{shown}` must be non-empty, without spaces or slashes");
    }
    let name = shown.as_str();
    let serde_yaml::Value::Mapping(m) = v else {
        user_bail!("{fname}: stage `{name}` must be a mapping with at least `kind`");
    };
    let mut kind = None;
    let mut inputs = BTreeMap::new();
    let mut params = Map::new();
    let mut matrix = Vec::new();
    for (k, v) in m {
        let key = yaml_key(&k, fname, &format!("stage `{name}`"))?;
        match key.as_str() {
            "kind" => kind = Some(yaml_string(&v, fname, &format!("stage `{name}`: kind"))?),
            "inputs" => {
                let serde_yaml::Value::Mapping(im) = v else {
                    user_bail!("{fname}: stage `{name}`: `inputs` must map roles to stage names");
                };
                for (rk, rv) in im {
                    let role = yaml_key(&rk, fname, &format!("stage `{name}`: inputs"))?;
                    let what = format!("stage `{name}`: inputs.{role}");
                    let r = match rv {
                        serde_yaml::Value::Sequence(seq) => InputRef::Many(
                            seq.iter()
                                .map(|x| yaml_string(x, fname, &what))
                                .collect::<Result<_>>()?,
                        ),
                        other => InputRef::One(yaml_string(&other, fname, &what)?),
                    };
                    inputs.insert(role, r);
                }
            }
            "matrix" => {
                let what = format!("stage `{name}`");
                matrix = parse_matrix(
                    &yaml_to_json(&v, fname).with_context(|| what.clone())?,
                    fname,
                    &what,
                )?;
            }
            _ => {
                params.insert(
                    key,
                    yaml_to_json(&v, fname).with_context(|| format!("stage `{name}`"))?,
                );
            }
        }
    }
    let Some(kind) = kind else {
        user_bail!("{fname}: stage `{name}` has no `kind`");
    };
    Ok(StageDecl {
        name: full_name.to_string(),
        kind,
        inputs,
        params,
        matrix,
        instance: None,
    })
}

fn yaml_key(k: &serde_yaml::Value, fname: &str, ctx: &str) -> Result<String> {
    match k {
        serde_yaml::Value::String(s) => Ok(s.clone()),
        other => Err(user(format!(
            "{fname}: {ctx}: keys must be strings, found {}",
            clip(&format!("{other:?}"))
        ))),
    }
}

fn yaml_string(v: &serde_yaml::Value, fname: &str, what: &str) -> Result<String> {
    match v {
        serde_yaml::Value::String(s) => Ok(s.clone()),
        serde_yaml::Value::Number(n) => Ok(n.to_string()),
        serde_yaml::Value::Bool(b) => Ok(b.to_string()),
        _ => Err(user(format!("{fname}: `{what}` must be a string"))),
    }
}

/// YAML to JSON, refusing what JSON cannot hold (non-string keys, tags, NaN).
pub fn yaml_to_json(v: &serde_yaml::Value, fname: &str) -> Result<Value> {
    Ok(match v {
        serde_yaml::Value::Null => Value::Null,
        serde_yaml::Value::Bool(b) => Value::Bool(*b),
        serde_yaml::Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                Value::from(u)
            } else if let Some(i) = n.as_i64() {
                Value::from(i)
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                serde_json::Number::from_f64(f)
                    .map(Value::Number)
                    .ok_or_else(|| user(format!("{fname}: {f} is not a finite number")))?
            }
        }
        serde_yaml::Value::String(s) => Value::String(s.clone()),
        serde_yaml::Value::Sequence(seq) => Value::Array(
            seq.iter()
                .map(|x| yaml_to_json(x, fname))
                .collect::<Result<_>>()?,
        ),
        serde_yaml::Value::Mapping(m) => {
            let mut out = Map::new();
            for (k, v) in m {
                out.insert(yaml_key(k, fname, "mapping")?, yaml_to_json(v, fname)?);
            }
            Value::Object(out)
        }
        serde_yaml::Value::Tagged(t) => yaml_to_json(&t.value, fname)?,
    })
}

/// The stage a `--set` assignment addresses: among `stages` that pass `keep`, the one whose name
/// followed by a dot starts the assignment, the longest such, so that a name holding dots or `=`
/// (a matrix instance: `keys@chosen_ratio=0.3.rejected_ratio=0.2`) is still addressable.
pub(super) fn addressed_stage(
    stages: &[StageDecl],
    assignment: &str,
    keep: impl Fn(&StageDecl) -> bool,
) -> Option<usize> {
    stages
        .iter()
        .enumerate()
        .filter(|(_, s)| keep(s))
        .filter(|(_, s)| {
            assignment
                .strip_prefix(s.name.as_str())
                .is_some_and(|r| r.starts_with('.'))
        })
        .max_by_key(|(_, s)| s.name.len())
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Pipeline> {
        Pipeline::parse(text, Path::new("p/x.yaml"))
    }

    #[test]
    fn parses_stages_in_order_with_inputs_and_params() {
        let p = parse(
            "name: t\nseed: 7\nstages:\n  b: {kind: ingest, path: a.jsonl}\n  a: {kind: tokenize, inputs: {data: b, many: [b, b]}, max_len: 5}\n",
        )
        .unwrap();
        assert_eq!(p.seed, 7);
        assert_eq!(p.cache, Path::new("p/cache"));
        assert_eq!(
            normalize(Path::new("pipelines/../cache")),
            Path::new("cache")
        );
        assert_eq!(normalize(Path::new("../a/./b/../c")), Path::new("../a/c"));
        assert_eq!(p.stages[0].name, "b");
        assert_eq!(p.stages[1].inputs["data"], InputRef::One("b".into()));
        assert_eq!(
            p.stages[1].inputs["many"],
            InputRef::Many(vec!["b".into(), "b".into()])
        );
        assert_eq!(p.stages[1].params["max_len"], Value::from(5));
    }

    #[test]
    fn syntax_error_names_file_and_line() {
        let err = parse("stages:\n  a: {kind: ingest\n").unwrap_err();
        let msg = crate::error::render(&err);
        assert!(crate::error::is_user_error(&err));
        assert!(msg.contains("p/x.yaml") && msg.contains("line"), "{msg}");
    }

    #[test]
    fn unknown_top_level_key_is_suggested() {
        let err = parse("stagez: {}\n").unwrap_err();
        assert!(crate::error::render(&err).contains("did you mean `stages`"));
    }

    #[test]
    fn set_overrides_nested_params() {
        let mut p = parse("stages:\n  t: {kind: tokenizer, train: {vocab_size: 10}}\n").unwrap();
        p.apply_set("t.train.vocab_size=20").unwrap();
        assert_eq!(p.stages[0].params["train"]["vocab_size"], Value::from(20));
        assert!(p.apply_set("nope.x=1").is_err());
        assert!(p.apply_set("t.kind=ingest").is_err());
    }
}
