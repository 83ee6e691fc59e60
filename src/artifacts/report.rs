//! The `evaluate` artifact: `report.parquet`, one row per (model, metric), in long form so that
//! `sepo compare` and plain Polars can pivot it any way; `report.md`, `report.html` and
//! `generations/<model>.json` beside it.

use std::path::Path;

use anyhow::Result;
use polars::prelude::Column;

use super::Artifact;
use crate::data::parquet as pq;

/// One figure of an evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportRow {
    /// The evaluated model's stage name (a policy, the reference, or the oracle).
    pub policy: String,
    /// `policy`, `reference` or `oracle`.
    pub role: String,
    pub metric: String,
    pub value: f64,
    /// Standard error of `value`, when it is a mean or a rate over `n` items.
    pub stderr: Option<f64>,
    /// Items behind the value (pairs, prompts, steps).
    pub n: i64,
}

/// The report of an `evaluate` artifact.
pub struct Report;

impl Report {
    pub const FILE: &'static str = "report.parquet";
    pub const MARKDOWN: &'static str = "report.md";
    pub const HTML: &'static str = "report.html";
    pub const GENERATIONS: &'static str = "generations";

    /// Writes `rows` as `report.parquet` in `out`.
    pub fn write(rows: &[ReportRow], out: &Path) -> Result<()> {
        let mut df = pq::frame(vec![
            pq::utf8("policy", rows.iter().map(|r| r.policy.clone()).collect()),
            pq::utf8("role", rows.iter().map(|r| r.role.clone()).collect()),
            pq::utf8("metric", rows.iter().map(|r| r.metric.clone()).collect()),
            Column::new(
                "value".into(),
                rows.iter().map(|r| r.value).collect::<Vec<f64>>(),
            ),
            pq::opt_f64("stderr", rows.iter().map(|r| r.stderr).collect()),
            Column::new("n".into(), rows.iter().map(|r| r.n).collect::<Vec<i64>>()),
        ])?;
        pq::write(&mut df, &out.join(Self::FILE))
    }

    /// Reads the report of an `evaluate` artifact.
    pub fn open(a: &Artifact) -> Result<Vec<ReportRow>> {
        Self::read(&a.dir.join(Self::FILE))
    }

    /// Reads a `report.parquet` file.
    pub fn read(path: &Path) -> Result<Vec<ReportRow>> {
        let df = pq::read(path)?;
        let r = pq::Reader {
            df: &df,
            file: path,
        };
        let (policy, role, metric) = (
            r.strings("policy")?,
            r.strings("role")?,
            r.strings("metric")?,
        );
        let value = r.opt_f64("value")?;
        let stderr = r.opt_f64("stderr")?;
        let n = r.i64s("n")?;
        Ok((0..policy.len())
            .map(|i| ReportRow {
                policy: policy[i].clone(),
                role: role[i].clone(),
                metric: metric[i].clone(),
                value: value[i].unwrap_or(f64::NAN),
                stderr: stderr[i],
                n: n[i],
            })
            .collect())
    }
}
