//! The human-readable report of an evaluation: `report.md` (one table, models as rows) and
//! `report.html` (the same table, every figure in long form, the plots and the key-token view).

use std::collections::BTreeSet;

use anyhow::Result;
use serde_json::json;

use crate::artifacts::ReportRow;

/// The metrics of the one-table summary, in column order; those no model has are left out.
pub const HEADLINE: &[&str] = &[
    "reward_accuracy",
    "reward_margin",
    "logp_accuracy",
    "key_reward_accuracy",
    "win_rate_vs_reference",
    "lc_win_rate_vs_reference",
    "win_rate_vs_chosen",
    "lc_win_rate_vs_chosen",
    "response_length_mean",
    "loss_token_share",
    "train_steps",
    "train_wall_s",
];

/// One report row.
pub fn row(
    model: &str,
    role: &str,
    metric: &str,
    value: f64,
    stderr: Option<f64>,
    n: usize,
) -> ReportRow {
    ReportRow {
        policy: model.to_string(),
        role: role.to_string(),
        metric: metric.to_string(),
        value,
        stderr,
        n: n as i64,
    }
}

/// `value ± stderr` with a precision that suits the metric.
pub fn format_value(r: &ReportRow) -> String {
    let digits = if r.metric.ends_with("_s")
        || r.metric.contains("length")
        || r.metric.ends_with("steps")
        || r.metric.ends_with("tokens")
    {
        1
    } else {
        3
    };
    match r.stderr {
        Some(se) => format!("{:.*} ± {:.*}", digits, r.value, digits, se),
        None => format!("{:.*}", digits, r.value),
    }
}

/// The models in report order and the headline metrics any of them has.
fn table(rows: &[ReportRow]) -> (Vec<(String, String)>, Vec<&'static str>) {
    let mut models: Vec<(String, String)> = Vec::new();
    for r in rows {
        if r.role != "oracle" && r.role != "judge" && !models.iter().any(|(m, _)| *m == r.policy) {
            models.push((r.policy.clone(), r.role.clone()));
        }
    }
    let present: BTreeSet<&str> = rows.iter().map(|r| r.metric.as_str()).collect();
    let cols = HEADLINE
        .iter()
        .copied()
        .filter(|m| present.contains(m))
        .collect();
    (models, cols)
}

fn cell(rows: &[ReportRow], model: &str, metric: &str) -> String {
    rows.iter()
        .find(|r| r.policy == model && r.metric == metric)
        .map(format_value)
        .unwrap_or_else(|| "–".into())
}

/// `report.md`: one Markdown table, models as rows, headline metrics as columns, then the
/// oracle's held-out accuracy when the report has it.
pub fn markdown(title: &str, rows: &[ReportRow]) -> String {
    let (models, cols) = table(rows);
    let mut s = format!(
        "# {title}\n\n| model | role | {} |\n|---|---|{}\n",
        cols.join(" | "),
        "---|".repeat(cols.len())
    );
    for (m, role) in &models {
        let cells: Vec<String> = cols.iter().map(|c| cell(rows, m, c)).collect();
        s.push_str(&format!("| {m} | {role} | {} |\n", cells.join(" | ")));
    }
    for r in rows
        .iter()
        .filter(|r| r.role == "oracle" || r.role == "judge")
    {
        s.push_str(&format!(
            "\n{} `{}`: {} = {} (n = {})\n",
            if r.role == "judge" { "Judge" } else { "Oracle" },
            r.policy,
            r.metric,
            format_value(r),
            r.n
        ));
    }
    s.push_str("\nValues are means ± standard error over the test pairs (prompts for win rates). Every figure, in long form: `report.parquet`.\n");
    s
}

const PAGE: &str = include_str!("report.html.j2");

/// A plot for the HTML report: a caption and an SVG document.
pub struct Figure {
    pub caption: String,
    pub svg: String,
}

/// `report.html`: the summary table, every figure, the plots (inline SVG), and extra sections
/// (HTML fragments, e.g. the key-token view).
pub fn html(
    title: &str,
    rows: &[ReportRow],
    figures: &[Figure],
    sections: &[String],
) -> Result<String> {
    let (models, cols) = table(rows);
    let table_rows: Vec<serde_json::Value> = models
        .iter()
        .map(|(m, role)| json!({"model": m, "role": role, "cells": cols.iter().map(|c| cell(rows, m, c)).collect::<Vec<_>>()}))
        .collect();
    let all: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| json!({"model": r.policy, "role": r.role, "metric": r.metric, "value": format_value(r), "n": r.n}))
        .collect();
    let figs: Vec<serde_json::Value> = figures
        .iter()
        .map(|f| json!({"caption": f.caption, "svg": f.svg}))
        .collect();
    let mut env = minijinja::Environment::new();
    env.add_template("report.html", PAGE)?;
    let page = env.get_template("report.html")?.render(json!({
        "title": title,
        "columns": cols,
        "rows": table_rows,
        "all": all,
        "figures": figs,
        "sections": sections,
    }))?;
    Ok(page)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(policy: &str, role: &str, metric: &str, value: f64, stderr: Option<f64>) -> ReportRow {
        ReportRow {
            policy: policy.into(),
            role: role.into(),
            metric: metric.into(),
            value,
            stderr,
            n: 10,
        }
    }

    #[test]
    fn markdown_has_models_as_rows_and_escapes_nothing_it_should_not() {
        let rows = vec![
            row("policy", "policy", "reward_accuracy", 0.6, Some(0.05)),
            row("ref", "reference", "reward_accuracy", 0.5, Some(0.05)),
            row("policy", "policy", "win_rate_vs_reference", 0.7, Some(0.1)),
            row("oracle", "oracle", "oracle_test_accuracy", 0.8, Some(0.04)),
        ];
        let md = markdown("t", &rows);
        assert!(
            md.contains("| model | role | reward_accuracy | win_rate_vs_reference |"),
            "{md}"
        );
        assert!(
            md.contains("| policy | policy | 0.600 ± 0.050 | 0.700 ± 0.100 |"),
            "{md}"
        );
        assert!(
            md.contains("| ref | reference | 0.500 ± 0.050 | – |"),
            "{md}"
        );
        assert!(
            md.contains("Oracle `oracle`: oracle_test_accuracy = 0.800 ± 0.040"),
            "{md}"
        );
        let page = html("<t>", &rows, &[], &[]).unwrap();
        assert!(
            page.contains("&lt;t&gt;") && !page.contains("<t>"),
            "titles are escaped"
        );
    }
}
