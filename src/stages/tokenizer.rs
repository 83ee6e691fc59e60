//! `tokenizer`: a Hugging Face tokenizer.json, loaded from a file or trained (byte-level BPE) on
//! the ingested text. The artifact holds `tokenizer.json` and `tokenizer_config.json` (whose
//! `eos_token` every later stage uses).

use std::path::PathBuf;

use anyhow::Result;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokenizers::Tokenizer;

use super::{
    Artifact, BuildContext, Role, RunContext, Stage, StageKind, params_schema, parse_config,
    resolve, to_params,
};
use crate::artifacts::{HfTokenizer, Pairs};
use crate::error::user;
use crate::template::special_token;
use crate::user_bail;

pub static KIND: StageKind = StageKind {
    kind: "tokenizer",
    version: "1",
    roles: &[Role {
        name: "data",
        required: false,
        many: false,
        kinds: &["ingest"],
    }],
    uses_device: false,
    build,
    params_schema: params_schema::<TokenizerConfig>,
};

/// Names used for the end of a sequence by common tokenizers, tried in order when no
/// tokenizer_config.json says.
const EOS_CANDIDATES: &[&str] = &[
    "</s>",
    "<|endoftext|>",
    "<|im_end|>",
    "<|end_of_text|>",
    "<eos>",
    "<|eot_id|>",
];

/// A byte-level BPE trained on the `data` input's train split (prompts and both responses).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BpeTrainConfig {
    /// Vocabulary size, special tokens included; at least 260 (the 256 bytes plus specials).
    #[serde(default = "default_vocab")]
    #[schemars(range(min = 260))]
    pub vocab_size: usize,
    /// A pair of tokens is merged only if it occurs at least this many times.
    #[serde(default = "default_min_frequency")]
    pub min_frequency: u64,
    /// Tokens added whole, never split or merged (the first ids).
    #[serde(default = "default_specials")]
    pub special_tokens: Vec<String>,
}

fn default_vocab() -> usize {
    4096
}
fn default_min_frequency() -> u64 {
    2
}
fn default_specials() -> Vec<String> {
    vec![
        "<|endoftext|>".into(),
        "<|im_start|>".into(),
        "<|im_end|>".into(),
    ]
}

/// `tokenizer`: a Hugging Face tokenizer.json, loaded (`path`) or trained (`train`); give one.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenizerConfig {
    /// A tokenizer.json, relative to the pipeline file (a tokenizer_config.json beside it is used
    /// too).
    #[serde(default)]
    pub path: Option<String>,
    /// Train a byte-level BPE tokenizer on the `data` input's train split instead of `path`.
    #[serde(default)]
    pub train: Option<BpeTrainConfig>,
    /// Overrides the end-of-sequence token appended to every response (default: the
    /// tokenizer_config.json's `eos_token`, else a common EOS name the vocabulary has).
    #[serde(default)]
    pub eos_token: Option<String>,
}

struct TokenizerStage {
    cfg: TokenizerConfig,
    base: PathBuf,
}

fn build(params: &Value, ctx: &BuildContext) -> Result<Box<dyn Stage>> {
    let cfg: TokenizerConfig = parse_config(params)?;
    match (&cfg.path, &cfg.train) {
        (Some(_), Some(_)) => user_bail!("give either `path` or `train`, not both"),
        (None, None) => user_bail!("give `path: <tokenizer.json>` or `train: {{vocab_size: N}}`"),
        (None, Some(t)) => {
            if !ctx.roles.iter().any(|r| r == "data") {
                user_bail!("`train` needs `inputs: {{data: <ingest stage>}}`");
            }
            if t.vocab_size < 260 {
                user_bail!(
                    "`train.vocab_size` must be at least 260 (256 bytes plus specials), got {}",
                    t.vocab_size
                );
            }
        }
        (Some(_), None) => {}
    }
    Ok(Box::new(TokenizerStage {
        cfg,
        base: ctx.base_dir.to_path_buf(),
    }))
}

impl TokenizerStage {
    fn json_path(&self) -> Option<PathBuf> {
        self.cfg.path.as_ref().map(|p| resolve(&self.base, p))
    }
}

impl Stage for TokenizerStage {
    fn params(&self) -> Value {
        to_params(&self.cfg)
    }

    fn external_files(&self) -> Result<Vec<PathBuf>> {
        let Some(p) = self.json_path() else {
            return Ok(Vec::new());
        };
        let mut files = vec![p.clone()];
        let cfg = HfTokenizer::config_beside(&p);
        if cfg.is_file() {
            files.push(cfg);
        }
        Ok(files)
    }

    fn run(&self, ctx: &RunContext) -> Result<Value> {
        let (tok, mut config) = match (&self.json_path(), &self.cfg.train) {
            (Some(p), _) => {
                let (tok, config) = HfTokenizer::open(p)?.into_parts();
                (tok, config.unwrap_or_else(|| json!({})))
            }
            (None, Some(t)) => {
                let tok = train(ctx.input("data")?, t, ctx)?;
                let config = json!({
                    "bos_token": null,
                    "eos_token": "<|endoftext|>",
                    "chat_template": CHATML_JINJA,
                    "model_max_length": 2048,
                    "tokenizer_class": "PreTrainedTokenizerFast",
                });
                (tok, config)
            }
            (None, None) => unreachable!("validated in build"),
        };
        let eos = match &self.cfg.eos_token {
            Some(e) => e.clone(),
            None => special_token(&config, "eos_token")
                .or_else(|| {
                    EOS_CANDIDATES
                        .iter()
                        .find(|c| tok.token_to_id(c).is_some())
                        .map(|s| s.to_string())
                })
                .ok_or_else(|| {
                    user("the tokenizer names no end-of-sequence token: set `eos_token`")
                })?,
        };
        let eos_id = tok.token_to_id(&eos).ok_or_else(|| {
            user(format!(
                "`eos_token` {eos:?} is not in the tokenizer's vocabulary"
            ))
        })?;
        config["eos_token"] = Value::String(eos.clone());
        HfTokenizer::save(&tok, &config, ctx.out)?;
        Ok(
            json!({"vocab_size": tok.get_vocab_size(true), "eos_token": eos, "eos_token_id": eos_id}),
        )
    }
}

const CHATML_JINJA: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

fn train(data: &Artifact, t: &BpeTrainConfig, ctx: &RunContext) -> Result<Tokenizer> {
    use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{
        AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
        TokenizerBuilder,
    };

    let pairs = Pairs::open(data)?;
    let mut texts: Vec<String> = Vec::new();
    for p in pairs.iter().filter(|p| p.split == "train") {
        texts.extend(p.prompt.iter().map(|m| m.1.clone()));
        texts.push(p.chosen.clone());
        texts.push(p.rejected.clone());
    }
    ctx.progress.log(format!(
        "         {}: training BPE on {} texts",
        ctx.stage,
        texts.len()
    ));
    // No prefix space: responses are encoded on their own and must not gain a leading space.
    let byte_level = ByteLevel::new(false, true, true);
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(t.vocab_size)
        .min_frequency(t.min_frequency)
        .show_progress(false)
        .special_tokens(
            t.special_tokens
                .iter()
                .map(|s| AddedToken::from(s.clone(), true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tok = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_pre_tokenizer(Some(byte_level.into()))
    .with_post_processor(Some(byte_level.into()))
    .with_decoder(Some(byte_level.into()))
    .build()
    .map_err(|e| anyhow::anyhow!("building tokenizer: {e}"))?;
    tok.train(&mut trainer, texts.iter())
        .map_err(|e| anyhow::anyhow!("training tokenizer: {e}"))?;
    Ok(Tokenizer::from(tok))
}
