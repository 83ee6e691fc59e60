//! Typed readers of stage artifacts. Each stage kind's files are named here once, and the stage
//! that writes them and every stage that reads them go through the same type, so no stage spells
//! another's file names or imports another's internals:
//!
//! | kind | files | reader |
//! |---|---|---|
//! | `ingest` | `pairs.parquet` | [`Pairs`] |
//! | `tokenizer` | `tokenizer.json`, `tokenizer_config.json` | [`tokenizer_of`] ([`HfTokenizer`]) |
//! | `tokenize` | `tokens.parquet` | [`Tokens`] |
//! | `model` | `model/` (a Hugging Face folder) | [`ModelDir`] (and [`tokenizer_of`]) |
//! | `train` | `model/`, `metrics.parquet`, `loss.svg` | [`ModelDir`] (and [`tokenizer_of`]) |
//! | `score` | `scores.parquet` (the token columns too) | [`Scores`], [`Tokens`] |
//! | `select` | `selection.parquet` (the token columns too) | [`Selection`], [`Tokens`] |
//! | `evaluate` | `report.parquet`, `report.md`, `report.html`, `generations/` | [`Report`] |

pub mod model;
pub mod pairs;
pub mod report;
pub mod tokens;

use anyhow::Result;

pub use crate::pipeline::stage::Artifact;
pub use crate::tokenizer::HfTokenizer;
use crate::tokenizer::{TOKENIZER_CONFIG, TOKENIZER_JSON};
pub use model::ModelDir;
pub use pairs::{Pair, Pairs};
pub use report::{Report, ReportRow};
pub use tokens::{Scores, Selection, TokenRow, Tokens};

/// What an artifact of each stage kind holds besides its manifest: files, and `model/` for the
/// model folder of the model kinds. The writers and readers above use these same names.
pub fn outputs(kind: &str) -> &'static [&'static str] {
    match kind {
        "ingest" => &[Pairs::FILE],
        "tokenizer" => &[TOKENIZER_JSON, TOKENIZER_CONFIG],
        "tokenize" => &[Tokens::FILE],
        "model" => &[ModelDir::DIR],
        "train" => &[ModelDir::DIR, model::METRICS_FILE, model::LOSS_PLOT],
        "score" => &[Scores::FILE],
        "select" => &[Selection::FILE],
        "evaluate" => &[
            Report::FILE,
            Report::MARKDOWN,
            Report::HTML,
            Report::GENERATIONS,
        ],
        _ => &[],
    }
}

/// The tokenizer of a `tokenizer` artifact (at its root) or of a `model` or `train` artifact
/// (in its model folder).
pub fn tokenizer_of(a: &Artifact) -> Result<HfTokenizer> {
    let dir = match a.kind.as_str() {
        "model" | "train" => ModelDir::of(a).path().to_path_buf(),
        _ => a.dir.clone(),
    };
    if !HfTokenizer::json_in(&dir).is_file() {
        crate::user_bail!("stage `{}` ({}) holds no tokenizer.json", a.stage, a.kind);
    }
    HfTokenizer::open_dir(&dir)
}
