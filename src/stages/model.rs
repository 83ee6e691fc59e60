//! `model`: a causal LM as a Hugging Face folder artifact (`model/`: config.json,
//! model.safetensors, tokenizer.json, tokenizer_config.json), either loaded from a folder the user
//! has (`from:`) or freshly initialized from a `config:` sized to the tokenizer (seeded).

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::{
    Artifact, BuildContext, Role, RunContext, Stage, StageKind, parse_config, resolve, to_params,
};
use crate::error::user;
use crate::model::safetensors_io::WeightSource;
use crate::model::{CausalLm, ModelConfig};
use crate::user_bail;

pub static KIND: StageKind = StageKind {
    kind: "model",
    version: "1",
    roles: &[Role {
        name: "tokenizer",
        required: false,
        many: false,
        kinds: &["tokenizer"],
    }],
    uses_device: true,
    build,
};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelStageConfig {
    /// A Hugging Face model folder.
    #[serde(default)]
    pub from: Option<String>,
    /// Or the architecture of a fresh model (Hugging Face config keys; `vocab_size` defaults to
    /// the tokenizer's).
    #[serde(default)]
    pub config: Option<Map<String, Value>>,
    /// Seed of a fresh model's initialization (default: the pipeline's seed).
    #[serde(default)]
    pub seed: Option<u64>,
}

const KEYS: &[&str] = &["from", "config", "seed"];

/// Keys `config:` accepts (ModelConfig's fields, plus `model_type` as an alias of `architecture`).
const CONFIG_KEYS: &[&str] = &[
    "architecture",
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "head_dim",
    "max_position_embeddings",
    "rope_theta",
    "rope_scaling",
    "partial_rotary_factor",
    "rms_norm_eps",
    "layer_norm_eps",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "use_parallel_residual",
    "hidden_act",
    "sliding_window",
    "use_sliding_window",
    "initializer_range",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
];

struct ModelStage {
    cfg: ModelStageConfig,
    base: PathBuf,
}

fn build(params: &Value, ctx: &BuildContext) -> Result<Box<dyn Stage>> {
    let mut cfg: ModelStageConfig = parse_config(params, KEYS)?;
    match (&cfg.from, &mut cfg.config) {
        (Some(_), Some(_)) => {
            user_bail!("give either `from` (a model folder) or `config`, not both")
        }
        (None, None) => user_bail!(
            "give `from: <Hugging Face model folder>` or `config: {{architecture: llama, ...}}`"
        ),
        (Some(_), None) => cfg.seed = None,
        (None, Some(c)) => {
            for k in c.keys() {
                if !CONFIG_KEYS.contains(&k.as_str()) {
                    user_bail!(
                        "`config.{k}` is not a model setting{}",
                        crate::util::suggest(k, CONFIG_KEYS)
                    );
                }
            }
            if !c.contains_key("vocab_size") && !ctx.roles.iter().any(|r| r == "tokenizer") {
                user_bail!(
                    "a fresh model needs `config.vocab_size` or `inputs: {{tokenizer: <stage>}}`"
                );
            }
            // Canonical form: every setting spelled out, so writing a default changes no hash.
            let full: ModelConfig = serde_json::from_value(Value::Object(c.clone()))
                .map_err(|e| user(format!("`config`: {e}")))?;
            let explicit_vocab = c.contains_key("vocab_size");
            // Checked now, before any stage runs, so a wrong or absurd config is an exit-2 error
            // at planning. Without `vocab_size` the tokenizer's is known only when the stage
            // runs: check with a vocabulary of 1, which passes whenever the real one will (the
            // size bound only grows with it); the run checks again with the real one.
            let mut probe = full.clone();
            if !explicit_vocab {
                probe.vocab_size = 1;
            }
            probe.validate().map_err(|e| {
                let note = if explicit_vocab {
                    ""
                } else {
                    " (vocab_size 1 stands in for the tokenizer's, known when the stage runs)"
                };
                user(format!("`config`: {e}{note}"))
            })?;
            let mut v = serde_json::to_value(&full)?;
            if !explicit_vocab {
                v["vocab_size"] = Value::Null;
            }
            *c = v.as_object().cloned().unwrap_or_default();
            cfg.seed = Some(cfg.seed.unwrap_or(ctx.pipeline_seed));
        }
    }
    Ok(Box::new(ModelStage {
        cfg,
        base: ctx.base_dir.to_path_buf(),
    }))
}

/// The files of a Hugging Face model folder that define it: config.json, the weight files
/// that loading reads ([`WeightSource::find`]: `model.safetensors` when present, else the
/// index and its shards), and the tokenizer files present.
pub fn model_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        user_bail!("{}: model folder not found", dir.display());
    }
    let mut files = vec![dir.join("config.json")];
    let weights = WeightSource::find(dir).map_err(|e| user(format!("{e:#}")))?;
    files.extend(weights.files());
    for extra in ["tokenizer.json", "tokenizer_config.json"] {
        if dir.join(extra).is_file() {
            files.push(dir.join(extra));
        }
    }
    for f in &files {
        if !f.is_file() {
            user_bail!("{}: missing from the model folder", f.display());
        }
    }
    Ok(files)
}

/// Copies tokenizer.json (and tokenizer_config.json) next to a saved model.
pub fn copy_tokenizer(json: &Path, config: Option<&Value>, dest: &Path) -> Result<()> {
    std::fs::copy(json, dest.join("tokenizer.json"))?;
    if let Some(c) = config {
        std::fs::write(
            dest.join("tokenizer_config.json"),
            serde_json::to_vec_pretty(c)?,
        )?;
    }
    Ok(())
}

/// Loads the model of a `model` or `train` artifact.
pub fn load_artifact(a: &Artifact, device: &burn::tensor::Device) -> Result<CausalLm> {
    CausalLm::load(&a.dir.join("model"), device)
}

impl Stage for ModelStage {
    fn params(&self) -> Value {
        to_params(&self.cfg)
    }

    fn external_files(&self) -> Result<Vec<PathBuf>> {
        match &self.cfg.from {
            Some(f) => model_files(&resolve(&self.base, f)),
            None => Ok(Vec::new()),
        }
    }

    fn run(&self, ctx: &RunContext) -> Result<Value> {
        let device = crate::device::parse_device(ctx.device).map_err(|e| user(e.to_string()))?;
        let out = ctx.out.join("model");
        let tokenizer = match ctx.input_opt("tokenizer") {
            Some(a) => Some(super::tokenizer::files_of(a)?),
            None => None,
        };
        let model = match (&self.cfg.from, &self.cfg.config) {
            (Some(from), _) => {
                let dir = resolve(&self.base, from);
                CausalLm::load(&dir, &device).map_err(|e| user(format!("{e:#}")))?
            }
            (None, Some(c)) => {
                let mut c = c.clone();
                if c.get("vocab_size").is_none_or(Value::is_null) {
                    let (json, _) = tokenizer.as_ref().expect("checked in build");
                    let tok = crate::tokenizer::load(json)?;
                    c.insert("vocab_size".into(), Value::from(tok.get_vocab_size(true)));
                }
                let mc: ModelConfig = serde_json::from_value(Value::Object(c))
                    .map_err(|e| user(format!("`config`: {e}")))?;
                CausalLm::init(&mc, &device, self.cfg.seed.unwrap_or(0))
                    .map_err(|e| user(format!("`config`: {e:#}")))?
            }
            (None, None) => unreachable!("validated in build"),
        };
        model.save(&out)?;
        // The tokenizer: the input's if given, else the one in the model folder.
        let tok_files = match tokenizer {
            Some(t) => Some(Ok(t)),
            None => self.cfg.from.as_ref().and_then(|f| {
                let dir = resolve(&self.base, f);
                let json = dir.join("tokenizer.json");
                json.is_file().then(|| {
                    crate::template::read_tokenizer_config(&dir.join("tokenizer_config.json"))
                        .map(|cfg| (json, cfg))
                })
            }),
        };
        let tok_files = tok_files.transpose()?;
        let Some((json, tcfg)) = tok_files else {
            user_bail!(
                "the model has no tokenizer.json: add `inputs: {{tokenizer: <tokenizer stage>}}`"
            );
        };
        let tok = crate::tokenizer::load(&json)?;
        if tok.get_vocab_size(true) > model.vocab_size() {
            user_bail!(
                "the tokenizer has {} tokens but the model's vocabulary is {}",
                tok.get_vocab_size(true),
                model.vocab_size()
            );
        }
        copy_tokenizer(&json, tcfg.as_ref(), &out)?;
        ctx.progress.log(format!(
            "         {}: {} ({} parameters, vocab {})",
            ctx.stage,
            model.config().architecture.model_type(),
            model.param_count(),
            model.vocab_size()
        ));
        Ok(
            json!({"parameters": model.param_count(), "vocab_size": model.vocab_size(), "architecture": model.config().architecture.model_type()}),
        )
    }
}
