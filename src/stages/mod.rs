//! Stage kinds. Each kind lives in its own file, declares its input roles and a serde config
//! (`deny_unknown_fields`, defaults filled so the canonical form hashes the same whether a default
//! is written or not), and implements [`Stage`].

pub mod evaluate;
pub mod ingest;
pub mod model;
pub mod score;
pub mod select;
pub mod tokenize;
pub mod tokenizer;
pub mod train;

use std::path::{Path, PathBuf};

use anyhow::Result;
use schemars::JsonSchema;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::user;
pub use crate::pipeline::stage::{
    Artifact, BuildContext, Registry, Role, RunContext, Stage, StageKind, params_schema,
};

/// The run's device for a stage that computes in `precision` (a bad name is exit 2), saying on
/// stderr when that precision buys nothing there ([`crate::model::precision::cpu_note`]).
pub fn compute_device(
    ctx: &RunContext,
    precision: crate::model::Precision,
) -> Result<burn::tensor::Device> {
    let device = crate::device::parse_device(ctx.device).map_err(|e| user(e.to_string()))?;
    if let Some(note) = crate::model::precision::cpu_note(&device, precision) {
        ctx.progress.log(format!("         {}: {note}", ctx.stage));
    }
    Ok(device)
}

/// Every stage kind, handed to the planner (`Plan::new(pipeline, &stages::REGISTRY)`).
pub static REGISTRY: Registry = Registry::new(&[
    &ingest::KIND,
    &tokenizer::KIND,
    &tokenize::KIND,
    &model::KIND,
    &train::KIND,
    &score::KIND,
    &select::KIND,
    &evaluate::KIND,
]);

/// Deserializes a stage's parameters into its config struct, turning serde's complaints
/// (unknown field, wrong type) into user errors that suggest the intended key, one of the
/// config's [`schema_keys`].
pub fn parse_config<T: DeserializeOwned + Serialize + JsonSchema>(params: &Value) -> Result<T> {
    serde_json::from_value::<T>(params.clone()).map_err(|e| {
        let msg = e.to_string();
        let hint = msg
            .strip_prefix("unknown field `")
            .and_then(|r| r.split('`').next())
            .map(|f| {
                let known = schema_keys::<T>();
                crate::util::suggest(f, &known.iter().map(String::as_str).collect::<Vec<_>>())
            })
            .unwrap_or_default();
        // serde quotes the offending value ("unknown variant `…`"): never echo a huge one whole.
        user(format!("{}{hint}", crate::error::clip_message(&msg)))
    })
}

/// The keys a config type's YAML mapping accepts: the property names of its JSON Schema
/// (derived from the type with `schemars`, so they are the serde field names).
pub fn schema_keys<T: JsonSchema>() -> Vec<String> {
    let schema = T::json_schema(&mut schemars::SchemaGenerator::default());
    let properties = schema.get("properties").and_then(Value::as_object);
    properties
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default()
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
        assert_eq!(users, ["model", "train", "score", "evaluate"]);
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
            // `config:`, whose canonical form has every parameter (`seed`, `init`), rather than
            // `from:`.
            "model" => (
                serde_json::json!({"config": {"architecture": "llama", "hidden_size": 8,
                    "num_hidden_layers": 1, "num_attention_heads": 2}}),
                vec!["tokenizer".into()],
            ),
            "train" => (
                serde_json::json!({"objective": "sft"}),
                vec!["model".into(), "data".into()],
            ),
            "score" => (
                serde_json::json!({}),
                vec!["oracle".into(), "reference".into(), "data".into()],
            ),
            "select" => (serde_json::json!({}), vec!["scores".into()]),
            "evaluate" => (
                serde_json::json!({}),
                vec!["policies".into(), "reference".into(), "data".into()],
            ),
            other => panic!("add a minimal config for `{other}` here"),
        }
    }

    /// The generated schema (`sepo schema`) lists exactly the parameters of each kind's canonical
    /// form and the kind's roles, and every default it states is the value the code fills in.
    #[test]
    fn json_schema_matches_the_stage_configs() {
        let schema = crate::schema::pipeline_schema(&REGISTRY);
        let kinds = &schema["$defs"]["stage"]["properties"]["kind"]["enum"];
        assert_eq!(kinds.as_array().unwrap().len(), REGISTRY.kinds().len());
        for k in REGISTRY.kinds() {
            let def = &schema["$defs"][k.kind]["properties"];
            let mut in_schema: Vec<&str> = def
                .as_object()
                .unwrap_or_else(|| panic!("schema has no $defs.{}", k.kind))
                .keys()
                .map(String::as_str)
                .filter(|x| !["kind", "inputs", "matrix"].contains(x))
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
            // A parameter added later may be left out of the canonical form at its default (so
            // that adding it moved no hash, e.g. `train.data_complement`): spelled at that
            // default, it must change nothing.
            in_schema.retain(|key| {
                if canonical.get(*key).is_some() {
                    return true;
                }
                let Some(default) = def[*key].get("default") else {
                    return true; // and the comparison below names it
                };
                let mut spelled = params.clone();
                spelled[*key] = default.clone();
                let again = (k.build)(&spelled, &ctx).unwrap().params();
                assert_eq!(again, canonical, "`{}.{key}` at its default", k.kind);
                false
            });
            in_schema.sort();
            in_code.sort();
            assert_eq!(in_schema, in_code, "parameters of `{}`", k.kind);
            for key in in_code {
                // `train`'s and `evaluate`'s seed is the pipeline's when left out: no fixed
                // default.
                if let Some(default) = def[key].get("default")
                    && params.get(key).is_none()
                    && key != "seed"
                {
                    assert_eq!(default, &canonical[key], "default of `{}.{key}`", k.kind);
                }
            }
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

    /// A fresh model's `config:` accepts exactly the keys its canonical form spells, plus
    /// `model_type` for `architecture`; the schema's defaults are the code's.
    #[test]
    fn model_config_keys_are_the_canonical_ones() {
        let ctx = BuildContext {
            base_dir: Path::new("."),
            pipeline_seed: 1,
            roles: vec![],
            role_kinds: BTreeMap::new(),
        };
        let params = serde_json::json!({"config": {"vocab_size": 64}});
        let canonical = (model::KIND.build)(&params, &ctx).unwrap().params();
        let config = canonical["config"].as_object().unwrap();
        let mut in_code: Vec<&str> = config.keys().map(String::as_str).collect();
        in_code.push("model_type");
        in_code.sort();
        let known = schema_keys::<crate::model::ModelConfig>();
        let mut in_schema: Vec<&str> = known.iter().map(String::as_str).collect();
        in_schema.sort();
        assert_eq!(in_schema, in_code);
        // Left out, these are derived (from the family or other keys) rather than a fixed value.
        let derived = [
            "num_key_value_heads",
            "intermediate_size",
            "head_dim",
            "partial_rotary_factor",
            "attention_bias",
            "hidden_act",
        ];
        let schema = crate::schema::pipeline_schema(&REGISTRY);
        let props = &schema["$defs"]["ModelConfig"]["properties"];
        for (key, value) in config {
            if let Some(default) = props[key].get("default")
                && !derived.contains(&key.as_str())
            {
                assert_eq!(default, value, "default of `config.{key}`");
            }
        }
    }
}
