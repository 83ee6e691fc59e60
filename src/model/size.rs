//! How big a model is: its parameter count, computed without overflow from the config alone,
//! and the refusal of models whose f32 weights would not fit in this machine's memory.

use anyhow::{Result, bail};

use super::config::ModelConfig;

impl ModelConfig {
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
        let family = self.architecture.family();
        // Gated: gate and up `[h, i]`; else one `[h, i]` projection. Then down `[i, h]`.
        let mlp_in = num(if family.gated_mlp() { 2 } else { 1 });
        let mlp_bias = if self.mlp_has_bias() {
            add(mul(mlp_in, i), h)
        } else {
            zero
        };
        let mlp = add(mul(add(mlp_in, num(1)), mul(h, i)), mlp_bias);
        // RMSNorm: a weight; LayerNorm: a weight and a bias.
        let norm = mul(num(if family.rms_norm { 1 } else { 2 }), h);
        let per_layer = add(add(qkv, o), add(mlp, mul(num(2), norm)));
        let final_norm = norm;
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
