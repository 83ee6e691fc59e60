//! Stage kinds. Each kind lives in its own file, declares its input roles and a serde config
//! (`deny_unknown_fields`, defaults filled so the canonical form hashes the same whether a default
//! is written or not), and implements [`Stage`].

pub mod ingest;
pub mod logprobs;
pub mod model;
pub mod score;
pub mod select;
pub mod tokenize;
pub mod tokenizer;
pub mod train;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::user;
use crate::pipeline::store::Manifest;
use crate::progress::Progress;

/// An input role a stage kind accepts.
#[derive(Debug, Clone, Copy)]
pub struct Role {
    pub name: &'static str,
    pub required: bool,
    /// Whether the role takes a list of stages.
    pub many: bool,
    /// Stage kinds this role accepts (empty: any).
    pub kinds: &'static [&'static str],
}

/// Static description of a stage kind, registered in [`REGISTRY`].
pub struct StageKind {
    pub kind: &'static str,
    /// Bump when the stage's output for the same inputs changes: it is part of every hash.
    pub version: &'static str,
    pub roles: &'static [Role],
    /// Parses and validates parameters (as written, plus `--set`) into a runnable stage.
    pub build: fn(&Value, &BuildContext) -> Result<Box<dyn Stage>>,
}

/// What parameter validation may need besides the parameters.
pub struct BuildContext<'a> {
    /// The pipeline file's folder: relative paths resolve against it.
    pub base_dir: &'a Path,
    pub pipeline_seed: u64,
    /// Roles present in the YAML, to check combinations (e.g. `train` needs `data`).
    pub roles: Vec<String>,
    /// The stage kind behind each role, for checks like "sepo trains on a select stage".
    pub role_kinds: BTreeMap<String, Vec<String>>,
}

impl BuildContext<'_> {
    pub fn role_kind(&self, role: &str) -> Option<&str> {
        self.role_kinds
            .get(role)
            .and_then(|v| v.first())
            .map(String::as_str)
    }
}

/// A configured stage.
pub trait Stage: Send + Sync {
    /// Canonical parameters with every default filled in; this is what is hashed.
    fn params(&self) -> Value;
    /// External files read, resolved, in reading order; their content goes into the hash.
    fn external_files(&self) -> Result<Vec<PathBuf>> {
        Ok(Vec::new())
    }
    /// Produces the artifact's files in `ctx.out`; returns stage statistics for the manifest.
    fn run(&self, ctx: &RunContext) -> Result<Value>;
}

/// A finished upstream artifact.
#[derive(Debug, Clone)]
pub struct Artifact {
    pub stage: String,
    pub kind: String,
    pub hash: String,
    pub dir: PathBuf,
    pub manifest: Manifest,
}

/// Everything a running stage may touch.
pub struct RunContext<'a> {
    pub stage: &'a str,
    /// Output folder, empty at start; committed atomically after `run` returns.
    pub out: &'a Path,
    /// Scratch space that survives a crash (checkpoints), under `<cache>/tmp/<hash>/`.
    pub work: &'a Path,
    pub inputs: &'a BTreeMap<String, Vec<Artifact>>,
    pub device: &'a str,
    pub progress: &'a Progress,
    /// The artifact store, for artifacts a stage derives and shares (cached log-probs).
    pub store: &'a crate::pipeline::store::Store,
}

impl RunContext<'_> {
    /// The single artifact bound to `role`.
    pub fn input(&self, role: &str) -> Result<&Artifact> {
        self.inputs
            .get(role)
            .and_then(|v| v.first())
            .ok_or_else(|| {
                user(format!(
                    "stage `{}`: input `{role}` is required",
                    self.stage
                ))
            })
    }

    pub fn input_opt(&self, role: &str) -> Option<&Artifact> {
        self.inputs.get(role).and_then(|v| v.first())
    }
}

pub static REGISTRY: &[&StageKind] = &[
    &ingest::KIND,
    &tokenizer::KIND,
    &tokenize::KIND,
    &model::KIND,
    &train::KIND,
    &score::KIND,
    &select::KIND,
];

pub fn lookup(kind: &str) -> Option<&'static StageKind> {
    REGISTRY.iter().copied().find(|k| k.kind == kind)
}

pub fn kind_names() -> Vec<&'static str> {
    REGISTRY.iter().map(|k| k.kind).collect()
}

/// Whether a stage of this kind computes on the pipeline's `device` (loads or trains a model).
/// Only these make a device that is unknown or absent an error: a data-only pipeline runs
/// whatever `device:` says.
pub fn uses_device(kind: &str) -> bool {
    matches!(kind, "model" | "train" | "score" | "evaluate")
}

/// Deserializes a stage's parameters into its config struct, turning serde's complaints
/// (unknown field, wrong type) into user errors that suggest the intended key.
pub fn parse_config<T: DeserializeOwned + Serialize>(params: &Value, known: &[&str]) -> Result<T> {
    serde_json::from_value::<T>(params.clone()).map_err(|e| {
        let msg = e.to_string();
        let hint = msg
            .strip_prefix("unknown field `")
            .and_then(|r| r.split('`').next())
            .map(|f| crate::pipeline::spec::suggest(f, known))
            .unwrap_or_default();
        // serde quotes the offending value ("unknown variant `…`"): never echo a huge one whole.
        user(format!("{}{hint}", crate::error::clip_message(&msg)))
    })
}

/// Canonical form of a config struct.
pub fn to_params<T: Serialize>(cfg: &T) -> Value {
    serde_json::to_value(cfg).expect("configs serialize")
}

/// Resolves a path written in the YAML against the pipeline's folder.
pub fn resolve(base: &Path, p: &str) -> PathBuf {
    let pb = PathBuf::from(p);
    if pb.is_absolute() { pb } else { base.join(pb) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Minimal valid parameters per kind, to read back the full canonical parameter set.
    fn minimal(kind: &str) -> (Value, Vec<String>) {
        match kind {
            "ingest" => (
                serde_json::json!({"format": "preference", "path": "x.jsonl"}),
                vec![],
            ),
            "tokenizer" => (serde_json::json!({"path": "tokenizer.json"}), vec![]),
            "tokenize" => (
                serde_json::json!({}),
                vec!["data".into(), "tokenizer".into()],
            ),
            "model" => (serde_json::json!({"from": "m"}), vec![]),
            "train" => (
                serde_json::json!({"objective": "sft"}),
                vec!["model".into(), "data".into()],
            ),
            "score" => (
                serde_json::json!({}),
                vec!["oracle".into(), "reference".into(), "data".into()],
            ),
            "select" => (serde_json::json!({}), vec!["scores".into()]),
            other => panic!(
                "add a minimal config for `{other}` here and to schemas/pipeline.schema.json"
            ),
        }
    }

    /// schemas/pipeline.schema.json lists exactly the parameters and roles each kind accepts.
    #[test]
    fn json_schema_matches_the_stage_configs() {
        let schema: Value =
            serde_json::from_str(include_str!("../../schemas/pipeline.schema.json")).unwrap();
        let kinds = &schema["$defs"]["stage"]["properties"]["kind"]["enum"];
        assert_eq!(kinds.as_array().unwrap().len(), REGISTRY.len());
        for k in REGISTRY {
            let def = &schema["$defs"][k.kind]["properties"];
            let mut in_schema: Vec<&str> = def
                .as_object()
                .unwrap_or_else(|| panic!("schema has no $defs.{}", k.kind))
                .keys()
                .map(String::as_str)
                .filter(|x| *x != "kind" && *x != "inputs")
                .collect();
            let (params, roles) = minimal(k.kind);
            let ctx = BuildContext {
                base_dir: Path::new("."),
                pipeline_seed: 1,
                roles,
                role_kinds: BTreeMap::new(),
            };
            let stage = (k.build)(&params, &ctx).unwrap();
            let canonical = stage.params();
            let mut in_code: Vec<&str> = canonical
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            in_schema.sort();
            in_code.sort();
            assert_eq!(in_schema, in_code, "parameters of `{}`", k.kind);
            let mut schema_roles: Vec<&str> = def["inputs"]["properties"]
                .as_object()
                .map(|o| o.keys().map(String::as_str).collect())
                .unwrap_or_default();
            let mut code_roles: Vec<&str> = k.roles.iter().map(|r| r.name).collect();
            schema_roles.sort();
            code_roles.sort();
            assert_eq!(schema_roles, code_roles, "roles of `{}`", k.kind);
        }
    }
}
