//! Tokenizer files as every reader of them sees them: tokenizer.json loaded with a user error
//! when it does not parse, and the one rule that says which token ends a sequence. The `tokenize`
//! stage (which appends it to every response) and `generate` (which stops at it) share the rule,
//! so a model never learns one end token and is asked to stop at another.

use std::path::Path;

use anyhow::Result;
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::error::user;
use crate::template::special_token;
use crate::user_bail;

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
