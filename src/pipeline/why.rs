//! Why is a stage stale? As DVC's `status` does, sepo compares what a stage is now with what it
//! was when it was last built: parameters (which keys, old → new), inputs (which), external files
//! (which), the stage code's version, or never built. `run` remembers each pipeline's last built
//! stages in `<cache>/.state/last/<pipeline id>.json`, keyed by stage name.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::executor::{Plan, Planned};
use super::store::write_atomic;

/// What one stage was when it was last built.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StageRecord {
    pub kind: String,
    pub version: String,
    pub hash: String,
    pub params: Value,
    /// Role -> (upstream stage, its hash), in the order written.
    pub inputs: BTreeMap<String, Vec<(String, String)>>,
    /// External file -> its content hash.
    pub files: BTreeMap<String, String>,
}

impl StageRecord {
    pub fn of(plan: &Plan, p: &Planned) -> StageRecord {
        let inputs = p
            .inputs
            .iter()
            .map(|(role, ups)| {
                let pairs = ups
                    .iter()
                    .map(|u| {
                        let h = plan.get(u).map(|s| s.hash.clone()).unwrap_or_default();
                        (u.clone(), h)
                    })
                    .collect();
                (role.clone(), pairs)
            })
            .collect();
        StageRecord {
            kind: p.kind.kind.to_string(),
            version: p.kind.version.to_string(),
            hash: p.hash.clone(),
            params: p.stage.params(),
            inputs,
            files: p
                .external_files
                .iter()
                .map(|f| (f.path.clone(), f.blake3.clone()))
                .collect(),
        }
    }
}

type Records = BTreeMap<String, StageRecord>;

/// The state file of one pipeline file (several pipelines may share a cache and stage names).
fn records_path(plan: &Plan) -> PathBuf {
    let file = std::path::absolute(&plan.pipeline.file)
        .unwrap_or_else(|_| plan.pipeline.file.clone())
        .display()
        .to_string();
    let id = &blake3::hash(file.as_bytes()).to_hex()[..16];
    plan.store
        .root
        .join(".state")
        .join("last")
        .join(format!("{id}.json"))
}

/// The last recorded build of every stage of this pipeline (empty when none was recorded).
pub fn last_built(plan: &Plan) -> Records {
    std::fs::read(records_path(plan))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Records every stage of the plan whose artifact exists now (called after `run`).
pub fn remember(plan: &Plan) -> Result<()> {
    let mut recs = last_built(plan);
    let before = recs.clone();
    for p in &plan.stages {
        if plan.store.is_fresh(p.kind.kind, &p.hash) {
            recs.insert(p.name.clone(), StageRecord::of(plan, p));
        }
    }
    if recs != before {
        let path = records_path(plan);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        write_atomic(&path, &serde_json::to_vec_pretty(&recs)?)?;
    }
    Ok(())
}

/// Why `p` is stale, one reason per entry (empty when it is fresh).
pub fn why(plan: &Plan, p: &Planned, last: &Records) -> Vec<String> {
    if p.fresh {
        return Vec::new();
    }
    let Some(old) = last.get(&p.name) else {
        return vec!["never built".to_string()];
    };
    let now = StageRecord::of(plan, p);
    if old.hash == now.hash {
        return vec!["its artifact was deleted (by gc or by hand)".to_string()];
    }
    let mut out = Vec::new();
    if old.kind != now.kind {
        out.push(format!("kind {} → {}", old.kind, now.kind));
        return out;
    }
    if old.version != now.version {
        out.push(format!(
            "stage code version {} → {} (a newer sepo computes it differently)",
            old.version, now.version
        ));
    }
    let mut changes = Vec::new();
    diff_values("", &old.params, &now.params, &mut changes);
    if !changes.is_empty() {
        out.push(format!("params: {}", changes.join(", ")));
    }
    for (role, ups) in &now.inputs {
        match old.inputs.get(role) {
            None => out.push(format!("new input `{role}`")),
            Some(was) if was.iter().map(|x| &x.0).ne(ups.iter().map(|x| &x.0)) => {
                let names = |v: &[(String, String)]| {
                    v.iter()
                        .map(|x| x.0.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                out.push(format!(
                    "input `{role}` is now `{}` (was `{}`)",
                    names(ups),
                    names(was)
                ));
            }
            Some(was) => {
                for ((name, h), (_, old_h)) in ups.iter().zip(was) {
                    if h != old_h {
                        out.push(format!("input `{name}` ({role}) changed"));
                    }
                }
            }
        }
    }
    for role in old.inputs.keys() {
        if !now.inputs.contains_key(role) {
            out.push(format!("input `{role}` removed"));
        }
    }
    for (path, h) in &now.files {
        match old.files.get(path) {
            None => out.push(format!("new file {path}")),
            Some(o) if o != h => out.push(format!("file {path} changed")),
            _ => {}
        }
    }
    for path in old.files.keys() {
        if !now.files.contains_key(path) {
            out.push(format!("file {path} no longer read"));
        }
    }
    if out.is_empty() {
        out.push("its hash changed".to_string());
    }
    out
}

/// A value for a one-line message: JSON, clipped.
fn show(v: &Value) -> String {
    crate::error::clip(&serde_json::to_string(v).unwrap_or_default())
}

/// Appends `key old → new` for every leaf that differs (dotted keys for nesting).
fn diff_values(prefix: &str, old: &Value, new: &Value, out: &mut Vec<String>) {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => diff_values(&key, x, y, out),
                    (Some(x), None) => out.push(format!("{key} {} → (unset)", show(x))),
                    (None, Some(y)) => out.push(format!("{key} (unset) → {}", show(y))),
                    (None, None) => {}
                }
            }
        }
        (a, b) if a != b => out.push(format!("{prefix} {} → {}", show(a), show(b))),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nested_parameter_changes_are_named_with_dotted_keys() {
        let mut out = Vec::new();
        diff_values(
            "",
            &json!({"lr": 0.001, "config": {"hidden_size": 64, "layers": 2}, "gone": 1}),
            &json!({"lr": 0.0002, "config": {"hidden_size": 64, "layers": 4}, "new": "x"}),
            &mut out,
        );
        assert_eq!(
            out,
            [
                "config.layers 2 → 4",
                "gone 1 → (unset)",
                "lr 0.001 → 0.0002",
                "new (unset) → \"x\""
            ]
        );
    }
}
