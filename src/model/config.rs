//! Model configuration: Hugging Face `config.json` keys, serde-deserializable from a pipeline
//! YAML (`config: {architecture: llama, hidden_size: 128, ...}`) as well.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// The architecture families sepo can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Architecture {
    /// `model_type: llama` (TinyLlama, Llama-2/3, llama2.c exports).
    Llama,
    /// `model_type: mistral`.
    Mistral,
    /// `model_type: qwen2` (q/k/v projections with bias).
    Qwen2,
    /// `model_type: gpt_neox` (Pythia).
    GptNeox,
}

impl Architecture {
    /// All supported `model_type` strings.
    pub const NAMES: [&'static str; 4] = ["llama", "mistral", "qwen2", "gpt_neox"];

    /// The Hugging Face `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
            Architecture::GptNeox => "gpt_neox",
        }
    }

    /// The transformers class written to `architectures`.
    pub fn hf_class(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::GptNeox => "GPTNeoXForCausalLM",
        }
    }

    /// Parses a `model_type` / `architecture` string.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Architecture::Llama),
            "mistral" => Some(Architecture::Mistral),
            "qwen2" => Some(Architecture::Qwen2),
            "gpt_neox" | "gpt-neox" => Some(Architecture::GptNeox),
            _ => None,
        }
    }

    /// Llama-style (RMSNorm, SwiGLU, separate q/k/v) as opposed to GPT-NeoX.
    pub fn is_llama_like(self) -> bool {
        !matches!(self, Architecture::GptNeox)
    }
}

/// A token id or a list of them (`eos_token_id` is a list in Llama-3 configs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// Rotary-embedding frequency scaling (`rope_scaling` in Hugging Face configs).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// `{"rope_type": "linear", "factor": f}`: positions divided by `f`.
    Linear {
        /// Scale factor.
        factor: f64,
    },
    /// `{"rope_type": "llama3", ...}` exactly as transformers' `_compute_llama3_parameters`.
    Llama3 {
        /// `factor` (8 in Llama 3.1).
        factor: f64,
        /// `low_freq_factor` (1).
        low_freq_factor: f64,
        /// `high_freq_factor` (4).
        high_freq_factor: f64,
        /// `original_max_position_embeddings` (8192).
        original_max_position_embeddings: f64,
    },
}

impl RopeScaling {
    /// Parses a `rope_scaling` object; `None` for null / `default` rope.
    pub fn from_json(value: &Value) -> Result<Option<Self>> {
        if value.is_null() {
            return Ok(None);
        }
        let obj = value
            .as_object()
            .with_context(|| format!("rope_scaling must be an object or null, got {value}"))?;
        let kind = obj
            .get("rope_type")
            .or_else(|| obj.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let num = |key: &str| -> Result<f64> {
            obj.get(key)
                .and_then(Value::as_f64)
                .with_context(|| format!("rope_scaling of type `{kind}` needs a number `{key}`"))
        };
        match kind {
            "default" => Ok(None),
            "linear" => Ok(Some(RopeScaling::Linear {
                factor: num("factor")?,
            })),
            "llama3" => Ok(Some(RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")?,
            })),
            other => bail!(
                "rope_scaling type `{other}` is not supported (supported: default, linear, llama3)"
            ),
        }
    }

    /// The Hugging Face JSON object.
    pub fn to_json(&self) -> Value {
        match self {
            RopeScaling::Linear { factor } => json!({"rope_type": "linear", "factor": factor}),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": *original_max_position_embeddings as u64,
            }),
        }
    }
}

impl Serialize for RopeScaling {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

impl<'de> Deserialize<'de> for RopeScaling {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(d)?;
        match RopeScaling::from_json(&value).map_err(serde::de::Error::custom)? {
            Some(s) => Ok(s),
            // `rope_scaling: {rope_type: default}` means no scaling; represented as
            // Linear{1} so that the Option stays Some without changing any number.
            None => Ok(RopeScaling::Linear { factor: 1.0 }),
        }
    }
}

/// The configuration of a causal LM. Field names are Hugging Face's; `architecture` is also
/// read from `model_type`. Missing keys get small, sane defaults (a 4-layer, 256-wide model).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelConfig {
    /// Architecture family (`model_type` in config.json).
    #[serde(alias = "model_type")]
    pub architecture: Architecture,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Number of transformer blocks.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention); default: `num_attention_heads`.
    pub num_key_value_heads: Option<usize>,
    /// Width of the MLP; default: 4 * hidden (gpt_neox) or 8/3 * hidden rounded up to 64 (llama).
    pub intermediate_size: Option<usize>,
    /// Per-head width; default `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    /// Longest sequence the model was trained for (informational; rope has no hard limit).
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
    /// Std of the normal init of fresh weights.
    pub initializer_range: f64,
    /// BOS id.
    pub bos_token_id: Option<TokenIds>,
    /// EOS id(s).
    pub eos_token_id: Option<TokenIds>,
    /// PAD id.
    pub pad_token_id: Option<TokenIds>,
    /// The config.json this config was read from, kept so that saving preserves keys sepo does
    /// not interpret. Empty for fresh configs.
    #[serde(skip)]
    pub source: Map<String, Value>,
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
        if self.architecture == Architecture::GptNeox && kv != self.num_attention_heads {
            bail!("gpt_neox has no grouped-query attention (num_key_value_heads must be unset)");
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
        let mut c = self.clone();
        c.num_key_value_heads = Some(self.num_kv_heads());
        c.intermediate_size = Some(self.intermediate_size());
        c.head_dim = Some(self.head_dim());
        if c.partial_rotary_factor.is_none() {
            c.partial_rotary_factor = Some(match self.architecture {
                Architecture::GptNeox => 0.25,
                _ => 1.0,
            });
        }
        if c.attention_bias.is_none() && self.architecture != Architecture::Qwen2 {
            c.attention_bias = Some(self.qkv_bias());
        }
        if c.hidden_act.is_none() {
            c.hidden_act = Some(
                match self.architecture {
                    Architecture::GptNeox => "gelu",
                    _ => "silu",
                }
                .to_string(),
            );
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
        // Saturating: for an absurd hidden_size this must not overflow (a panic in debug
        // builds) before `check_size` can refuse the config with a message.
        self.intermediate_size.unwrap_or(match self.architecture {
            Architecture::GptNeox => self.hidden_size.saturating_mul(4),
            _ => (self.hidden_size.saturating_mul(8) / 3)
                .div_ceil(64)
                .saturating_mul(64),
        })
    }

    /// Number of rotated channels per head.
    pub fn rotary_dim(&self) -> usize {
        let pct = self
            .partial_rotary_factor
            .unwrap_or(match self.architecture {
                Architecture::GptNeox => 0.25,
                _ => 1.0,
            });
        (self.head_dim() as f64 * pct) as usize
    }

    /// Bias on q/k/v projections.
    pub fn qkv_bias(&self) -> bool {
        match self.architecture {
            Architecture::Qwen2 => true,
            Architecture::GptNeox => self.attention_bias.unwrap_or(true),
            _ => self.attention_bias.unwrap_or(false),
        }
    }

    /// Bias on the attention output projection.
    pub fn o_bias(&self) -> bool {
        match self.architecture {
            Architecture::Qwen2 => false,
            Architecture::GptNeox => self.attention_bias.unwrap_or(true),
            _ => self.attention_bias.unwrap_or(false),
        }
    }

    /// Bias on MLP projections.
    pub fn mlp_has_bias(&self) -> bool {
        match self.architecture {
            Architecture::GptNeox => true,
            _ => self.mlp_bias,
        }
    }

    /// The MLP activation.
    pub fn activation(&self) -> Result<Activation> {
        let default = match self.architecture {
            Architecture::GptNeox => "gelu",
            _ => "silu",
        };
        let name = self.hidden_act.as_deref().unwrap_or(default);
        Ok(match name {
            "silu" | "swish" => Activation::Silu,
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            other => bail!("hidden_act `{other}` is not supported"),
        })
    }

    /// The attention window, when sliding-window attention is on.
    pub fn attention_window(&self) -> Option<usize> {
        match self.architecture {
            Architecture::Mistral => self.sliding_window,
            Architecture::Qwen2 if self.use_sliding_window => self.sliding_window,
            _ => None,
        }
    }

    /// Number of parameters the model built from this config has (`usize::MAX` if that does
    /// not fit, which [`ModelConfig::validate`] refuses).
    pub fn num_params(&self) -> usize {
        self.checked_num_params().unwrap_or(usize::MAX)
    }

    /// Number of parameters, or `None` when the count overflows `usize`.
    pub fn checked_num_params(&self) -> Option<usize> {
        self.count_params(Some, |a, b| a?.checked_add(b?), |a, b| a?.checked_mul(b?))
    }

    /// The parameter count in floating point: never overflows, for messages about sizes that
    /// do not fit.
    pub fn approx_num_params(&self) -> f64 {
        self.count_params(|x| x as f64, |a, b| a + b, |a, b| a * b)
    }

    /// The parameter-count formula, written once over any arithmetic (checked integers for the
    /// count, floats for an estimate that cannot overflow).
    fn count_params<T: Copy>(
        &self,
        num: impl Fn(usize) -> T,
        add: impl Fn(T, T) -> T,
        mul: impl Fn(T, T) -> T,
    ) -> T {
        let h = num(self.hidden_size);
        let hd = num(self.head_dim());
        let nh = num(self.num_attention_heads);
        let kv = num(self.num_kv_heads());
        let i = num(self.intermediate_size());
        let v = num(self.vocab_size);
        let zero = num(0);
        let qkv_width = mul(add(nh, mul(num(2), kv)), hd);
        let qkv = add(
            mul(h, qkv_width),
            if self.qkv_bias() { qkv_width } else { zero },
        );
        let o = add(mul(mul(nh, hd), h), if self.o_bias() { h } else { zero });
        let (mlp, norms) = if self.architecture.is_llama_like() {
            let b = if self.mlp_has_bias() {
                add(mul(num(2), i), h)
            } else {
                zero
            };
            (add(mul(num(3), mul(h, i)), b), mul(num(2), h))
        } else {
            (add(add(mul(num(2), mul(h, i)), i), h), mul(num(4), h))
        };
        let per_layer = add(add(qkv, o), add(mlp, norms));
        let final_norm = if self.architecture.is_llama_like() {
            h
        } else {
            mul(num(2), h)
        };
        let embed = mul(v, h);
        let head = if self.tie_word_embeddings {
            zero
        } else {
            embed
        };
        add(
            add(embed, mul(num(self.num_hidden_layers), per_layer)),
            add(final_norm, head),
        )
    }

    /// Refuses a model whose f32 weights do not fit in `usize` or exceed `mem_bytes` (the
    /// machine's memory, when known), naming the keys that size it and the estimated size.
    pub fn check_size(&self, mem_bytes: Option<u64>) -> Result<()> {
        let bytes = self.checked_num_params().and_then(|n| n.checked_mul(4));
        let approx = self.approx_num_params();
        let too_big = match (bytes, mem_bytes) {
            (None, _) => Some("more than this machine can address".to_string()),
            (Some(b), Some(mem)) if b as u64 > mem => Some(format!(
                "more than this machine's memory ({}, MemTotal in /proc/meminfo)",
                human_bytes(mem as f64)
            )),
            _ => None,
        };
        if let Some(why) = too_big {
            let c = self;
            bail!(
                "{}: the model is too large: about {approx:.3e} parameters, {} of f32 weights, {why}; \
                 it is sized by vocab_size {}, hidden_size {}, num_hidden_layers {}, \
                 intermediate_size {}, num_attention_heads {}, num_key_value_heads {}, head_dim {}",
                c.architecture.model_type(),
                human_bytes(approx * 4.0),
                c.vocab_size,
                c.hidden_size,
                c.num_hidden_layers,
                c.intermediate_size(),
                c.num_attention_heads,
                c.num_kv_heads(),
                c.head_dim()
            );
        }
        Ok(())
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
        match arch {
            Architecture::GptNeox => {
                set(
                    "rotary_pct",
                    json!(self.partial_rotary_factor.unwrap_or(0.25)),
                );
                set("rotary_emb_base", json!(self.rope_theta));
                set("layer_norm_eps", json!(self.layer_norm_eps));
                set("use_parallel_residual", json!(self.use_parallel_residual));
                set("attention_bias", json!(self.qkv_bias()));
                if let Some(s) = &self.rope_scaling {
                    set("rope_scaling", s.to_json());
                }
            }
            _ => {
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
                if arch != Architecture::Qwen2 {
                    set("attention_bias", json!(self.qkv_bias()));
                    set("mlp_bias", json!(self.mlp_bias));
                }
                if arch == Architecture::Mistral || arch == Architecture::Qwen2 {
                    set("sliding_window", json!(self.sliding_window));
                }
                if arch == Architecture::Qwen2 {
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
        if arch == Architecture::GptNeox {
            rope["partial_rotary_factor"] = json!(self.partial_rotary_factor.unwrap_or(0.25));
        } else if let Some(p) = self.partial_rotary_factor {
            rope["partial_rotary_factor"] = json!(p);
        }
        set("rope_parameters", rope);
        set("dtype", json!("float32"));
        set("torch_dtype", json!("float32"));
        Value::Object(out)
    }
}

/// The machine's memory in bytes (`MemTotal` of /proc/meminfo), when the system says. Read
/// once: planning validates every model stage's config.
pub fn mem_total_bytes() -> Option<u64> {
    static MEM: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *MEM.get_or_init(read_mem_total)
}

fn read_mem_total() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line.split_whitespace().skip(1);
    let n: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => n.checked_mul(1024),
        None => Some(n),
        Some(_) => None,
    }
}

/// `12.3 GiB`, or scientific notation past exbibytes.
fn human_bytes(b: f64) -> String {
    const UNITS: [&str; 7] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = b;
    for unit in UNITS {
        if v < 1024.0 {
            return if unit == "bytes" {
                format!("{v:.0} bytes")
            } else {
                format!("{v:.1} {unit}")
            };
        }
        v /= 1024.0;
    }
    format!("{b:.3e} bytes")
}

#[cfg(test)]
mod size_tests {
    use super::*;

    #[test]
    fn sizes_are_checked_without_overflow() {
        let small = ModelConfig::default();
        assert_eq!(small.checked_num_params(), Some(small.num_params()));
        assert!(small.check_size(Some(1 << 40)).is_ok());
        // Too big for 1 MiB, named with its keys and size.
        let err = small.check_size(Some(1 << 20)).unwrap_err().to_string();
        assert!(
            err.contains("too large") && err.contains("hidden_size 256") && err.contains("MiB"),
            "{err}"
        );
        // Overflows usize: an error, not a panic, whatever memory says.
        let huge = ModelConfig {
            hidden_size: 1 << 40,
            num_attention_heads: 1,
            ..ModelConfig::default()
        };
        assert_eq!(huge.checked_num_params(), None);
        assert_eq!(huge.num_params(), usize::MAX);
        let err = huge.check_size(None).unwrap_err().to_string();
        assert!(err.contains("can address") && err.contains("hidden_size 1099511627776"));
        assert!(huge.validate().is_err());
        let wide = ModelConfig {
            hidden_size: usize::MAX,
            num_attention_heads: 1,
            ..ModelConfig::default()
        };
        assert!(wide.validate().is_err());
    }
}
