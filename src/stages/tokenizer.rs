//! `tokenizer`: a Hugging Face tokenizer.json, loaded from a file or trained (byte-level BPE) on
//! the ingested text. The artifact holds `tokenizer.json` and `tokenizer_config.json` (whose
//! `eos_token` every later stage uses).

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokenizers::Tokenizer;

use super::{
    Artifact, BuildContext, Role, RunContext, Stage, StageKind, parse_config, resolve, to_params,
};
use crate::error::user;
use crate::template::{read_tokenizer_config, special_token};
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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BpeTrainConfig {
    #[serde(default = "default_vocab")]
    pub vocab_size: usize,
    #[serde(default = "default_min_frequency")]
    pub min_frequency: u64,
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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerConfig {
    /// A tokenizer.json (a tokenizer_config.json beside it is used too).
    #[serde(default)]
    pub path: Option<String>,
    /// Train a byte-level BPE tokenizer on the `data` input's train split instead.
    #[serde(default)]
    pub train: Option<BpeTrainConfig>,
    /// Overrides the end-of-sequence token appended to every response.
    #[serde(default)]
    pub eos_token: Option<String>,
}

const KEYS: &[&str] = &["path", "train", "eos_token"];

struct TokenizerStage {
    cfg: TokenizerConfig,
    base: PathBuf,
}

fn build(params: &Value, ctx: &BuildContext) -> Result<Box<dyn Stage>> {
    let cfg: TokenizerConfig = parse_config(params, KEYS)?;
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
        let cfg = p.with_file_name("tokenizer_config.json");
        if cfg.is_file() {
            files.push(cfg);
        }
        Ok(files)
    }

    fn run(&self, ctx: &RunContext) -> Result<Value> {
        let (tok, mut config) = match (&self.json_path(), &self.cfg.train) {
            (Some(p), _) => {
                let tok = crate::tokenizer::load(p)?;
                let config = read_tokenizer_config(&p.with_file_name("tokenizer_config.json"))?
                    .unwrap_or_else(|| json!({}));
                (tok, config)
            }
            (None, Some(t)) => {
                let data = ctx.input("data")?;
                let tok = train(&data.dir.join("pairs.parquet"), t, ctx)?;
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
        tok.save(ctx.out.join("tokenizer.json"), false)
            .map_err(|e| anyhow::anyhow!("saving tokenizer.json: {e}"))?;
        std::fs::write(
            ctx.out.join("tokenizer_config.json"),
            serde_json::to_vec_pretty(&config)?,
        )?;
        Ok(
            json!({"vocab_size": tok.get_vocab_size(true), "eos_token": eos, "eos_token_id": eos_id}),
        )
    }
}

const CHATML_JINJA: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// The tokenizer files of an upstream artifact: a `tokenizer` stage keeps them at its root, a
/// model stage under `model/`.
pub fn files_of(a: &Artifact) -> Result<(PathBuf, Option<Value>)> {
    for dir in [a.dir.clone(), a.dir.join("model")] {
        let json = dir.join("tokenizer.json");
        if json.is_file() {
            let cfg = read_tokenizer_config(&dir.join("tokenizer_config.json"))?;
            return Ok((json, cfg));
        }
    }
    user_bail!("stage `{}` ({}) holds no tokenizer.json", a.stage, a.kind)
}

fn train(pairs_path: &Path, t: &BpeTrainConfig, ctx: &RunContext) -> Result<Tokenizer> {
    use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{
        AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
        TokenizerBuilder,
    };

    let pairs = super::ingest::read_pairs(pairs_path)?;
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
