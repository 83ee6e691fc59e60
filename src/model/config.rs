//! Model configuration: Hugging Face `config.json` keys, serde-deserializable from a pipeline
//! YAML (`config: {architecture: llama, hidden_size: 128, ...}`) as well. What a key means when
//! it is left out, or whether a family fixes it, is not decided here but read from the
//! family's entry in `arch.rs`.

use std::path::Path;

use anyhow::{Context, Result, bail};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

pub use super::arch::Architecture;
use super::arch::{ConfigKeys, SlidingWindow};
pub use super::rope::RopeScaling;
use super::size::mem_total_bytes;

/// A token id or a list of them (`eos_token_id` is a list in Llama-3 configs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum TokenIds {
    /// One id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

impl TokenIds {
    /// The first id.
    pub fn first(&self) -> Option<u32> {
        match self {
            TokenIds::One(id) => Some(*id),
            TokenIds::Many(ids) => ids.first().copied(),
        }
    }
}

/// The configuration of a causal LM. Field names are Hugging Face's; `architecture` is also
/// read from `model_type`. Missing keys get small, sane defaults (a 4-layer, 256-wide model).
// The schema (a `model` stage's `config:`) refuses other keys; config.json files may have any.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
#[schemars(deny_unknown_fields, transform = stage_config_schema)]
pub struct ModelConfig {
    /// Architecture family (`model_type` in config.json).
    #[serde(alias = "model_type")]
    pub architecture: Architecture,
    /// Vocabulary size (token ids 0..N-1); in a `model` stage, the tokenizer's when left out.
    #[schemars(range(min = 1))]
    pub vocab_size: usize,
    /// Width of the residual stream.
    #[schemars(range(min = 1))]
    pub hidden_size: usize,
    /// Number of transformer blocks.
    pub num_hidden_layers: usize,
    /// Number of query heads; `hidden_size` must be a multiple unless `head_dim` is given.
    #[schemars(range(min = 1))]
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention); default: `num_attention_heads`.
    pub num_key_value_heads: Option<usize>,
    /// Width of the MLP; default: 4 * hidden (gpt_neox) or 8/3 * hidden rounded up to 64 (llama).
    pub intermediate_size: Option<usize>,
    /// Per-head width; default `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    /// Context length, in tokens: the longest prompt + continuation `sepo generate` runs.
    #[schemars(range(min = 1))]
    pub max_position_embeddings: usize,
    /// Rotary base (`rotary_emb_base` in gpt_neox configs).
    #[serde(alias = "rotary_emb_base")]
    pub rope_theta: f64,
    /// Rotary scaling (`rope_scaling`).
    pub rope_scaling: Option<RopeScaling>,
    /// Fraction of each head that is rotated; default 1 (llama) or 0.25 (gpt_neox).
    #[serde(alias = "rotary_pct")]
    pub partial_rotary_factor: Option<f64>,
    /// RMSNorm epsilon (llama family).
    pub rms_norm_eps: f64,
    /// LayerNorm epsilon (gpt_neox).
    pub layer_norm_eps: f64,
    /// Output projection shares the input embedding.
    pub tie_word_embeddings: bool,
    /// Bias on attention projections: default false (llama, mistral), true (gpt_neox); qwen2
    /// always has q/k/v bias and no o bias.
    pub attention_bias: Option<bool>,
    /// Bias on MLP projections (llama family; gpt_neox always has them).
    pub mlp_bias: bool,
    /// gpt_neox: `x + attn(ln1(x)) + mlp(ln2(x))` instead of sequential residuals.
    pub use_parallel_residual: bool,
    /// MLP activation: `silu` (llama family default), `gelu` (gpt_neox default), `gelu_new`,
    /// `gelu_pytorch_tanh`, `relu`.
    pub hidden_act: Option<String>,
    /// Mistral's sliding attention window.
    pub sliding_window: Option<usize>,
    /// Qwen2: whether `sliding_window` is used.
    pub use_sliding_window: bool,
    /// Standard deviation of the normal initialization of a fresh model's weights.
    pub initializer_range: f64,
    /// Beginning-of-sequence token id.
    pub bos_token_id: Option<TokenIds>,
    /// End-of-sequence token id(s).
    pub eos_token_id: Option<TokenIds>,
    /// Padding token id.
    pub pad_token_id: Option<TokenIds>,
    /// The config.json this config was read from, kept so that saving preserves keys sepo does
    /// not interpret. Empty for fresh configs.
    #[serde(skip)]
    pub source: Map<String, Value>,
}

/// The schema of [`ModelConfig`] as a `model` stage's `config:` reads it: `model_type` is
/// accepted for `architecture`, `vocab_size` has no fixed default (the tokenizer's), and
/// `hidden_act` is one of the [`ACTIVATIONS`].
fn stage_config_schema(schema: &mut schemars::Schema) {
    let Some(Value::Object(props)) = schema.get_mut("properties") else {
        return;
    };
    if let Some(Value::Object(vocab)) = props.get_mut("vocab_size") {
        vocab.remove("default");
    }
    if let Some(act) = props.get_mut("hidden_act") {
        let mut names: Vec<Value> = ACTIVATIONS.iter().map(|(n, _)| json!(n)).collect();
        names.push(Value::Null);
        act["enum"] = Value::Array(names);
    }
    if let Some(Value::Object(arch)) = props.get("architecture") {
        let mut alias = arch.clone();
        alias.remove("default");
        alias.insert("description".into(), json!("Same as `architecture`."));
        props.insert("model_type".into(), Value::Object(alias));
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            architecture: Architecture::Llama,
            vocab_size: 32000,
            hidden_size: 256,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: None,
            intermediate_size: None,
            head_dim: None,
            max_position_embeddings: 2048,
            rope_theta: 10000.0,
            rope_scaling: None,
            partial_rotary_factor: None,
            rms_norm_eps: 1e-6,
            layer_norm_eps: 1e-5,
            tie_word_embeddings: false,
            attention_bias: None,
            mlp_bias: false,
            use_parallel_residual: true,
            hidden_act: None,
            sliding_window: None,
            use_sliding_window: false,
            initializer_range: 0.02,
            bos_token_id: None,
            eos_token_id: None,
            pad_token_id: None,
            source: Map::new(),
        }
    }
}

/// The `hidden_act` names sepo runs, with the activation each means.
pub const ACTIVATIONS: &[(&str, Activation)] = &[
    ("silu", Activation::Silu),
    ("swish", Activation::Silu),
    ("gelu", Activation::Gelu),
    ("gelu_new", Activation::GeluTanh),
    ("gelu_pytorch_tanh", Activation::GeluTanh),
    ("gelu_fast", Activation::GeluTanh),
    ("relu", Activation::Relu),
];

/// Activation of the MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SiLU (SwiGLU gate in the llama family).
    Silu,
    /// Exact (erf) GELU.
    Gelu,
    /// tanh-approximated GELU.
    GeluTanh,
    /// ReLU.
    Relu,
}

impl ModelConfig {
    /// Reads a Hugging Face `config.json`. Unsupported `model_type` is an error naming it and
    /// the file.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read model config {}", path.display()))?;
        let value: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        Self::from_hf_json(value).with_context(|| format!("in model config {}", path.display()))
    }

    /// Reads a Hugging Face config object (see [`ModelConfig::from_hf_file`]).
    pub fn from_hf_json(value: Value) -> Result<Self> {
        let Value::Object(source) = value else {
            bail!("config must be a JSON object")
        };
        let model_type = source
            .get("model_type")
            .and_then(Value::as_str)
            .with_context(|| {
                format!(
                    "no `model_type` (supported: {})",
                    Architecture::NAMES.join(", ")
                )
            })?;
        if Architecture::from_name(model_type).is_none() {
            bail!(
                "unsupported model_type `{model_type}` (supported: {})",
                Architecture::NAMES.join(", ")
            );
        }
        let mut obj = source.clone();
        obj.remove("architecture");
        // transformers >= 5 keeps rope settings in `rope_parameters`.
        if let Some(Value::Object(rp)) = source.get("rope_parameters") {
            if !obj.contains_key("rope_theta")
                && let Some(theta) = rp.get("rope_theta")
            {
                obj.insert("rope_theta".into(), theta.clone());
            }
            if !obj.contains_key("partial_rotary_factor")
                && !obj.contains_key("rotary_pct")
                && let Some(p) = rp.get("partial_rotary_factor")
            {
                obj.insert("partial_rotary_factor".into(), p.clone());
            }
            let kind = rp
                .get("rope_type")
                .or_else(|| rp.get("type"))
                .and_then(Value::as_str);
            if obj.get("rope_scaling").is_none_or(Value::is_null)
                && kind.is_some_and(|k| k != "default")
            {
                obj.insert("rope_scaling".into(), Value::Object(rp.clone()));
            }
        }
        // transformers falls back to max_position_embeddings for llama3's original length.
        if let (Some(Value::Object(rs)), Some(max)) = (
            obj.get_mut("rope_scaling"),
            source.get("max_position_embeddings"),
        ) && !rs.contains_key("original_max_position_embeddings")
        {
            rs.insert("original_max_position_embeddings".into(), max.clone());
        }
        // Keys that gpt_neox configs may spell both ways: keep only one to avoid serde's
        // "duplicate field" error for aliases.
        if obj.contains_key("rope_theta") {
            obj.remove("rotary_emb_base");
        }
        if obj.contains_key("partial_rotary_factor") {
            obj.remove("rotary_pct");
        }
        if obj.get("rope_scaling").is_some_and(|v| {
            RopeScaling::from_json(v)
                .map(|s| s.is_none())
                .unwrap_or(false)
        }) {
            obj.insert("rope_scaling".into(), Value::Null);
        }
        let mut config: ModelConfig = serde_json::from_value(Value::Object(obj))
            .context("config.json has a field sepo cannot read")?;
        config.source = source;
        config.validate()?;
        Ok(config)
    }

    /// Checks the numbers are consistent.
    pub fn validate(&self) -> Result<()> {
        let arch = self.architecture.model_type();
        if self.hidden_size == 0 || self.num_attention_heads == 0 || self.vocab_size == 0 {
            bail!("{arch}: hidden_size, num_attention_heads and vocab_size must be positive");
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            bail!(
                "{arch}: hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        let kv = self.num_kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            bail!(
                "{arch}: num_attention_heads {} is not a multiple of num_key_value_heads {kv}",
                self.num_attention_heads
            );
        }
        if !self.architecture.family().grouped_query() && kv != self.num_attention_heads {
            bail!("{arch} has no grouped-query attention (num_key_value_heads must be unset)");
        }
        if self.max_position_embeddings == 0 {
            bail!("{arch}: max_position_embeddings (the context length) must be positive");
        }
        // Before anything allocates: an absurd size must be this error, not a capacity overflow
        // or an allocation failure that aborts the process.
        self.check_size(mem_total_bytes())?;
        let rot = self.rotary_dim();
        if !rot.is_multiple_of(2) || rot > self.head_dim() {
            bail!(
                "{arch}: rotary dimension {rot} (head_dim {} x partial_rotary_factor) must be even",
                self.head_dim()
            );
        }
        self.activation()?;
        Ok(())
    }

    /// The same configuration with every derived default written out (`num_key_value_heads`,
    /// `intermediate_size`, `head_dim`, `partial_rotary_factor`, `attention_bias`, `hidden_act`),
    /// so that a config that spells out a default serializes (and hashes) like one that omits it.
    pub fn resolved(&self) -> ModelConfig {
        let family = self.architecture.family();
        let mut c = self.clone();
        c.num_key_value_heads = Some(self.num_kv_heads());
        c.intermediate_size = Some(self.intermediate_size());
        c.head_dim = Some(self.head_dim());
        c.partial_rotary_factor = Some(self.partial_rotary_factor());
        // A family that fixes its q/k/v bias ignores `attention_bias`: left unset.
        if c.attention_bias.is_none() && family.qkv_bias.is_none() {
            c.attention_bias = Some(self.qkv_bias());
        }
        if c.hidden_act.is_none() {
            c.hidden_act = Some(family.hidden_act.to_string());
        }
        if c.rope_scaling == Some(RopeScaling::Linear { factor: 1.0 }) {
            c.rope_scaling = None;
        }
        c
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Number of key/value heads.
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// MLP width.
    pub fn intermediate_size(&self) -> usize {
        let default = self.architecture.family().intermediate_size;
        self.intermediate_size
            .unwrap_or_else(|| default(self.hidden_size))
    }

    /// Fraction of each head that is rotated.
    pub fn partial_rotary_factor(&self) -> f64 {
        let family = self.architecture.family();
        self.partial_rotary_factor
            .unwrap_or(family.partial_rotary_factor)
    }

    /// Number of rotated channels per head.
    pub fn rotary_dim(&self) -> usize {
        (self.head_dim() as f64 * self.partial_rotary_factor()) as usize
    }

    /// Epsilon of the family's norm (`rms_norm_eps` or `layer_norm_eps`).
    pub fn norm_eps(&self) -> f64 {
        if self.architecture.family().rms_norm {
            self.rms_norm_eps
        } else {
            self.layer_norm_eps
        }
    }

    /// Bias on q/k/v projections.
    pub fn qkv_bias(&self) -> bool {
        let family = self.architecture.family();
        family
            .qkv_bias
            .unwrap_or(self.attention_bias.unwrap_or(family.attention_bias))
    }

    /// Bias on the attention output projection.
    pub fn o_bias(&self) -> bool {
        let family = self.architecture.family();
        family
            .o_bias
            .unwrap_or(self.attention_bias.unwrap_or(family.attention_bias))
    }

    /// Bias on MLP projections.
    pub fn mlp_has_bias(&self) -> bool {
        self.architecture.family().mlp_bias.unwrap_or(self.mlp_bias)
    }

    /// The MLP activation.
    pub fn activation(&self) -> Result<Activation> {
        let default = self.architecture.family().hidden_act;
        let name = self.hidden_act.as_deref().unwrap_or(default);
        match ACTIVATIONS.iter().find(|(n, _)| *n == name) {
            Some((_, activation)) => Ok(*activation),
            None => bail!("hidden_act `{name}` is not supported"),
        }
    }

    /// The attention window, when sliding-window attention is on.
    pub fn attention_window(&self) -> Option<usize> {
        match self.architecture.family().sliding_window {
            SlidingWindow::Always => self.sliding_window,
            SlidingWindow::WhenEnabled if self.use_sliding_window => self.sliding_window,
            _ => None,
        }
    }

    /// The `config.json` to write next to saved weights: Hugging Face keys, `model_type`,
    /// `architectures`, `torch_dtype: float32`. Keys of the source config that sepo does not
    /// interpret are kept.
    pub fn to_hf_json(&self) -> Value {
        let mut out = self.source.clone();
        let mut set = |k: &str, v: Value| {
            out.insert(k.to_string(), v);
        };
        let arch = self.architecture;
        set("architectures", json!([arch.hf_class()]));
        set("model_type", json!(arch.model_type()));
        set("vocab_size", json!(self.vocab_size));
        set("hidden_size", json!(self.hidden_size));
        set("intermediate_size", json!(self.intermediate_size()));
        set("num_hidden_layers", json!(self.num_hidden_layers));
        set("num_attention_heads", json!(self.num_attention_heads));
        set(
            "max_position_embeddings",
            json!(self.max_position_embeddings),
        );
        set("tie_word_embeddings", json!(self.tie_word_embeddings));
        set("initializer_range", json!(self.initializer_range));
        let act = match self.activation().unwrap_or(Activation::Silu) {
            Activation::Silu => "silu",
            Activation::Gelu => "gelu",
            Activation::GeluTanh => "gelu_new",
            Activation::Relu => "relu",
        };
        set(
            "hidden_act",
            json!(self.hidden_act.clone().unwrap_or_else(|| act.to_string())),
        );
        let ids = |t: &Option<TokenIds>| serde_json::to_value(t).unwrap_or(Value::Null);
        set("bos_token_id", ids(&self.bos_token_id));
        set("eos_token_id", ids(&self.eos_token_id));
        if self.pad_token_id.is_some() || self.source.contains_key("pad_token_id") {
            set("pad_token_id", ids(&self.pad_token_id));
        }
        let family = arch.family();
        match family.config_keys {
            ConfigKeys::GptNeox => {
                set("rotary_pct", json!(self.partial_rotary_factor()));
                set("rotary_emb_base", json!(self.rope_theta));
                set("layer_norm_eps", json!(self.layer_norm_eps));
                set("use_parallel_residual", json!(self.use_parallel_residual));
                set("attention_bias", json!(self.qkv_bias()));
                if let Some(s) = &self.rope_scaling {
                    set("rope_scaling", s.to_json());
                }
            }
            ConfigKeys::Llama { biases } => {
                set("num_key_value_heads", json!(self.num_kv_heads()));
                set("head_dim", json!(self.head_dim()));
                set("rms_norm_eps", json!(self.rms_norm_eps));
                set("rope_theta", json!(self.rope_theta));
                set(
                    "rope_scaling",
                    self.rope_scaling
                        .as_ref()
                        .map_or(Value::Null, RopeScaling::to_json),
                );
                if let Some(p) = self.partial_rotary_factor {
                    set("partial_rotary_factor", json!(p));
                }
                if biases {
                    set("attention_bias", json!(self.qkv_bias()));
                    set("mlp_bias", json!(self.mlp_bias));
                }
                if family.sliding_window != SlidingWindow::Never {
                    set("sliding_window", json!(self.sliding_window));
                }
                if family.sliding_window == SlidingWindow::WhenEnabled {
                    set("use_sliding_window", json!(self.use_sliding_window));
                }
            }
        }
        // transformers >= 5 reads `rope_parameters`; older versions the legacy keys above.
        let mut rope = match &self.rope_scaling {
            Some(s) => s.to_json(),
            None => json!({"rope_type": "default"}),
        };
        rope["rope_theta"] = json!(self.rope_theta);
        if family.config_keys == ConfigKeys::GptNeox {
            rope["partial_rotary_factor"] = json!(self.partial_rotary_factor());
        } else if let Some(p) = self.partial_rotary_factor {
            rope["partial_rotary_factor"] = json!(p);
        }
        set("rope_parameters", rope);
        set("dtype", json!("float32"));
        set("torch_dtype", json!("float32"));
        Value::Object(out)
    }
}

/// A config.json (from [`ModelConfig::to_hf_json`]) whose `dtype` and `torch_dtype` name the
/// dtype its weights are stored in.
pub fn with_dtype(mut config: Value, dtype: super::Precision) -> Value {
    let name = match dtype {
        super::Precision::F32 => "float32",
        super::Precision::Bf16 => "bfloat16",
        super::Precision::F16 => "float16",
    };
    if let Some(obj) = config.as_object_mut() {
        for key in ["dtype", "torch_dtype"] {
            obj.insert(key.into(), json!(name));
        }
    }
    config
}
