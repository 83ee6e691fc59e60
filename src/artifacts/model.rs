//! The `model` and `train` artifacts: a Hugging Face model folder, `model/` (config.json, the
//! weights, tokenizer.json and tokenizer_config.json); `train` also writes its metrics.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::Value;

use super::{Artifact, HfTokenizer};
use crate::error::user;
use crate::model::safetensors_io::WeightSource;
use crate::model::{CONFIG_FILE, CausalLm, RewardModel};
use crate::pipeline::stage::RunContext;
use crate::user_bail;

/// Beside its model, a `train` artifact holds its per-step metrics (Parquet) ...
pub const METRICS_FILE: &str = "metrics.parquet";
/// ... and their plot.
pub const LOSS_PLOT: &str = "loss.svg";

/// A Hugging Face model folder: the `model/` of a `model` or `train` artifact, or one the user
/// has.
#[derive(Debug, Clone)]
pub struct ModelDir {
    dir: PathBuf,
}

impl ModelDir {
    /// The folder a `model` or `train` artifact keeps its model in.
    pub const DIR: &'static str = "model";

    /// The model of a `model` or `train` artifact.
    pub fn of(a: &Artifact) -> ModelDir {
        Self::in_artifact(&a.dir)
    }

    /// Where the artifact in folder `out` keeps (or a running stage writes) its model.
    pub fn in_artifact(out: &Path) -> ModelDir {
        ModelDir {
            dir: out.join(Self::DIR),
        }
    }

    /// A model folder anywhere.
    pub fn at(dir: &Path) -> ModelDir {
        ModelDir {
            dir: dir.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn config_json(&self) -> PathBuf {
        self.dir.join(CONFIG_FILE)
    }

    /// The files that define the model: config.json, the weight files that loading reads
    /// ([`WeightSource::find`]: `model.safetensors` when present, else the index and its
    /// shards), and the tokenizer files present.
    pub fn files(&self) -> Result<Vec<PathBuf>> {
        let dir = &self.dir;
        if !dir.is_dir() {
            user_bail!("{}: model folder not found", dir.display());
        }
        let mut files = vec![self.config_json()];
        let weights = WeightSource::find(dir).map_err(|e| user(format!("{e:#}")))?;
        files.extend(weights.files());
        files.extend(HfTokenizer::files_in(dir));
        for f in &files {
            if !f.is_file() {
                user_bail!("{}: missing from the model folder", f.display());
            }
        }
        Ok(files)
    }

    /// Loads the model onto `device`.
    pub fn load(&self, device: &burn::tensor::Device) -> Result<CausalLm> {
        CausalLm::load(&self.dir, device)
    }

    /// Writes `model` (config.json and weights) here, creating the folder.
    pub fn save(&self, model: &CausalLm) -> Result<()> {
        model.save(&self.dir)
    }

    /// [`ModelDir::save`] with the weights stored as `dtype`.
    pub fn save_as(&self, model: &CausalLm, dtype: crate::model::Precision) -> Result<()> {
        model.save_as(&self.dir, dtype)
    }

    /// Whether the folder holds a reward model (`*ForSequenceClassification`) rather than a
    /// causal LM ([`crate::model::is_reward_model`]).
    pub fn is_reward_model(&self) -> Result<bool> {
        crate::model::is_reward_model(&self.dir)
    }

    /// Loads the reward model onto `device`.
    pub fn load_reward(&self, device: &burn::tensor::Device) -> Result<RewardModel> {
        RewardModel::load(&self.dir, device)
    }

    /// Whether the folder has a tokenizer.json.
    pub fn has_tokenizer(&self) -> bool {
        HfTokenizer::json_in(&self.dir).is_file()
    }

    /// The tokenizer in the folder.
    pub fn tokenizer(&self) -> Result<HfTokenizer> {
        HfTokenizer::open_dir(&self.dir)
    }

    /// Copies the tokenizer files present here, as they are, into the model folder `dest`.
    pub fn copy_tokenizer_to(&self, dest: &ModelDir) -> Result<()> {
        HfTokenizer::copy_files(&self.dir, &dest.dir)
    }

    /// config.json's `vocab_size` and the content hash of tokenizer.json (empty when absent).
    fn vocabulary(&self) -> Result<(usize, String)> {
        let cfg: Value = serde_json::from_slice(&std::fs::read(self.config_json())?)?;
        let n = cfg["vocab_size"].as_u64().unwrap_or(0) as usize;
        let tok =
            crate::pipeline::stage::hash_file(&HfTokenizer::json_in(&self.dir)).unwrap_or_default();
        Ok((n, tok))
    }
}

/// Refuses two models (of `model` or `train` artifacts) whose token ids mean different things.
pub fn check_same_vocabulary(a: &Artifact, b: &Artifact) -> Result<()> {
    let ((na, ta), (nb, tb)) = (ModelDir::of(a).vocabulary()?, ModelDir::of(b).vocabulary()?);
    if na != nb || ta != tb {
        user_bail!(
            "`{}` and `{}` have different vocabularies ({na} vs {nb} tokens{}): their log-probs cannot be compared",
            a.stage,
            b.stage,
            if ta != tb {
                ", different tokenizer.json"
            } else {
                ""
            }
        );
    }
    Ok(())
}

/// The `tokenize` artifact whose token ids `data` (a tokenize, score or select artifact) holds:
/// a select stage's `tokens` input when it re-expressed its masks in another tokenizer, else
/// the data behind its scores.
pub fn tokenize_behind(ctx: &RunContext, data: &Artifact) -> Result<Option<Artifact>> {
    let next = match data.kind.as_str() {
        "tokenize" => return Ok(Some(data.clone())),
        "select" => match ctx.upstream_one(data, "tokens")? {
            Some(t) => Some(t),
            None => ctx.upstream_one(data, "scores")?,
        },
        "score" => ctx.upstream_one(data, "data")?,
        _ => None,
    };
    match next {
        Some(a) => tokenize_behind(ctx, &a),
        None => Ok(None),
    }
}

/// Refuses a model (a `model` or `train` artifact) whose tokenizer.json is not the one `data`
/// was tokenized with: equal vocabulary sizes are not enough (two BPE vocabularies of the same
/// size give the same ids different meanings). The files are compared as the tokenizers crate
/// reads them (each loaded and serialized again), so a re-serialized copy of the same tokenizer
/// passes. A model folder without tokenizer.json, or
/// data whose tokenizer cannot be found, is left to the vocabulary-size check.
pub fn check_tokenizer_matches(ctx: &RunContext, model: &Artifact, data: &Artifact) -> Result<()> {
    let model_json = HfTokenizer::json_in(ModelDir::of(model).path());
    if !model_json.is_file() {
        return Ok(());
    }
    let Some(tokenize) = tokenize_behind(ctx, data)? else {
        return Ok(());
    };
    let Some(tok) = ctx.upstream_one(&tokenize, "tokenizer")? else {
        return Ok(());
    };
    let data_json = match tok.kind.as_str() {
        "model" | "train" => HfTokenizer::json_in(ModelDir::of(&tok).path()),
        _ => HfTokenizer::json_in(&tok.dir),
    };
    // The same bytes are the same tokenizer, and the common case (the model and the data both
    // got the file from one `tokenizer` stage): a byte comparison, where parsing both through
    // the tokenizers crate took 0.65-0.9 s of a `train` stage for the Llama-2 vocabulary (2-core
    // VM).
    let bytes = |p: &Path| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    if bytes(&model_json)? == bytes(&data_json)? {
        return Ok(());
    }
    // Else both through the tokenizers crate and back to JSON: the `tokenizer` stage
    // re-serializes the file it reads, so the bytes (and even the JSON values: defaults written
    // out) of two copies of one tokenizer may differ while their meaning does not.
    let read = |p: &Path| -> Result<String> {
        crate::tokenizer::load(p)?
            .to_string(false)
            .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
    };
    if read(&model_json)? != read(&data_json)? {
        user_bail!(
            "`{}`'s tokenizer.json differs from the tokenizer `{}` that `{}` was tokenized with \
             (via `{}`): the same ids would mean different tokens. Tokenize the data with the \
             model's tokenizer, or carry key tokens across with a select stage's `tokens:` input",
            model.stage,
            tok.stage,
            data.stage,
            tokenize.stage
        );
    }
    Ok(())
}
