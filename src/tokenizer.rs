//! Tokenizer files as every reader of them sees them: [`HfTokenizer`], tokenizer.json (loaded
//! with a user error when it does not parse) bundled with the tokenizer_config.json beside it,
//! and the one rule that says which token ends a sequence. The `tokenize` stage (which appends it
//! to every response) and `generate` (which stops at it) share the rule, so a model never learns
//! one end token and is asked to stop at another. The two file names are spelled here only.

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::error::user;
use crate::template::{read_tokenizer_config, special_token};
use crate::user_bail;

/// The tokenizer file (vocabulary, merges, pre- and post-processing).
pub const TOKENIZER_JSON: &str = "tokenizer.json";
/// Its companion: special tokens (`eos_token`, `bos_token`) and the `chat_template`.
pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";

/// A Hugging Face tokenizer as a folder holds it: tokenizer.json, loaded, and the
/// tokenizer_config.json beside it when there is one.
pub struct HfTokenizer {
    json: PathBuf,
    tok: Tokenizer,
    config: Option<Value>,
}

impl HfTokenizer {
    /// The tokenizer.json at `json` and the tokenizer_config.json beside it (if any).
    pub fn open(json: &Path) -> Result<HfTokenizer> {
        let tok = load(json)?;
        let config = read_tokenizer_config(&Self::config_beside(json))?;
        Ok(HfTokenizer {
            json: json.to_path_buf(),
            tok,
            config,
        })
    }

    /// The tokenizer files of a folder (a `tokenizer` artifact, a model folder).
    pub fn open_dir(dir: &Path) -> Result<HfTokenizer> {
        Self::open(&Self::json_in(dir))
    }

    /// Where a folder keeps tokenizer.json.
    pub fn json_in(dir: &Path) -> PathBuf {
        dir.join(TOKENIZER_JSON)
    }

    /// Where the tokenizer_config.json that goes with the tokenizer.json at `json` is.
    pub fn config_beside(json: &Path) -> PathBuf {
        json.with_file_name(TOKENIZER_CONFIG)
    }

    /// The tokenizer files a folder holds, tokenizer.json first (the config only when present).
    pub fn files_in(dir: &Path) -> Vec<PathBuf> {
        [TOKENIZER_JSON, TOKENIZER_CONFIG]
            .iter()
            .map(|f| dir.join(f))
            .filter(|p| p.is_file())
            .collect()
    }

    /// Copies the tokenizer files `from` holds ([`HfTokenizer::files_in`]), as they are, into
    /// the folder `to`.
    pub fn copy_files(from: &Path, to: &Path) -> Result<()> {
        for src in Self::files_in(from) {
            let name = src.file_name().expect("a file in the folder");
            std::fs::copy(&src, to.join(name))?;
        }
        Ok(())
    }

    /// Writes a tokenizer and its config into `dir` (the `tokenizer` stage's artifact).
    pub fn save(tok: &Tokenizer, config: &Value, dir: &Path) -> Result<()> {
        tok.save(dir.join(TOKENIZER_JSON), false)
            .map_err(|e| anyhow::anyhow!("saving {TOKENIZER_JSON}: {e}"))?;
        std::fs::write(
            dir.join(TOKENIZER_CONFIG),
            serde_json::to_vec_pretty(config)?,
        )?;
        Ok(())
    }

    /// Puts these files next to a saved model in `dest`: tokenizer.json as it is, the config
    /// (when there is one) as formatted JSON.
    pub fn write_to(&self, dest: &Path) -> Result<()> {
        std::fs::copy(&self.json, dest.join(TOKENIZER_JSON))?;
        if let Some(c) = &self.config {
            std::fs::write(dest.join(TOKENIZER_CONFIG), serde_json::to_vec_pretty(c)?)?;
        }
        Ok(())
    }

    /// The path of tokenizer.json.
    pub fn json_path(&self) -> &Path {
        &self.json
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tok
    }

    /// tokenizer_config.json's contents, `None` when there is no such file.
    pub fn config(&self) -> Option<&Value> {
        self.config.as_ref()
    }

    /// The tokenizer and its config, taken apart.
    pub fn into_parts(self) -> (Tokenizer, Option<Value>) {
        (self.tok, self.config)
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }

    /// A special token the config names (`bos_token`, ...).
    pub fn special_token(&self, key: &str) -> Option<String> {
        self.config.as_ref().and_then(|c| special_token(c, key))
    }

    /// The end-of-sequence token and its id ([`eos_token`]).
    pub fn eos(&self) -> Result<Option<(String, u32)>> {
        eos_token(&self.tok, self.config.as_ref(), &self.json)
    }
}

/// Loads a tokenizer.json, as a user error if it does not parse.
pub fn load(path: &Path) -> Result<Tokenizer> {
    if !path.is_file() {
        user_bail!("{}: tokenizer file not found", path.display());
    }
    Tokenizer::from_file(path).map_err(|e| {
        user(format!(
            "{}: not a valid tokenizer.json: {e}",
            path.display()
        ))
    })
}

/// The end-of-sequence token and its id: the `eos_token` that tokenizer_config.json (`config`)
/// names, looked up in the tokenizer `tok` read from `json`. The `tokenizer` stage decides it
/// once and writes it there, so every tokenizer and model artifact names one. `None` when the
/// config names none (a folder from elsewhere); a name the vocabulary lacks is a user error.
pub fn eos_token(
    tok: &Tokenizer,
    config: Option<&Value>,
    json: &Path,
) -> Result<Option<(String, u32)>> {
    let Some(eos) = config.and_then(|c| special_token(c, "eos_token")) else {
        return Ok(None);
    };
    let id = tok
        .token_to_id(&eos)
        .ok_or_else(|| user(format!("eos_token {eos:?} is not in {}", json.display())))?;
    Ok(Some((eos, id)))
}
