//! `sepo compare`: every built `evaluate` report of a pipeline in one table (DVC's `metrics diff`
//! and `params diff` ideas). A method is a model's stage name without the matrix values of its
//! seed keys (`policy@seed=1` and `policy@seed=2` are one method, `policy`); per method and
//! metric: the mean over its seeds, the sample standard deviation and how many seeds there are.
//! Beside the methods, the parameters that differ between them: the canonical parameters of the
//! policies' stages (defaults filled in) and their matrix values, only the keys whose values are
//! not the same for every policy.

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::Result;
use comfy_table::presets;
use serde_json::{Map, Value, json};

use crate::artifacts::Report;
use crate::pipeline::executor::Plan;
use crate::pipeline::matrix::{instance_name, value_text};
use crate::pipeline::spec::Instance;
use crate::progress::Progress;
use crate::user_bail;

/// The matrix key whose values are seeds: runs that differ only in it are one method.
pub const SEED_KEY: &str = "seed";

/// The stage kind whose artifacts are compared.
const EVALUATE: &str = "evaluate";

/// How `sepo compare` prints the table. A value of `--format`, hence clap's derive.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Methods as rows, metrics as columns.
    Text,
    /// The same as a Markdown table.
    Md,
    /// Long form: one line per method and metric.
    Csv,
}

/// One figure of one evaluated model, with what grouping needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The evaluate stage that measured it, without its seed values.
    pub evaluate: String,
    /// The model's stage name without its seed values.
    pub method: String,
    /// `policy`, `reference` or `oracle`.
    pub role: String,
    pub metric: String,
    pub value: f64,
    /// What may tell methods apart: the model stage's canonical parameters (nested ones as
    /// dotted keys) and its matrix values, seeds left out.
    pub params: BTreeMap<String, Value>,
}

/// A metric of one method over its seeds.
#[derive(Debug, Clone, PartialEq)]
pub struct Stat {
    pub mean: f64,
    /// The sample standard deviation (n - 1); none for a single seed.
    pub std: Option<f64>,
    /// How many seeds.
    pub n: usize,
}

impl Stat {
    pub fn of(values: &[f64]) -> Stat {
        let n = values.len();
        let mean = values.iter().sum::<f64>() / n as f64;
        let std = (n > 1).then(|| {
            let ss: f64 = values.iter().map(|x| (x - mean) * (x - mean)).sum();
            (ss / (n - 1) as f64).sqrt()
        });
        Stat { mean, std, n }
    }
}

/// One method of one evaluation: a row of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub evaluate: String,
    pub method: String,
    pub role: String,
    /// The parameters of the table's `param_keys` this method has.
    pub params: BTreeMap<String, Value>,
    /// One per metric of the table (none where the method has no such figure).
    pub stats: Vec<Option<Stat>>,
}

impl Row {
    /// The most seeds behind any of the row's metrics.
    pub fn seeds(&self) -> usize {
        self.stats.iter().flatten().map(|s| s.n).max().unwrap_or(0)
    }
}

/// The comparison: methods as rows, metrics as columns, in the order they first appear.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub metrics: Vec<String>,
    /// The parameters whose values differ between the policies, sorted.
    pub param_keys: Vec<String>,
    pub rows: Vec<Row>,
}

impl Table {
    /// Groups samples by (evaluation, method, role) and metric.
    pub fn aggregate(samples: &[Sample]) -> Table {
        let mut metrics: Vec<String> = Vec::new();
        let mut groups: Vec<(&Sample, BTreeMap<&str, Vec<f64>>)> = Vec::new();
        let mut index: BTreeMap<(&str, &str, &str), usize> = BTreeMap::new();
        for s in samples {
            if !metrics.contains(&s.metric) {
                metrics.push(s.metric.clone());
            }
            let key = (s.evaluate.as_str(), s.method.as_str(), s.role.as_str());
            let i = *index.entry(key).or_insert_with(|| {
                groups.push((s, BTreeMap::new()));
                groups.len() - 1
            });
            groups[i].1.entry(&s.metric).or_default().push(s.value);
        }
        let policies: Vec<&BTreeMap<String, Value>> = groups
            .iter()
            .filter(|(s, _)| s.role == "policy")
            .map(|(s, _)| &s.params)
            .collect();
        let param_keys = differing_keys(&policies);
        let rows = groups
            .iter()
            .map(|(s, values)| Row {
                evaluate: s.evaluate.clone(),
                method: s.method.clone(),
                role: s.role.clone(),
                params: param_keys
                    .iter()
                    .filter_map(|k| s.params.get(k).map(|v| (k.clone(), v.clone())))
                    .collect(),
                stats: metrics
                    .iter()
                    .map(|m| values.get(m.as_str()).map(|v| Stat::of(v)))
                    .collect(),
            })
            .collect();
        Table {
            metrics,
            param_keys,
            rows,
        }
    }

    /// Long form, as JSON: `[{"evaluate","method","role","metric","mean","std","n_seeds",
    /// "params"}]`, one object per method and metric it has.
    pub fn to_json(&self) -> Value {
        let mut out = Vec::new();
        for row in &self.rows {
            for (metric, stat) in self.metrics.iter().zip(&row.stats) {
                let Some(stat) = stat else { continue };
                let params: Map<String, Value> = row.params.clone().into_iter().collect();
                out.push(json!({
                    "evaluate": row.evaluate,
                    "method": row.method,
                    "role": row.role,
                    "metric": metric,
                    "mean": finite(stat.mean),
                    "std": stat.std.map(finite),
                    "n_seeds": stat.n,
                    "params": params,
                }));
            }
        }
        Value::Array(out)
    }

    /// The table in `format` (text and md: methods as rows; csv: long form).
    pub fn write(&self, out: &mut dyn Write, format: Format) -> Result<()> {
        match format {
            Format::Text | Format::Md => {
                let md = format == Format::Md;
                let mut t = comfy_table::Table::new();
                t.force_no_tty().load_preset(if md {
                    presets::ASCII_MARKDOWN
                } else {
                    presets::NOTHING
                });
                let cell = |s: String| if md { s.replace('|', "\\|") } else { s };
                // The evaluation is a column only when there is more than one.
                let several = self
                    .rows
                    .iter()
                    .any(|r| r.evaluate != self.rows[0].evaluate);
                let mut header: Vec<String> = Vec::new();
                if several {
                    header.push("evaluate".into());
                }
                header.extend(["method".into(), "role".into()]);
                header.extend(self.param_keys.iter().cloned());
                header.push("seeds".into());
                header.extend(self.metrics.iter().cloned());
                t.set_header(header.into_iter().map(cell));
                for row in &self.rows {
                    let seeds = row.seeds();
                    let mut cells: Vec<String> = Vec::new();
                    if several {
                        cells.push(row.evaluate.clone());
                    }
                    cells.extend([row.method.clone(), row.role.clone()]);
                    for k in &self.param_keys {
                        cells.push(row.params.get(k).map_or("-".into(), value_text));
                    }
                    cells.push(seeds.to_string());
                    for stat in &row.stats {
                        cells.push(stat.as_ref().map_or("-".into(), |s| stat_text(s, seeds)));
                    }
                    t.add_row(cells.into_iter().map(cell));
                }
                let text = t.to_string();
                // comfy-table pads the last column too; trailing blanks are noise in a terminal.
                for line in text.lines() {
                    writeln!(out, "{}", line.trim_end())?;
                }
            }
            Format::Csv => {
                let mut w = csv::Writer::from_writer(out);
                let mut header: Vec<String> = [
                    "evaluate", "method", "role", "metric", "mean", "std", "n_seeds",
                ]
                .map(String::from)
                .to_vec();
                header.extend(self.param_keys.iter().cloned());
                w.write_record(&header)?;
                for row in &self.rows {
                    for (metric, stat) in self.metrics.iter().zip(&row.stats) {
                        let Some(stat) = stat else { continue };
                        let mut rec = vec![
                            row.evaluate.clone(),
                            row.method.clone(),
                            row.role.clone(),
                            metric.clone(),
                            stat.mean.to_string(),
                            stat.std.map(|s| s.to_string()).unwrap_or_default(),
                            stat.n.to_string(),
                        ];
                        for k in &self.param_keys {
                            rec.push(row.params.get(k).map(value_text).unwrap_or_default());
                        }
                        w.write_record(&rec)?;
                    }
                }
                w.flush()?;
            }
        }
        Ok(())
    }
}

/// `mean ± std` with four significant digits, ` (n=K)` when fewer seeds than the row's.
fn stat_text(s: &Stat, seeds: usize) -> String {
    let d = decimals(s.mean);
    let mut t = match s.std {
        Some(sd) => format!("{:.d$} ± {:.d$}", s.mean, sd),
        None => format!("{:.d$}", s.mean),
    };
    if s.n < seeds {
        t.push_str(&format!(" (n={})", s.n));
    }
    t
}

/// Decimals that show `x` with four significant digits (none for large values, at most 6).
fn decimals(x: f64) -> usize {
    if x == 0.0 || !x.is_finite() {
        return 4;
    }
    (3 - x.abs().log10().floor() as i64).clamp(0, 6) as usize
}

/// A number as JSON: NaN and infinities (which JSON lacks) as null.
fn finite(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

/// The keys whose values are not the same in every one of `params` (a key some lack differs).
fn differing_keys(params: &[&BTreeMap<String, Value>]) -> Vec<String> {
    let Some(first) = params.first() else {
        return Vec::new();
    };
    let mut keys: Vec<&String> = params.iter().flat_map(|p| p.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| params.iter().any(|p| p.get(*k) != first.get(*k)))
        .cloned()
        .collect()
}

/// The method a stage belongs to: its name without the values of its seed keys. From its
/// matrix values when the plan knows the stage, else (a report written under an older name)
/// from the name itself.
pub fn method_of(name: &str, instance: Option<&Instance>) -> String {
    match instance {
        Some(inst) => {
            let kept: Vec<(String, Value)> = inst
                .values
                .iter()
                .filter(|(k, _)| k != SEED_KEY)
                .cloned()
                .collect();
            instance_name(&inst.base, &kept)
        }
        None => match name.split_once('@') {
            Some((base, values)) => {
                let kept: Vec<&str> = values
                    .split(',')
                    .filter(|kv| kv.split_once('=').is_none_or(|(k, _)| k != SEED_KEY))
                    .collect();
                if kept.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}@{}", kept.join(","))
                }
            }
            None => name.to_string(),
        },
    }
}

/// The parameters that may tell the stage `name` apart from other methods: its canonical
/// parameters as dotted keys and its matrix values, without seeds.
fn params_of(plan: &Plan, name: &str, instance: Option<&Instance>) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    let Ok(s) = plan.get(name) else {
        return out;
    };
    flatten("", &s.stage.params(), &mut out);
    for (k, v) in instance.map_or(&[][..], |i| &i.values) {
        out.insert(k.clone(), v.clone());
    }
    out.retain(|k, _| k != SEED_KEY);
    out
}

fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.clone());
        }
    }
}

/// Every figure of the plan's built `evaluate` stages. An evaluate stage that is not built is
/// named on stderr and skipped; none built (or none at all) is the user's error.
pub fn gather(plan: &Plan, progress: &Progress) -> Result<Vec<Sample>> {
    let file = plan.pipeline.file.display();
    let evals: Vec<_> = plan
        .stages
        .iter()
        .filter(|s| s.kind.kind == EVALUATE)
        .collect();
    if evals.is_empty() {
        user_bail!("{file}: no `{EVALUATE}` stage, so nothing to compare");
    }
    let instance = |name: &str| plan.pipeline.stage(name).and_then(|d| d.instance.as_ref());
    let mut samples = Vec::new();
    let mut built = 0;
    // Each model's method and parameters, worked out once however many figures it has.
    let mut models: BTreeMap<String, (String, BTreeMap<String, Value>)> = BTreeMap::new();
    for e in evals {
        if !e.fresh {
            progress.log(format!(
                "stage `{}` ({EVALUATE}) is not built: skipped",
                crate::error::clip(&e.name)
            ));
            continue;
        }
        // Never read a damaged artifact.
        plan.intact_manifest(&e.name)?;
        let rows = Report::read(&plan.artifact_dir(e).join(Report::FILE))?;
        built += 1;
        let evaluate = method_of(&e.name, instance(&e.name));
        for r in rows {
            let (method, params) = models.entry(r.policy.clone()).or_insert_with(|| {
                let inst = instance(&r.policy);
                (method_of(&r.policy, inst), params_of(plan, &r.policy, inst))
            });
            samples.push(Sample {
                evaluate: evaluate.clone(),
                method: method.clone(),
                role: r.role,
                metric: r.metric,
                value: r.value,
                params: params.clone(),
            });
        }
    }
    if built == 0 {
        user_bail!("{file}: no `{EVALUATE}` stage is built: run `sepo run {file}` first");
    }
    Ok(samples)
}

#[cfg(test)]
mod tests;
