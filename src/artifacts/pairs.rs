//! The `ingest` artifact: `pairs.parquet`, one preference pair per row.

use std::path::Path;

use anyhow::Result;

use super::Artifact;
use crate::data::parquet as pq;

/// One preference pair in the artifact's schema.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    pub id: String,
    pub split: String,
    pub prompt: Vec<(String, String)>,
    pub chosen: String,
    pub rejected: String,
    pub score_chosen: Option<f64>,
    pub score_rejected: Option<f64>,
    pub source: String,
}

/// The pairs of an `ingest` artifact.
pub struct Pairs;

impl Pairs {
    /// The file an `ingest` artifact holds.
    pub const FILE: &'static str = "pairs.parquet";

    /// Reads the pairs of an `ingest` artifact.
    pub fn open(a: &Artifact) -> Result<Vec<Pair>> {
        read_pairs(&a.dir.join(Self::FILE))
    }

    /// Writes `pairs` as the artifact in `out`.
    pub fn write(pairs: &[Pair], out: &Path) -> Result<()> {
        pq::write(&mut to_frame(pairs)?, &out.join(Self::FILE))
    }
}

pub fn to_frame(pairs: &[Pair]) -> Result<polars::prelude::DataFrame> {
    pq::frame(vec![
        pq::utf8("id", pairs.iter().map(|p| p.id.clone()).collect()),
        pq::utf8("split", pairs.iter().map(|p| p.split.clone()).collect()),
        pq::messages(
            "prompt",
            &pairs.iter().map(|p| p.prompt.clone()).collect::<Vec<_>>(),
        )?,
        pq::utf8("chosen", pairs.iter().map(|p| p.chosen.clone()).collect()),
        pq::utf8(
            "rejected",
            pairs.iter().map(|p| p.rejected.clone()).collect(),
        ),
        pq::opt_f64(
            "score_chosen",
            pairs.iter().map(|p| p.score_chosen).collect(),
        ),
        pq::opt_f64(
            "score_rejected",
            pairs.iter().map(|p| p.score_rejected).collect(),
        ),
        pq::utf8("source", pairs.iter().map(|p| p.source.clone()).collect()),
    ])
}

/// Reads a `pairs.parquet` back.
pub fn read_pairs(path: &Path) -> Result<Vec<Pair>> {
    let df = pq::read(path)?;
    let r = pq::Reader {
        df: &df,
        file: path,
    };
    let (id, split, prompt) = (r.strings("id")?, r.strings("split")?, r.messages("prompt")?);
    let (chosen, rejected) = (r.strings("chosen")?, r.strings("rejected")?);
    let (sc, sr, source) = (
        r.opt_f64("score_chosen")?,
        r.opt_f64("score_rejected")?,
        r.strings("source")?,
    );
    Ok((0..df.height())
        .map(|i| Pair {
            id: id[i].clone(),
            split: split[i].clone(),
            prompt: prompt[i].clone(),
            chosen: chosen[i].clone(),
            rejected: rejected[i].clone(),
            score_chosen: sc[i],
            score_rejected: sr[i],
            source: source[i].clone(),
        })
        .collect())
}
