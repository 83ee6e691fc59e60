//! Stage kinds. Each kind lives in its own file, declares its input roles and a serde config
//! (`deny_unknown_fields`, defaults filled so the canonical form hashes the same whether a default
//! is written or not), and implements [`Stage`].

pub mod ingest;
pub mod model;
pub mod score;
pub mod select;
pub mod tokenize;
pub mod tokenizer;
pub mod train;

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::user;
pub use crate::pipeline::stage::{
    Artifact, BuildContext, Registry, Role, RunContext, Stage, StageKind,
};

/// Every stage kind, handed to the planner (`Plan::new(pipeline, &stages::REGISTRY)`).
pub static REGISTRY: Registry = Registry::new(&[
    &ingest::KIND,
    &tokenizer::KIND,
    &tokenize::KIND,
    &model::KIND,
    &train::KIND,
    &score::KIND,
    &select::KIND,
]);

/// Deserializes a stage's parameters into its config struct, turning serde's complaints
/// (unknown field, wrong type) into user errors that suggest the intended key.
pub fn parse_config<T: DeserializeOwned + Serialize>(params: &Value, known: &[&str]) -> Result<T> {
    serde_json::from_value::<T>(params.clone()).map_err(|e| {
        let msg = e.to_string();
        let hint = msg
            .strip_prefix("unknown field `")
            .and_then(|r| r.split('`').next())
            .map(|f| crate::util::suggest(f, known))
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
    use std::collections::BTreeMap;

    use super::*;

    /// Exactly the kinds that load or train a model make the device matter.
    #[test]
    fn device_users_are_the_model_kinds() {
        let users: Vec<&str> = REGISTRY
            .kinds()
            .iter()
            .filter(|k| k.uses_device)
            .map(|k| k.kind)
            .collect();
        assert_eq!(users, ["model", "train", "score"]);
    }

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
        assert_eq!(kinds.as_array().unwrap().len(), REGISTRY.kinds().len());
        for k in REGISTRY.kinds() {
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
