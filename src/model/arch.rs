//! The architectures sepo runs and everything that differs between them, written once: what
//! transformers assumes when a config.json leaves a key out, what a family fixes whatever the
//! config says, which keys its config.json spells, and where its checkpoints keep the weights
//! (a [`WeightTable`]). Loading, saving, fresh initialization, parameter counts and config
//! defaults all read these entries, so adding a family means adding a variant to
//! [`Architecture`] and its [`Family`] entry here, not a loader.

use serde::{Deserialize, Serialize};

use super::layout::{MlpNames, QkvNames, WeightTable};

/// The architecture families sepo can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
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
    /// Every architecture, in the order of [`Architecture::NAMES`].
    pub const ALL: [Architecture; 4] = [
        Architecture::Llama,
        Architecture::Mistral,
        Architecture::Qwen2,
        Architecture::GptNeox,
    ];

    /// All supported `model_type` strings.
    pub const NAMES: [&'static str; 4] = ["llama", "mistral", "qwen2", "gpt_neox"];

    /// The family's entry: defaults, fixed settings, config keys and weight names.
    pub fn family(self) -> &'static Family {
        match self {
            Architecture::Llama => &LLAMA,
            Architecture::Mistral => &MISTRAL,
            Architecture::Qwen2 => &QWEN2,
            Architecture::GptNeox => &GPT_NEOX,
        }
    }

    /// The Hugging Face `model_type`.
    pub fn model_type(self) -> &'static str {
        self.family().model_type
    }

    /// The transformers class written to `architectures`.
    pub fn hf_class(self) -> &'static str {
        self.family().hf_class
    }

    /// The transformers class of a reward model (a score head instead of the LM head).
    pub fn reward_class(self) -> &'static str {
        self.family().reward_class
    }

    /// Parses a `model_type` / `architecture` string.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| {
            let f = a.family();
            f.model_type == name || f.aliases.contains(&name)
        })
    }
}

/// One family. Plain fields are defaults a config.json may override; `Option` fields that are
/// `Some` are fixed by the family and override the config (transformers hard-codes them).
#[derive(Debug)]
pub struct Family {
    /// `model_type`.
    pub model_type: &'static str,
    /// Other spellings `model_type` accepts.
    pub aliases: &'static [&'static str],
    /// The transformers class written to `architectures`.
    pub hf_class: &'static str,
    /// The `*ForSequenceClassification` class of the family's reward models.
    pub reward_class: &'static str,
    /// RMSNorm (`rms_norm_eps`, no bias) rather than LayerNorm (`layer_norm_eps`, with bias).
    pub rms_norm: bool,
    /// Default `hidden_act`.
    pub hidden_act: &'static str,
    /// Default `partial_rotary_factor` (`rotary_pct`).
    pub partial_rotary_factor: f64,
    /// Default `intermediate_size` as a function of `hidden_size`.
    pub intermediate_size: fn(usize) -> usize,
    /// Default `attention_bias`.
    pub attention_bias: bool,
    /// Bias on q/k/v, fixed whatever `attention_bias` says.
    pub qkv_bias: Option<bool>,
    /// Bias on the attention output projection, fixed.
    pub o_bias: Option<bool>,
    /// Bias on the MLP projections, fixed whatever `mlp_bias` says.
    pub mlp_bias: Option<bool>,
    /// Whether `use_parallel_residual` is honoured (otherwise residuals are sequential).
    pub parallel_residual: bool,
    /// When `sliding_window` restricts attention.
    pub sliding_window: SlidingWindow,
    /// Which keys a saved config.json spells (transformers' config class for the family).
    pub config_keys: ConfigKeys,
    /// Where checkpoints keep the weights.
    pub weights: WeightTable,
}

impl Family {
    /// Gated (`act(gate) * up`) MLP: the weight table has a gate and an up projection.
    pub fn gated_mlp(&self) -> bool {
        matches!(self.weights.mlp_in, MlpNames::Gated { .. })
    }

    /// Whether `num_key_value_heads` may be fewer than `num_attention_heads`: a fused per-head
    /// q/k/v projection has exactly one key and one value per query head.
    pub fn grouped_query(&self) -> bool {
        matches!(self.weights.qkv, QkvNames::Separate(_))
    }
}

/// When a family's `sliding_window` key restricts attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlidingWindow {
    /// Never (the family has no such key).
    Never,
    /// Whenever `sliding_window` is set (mistral).
    Always,
    /// Only with `use_sliding_window: true` (qwen2).
    WhenEnabled,
}

/// The family-specific keys of a saved config.json (the common ones are written for all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigKeys {
    /// `GPTNeoXConfig`: `rotary_pct`, `rotary_emb_base`, `layer_norm_eps`,
    /// `use_parallel_residual`, `attention_bias`, `rope_scaling` only when set.
    GptNeox,
    /// `LlamaConfig` and relatives: `num_key_value_heads`, `head_dim`, `rms_norm_eps`,
    /// `rope_theta`, `rope_scaling`, `attention_bias` and `mlp_bias` when `biases` (qwen2's
    /// config has neither), and the sliding-window keys its [`SlidingWindow`] implies.
    Llama {
        /// Whether `attention_bias` and `mlp_bias` are spelled.
        biases: bool,
    },
}

/// transformers' llama default MLP width: 8/3 of the hidden size, rounded up to 64.
fn swiglu_width(hidden: usize) -> usize {
    // Saturating: for an absurd hidden_size this must not overflow (a panic in debug builds)
    // before `check_size` can refuse the config with a message.
    (hidden.saturating_mul(8) / 3)
        .div_ceil(64)
        .saturating_mul(64)
}

fn four_times(hidden: usize) -> usize {
    hidden.saturating_mul(4)
}

/// Llama; mistral and qwen2 differ from it in a few fields.
const LLAMA: Family = Family {
    model_type: "llama",
    aliases: &[],
    hf_class: "LlamaForCausalLM",
    reward_class: "LlamaForSequenceClassification",
    rms_norm: true,
    hidden_act: "silu",
    partial_rotary_factor: 1.0,
    intermediate_size: swiglu_width,
    attention_bias: false,
    qkv_bias: None,
    o_bias: None,
    mlp_bias: None,
    parallel_residual: false,
    sliding_window: SlidingWindow::Never,
    config_keys: ConfigKeys::Llama { biases: true },
    // `LlamaForCausalLM` naming, which mistral and qwen2 share.
    weights: WeightTable {
        body: "model",
        embed: "embed_tokens",
        layers: "layers",
        ln1: "input_layernorm",
        ln2: "post_attention_layernorm",
        attention: "self_attn",
        qkv: QkvNames::Separate(["q_proj", "k_proj", "v_proj"]),
        attn_out: "o_proj",
        mlp: "mlp",
        mlp_in: MlpNames::Gated {
            gate: "gate_proj",
            up: "up_proj",
        },
        mlp_out: "down_proj",
        final_norm: "norm",
        lm_head: "lm_head",
        score: "score",
        ignorable: &[".rotary_emb.inv_freq"],
    },
};

const MISTRAL: Family = Family {
    model_type: "mistral",
    hf_class: "MistralForCausalLM",
    reward_class: "MistralForSequenceClassification",
    sliding_window: SlidingWindow::Always,
    ..LLAMA
};

const QWEN2: Family = Family {
    model_type: "qwen2",
    hf_class: "Qwen2ForCausalLM",
    reward_class: "Qwen2ForSequenceClassification",
    qkv_bias: Some(true),
    o_bias: Some(false),
    sliding_window: SlidingWindow::WhenEnabled,
    config_keys: ConfigKeys::Llama { biases: false },
    ..LLAMA
};

const GPT_NEOX: Family = Family {
    model_type: "gpt_neox",
    aliases: &["gpt-neox"],
    hf_class: "GPTNeoXForCausalLM",
    reward_class: "GPTNeoXForSequenceClassification",
    rms_norm: false,
    hidden_act: "gelu",
    partial_rotary_factor: 0.25,
    intermediate_size: four_times,
    attention_bias: true,
    qkv_bias: None,
    o_bias: None,
    mlp_bias: Some(true),
    parallel_residual: true,
    sliding_window: SlidingWindow::Never,
    config_keys: ConfigKeys::GptNeox,
    weights: WeightTable {
        body: "gpt_neox",
        embed: "embed_in",
        layers: "layers",
        ln1: "input_layernorm",
        ln2: "post_attention_layernorm",
        attention: "attention",
        // Output rows per head as `[q_h | k_h | v_h]`.
        qkv: QkvNames::PerHead("query_key_value"),
        attn_out: "dense",
        mlp: "mlp",
        mlp_in: MlpNames::Plain("dense_h_to_4h"),
        mlp_out: "dense_4h_to_h",
        final_norm: "final_layer_norm",
        lm_head: "embed_out",
        score: "score",
        // Older Pythia checkpoints carry the causal mask and rotary cache as buffers.
        ignorable: &[
            ".attention.bias",
            ".attention.masked_bias",
            ".rotary_emb.inv_freq",
        ],
    },
};
