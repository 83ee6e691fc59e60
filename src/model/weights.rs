//! Translating between Hugging Face tensors (`[out, in]` linears, separate or interleaved
//! projections) and the decoder's fused `[in, out]` parameters; fresh seeded weights.

use anyhow::Result;
use burn::tensor::Device;
use rand::{Rng, SeedableRng, rngs::StdRng};

use super::safetensors_io::{HostTensor, WeightFiles};
use super::transformer::{Linear, Norm, host, param1};

/// One Hugging Face linear that is part of a fused projection: its weight name, bias name and
/// number of output rows.
pub struct Part {
    /// `....weight`
    pub weight: String,
    /// `....bias`, when the layer has one.
    pub bias: Option<String>,
    /// Output features.
    pub out: usize,
}

impl Part {
    /// A part named `prefix.weight` (and `prefix.bias` when `bias`).
    pub fn new(prefix: &str, out: usize, bias: bool) -> Self {
        Part {
            weight: format!("{prefix}.weight"),
            bias: bias.then(|| format!("{prefix}.bias")),
            out,
        }
    }
}

/// Reads parts `[out_i, in]`, stacks them along `out`, reorders output rows so that row `r`
/// is source row `perm[r]` (when given) and returns the `[in, out]` linear.
pub fn read_linear(
    files: &mut WeightFiles,
    parts: &[Part],
    in_dim: usize,
    perm: Option<&[usize]>,
    device: &Device,
) -> Result<Linear> {
    let total: usize = parts.iter().map(|p| p.out).sum();
    let mut w = Vec::with_capacity(total * in_dim);
    let mut b = Vec::with_capacity(total);
    let has_bias = parts.iter().all(|p| p.bias.is_some());
    for p in parts {
        w.extend(files.take(&p.weight, &[p.out, in_dim])?.data);
        if let Some(bn) = &p.bias {
            b.extend(files.take(bn, &[p.out])?.data);
        }
    }
    let (w, b) = match perm {
        Some(perm) => {
            let mut pw = Vec::with_capacity(w.len());
            for &src in perm {
                pw.extend_from_slice(&w[src * in_dim..(src + 1) * in_dim]);
            }
            let pb = if has_bias {
                perm.iter().map(|&s| b[s]).collect()
            } else {
                b
            };
            (pw, pb)
        }
        None => (w, b),
    };
    let weight = HostTensor::new(vec![total, in_dim], w).transpose2();
    let bias = has_bias.then(|| HostTensor::new(vec![total], b));
    Ok(Linear::from_host(weight, bias, device))
}

/// The inverse of [`read_linear`]: pushes the parts' Hugging Face tensors.
pub fn write_linear(
    lin: &Linear,
    parts: &[Part],
    perm: Option<&[usize]>,
    out: &mut Vec<(String, HostTensor)>,
) {
    let w = host(&lin.weight).transpose2(); // [total, in]
    let [total, in_dim] = [w.shape[0], w.shape[1]];
    let b = lin.bias.as_ref().map(host);
    // undo the permutation: source row perm[r] = row r
    let (w, b) = match perm {
        Some(perm) => {
            let mut uw = vec![0f32; total * in_dim];
            let mut ub = b.as_ref().map(|_| vec![0f32; total]);
            for (r, &src) in perm.iter().enumerate() {
                uw[src * in_dim..(src + 1) * in_dim]
                    .copy_from_slice(&w.data[r * in_dim..(r + 1) * in_dim]);
                if let (Some(ub), Some(b)) = (ub.as_mut(), b.as_ref()) {
                    ub[src] = b.data[r];
                }
            }
            (uw, ub)
        }
        None => (w.data, b.map(|b| b.data)),
    };
    let mut row = 0;
    for p in parts {
        let data = w[row * in_dim..(row + p.out) * in_dim].to_vec();
        out.push((p.weight.clone(), HostTensor::new(vec![p.out, in_dim], data)));
        if let (Some(bn), Some(b)) = (&p.bias, b.as_ref()) {
            out.push((
                bn.clone(),
                HostTensor::new(vec![p.out], b[row..row + p.out].to_vec()),
            ));
        }
        row += p.out;
    }
}

/// Reads a norm (`prefix.weight`, and `prefix.bias` for LayerNorm).
pub fn read_norm(
    files: &mut WeightFiles,
    prefix: &str,
    dim: usize,
    eps: f64,
    rms: bool,
    device: &Device,
) -> Result<Norm> {
    let weight = param1(files.take(&format!("{prefix}.weight"), &[dim])?, device);
    let bias = if rms {
        None
    } else {
        Some(param1(
            files.take(&format!("{prefix}.bias"), &[dim])?,
            device,
        ))
    };
    Ok(Norm {
        weight,
        bias,
        eps,
        rms,
    })
}

/// Pushes a norm's tensors.
pub fn write_norm(norm: &Norm, prefix: &str, out: &mut Vec<(String, HostTensor)>) {
    out.push((format!("{prefix}.weight"), host(&norm.weight)));
    if let Some(b) = &norm.bias {
        out.push((format!("{prefix}.bias"), host(b)));
    }
}

/// Seeded source of fresh weights (host-side, so every backend gets the same numbers).
pub struct Init {
    rng: StdRng,
    std: f32,
}

impl Init {
    /// A generator of `N(0, std)` weights seeded by `seed`.
    pub fn new(seed: u64, std: f64) -> Self {
        Init {
            rng: StdRng::seed_from_u64(seed),
            std: std as f32,
        }
    }

    /// `n` normal draws (Box-Muller).
    pub fn normal(&mut self, shape: Vec<usize>) -> HostTensor {
        let n: usize = shape.iter().product();
        let mut data = Vec::with_capacity(n);
        while data.len() < n {
            let u1: f64 = 1.0 - self.rng.random::<f64>(); // (0, 1]
            let u2: f64 = self.rng.random::<f64>();
            let r = (-2.0 * u1.ln()).sqrt();
            let t = 2.0 * std::f64::consts::PI * u2;
            data.push((r * t.cos()) as f32 * self.std);
            if data.len() < n {
                data.push((r * t.sin()) as f32 * self.std);
            }
        }
        HostTensor::new(shape, data)
    }

    /// A fresh linear `[in, out]` (normal weight, zero bias), as transformers initializes.
    pub fn linear(&mut self, in_dim: usize, out_dim: usize, bias: bool, device: &Device) -> Linear {
        let w = self.normal(vec![in_dim, out_dim]);
        let b = bias.then(|| HostTensor::new(vec![out_dim], vec![0.0; out_dim]));
        Linear::from_host(w, b, device)
    }

    /// A fresh norm (ones, zero bias for LayerNorm).
    pub fn norm(dim: usize, eps: f64, rms: bool, device: &Device) -> Norm {
        Norm {
            weight: param1(HostTensor::new(vec![dim], vec![1.0; dim]), device),
            bias: (!rms).then(|| param1(HostTensor::new(vec![dim], vec![0.0; dim]), device)),
            eps,
            rms,
        }
    }
}
