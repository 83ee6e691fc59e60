//! `matrix:` stages (DVC's idea): a stage declared over lists of parameter values becomes one
//! stage per combination, each exactly as if written by hand, named `NAME@KEY=VALUE[,KEY=VALUE]`.
//!
//! - Own keys: the product of the lists, in the order written (the first key varies slowest);
//!   each instance has those parameters set.
//! - Inherited keys: a stage that reads a matrix stage in a role that takes one stage becomes a
//!   matrix over the same values (`policy` reading `keys@chosen_ratio=0.3` is
//!   `policy@chosen_ratio=0.3`), down the graph. Several matrices are joined: a product over
//!   distinct keys, instances matched on shared keys (`report` reading `policy@seed=1` and
//!   `ref@seed=1`, never `ref@seed=2`). A stage's own key that an input also has is matched the
//!   same way. In its name, inherited keys come first (by role), then its own.
//! - A role that takes a list (`many`) gets every instance of a matrix stage it names (those
//!   that match the reader's own values on shared keys).
//!
//! Names are not hashed, so an instance hashes like the same stage written by hand.

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::Result;
use serde_json::Value;

use super::graph::Graph;
use super::spec::{InputRef, Instance, Pipeline, StageDecl, set_param, set_value};
use super::stage::{Registry, StageKind};
use crate::error::clip;
use crate::user_bail;
use crate::util::suggest;

/// The most stages the matrices of one pipeline may make: a typo (`lr: [1e-5, ...]` pasted ten
/// thousand times, or two long sweeps multiplied) should be an error, not hours of planning.
pub const MAX_INSTANCES: usize = 10_000;

/// One expanded stage: its name and its matrix values (none for a stage that is no matrix).
#[derive(Debug, Clone)]
struct Cell {
    name: String,
    values: Vec<(String, Value)>,
}

/// One instance being made: its values so far and the instance each single-stage role reads.
#[derive(Debug, Clone, Default)]
struct Combo {
    values: Vec<(String, Value)>,
    picks: BTreeMap<String, String>,
}

/// Expands every matrix stage of `p` in place (instances where the stage was declared), fills
/// `p.matrices` and applies the `--set`s addressed to one instance. Stage kinds come from
/// `registry`: which parameters a kind has, which of its roles take a list. A pipeline without
/// a matrix is left exactly as it is.
pub fn expand(p: &mut Pipeline, registry: &Registry) -> Result<()> {
    if p.stages.iter().all(|s| s.matrix.is_empty()) && p.instance_sets.is_empty() {
        return Ok(());
    }
    let fname = p.file.display().to_string();
    let order = template_order(p)?;
    let position: HashMap<&str, usize> = p
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.as_str(), i))
        .collect();
    let mut cells: HashMap<String, Vec<Cell>> = HashMap::new();
    let mut made: Vec<Vec<StageDecl>> = vec![Vec::new(); p.stages.len()];
    // Per instance, its own matrix keys: `--set S@k=v.k=...` must not contradict its name.
    let mut own_keys: HashMap<String, Vec<String>> = HashMap::new();
    let mut total = 0usize;
    for name in &order {
        let i = position[name.as_str()];
        let decl = &p.stages[i];
        let shown = clip(&decl.name);
        let kind = registry.lookup(&decl.kind);
        check_axes(decl, kind, &fname)?;
        let takes_list = |role: &str, r: &InputRef| {
            kind.and_then(|k| k.roles.iter().find(|x| x.name == role))
                .map_or(matches!(r, InputRef::Many(_)), |x| x.many)
        };
        let mut combos = vec![Combo::default()];
        for (role, r) in &decl.inputs {
            let InputRef::One(up) = r else { continue };
            if takes_list(role, r) {
                continue;
            }
            let Some(up_cells) = cells.get(up).filter(|c| is_matrix(c)) else {
                continue;
            };
            let mut joined = Vec::new();
            for c in &combos {
                for u in up_cells {
                    if agree(&c.values, &u.values) {
                        let mut next = c.clone();
                        merge(&mut next.values, &u.values);
                        next.picks.insert(role.clone(), u.name.clone());
                        joined.push(next);
                        check_total(total + joined.len(), &fname, &shown)?;
                    }
                }
            }
            if joined.is_empty() {
                user_bail!(
                    "{fname}: stage `{shown}`: input `{}` (`{}`) shares matrix keys with its other inputs but no values: no instance can read both",
                    clip(role),
                    clip(up)
                );
            }
            combos = joined;
        }
        for axis in &decl.matrix {
            let mut next = Vec::new();
            for c in combos {
                match c.values.iter().find(|(k, _)| *k == axis.key) {
                    // A key an input has already: keep the instances whose value is listed.
                    Some((_, v)) => {
                        if axis.values.iter().any(|x| same(x, v)) {
                            next.push(c);
                        }
                    }
                    None => {
                        for v in &axis.values {
                            let mut c = c.clone();
                            c.values.push((axis.key.clone(), v.clone()));
                            next.push(c);
                        }
                        check_total(total + next.len(), &fname, &shown)?;
                    }
                }
            }
            if next.is_empty() {
                user_bail!(
                    "{fname}: stage `{shown}`: no value of matrix.{} is one its inputs have",
                    clip(&axis.key)
                );
            }
            combos = next;
        }
        if combos.len() == 1 && combos[0].values.is_empty() {
            let mut plain = decl.clone();
            plain.inputs = expand_lists(decl, &[], &cells, &takes_list, &fname)?;
            made[i].push(plain);
            cells.insert(
                name.clone(),
                vec![Cell {
                    name: name.clone(),
                    values: Vec::new(),
                }],
            );
            continue;
        }
        total += combos.len();
        let mut instances = Vec::with_capacity(combos.len());
        for c in combos {
            let iname = instance_name(&decl.name, &c.values);
            let mut params = decl.params.clone();
            for axis in &decl.matrix {
                let v = c.values.iter().find(|(k, _)| *k == axis.key);
                params.insert(axis.key.clone(), v.expect("own key set").1.clone());
            }
            let mut inputs = expand_lists(decl, &c.values, &cells, &takes_list, &fname)?;
            for (role, up) in &c.picks {
                inputs.insert(role.clone(), InputRef::One(up.clone()));
            }
            own_keys.insert(
                iname.clone(),
                decl.matrix.iter().map(|a| a.key.clone()).collect(),
            );
            instances.push(Cell {
                name: iname.clone(),
                values: c.values.clone(),
            });
            made[i].push(StageDecl {
                name: iname,
                kind: decl.kind.clone(),
                inputs,
                params,
                matrix: Vec::new(),
                instance: Some(Instance {
                    base: decl.name.clone(),
                    values: c.values,
                }),
            });
        }
        cells.insert(name.clone(), instances);
    }
    let mut stages: Vec<StageDecl> = made.into_iter().flatten().collect();
    let mut seen: HashMap<&str, &StageDecl> = HashMap::with_capacity(stages.len());
    for s in &stages {
        if let Some(other) = seen.insert(s.name.as_str(), s) {
            let base = [s, other]
                .iter()
                .find_map(|d| d.instance.as_ref())
                .map(|i| &i.base);
            match base {
                Some(base) => user_bail!(
                    "{fname}: the matrix of stage `{}` makes `{}`, the name of another stage: rename one",
                    clip(base),
                    clip(&s.name)
                ),
                None => user_bail!("{fname}: stage `{}` is declared twice", clip(&s.name)),
            }
        }
    }
    for (base, c) in cells {
        if is_matrix(&c) {
            p.matrices
                .insert(base, c.into_iter().map(|c| c.name).collect());
        }
    }
    let sets = std::mem::take(&mut p.instance_sets);
    for a in &sets {
        apply_instance_set(&mut stages, &own_keys, a, &fname)?;
    }
    p.stages = stages;
    Ok(())
}

/// The declared stages in an order where every stage comes after the stages it reads. A
/// reference to one instance (`ref@seed=1`) counts as one to its matrix stage (`ref`), so the
/// graph's own checks (unknown stages, cycles) speak of the stages as declared.
fn template_order(p: &Pipeline) -> Result<Vec<String>> {
    let declared: HashSet<&str> = p.stages.iter().map(|s| s.name.as_str()).collect();
    let base_of = |r: &str| -> String {
        if declared.contains(r) {
            return r.to_string();
        }
        r.match_indices('@')
            .map(|(at, _)| &r[..at])
            .find(|b| declared.contains(b))
            .unwrap_or(r)
            .to_string()
    };
    let mut shadow = p.clone();
    for s in &mut shadow.stages {
        for r in s.inputs.values_mut() {
            *r = match r {
                InputRef::One(u) => InputRef::One(base_of(u)),
                InputRef::Many(v) => InputRef::Many(v.iter().map(|u| base_of(u)).collect()),
            };
        }
    }
    Ok(Graph::build(&shadow)?.order)
}

/// The input roles of `decl` (an instance with `values`, or a plain stage with none) with every
/// matrix stage named in a role that takes a list replaced by its instances that agree with
/// `values`.
fn expand_lists(
    decl: &StageDecl,
    values: &[(String, Value)],
    cells: &HashMap<String, Vec<Cell>>,
    takes_list: &dyn Fn(&str, &InputRef) -> bool,
    fname: &str,
) -> Result<BTreeMap<String, InputRef>> {
    let mut out = BTreeMap::new();
    for (role, r) in &decl.inputs {
        let matrix_of = |u: &str| cells.get(u).filter(|c| is_matrix(c));
        if !takes_list(role, r) || r.stages().iter().all(|u| matrix_of(u).is_none()) {
            out.insert(role.clone(), r.clone());
            continue;
        }
        let mut list = Vec::new();
        for u in r.stages() {
            let Some(c) = matrix_of(u) else {
                list.push(u.to_string());
                continue;
            };
            let before = list.len();
            list.extend(
                c.iter()
                    .filter(|c| agree(values, &c.values))
                    .map(|c| c.name.clone()),
            );
            if list.len() == before {
                user_bail!(
                    "{fname}: stage `{}`: input `{}`: no instance of `{}` has its matrix values ({})",
                    clip(&instance_name(&decl.name, values)),
                    clip(role),
                    clip(u),
                    values_text(values)
                );
            }
        }
        out.insert(role.clone(), InputRef::Many(list));
    }
    Ok(out)
}

/// Refuses a matrix that names no parameter of the stage's kind, one written as a plain
/// parameter too, or a list that is empty or repeats a value.
fn check_axes(decl: &StageDecl, kind: Option<&StageKind>, fname: &str) -> Result<()> {
    if decl.matrix.is_empty() {
        // Most stages: no need to generate the kind's parameter list.
        return Ok(());
    }
    let shown = clip(&decl.name);
    let known = kind.map(param_keys);
    for axis in &decl.matrix {
        let key = clip(&axis.key);
        if let (Some(known), Some(kind)) = (&known, kind)
            && !known.contains(&axis.key)
        {
            let names: Vec<&str> = known.iter().map(String::as_str).collect();
            user_bail!(
                "{fname}: stage `{shown}`: matrix key `{key}` is not a parameter of `{}` stages{} (they have: {})",
                kind.kind,
                suggest(&axis.key, &names),
                names.join(", ")
            );
        }
        if decl.params.contains_key(&axis.key) {
            user_bail!(
                "{fname}: stage `{shown}`: `{key}` is both a parameter and a matrix key: keep one (--set {shown}.matrix.{key}=[...] changes the matrix's values)"
            );
        }
        if axis.values.is_empty() {
            user_bail!(
                "{fname}: stage `{shown}`: matrix.{key} is an empty list: give at least one value"
            );
        }
        if axis.values.len() > MAX_INSTANCES {
            check_total(axis.values.len(), fname, &shown)?;
        }
        // Two values that print the same would make two stages of one name; numbers are
        // compared as numbers too (`1` and `1.0`), as JSON Schema's `uniqueItems` does.
        let mut texts = HashSet::new();
        let mut numbers = HashSet::new();
        for v in &axis.values {
            let number = v.as_f64().map(|f| (f + 0.0).to_bits());
            let text = value_text(v);
            if !texts.insert(text.clone()) || number.is_some_and(|n| !numbers.insert(n)) {
                user_bail!(
                    "{fname}: stage `{shown}`: matrix.{key} lists `{}` twice",
                    clip(&text)
                );
            }
        }
    }
    Ok(())
}

/// The top-level parameter names of a stage kind (its config type's properties).
fn param_keys(kind: &StageKind) -> Vec<String> {
    let schema = (kind.params_schema)(&mut schemars::SchemaGenerator::default());
    schema
        .get("properties")
        .and_then(Value::as_object)
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

fn check_total(n: usize, fname: &str, stage: &str) -> Result<()> {
    if n > MAX_INSTANCES {
        user_bail!(
            "{fname}: stage `{stage}`: the matrices make more than {MAX_INSTANCES} stages; sweep fewer values or split the sweep into several pipeline files"
        );
    }
    Ok(())
}

/// Applies one `--set S@k=v,....KEY=VALUE` to the instance it names.
fn apply_instance_set(
    stages: &mut [StageDecl],
    own_keys: &HashMap<String, Vec<String>>,
    assignment: &str,
    fname: &str,
) -> Result<()> {
    let shown = clip(assignment);
    // Values may hold dots and `=`: the longest instance name that starts the assignment.
    let target = super::spec::addressed_stage(stages, assignment, |s| s.instance.is_some());
    let Some(i) = target else {
        // What was probably meant as the stage: up to the last `.` before the last `=`.
        let lhs = assignment.rsplit_once('=').map_or(assignment, |(l, _)| l);
        let stage = lhs.rsplit_once('.').map_or(lhs, |(s, _)| s);
        let names: Vec<&str> = stages
            .iter()
            .filter(|s| s.instance.is_some())
            .map(|s| s.name.as_str())
            .collect();
        user_bail!(
            "--set `{shown}`: {fname} has no stage or matrix instance `{}`{}",
            clip(stage),
            suggest(stage, &names)
        );
    };
    let s = &mut stages[i];
    let rest = &assignment[s.name.len() + 1..];
    let Some((key, rhs)) = rest.split_once('=') else {
        user_bail!("--set `{shown}`: expected STAGE.KEY=VALUE");
    };
    let top = key.split('.').next().unwrap_or(key);
    if own_keys
        .get(&s.name)
        .is_some_and(|k| k.iter().any(|k| k == top))
    {
        let base = &s.instance.as_ref().expect("an instance").base;
        user_bail!(
            "--set `{shown}`: `{}` is a matrix key of `{}`: its instances are named by it (change the values with --set {}.matrix.{}=[...])",
            clip(top),
            clip(base),
            clip(base),
            clip(top)
        );
    }
    let value = set_value(rhs, &shown, fname)?;
    set_param(&mut s.params, key, value, &shown)
}

fn is_matrix(cells: &[Cell]) -> bool {
    cells.iter().any(|c| !c.values.is_empty())
}

/// Whether two sets of matrix values agree on every key they share.
fn agree(a: &[(String, Value)], b: &[(String, Value)]) -> bool {
    a.iter()
        .all(|(k, v)| b.iter().all(|(k2, v2)| k != k2 || same(v, v2)))
}

/// Adds to `into` the keys of `from` it lacks, in `from`'s order.
fn merge(into: &mut Vec<(String, Value)>, from: &[(String, Value)]) {
    for (k, v) in from {
        if !into.iter().any(|(k2, _)| k2 == k) {
            into.push((k.clone(), v.clone()));
        }
    }
}

/// Whether two matrix values are one: the same text in a name, or the same number.
fn same(a: &Value, b: &Value) -> bool {
    a == b
        || value_text(a) == value_text(b)
        || matches!((a.as_f64(), b.as_f64()), (Some(x), Some(y)) if x == y)
}

/// A value as an instance name shows it: a string as itself, anything else as compact JSON.
pub fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn values_text(values: &[(String, Value)]) -> String {
    values
        .iter()
        .map(|(k, v)| format!("{k}={}", value_text(v)))
        .collect::<Vec<_>>()
        .join(",")
}

/// `base@k=v,k2=v2`, or `base` for no values.
pub fn instance_name(base: &str, values: &[(String, Value)]) -> String {
    if values.is_empty() {
        base.to_string()
    } else {
        format!("{base}@{}", values_text(values))
    }
}

#[cfg(test)]
mod tests;
