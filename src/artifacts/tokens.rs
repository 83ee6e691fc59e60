//! The token artifacts: `tokenize` writes `tokens.parquet`; `score` and `select` write the same
//! rows with columns added (`scores.parquet`, `selection.parquet`), so [`Tokens`] reads the token
//! columns of any of the three.

use std::path::{Path, PathBuf};

use anyhow::Result;
use polars::prelude::DataFrame;

use super::Artifact;
use crate::data::parquet as pq;
use crate::user_bail;

/// One tokenized pair.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRow {
    pub id: String,
    pub split: String,
    pub prompt_ids: Vec<u32>,
    pub chosen_ids: Vec<u32>,
    pub rejected_ids: Vec<u32>,
    pub truncated: bool,
}

/// The key-token masks of the chosen and of the rejected responses, one per row.
pub type Masks = (Vec<Vec<bool>>, Vec<Vec<bool>>);

/// The token weights of the chosen and of the rejected responses, one list per row.
pub type Weights = (Vec<Vec<f32>>, Vec<Vec<f32>>);

/// The token columns of a `tokenize`, `score` or `select` artifact. The file is read once, on
/// first use, whatever is asked of it (rows, masks, weights).
pub struct Tokens {
    path: PathBuf,
    df: std::cell::OnceCell<DataFrame>,
}

impl Tokens {
    /// The file a `tokenize` artifact holds.
    pub const FILE: &'static str = "tokens.parquet";

    /// The token data of a `tokenize`, `score` or `select` artifact.
    pub fn open(a: &Artifact) -> Result<Tokens> {
        let file = match a.kind.as_str() {
            "tokenize" => Tokens::FILE,
            "score" => Scores::FILE,
            "select" => Selection::FILE,
            other => user_bail!("stage `{}` ({other}) holds no token ids", a.stage),
        };
        Ok(Tokens::at(a.dir.join(file)))
    }

    fn at(path: PathBuf) -> Tokens {
        Tokens {
            path,
            df: std::cell::OnceCell::new(),
        }
    }

    /// The file's frame, read on first use.
    fn df(&self) -> Result<&DataFrame> {
        if let Some(df) = self.df.get() {
            return Ok(df);
        }
        let df = pq::read(&self.path)?;
        Ok(self.df.get_or_init(|| df))
    }

    fn reader(&self) -> Result<pq::Reader<'_>> {
        Ok(pq::Reader {
            df: self.df()?,
            file: &self.path,
        })
    }

    /// The Parquet file holding the token columns.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every row, in file order.
    pub fn rows(&self) -> Result<Vec<TokenRow>> {
        rows_of(&self.reader()?)
    }

    /// The whole file, for a stage that adds columns to it.
    pub fn frame(&self) -> Result<DataFrame> {
        Ok(self.df()?.clone())
    }

    /// The key-token masks (`chosen_mask`, `rejected_mask`) of a `select` artifact; `None` when
    /// the file has no `chosen_mask`. A mask whose length differs from its response is exit 2
    /// naming the row: a mask shifted against its tokens would train on the wrong ones.
    pub fn masks(&self) -> Result<Option<Masks>> {
        let r = self.reader()?;
        if !r.has("chosen_mask") {
            return Ok(None);
        }
        let (c, rj) = (r.bool_lists("chosen_mask")?, r.bool_lists("rejected_mask")?);
        self.check_lengths(&r, "chosen_mask", &c, "rejected_mask", &rj)?;
        Ok(Some((c, rj)))
    }

    /// The token weights (`chosen_weights`, `rejected_weights`) of a `select` artifact written
    /// by `mode: weights`; `None` when the file has none. Lengths are checked as for the masks.
    pub fn weights(&self) -> Result<Option<Weights>> {
        let r = self.reader()?;
        if !r.has("chosen_weights") {
            return Ok(None);
        }
        let (c, rj) = (
            r.f32_lists("chosen_weights")?,
            r.f32_lists("rejected_weights")?,
        );
        self.check_lengths(&r, "chosen_weights", &c, "rejected_weights", &rj)?;
        Ok(Some((c, rj)))
    }

    /// Refuses a per-token list whose length differs from its response's, naming the row's id.
    fn check_lengths<T>(
        &self,
        r: &pq::Reader,
        chosen_col: &str,
        chosen: &[Vec<T>],
        rejected_col: &str,
        rejected: &[Vec<T>],
    ) -> Result<()> {
        let ids = r.strings("id")?;
        for (col, lists, ids_col) in [
            (chosen_col, chosen, "chosen_ids"),
            (rejected_col, rejected, "rejected_ids"),
        ] {
            let tokens = r.u32_lists(ids_col)?;
            for (i, (l, t)) in lists.iter().zip(&tokens).enumerate() {
                if l.len() != t.len() {
                    user_bail!(
                        "{}: row {i} (id `{}`): `{col}` has {} entries but `{ids_col}` has {} tokens",
                        self.path.display(),
                        ids.get(i).map_or("?", String::as_str),
                        l.len(),
                        t.len()
                    );
                }
            }
        }
        Ok(())
    }

    /// Writes `rows` as the artifact in `out`.
    pub fn write(rows: &[TokenRow], out: &Path) -> Result<()> {
        pq::write(&mut to_frame(rows)?, &out.join(Self::FILE))
    }
}

/// The token scores of a `score` artifact: the token columns plus `chosen_scores` and
/// `rejected_scores` (and the rewards, their sums).
pub struct Scores {
    path: PathBuf,
    df: DataFrame,
}

impl Scores {
    /// The file a `score` artifact holds.
    pub const FILE: &'static str = "scores.parquet";

    /// Reads the scores of a `score` artifact, or of a `select` artifact (which carries them).
    pub fn open(a: &Artifact) -> Result<Scores> {
        let file = match a.kind.as_str() {
            "select" => Selection::FILE,
            _ => Self::FILE,
        };
        let path = a.dir.join(file);
        let df = pq::read(&path)?;
        Ok(Scores { path, df })
    }

    fn reader(&self) -> pq::Reader<'_> {
        pq::Reader {
            df: &self.df,
            file: &self.path,
        }
    }

    /// The pair ids, per row.
    pub fn ids(&self) -> Result<Vec<String>> {
        self.reader().strings("id")
    }

    /// The score of every chosen response token, per row.
    pub fn chosen(&self) -> Result<Vec<Vec<f32>>> {
        self.reader().f32_lists("chosen_scores")
    }

    /// The score of every rejected response token, per row.
    pub fn rejected(&self) -> Result<Vec<Vec<f32>>> {
        self.reader().f32_lists("rejected_scores")
    }

    /// The whole file, for a stage that adds columns to it.
    pub fn into_frame(self) -> DataFrame {
        self.df
    }

    /// Writes `df` (the token columns with the score columns added) as the artifact in `out`.
    pub fn write(df: &mut DataFrame, out: &Path) -> Result<()> {
        pq::write(df, &out.join(Self::FILE))
    }
}

/// The key tokens of a `select` artifact: the score columns plus `chosen_mask` and
/// `rejected_mask`. Read it with [`Tokens::open`] and [`Tokens::masks`].
pub struct Selection;

impl Selection {
    /// The file a `select` artifact holds.
    pub const FILE: &'static str = "selection.parquet";

    /// Writes `df` (the score columns with the masks added) as the artifact in `out`.
    pub fn write(df: &mut DataFrame, out: &Path) -> Result<()> {
        pq::write(df, &out.join(Self::FILE))
    }
}

pub fn to_frame(rows: &[TokenRow]) -> Result<DataFrame> {
    pq::frame(vec![
        pq::utf8("id", rows.iter().map(|r| r.id.clone()).collect()),
        pq::utf8("split", rows.iter().map(|r| r.split.clone()).collect()),
        pq::list(
            "prompt_ids",
            &rows
                .iter()
                .map(|r| r.prompt_ids.clone())
                .collect::<Vec<_>>(),
        ),
        pq::list(
            "chosen_ids",
            &rows
                .iter()
                .map(|r| r.chosen_ids.clone())
                .collect::<Vec<_>>(),
        ),
        pq::list(
            "rejected_ids",
            &rows
                .iter()
                .map(|r| r.rejected_ids.clone())
                .collect::<Vec<_>>(),
        ),
        pq::bools("truncated", rows.iter().map(|r| r.truncated).collect()),
    ])
}

/// Reads `tokens.parquet` (or any file carrying its columns) back.
pub fn read_tokens(path: &Path) -> Result<Vec<TokenRow>> {
    let df = pq::read(path)?;
    rows_of(&pq::Reader {
        df: &df,
        file: path,
    })
}

/// The token rows of a frame carrying the `tokenize` columns.
fn rows_of(r: &pq::Reader) -> Result<Vec<TokenRow>> {
    let (id, split) = (r.strings("id")?, r.strings("split")?);
    let (p, c, j) = (
        r.u32_lists("prompt_ids")?,
        r.u32_lists("chosen_ids")?,
        r.u32_lists("rejected_ids")?,
    );
    let t = r.bools("truncated")?;
    Ok((0..r.df.height())
        .map(|i| TokenRow {
            id: id[i].clone(),
            split: split[i].clone(),
            prompt_ids: p[i].clone(),
            chosen_ids: c[i].clone(),
            rejected_ids: j[i].clone(),
            truncated: t[i],
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A selection file whose masks (or weights) are one entry short on a row.
    fn selection(dir: &Path, chosen_mask: Vec<Vec<bool>>, chosen_weights: Vec<Vec<f32>>) -> Tokens {
        let path = dir.join(Selection::FILE);
        let mut df = pq::frame(vec![
            pq::utf8("id", vec!["a".into(), "b".into()]),
            pq::list("chosen_ids", &[vec![1u32, 2, 3], vec![4, 5]]),
            pq::list("rejected_ids", &[vec![6u32], vec![7, 8]]),
            pq::list("chosen_mask", &chosen_mask),
            pq::list("rejected_mask", &[vec![true], vec![false, true]]),
            pq::list("chosen_weights", &chosen_weights),
            pq::list("rejected_weights", &[vec![1.0f32], vec![0.0, 2.0]]),
        ])
        .unwrap();
        pq::write(&mut df, &path).unwrap();
        Tokens::at(path)
    }

    #[test]
    fn a_mask_or_weight_list_of_the_wrong_length_names_the_row() {
        let dir = tempfile::tempdir().unwrap();
        let good_m = vec![vec![true, false, true], vec![false, true]];
        let good_w = vec![vec![1.0f32, 0.0, 2.0], vec![0.0, 0.5]];
        let ok = selection(dir.path(), good_m.clone(), good_w.clone());
        assert_eq!(ok.masks().unwrap().unwrap().0, good_m);
        assert_eq!(ok.weights().unwrap().unwrap().0, good_w);
        let short_mask = selection(
            dir.path(),
            vec![good_m[0].clone(), vec![true]],
            good_w.clone(),
        );
        let err = short_mask.masks().unwrap_err();
        assert!(crate::error::is_user_error(&err));
        let msg = err.to_string();
        assert!(
            msg.contains("row 1 (id `b`)")
                && msg.contains("`chosen_mask` has 1 entries")
                && msg.contains("2 tokens"),
            "{msg}"
        );
        let long_weights = selection(
            dir.path(),
            good_m,
            vec![good_w[0].clone(), vec![1.0, 1.0, 1.0]],
        );
        let msg = long_weights.weights().unwrap_err().to_string();
        assert!(
            msg.contains("id `b`") && msg.contains("`chosen_weights` has 3 entries"),
            "{msg}"
        );
    }
}
