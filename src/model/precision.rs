//! Compute precision of a forward pass: `f32`, or mixed precision in `bf16`/`f16` with what
//! `torch.autocast` does.
//!
//! Under mixed precision the parameters stay f32 (master weights, and so the AdamW state), and
//! only the matrix products run in the lower precision: every linear layer, the attention product
//! and the LM head cast their inputs (and the weight) down and return the low-precision result.
//! Everything autocast keeps in f32 stays f32 here too: embeddings, norms, rotary embeddings, the
//! residual stream (transformers adds a bf16 projection to the f32 residual, which promotes to
//! f32) and the log-softmax of the loss (the logits are cast up before it). The MLP's activation
//! and gate product run on the low-precision projection outputs, as they do in transformers under
//! autocast. Gradients flow back through the casts (burn's cast is differentiable) and reach the
//! f32 parameters in f32.

use std::fmt;

use burn::tensor::FloatDType;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Compute precision of the matrix products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// bfloat16 matrix products, f32 master weights (autocast's bf16).
    Bf16,
    /// float16 matrix products, f32 master weights (autocast's fp16). No loss scaling: sepo's
    /// objectives are log-prob sums whose gradients stay well inside f16's range at the sizes it
    /// trains, and the clip/norm is computed on the f32 gradients.
    F16,
}

impl Precision {
    /// The dtype the matrix products run in; `None` for f32 (no casts at all, so the f32 path
    /// is exactly what it was before mixed precision existed).
    pub fn compute_dtype(self) -> Option<FloatDType> {
        match self {
            Precision::F32 => None,
            Precision::Bf16 => Some(FloatDType::BF16),
            Precision::F16 => Some(FloatDType::F16),
        }
    }

    /// Whether this is the f32 default (left out of canonical stage parameters).
    pub fn is_f32(&self) -> bool {
        *self == Precision::F32
    }

    /// The YAML spelling.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }
}

/// A line for the log when `precision` buys nothing on `device`: on CPU backends the low
/// precision is there for its numbers (a run that matches a GPU run's rounding), not for speed
/// (flex rounds around its f32 kernels; libtorch's CPU bf16 kernels are slower than its f32 ones
/// on most CPUs).
pub fn cpu_note(device: &burn::tensor::Device, precision: Precision) -> Option<String> {
    let name = crate::device::device_name(device);
    (!precision.is_f32() && !name.starts_with("tch-cuda")).then(|| {
        format!(
            "precision {precision} on {name}: products rounded as {precision} would round them, \
             computed by CPU kernels (expect it slower than f32; it is fast on CUDA)"
        )
    })
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    //! Mixed precision against transformers under `torch.autocast` on CPU
    //! (`tests/fixtures/precision.json`, `scripts/make_precision_fixtures.py`).

    use burn::tensor::{DType, Int, Tensor, TensorData};
    use serde_json::Value;

    use super::Precision;
    use crate::model::CausalLm;
    use crate::model::tests::repo_root;
    use crate::train::optim::ParamGrads;

    fn fixture() -> Value {
        let path = repo_root().join("tests/fixtures/precision.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn floats(v: &Value) -> Vec<Vec<f64>> {
        serde_json::from_value(v.clone()).unwrap()
    }

    /// Per-sequence next-token log-probs of a right-padded batch, the mean NLL, and the global
    /// gradient norm with respect to the (f32) parameters, and the gradients' dtypes.
    fn run(model: &CausalLm, seqs: &[Vec<u32>]) -> (Vec<Vec<f64>>, f64, f64, Vec<DType>) {
        let device = model.device();
        let width = seqs.iter().map(Vec::len).max().unwrap();
        let rows = seqs.len();
        let (mut ids, mut tgt) = (vec![0i64; rows * width], vec![0i64; rows * width]);
        for (b, s) in seqs.iter().enumerate() {
            for t in 0..s.len() {
                ids[b * width + t] = s[t] as i64;
                if t + 1 < s.len() {
                    tgt[b * width + t] = s[t + 1] as i64;
                }
            }
        }
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [rows, width]), &device);
        let tgt = Tensor::<2, Int>::from_data(TensorData::new(tgt, [rows, width]), &device);
        let lp = model.token_logprobs(ids, tgt);
        assert_eq!(lp.dtype(), DType::F32, "log-probs come back in f32");
        let mut mask = vec![0f32; rows * width];
        let mut n = 0.0;
        for (b, s) in seqs.iter().enumerate() {
            for m in &mut mask[b * width..b * width + s.len() - 1] {
                *m = 1.0;
                n += 1.0;
            }
        }
        let mask = Tensor::<2>::from_data(TensorData::new(mask, [rows, width]), &device);
        let loss = (lp.clone() * mask).sum().neg().div_scalar(n);
        let all = lp.clone().inner().try_into_vec_as::<f32>().unwrap();
        let per_seq = seqs
            .iter()
            .enumerate()
            .map(|(b, s)| {
                all[b * width..b * width + s.len() - 1]
                    .iter()
                    .map(|&x| x as f64)
                    .collect()
            })
            .collect();
        let loss_v = loss.clone().inner().try_into_vec_as::<f32>().unwrap()[0] as f64;
        let grads = ParamGrads::from_backward(model, loss.backward());
        let dtypes = grads
            .paths()
            .map(|p| grads.get(p).unwrap().dtype())
            .collect();
        (per_seq, loss_v, grads.total_norm(), dtypes)
    }

    /// The largest and the mean absolute difference of two sets of log-probs.
    fn diff(a: &[Vec<f64>], b: &[Vec<f64>]) -> (f64, f64) {
        let d: Vec<f64> = a
            .iter()
            .zip(b)
            .flat_map(|(x, y)| {
                assert_eq!(x.len(), y.len());
                x.iter().zip(y).map(|(p, q)| (p - q).abs())
            })
            .collect();
        (
            d.iter().copied().fold(0.0, f64::max),
            d.iter().sum::<f64>() / d.len() as f64,
        )
    }

    /// bf16 and f16, forward and backward, against transformers under autocast in the same
    /// precision. Two correct low-precision implementations do not agree bit for bit (bf16 keeps
    /// 8 mantissa bits: summation order alone moves these log-probs by a few hundredths), so the
    /// yardstick is transformers against itself: its eager attention against its SDPA attention,
    /// both under autocast.
    ///
    /// Stated tolerance, per model and precision, on the next-token log-probs of two
    /// right-padded sequences:
    /// - sepo vs transformers (SDPA): the mean absolute difference at most 2x, and the largest
    ///   at most 2.5x, transformers' eager-vs-SDPA spread (floored at 1e-3 for f16, whose spread
    ///   is tiny);
    /// - sepo really rounds: its mean distance to transformers in f32 is at least half of
    ///   transformers' own low-precision-vs-f32 mean distance (f32 compute would be ~0);
    /// - the SFT loss (the mean of those log-probs) within 2x the mean spread, and its gradient
    ///   norm (with respect to the f32 parameters, whose gradients come back in f32) within the
    ///   format's unit roundoff, relative (2^-8 = 0.39% for bf16, 2^-11 = 0.049% for f16), or
    ///   2.5x transformers' eager-vs-SDPA difference if that is larger;
    /// - f32 within 1e-4 of transformers in f32.
    #[test]
    fn mixed_precision_matches_transformers_autocast() {
        let fx = fixture();
        let device = crate::device::parse_device("cpu").unwrap().autodiff();
        let num = |v: &Value| v.as_f64().unwrap();
        for (name, m) in fx["models"].as_object().unwrap() {
            let seqs: Vec<Vec<u32>> = serde_json::from_value(m["ids"].clone()).unwrap();
            let dir = repo_root().join(m["path"].as_str().unwrap());
            let hf_f32 = floats(&m["f32"]["logprobs"]);
            for p in [Precision::F32, Precision::Bf16, Precision::F16] {
                let (want, eager) = (&m[p.name()], &m[format!("{}_eager", p.name())]);
                let model = CausalLm::load(&dir, &device).unwrap().with_precision(p);
                let (lp, loss, gnorm, dtypes) = run(&model, &seqs);
                assert!(
                    dtypes.iter().all(|d| *d == DType::F32),
                    "{name} {p}: f32 grads"
                );
                let hf = floats(&want["logprobs"]);
                let (d_max, d_mean) = diff(&lp, &hf);
                if p == Precision::F32 {
                    assert!(d_max < 1e-4, "{name} f32: {d_max}");
                    continue;
                }
                let floor = if p == Precision::F16 { 1e-3 } else { 0.0 };
                let (s_max, s_mean) = diff(&floats(&eager["logprobs"]), &hf);
                let (_, gap_mean) = diff(&hf, &hf_f32);
                let (_, ours_gap) = diff(&lp, &hf_f32);
                let (hf_loss, hf_g) = (num(&want["loss"]), num(&want["grad_norm"]));
                let e_g = num(&eager["grad_norm"]);
                eprintln!(
                    "{name} {p}: |dlogp| max {d_max:.5} mean {d_mean:.5} (hf eager vs sdpa: max {s_max:.5} mean {s_mean:.5}); \
                     vs f32 mean {ours_gap:.5} (hf {gap_mean:.5}); loss {loss:.5} vs {hf_loss:.5}; \
                     grad norm {gnorm:.4} vs {hf_g:.4} (eager {e_g:.4})"
                );
                assert!(
                    d_mean <= (2.0 * s_mean).max(floor),
                    "{name} {p}: mean {d_mean} vs spread {s_mean}"
                );
                assert!(
                    d_max <= (2.5 * s_max).max(floor),
                    "{name} {p}: max {d_max} vs spread {s_max}"
                );
                assert!(
                    ours_gap >= 0.5 * gap_mean,
                    "{name} {p}: no rounding? {ours_gap} vs {gap_mean}"
                );
                assert!(
                    (loss - hf_loss).abs() <= 2.0 * s_mean,
                    "{name} {p}: loss {loss} vs {hf_loss}"
                );
                // The format's unit roundoff, relative: 2^-8 for bf16, 2^-11 for f16.
                let unit = if p == Precision::Bf16 {
                    2f64.powi(-8)
                } else {
                    2f64.powi(-11)
                };
                let g_tol = (2.5 * (hf_g - e_g).abs()).max(unit * hf_g);
                assert!(
                    (gnorm - hf_g).abs() <= g_tol,
                    "{name} {p}: grad norm {gnorm} vs {hf_g}"
                );
            }
        }
    }
}
