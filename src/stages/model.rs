//! `model`: a causal LM as a Hugging Face folder artifact (`model/`: config.json,
//! model.safetensors, tokenizer.json, tokenizer_config.json), either loaded from a folder the user
//! has (`from:`) or freshly initialized from a `config:` sized to the tokenizer (seeded). A `from:`
//! folder of a `*ForSequenceClassification` class gives a reward model artifact instead (the
//! `evaluate` stage's judge), saved the same way.

use std::path::{Path, PathBuf};

use anyhow::Result;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::{
    BuildContext, Role, RunContext, Stage, StageKind, params_schema, parse_config, resolve,
    schema_keys, to_params,
};
use crate::artifacts::{ModelDir, tokenizer_of};
use crate::error::user;
use crate::model::{Architecture, CausalLm, InitSampler, ModelConfig, Precision};
use crate::pipeline::stage::Artifact;
use crate::tokenizer::HfTokenizer;
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
    params_schema: params_schema::<ModelStageConfig>,
};

/// `model`: a causal LM as a Hugging Face folder artifact, loaded (`from`) or freshly
/// initialized (`config`); give one.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelStageConfig {
    /// A Hugging Face model folder (config.json, model.safetensors or shards and their index,
    /// tokenizer.json), relative to the pipeline file.
    #[serde(default)]
    pub from: Option<String>,
    /// Or the architecture of a fresh model (Hugging Face config keys; `vocab_size` defaults to
    /// the tokenizer's).
    #[serde(default)]
    #[schemars(with = "Option<ModelConfig>")]
    pub config: Option<Map<String, Value>>,
    /// Seed of a fresh model's initialization (default: the pipeline's seed).
    #[serde(default)]
    pub seed: Option<u64>,
    /// How `model/model.safetensors` stores the weights: `f32` (default), or `bf16`/`f16`
    /// (rounded to nearest even, config.json's `dtype` saying so), as Hugging Face folders of these
    /// models ship: half the bytes to write, hash and read. Loading computes in f32 either way.
    // Left out of the canonical parameters at f32, so that adding it moved no hash.
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    #[schemars(extend("default" = "f32"))]
    pub dtype: Precision,
    /// How a fresh model's weights are drawn from `N(0, initializer_range)`: `ziggurat` (default;
    /// rand_distr's ziggurat on a ChaCha12 stream per tensor and block of 65,536 weights, on all
    /// threads) or `box-muller` (sepo's first sampler, about five times slower: rebuilds a model
    /// made before `init` existed bit for bit, under its old hash). Only with `config`.
    // `box-muller` is left out of the canonical parameters (the hash it had before `init`); a
    // `config:` stage without `init` gets `ziggurat` written in, so no stale artifact drawn by
    // Box-Muller is taken for it.
    #[serde(default, skip_serializing_if = "hashed_as_before_init")]
    #[schemars(extend("default" = "ziggurat"))]
    pub init: Option<InitSampler>,
}

fn hashed_as_before_init(init: &Option<InitSampler>) -> bool {
    init.is_none_or(|s| s == InitSampler::BoxMuller)
}

struct ModelStage {
    cfg: ModelStageConfig,
    base: PathBuf,
}

fn build(params: &Value, ctx: &BuildContext) -> Result<Box<dyn Stage>> {
    let mut cfg: ModelStageConfig = parse_config(params)?;
    match (&cfg.from, &mut cfg.config) {
        (Some(_), Some(_)) => {
            user_bail!("give either `from` (a model folder) or `config`, not both")
        }
        (None, None) => user_bail!(
            "give `from: <Hugging Face model folder>` or `config: {{architecture: llama, ...}}`"
        ),
        (Some(_), None) => {
            if cfg.init.is_some() {
                user_bail!("`init` draws a fresh model (`config:`); a `from:` model is loaded")
            }
            cfg.seed = None
        }
        (None, Some(c)) => {
            // ModelConfig's fields, and `model_type` for `architecture`.
            let known = schema_keys::<ModelConfig>();
            for k in c.keys() {
                if !known.contains(k) {
                    let known: Vec<&str> = known.iter().map(String::as_str).collect();
                    user_bail!(
                        "`config.{k}` is not a model setting{}",
                        crate::util::suggest(k, &known)
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
            cfg.init = Some(cfg.init.unwrap_or_default());
        }
    }
    Ok(Box::new(ModelStage {
        cfg,
        base: ctx.base_dir.to_path_buf(),
    }))
}

/// The files of a Hugging Face model folder that define it ([`ModelDir::files`]).
pub fn model_files(dir: &Path) -> Result<Vec<PathBuf>> {
    ModelDir::at(dir).files()
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
        let out = ModelDir::in_artifact(ctx.out);
        let tokenizer = ctx
            .input_opt("tokenizer")
            .map(TokenizerInput::of)
            .transpose()?;
        let from = self
            .cfg
            .from
            .as_ref()
            .map(|f| ModelDir::at(&resolve(&self.base, f)));
        let reward = match &from {
            Some(dir) => dir.is_reward_model().map_err(|e| user(format!("{e:#}")))?,
            None => false,
        };
        // What the log line and the manifest say: the same for both kinds of model.
        let (vocab, params, arch): (usize, usize, Architecture) = if reward {
            let dir = from.as_ref().expect("a reward model comes from a folder");
            let rm = dir
                .load_reward(&device)
                .map_err(|e| user(format!("{e:#}")))?;
            rm.save_as(out.path(), self.cfg.dtype)?;
            (rm.vocab_size(), rm.param_count(), rm.config().architecture)
        } else {
            self.causal_lm(
                from.as_ref(),
                tokenizer.as_ref().map(TokenizerInput::vocab_size),
                &device,
                &out,
            )?
        };
        // The tokenizer: the input's if given, else the one in the model folder.
        let tok = match (tokenizer, from) {
            (Some(t), _) => Some(t),
            (None, Some(from)) if from.has_tokenizer() => {
                Some(TokenizerInput::Parsed(Box::new(from.tokenizer()?)))
            }
            _ => None,
        };
        let Some(tok) = tok else {
            user_bail!(
                "the model has no tokenizer.json: add `inputs: {{tokenizer: <tokenizer stage>}}`"
            );
        };
        if tok.vocab_size() > vocab {
            user_bail!(
                "the tokenizer has {} tokens but the model's vocabulary is {vocab}",
                tok.vocab_size(),
            );
        }
        tok.write_to(out.path())?;
        let what = if reward { " reward model" } else { "" };
        ctx.progress.log(format!(
            "         {}: {}{what} ({params} parameters, vocab {vocab})",
            ctx.stage,
            arch.model_type(),
        ));
        let mut summary =
            json!({"parameters": params, "vocab_size": vocab, "architecture": arch.model_type()});
        if reward {
            summary["head"] = json!("score");
        }
        Ok(summary)
    }
}

impl ModelStage {
    /// Writes the causal LM of a `from:` folder, or a fresh one of the `config:`, into `out`;
    /// returns its vocabulary, parameter count and architecture. `tokenizer_vocab`: the
    /// tokenizer input's, for a `config:` without `vocab_size`.
    fn causal_lm(
        &self,
        from: Option<&ModelDir>,
        tokenizer_vocab: Option<usize>,
        device: &burn::tensor::Device,
        out: &ModelDir,
    ) -> Result<(usize, usize, Architecture)> {
        let model = match (from, &self.cfg.config) {
            (Some(from), _) => from.load(device).map_err(|e| user(format!("{e:#}")))?,
            (None, Some(c)) => {
                let mut c = c.clone();
                if c.get("vocab_size").is_none_or(Value::is_null) {
                    let vocab = tokenizer_vocab.expect("checked in build");
                    c.insert("vocab_size".into(), Value::from(vocab));
                }
                let mc: ModelConfig = serde_json::from_value(Value::Object(c))
                    .map_err(|e| user(format!("`config`: {e}")))?;
                let (seed, init) = (
                    self.cfg.seed.unwrap_or(0),
                    self.cfg.init.unwrap_or_default(),
                );
                if init == InitSampler::Ziggurat {
                    // Drawn while written, no model built: the same bytes (see `model::fresh`).
                    let mc = CausalLm::save_fresh(&mc, seed, out.path(), self.cfg.dtype)
                        .map_err(|e| user(format!("`config`: {e:#}")))?;
                    return Ok((mc.vocab_size, mc.num_params(), mc.architecture));
                }
                CausalLm::init_with(&mc, device, seed, init)
                    .map_err(|e| user(format!("`config`: {e:#}")))?
            }
            (None, None) => unreachable!("validated in build"),
        };
        out.save_as(&model, self.cfg.dtype)?;
        Ok((
            model.vocab_size(),
            model.param_count(),
            model.config().architecture,
        ))
    }
}

/// The tokenizer a model folder gets.
enum TokenizerInput<'a> {
    /// A `tokenizer` stage's artifact and the vocabulary its manifest records: its files are
    /// copied as they are, unparsed (a `tokenizer` stage parsing and saving the Llama-2
    /// tokenizer.json takes 0.32 s on a 2-core VM, next to 1.2-1.4 s for this stage drawing and
    /// writing a 162M-parameter model). The tokenizer stage wrote tokenizer_config.json as
    /// formatted JSON, so the bytes are those [`HfTokenizer::write_to`] would write.
    Recorded(&'a Artifact, usize),
    /// A parsed tokenizer (an input whose manifest records no vocabulary, or the `from:`
    /// folder's).
    Parsed(Box<HfTokenizer>),
}

impl<'a> TokenizerInput<'a> {
    fn of(a: &'a Artifact) -> Result<TokenizerInput<'a>> {
        let recorded = a.manifest.stats.get("vocab_size").and_then(Value::as_u64);
        Ok(match recorded {
            Some(n) if a.kind == "tokenizer" => TokenizerInput::Recorded(a, n as usize),
            _ => TokenizerInput::Parsed(Box::new(tokenizer_of(a)?)),
        })
    }

    fn vocab_size(&self) -> usize {
        match self {
            TokenizerInput::Recorded(_, n) => *n,
            TokenizerInput::Parsed(t) => t.vocab_size(),
        }
    }

    fn write_to(&self, dir: &Path) -> Result<()> {
        match self {
            TokenizerInput::Recorded(a, _) => HfTokenizer::copy_files(&a.dir, dir),
            TokenizerInput::Parsed(t) => t.write_to(dir),
        }
    }
}
