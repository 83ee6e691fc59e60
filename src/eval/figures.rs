//! The artifact-reading parts of `report.html`: its plots and the key-token view.

use std::collections::BTreeMap;

use anyhow::Result;

use super::report::Figure;
use crate::artifacts::model::METRICS_FILE;
use crate::artifacts::{Artifact, ReportRow, tokenizer_of};
use crate::data::parquet as pq;

/// The key-token view of the test pairs (`sepo show P.yaml KEYS --html`'s page, embedded), when
/// the data is a select stage: what the policy was trained to move, next to how it did.
pub fn key_view(data: &Artifact, reference: &Artifact) -> Result<Vec<String>> {
    if data.kind != "select" {
        return Ok(Vec::new());
    }
    let mut view = crate::keyview::KeyView::from_artifact(data, &tokenizer_of(reference)?)?;
    view.pairs.retain(|p| p.split == "test");
    Ok(vec![format!(
        "<h2>Key tokens of the test pairs</h2>\n{}",
        crate::keyview::render_section(&view)?
    )])
}

/// The report's plots: win rates (with 95% error bars), answer lengths, and each policy's
/// training loss curve.
pub fn figures(
    report: &[ReportRow],
    lengths: &BTreeMap<String, Vec<usize>>,
    policies: &[Artifact],
) -> Result<Vec<Figure>> {
    let mut figs = Vec::new();
    for versus in ["reference", "chosen"] {
        let metric = format!("win_rate_vs_{versus}");
        let bars: Vec<(String, f64, f64)> = report
            .iter()
            .filter(|r| r.metric == metric)
            .map(|r| (r.policy.clone(), r.value, r.stderr.unwrap_or(0.0)))
            .collect();
        if !bars.is_empty() {
            let title = format!("Judged win rate against the {versus}'s answer");
            figs.push(Figure {
                svg: crate::plot::win_rates(&title, &bars)?,
                caption: title,
            });
        }
    }
    if !lengths.is_empty() {
        let groups: Vec<(String, Vec<f64>)> = lengths
            .iter()
            .map(|(m, a)| (m.clone(), a.iter().map(|&n| n as f64).collect()))
            .collect();
        let title = "Answer length (tokens)".to_string();
        figs.push(Figure {
            svg: crate::plot::lengths(&title, &groups)?,
            caption: title,
        });
    }
    let mut series = Vec::new();
    for p in policies.iter().filter(|p| p.kind == "train") {
        let path = p.dir.join(METRICS_FILE);
        let df = pq::read(&path)?;
        let r = pq::Reader {
            df: &df,
            file: &path,
        };
        let (step, loss) = (r.opt_f64("step")?, r.opt_f64("loss")?);
        let points = step
            .iter()
            .zip(&loss)
            .filter_map(|(s, l)| Some(((*s)?, (*l)?)))
            .collect();
        series.push((p.stage.clone(), points));
    }
    if !series.is_empty() {
        let title = "Training loss per step".to_string();
        figs.push(Figure {
            svg: crate::plot::loss_curves(&title, &series)?,
            caption: title,
        });
    }
    Ok(figs)
}
