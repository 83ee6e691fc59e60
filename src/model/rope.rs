//! Rotary position embeddings: the `rope_scaling` settings of Hugging Face configs and the
//! inverse frequencies transformers computes from them.

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

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

impl schemars::JsonSchema for RopeScaling {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "RopeScaling".into()
    }

    /// What [`RopeScaling::from_json`] reads: `rope_type` (or `type`) and the numbers it needs.
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let kinds = ["default", "linear", "llama3"];
        let number = |d: &str| json!({"type": "number", "description": d});
        // When `rope_type` (or, without it, `type`) is `kind`, `keys` are required.
        let needs = |kind: &str, keys: &[&str]| {
            json!({
                "if": {"anyOf": [
                    {"required": ["rope_type"], "properties": {"rope_type": {"const": kind}}},
                    {
                        "not": {"required": ["rope_type"]},
                        "required": ["type"],
                        "properties": {"type": {"const": kind}},
                    },
                ]},
                "then": {"required": keys},
            })
        };
        let llama3 = [
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        ];
        let schema = json!({
            "type": "object",
            "description": "Rotary-embedding frequency scaling, as in Hugging Face configs: \
                `rope_type` default (none), linear (positions divided by `factor`) or llama3.",
            "properties": {
                "rope_type": {"enum": kinds},
                "type": {"enum": kinds, "description": "Older name of `rope_type`."},
                "factor": number("Scale factor (linear, llama3; 8 in Llama 3.1)."),
                "low_freq_factor": number("llama3 (1 in Llama 3.1)."),
                "high_freq_factor": number("llama3 (4 in Llama 3.1)."),
                "original_max_position_embeddings": number("llama3 (8192 in Llama 3.1)."),
            },
            "allOf": [needs("linear", &["factor"]), needs("llama3", &llama3)],
        });
        schemars::Schema::try_from(schema).expect("an object")
    }
}

/// Rotary inverse frequencies in f32, as transformers' `_compute_default_rope_parameters`,
/// `_compute_linear_scaling_rope_parameters` and `_compute_llama3_parameters` compute them.
pub fn rope_inv_freq(dim: usize, base: f64, scaling: Option<&RopeScaling>) -> Vec<f32> {
    let base = base as f32;
    let inv: Vec<f32> = (0..dim)
        .step_by(2)
        .map(|i| 1.0f32 / base.powf(i as f32 / dim as f32))
        .collect();
    match scaling {
        None => inv,
        Some(RopeScaling::Linear { factor }) => inv.iter().map(|f| f / *factor as f32).collect(),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            let factor = *factor as f32;
            let low = *low_freq_factor as f32;
            let high = *high_freq_factor as f32;
            let old = *original_max_position_embeddings as f32;
            let low_freq_wavelen = old / low;
            let high_freq_wavelen = old / high;
            let two_pi = (2.0 * std::f64::consts::PI) as f32;
            inv.iter()
                .map(|&f| {
                    let wavelen = two_pi / f;
                    let scaled = if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        f
                    };
                    let smooth = (old / wavelen - low) / (high - low);
                    let smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled;
                    // transformers: ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
                    let medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
                    if medium { smoothed } else { scaled }
                })
                .collect()
        }
    }
}
