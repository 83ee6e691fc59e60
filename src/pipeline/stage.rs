//! The stage contract: what the engine needs from a stage kind ([`StageKind`], [`Stage`]) and
//! what it hands a stage (a [`BuildContext`] to validate parameters, a [`RunContext`] to run).
//! The engine owns it, so the pipeline code never names a stage kind: the kinds are handed to
//! the planner as a [`Registry`]. Stage code reaches the engine only through this module.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde_json::Value;

use crate::error::user;
use crate::progress::Progress;

// What stages legitimately use of the engine: the store, for artifacts they derive and share
// (cached log-probs), and the engine's content hash.
pub use super::hash::{HASH_HEX_LEN, hash_file};
pub use super::store::{Manifest, Store};

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

/// Static description of a stage kind, listed in a [`Registry`].
pub struct StageKind {
    pub kind: &'static str,
    /// Bump when the stage's output for the same inputs changes: it is part of every hash.
    pub version: &'static str,
    pub roles: &'static [Role],
    /// Whether the stage computes on the pipeline's `device` (loads or trains a model). Only
    /// such stages make a device that is unknown or absent an error: a data-only pipeline runs
    /// whatever `device:` says.
    pub uses_device: bool,
    /// Parses and validates parameters (as written, plus `--set`) into a runnable stage.
    pub build: fn(&Value, &BuildContext) -> Result<Box<dyn Stage>>,
    /// The JSON Schema of the parameters, the config type's: `params_schema::<Config>` (see
    /// [`params_schema`]). `sepo schema` writes it for every kind, with `kind` and `inputs`.
    pub params_schema: fn(&mut SchemaGenerator) -> Schema,
}

/// The JSON Schema of a config type (derived with `schemars`), for [`StageKind::params_schema`].
pub fn params_schema<T: JsonSchema>(generator: &mut SchemaGenerator) -> Schema {
    T::json_schema(generator)
}

/// The stage kinds a pipeline may use, handed to the planner.
pub struct Registry {
    kinds: &'static [&'static StageKind],
}

impl Registry {
    pub const fn new(kinds: &'static [&'static StageKind]) -> Registry {
        Registry { kinds }
    }

    pub fn lookup(&self, kind: &str) -> Option<&'static StageKind> {
        self.kinds.iter().copied().find(|k| k.kind == kind)
    }

    pub fn kind_names(&self) -> Vec<&'static str> {
        self.kinds.iter().map(|k| k.kind).collect()
    }

    pub fn kinds(&self) -> &'static [&'static StageKind] {
        self.kinds
    }
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
    pub store: &'a Store,
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

    /// The artifacts an upstream artifact `a` was built from under `role` (its manifest's
    /// `inputs`), found in the store and checked like direct inputs before they are read. For a
    /// stage that needs more than its direct inputs: `evaluate` reads the prompts' text from the
    /// `ingest` artifact behind its token data, and the oracle behind a `select` stage.
    pub fn upstream(&self, a: &Artifact, role: &str) -> Result<Vec<Artifact>> {
        let hashes: Vec<&str> = match a.manifest.inputs.get(role) {
            Some(Value::String(h)) => vec![h.as_str()],
            Some(Value::Array(v)) => v.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        hashes
            .into_iter()
            .map(|h| self.store.upstream_artifact(h))
            .collect()
    }

    /// The single artifact `a` was built from under `role`, if any.
    pub fn upstream_one(&self, a: &Artifact, role: &str) -> Result<Option<Artifact>> {
        Ok(self.upstream(a, role)?.into_iter().next())
    }
}
