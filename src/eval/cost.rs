//! What training a policy cost, for `evaluate`'s report.

use anyhow::Result;
use serde_json::Value;

use super::report::row;
use crate::artifacts::model::METRICS_FILE;
use crate::artifacts::{Artifact, ReportRow};
use crate::data::parquet as pq;

/// What training a policy cost, from its artifact: optimizer steps, tokens processed, wall time,
/// and (when the train stage recorded them) the tokens that carried loss and their share of the
/// response tokens.
pub fn cost(policy: &Artifact) -> Result<Vec<ReportRow>> {
    let mut out = Vec::new();
    if policy.kind != "train" {
        return Ok(out);
    }
    let stage = policy.stage.as_str();
    let path = policy.dir.join(METRICS_FILE);
    let df = pq::read(&path)?;
    let steps = df.height();
    out.push(row(
        stage,
        "policy",
        "train_steps",
        steps as f64,
        None,
        steps,
    ));
    out.push(row(
        stage,
        "policy",
        "train_wall_s",
        policy.manifest.wall_time_s,
        None,
        steps,
    ));
    let stats = &policy.manifest.stats;
    let num = |k: &str| stats.get(k).and_then(Value::as_f64);
    if let Some(t) = num("tokens") {
        out.push(row(stage, "policy", "train_tokens", t, None, steps));
    }
    if let (Some(l), Some(r)) = (num("loss_tokens"), num("response_tokens")) {
        out.push(row(stage, "policy", "loss_tokens", l, None, steps));
        out.push(row(
            stage,
            "policy",
            "loss_token_share",
            l / r.max(1.0),
            None,
            steps,
        ));
    }
    Ok(out)
}
