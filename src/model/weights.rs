//! The one path between a [`Layout`] and the decoder, for every family: loading Hugging Face
//! tensors (`[out, in]` linears, separate or interleaved projections) into the decoder's fused
//! `[in, out]` parameters, exporting them back, and drawing fresh seeded weights.

use anyhow::Result;
use burn::tensor::Device;
use rand::{Rng, SeedableRng, rngs::StdRng};

use super::config::ModelConfig;
use super::layout::{Layout, LinearLayout, NormLayout};
use super::safetensors_io::{HostTensor, WeightFiles};
use super::transformer::{Block, Decoder, Linear, Norm, Spec, host, param1, param2};

/// Where the decoder's parameters come from: a checkpoint or a seeded generator. Both are
/// walked by [`build`] in the same order, so reading and initializing cannot drift apart.
trait Source {
    /// Token embeddings `[vocab, hidden]`.
    fn embed(&mut self, name: &str, shape: [usize; 2]) -> Result<HostTensor>;
    /// The untied output projection, in the decoder's `[hidden, vocab]`.
    fn lm_head(&mut self, name: &str, vocab_hidden: [usize; 2]) -> Result<HostTensor>;
    /// The tied output projection (nothing to read or draw).
    fn tied_lm_head(&mut self, name: &str);
    /// A decoder linear.
    fn linear(&mut self, l: &LinearLayout) -> Result<Linear>;
    /// A norm.
    fn norm(&mut self, n: &NormLayout) -> Result<Norm>;
}

fn build(c: &ModelConfig, src: &mut impl Source, device: &Device) -> Result<(Decoder, Layout)> {
    // Validates the config, so that the layout's sizes are sane.
    let spec = Spec::from_config(c)?;
    let layout = Layout::new(c);
    let embed = param2(src.embed(&layout.embed, layout.vocab_hidden)?, device);
    let mut blocks = Vec::with_capacity(layout.blocks.len());
    for b in &layout.blocks {
        blocks.push(Block {
            ln1: src.norm(&b.ln1)?,
            ln2: src.norm(&b.ln2)?,
            qkv: src.linear(&b.qkv)?,
            o: src.linear(&b.o)?,
            mlp_in: src.linear(&b.mlp_in)?,
            mlp_out: src.linear(&b.mlp_out)?,
        });
    }
    let final_norm = src.norm(&layout.final_norm)?;
    let lm_head = if layout.tied {
        src.tied_lm_head(&layout.lm_head);
        None
    } else {
        Some(param2(
            src.lm_head(&layout.lm_head, layout.vocab_hidden)?,
            device,
        ))
    };
    let decoder = Decoder {
        embed,
        blocks,
        final_norm,
        lm_head,
        spec,
    };
    Ok((decoder, layout))
}

/// Loads a decoder from Hugging Face tensors. Every tensor of the layout must be there with its
/// shape, and no other (recomputed buffers aside); errors name the tensor and the shapes.
pub fn load(c: &ModelConfig, files: &mut WeightFiles, device: &Device) -> Result<Decoder> {
    let (decoder, layout) = build(c, &mut Reader { files, device }, device)?;
    files.finish(|name| layout.ignorable(name))?;
    Ok(decoder)
}

/// A fresh decoder with weights drawn from `N(0, initializer_range)` seeded by `seed` (norms
/// one, biases zero), in the order of the layout.
pub fn init(c: &ModelConfig, device: &Device, seed: u64) -> Result<Decoder> {
    let mut init = Init::new(seed, c.initializer_range, device);
    Ok(build(c, &mut init, device)?.0)
}

/// The Hugging Face tensors of a decoder, in the layout's order.
pub fn export(c: &ModelConfig, d: &Decoder) -> Vec<(String, HostTensor)> {
    let layout = Layout::new(c);
    let mut out = vec![(layout.embed.clone(), host(&d.embed))];
    for (b, l) in d.blocks.iter().zip(&layout.blocks) {
        write_norm(&b.ln1, &l.ln1, &mut out);
        write_norm(&b.ln2, &l.ln2, &mut out);
        write_linear(&b.qkv, &l.qkv, &mut out);
        write_linear(&b.o, &l.o, &mut out);
        write_linear(&b.mlp_in, &l.mlp_in, &mut out);
        write_linear(&b.mlp_out, &l.mlp_out, &mut out);
    }
    write_norm(&d.final_norm, &layout.final_norm, &mut out);
    if let Some(w) = &d.lm_head {
        out.push((layout.lm_head.clone(), host(w).transpose2()));
    }
    out
}

struct Reader<'a> {
    files: &'a mut WeightFiles,
    device: &'a Device,
}

impl Source for Reader<'_> {
    fn embed(&mut self, name: &str, shape: [usize; 2]) -> Result<HostTensor> {
        self.files.take(name, &shape)
    }

    fn lm_head(&mut self, name: &str, vocab_hidden: [usize; 2]) -> Result<HostTensor> {
        Ok(self.files.take(name, &vocab_hidden)?.transpose2())
    }

    fn tied_lm_head(&mut self, name: &str) {
        self.files.skip(name);
    }

    /// Reads the parts `[out_i, in]`, stacks them along `out`, reorders the rows by `perm`
    /// (when given) and returns the `[in, out]` linear.
    fn linear(&mut self, l: &LinearLayout) -> Result<Linear> {
        let (total, in_dim, has_bias) = (l.out_dim(), l.in_dim, l.has_bias());
        let mut w = Vec::with_capacity(total * in_dim);
        let mut b = Vec::with_capacity(total);
        for p in &l.parts {
            w.extend(self.files.take(&p.weight, &[p.out, in_dim])?.data);
            if let Some(bn) = &p.bias {
                b.extend(self.files.take(bn, &[p.out])?.data);
            }
        }
        let (w, b) = match &l.perm {
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
        Ok(Linear::from_host(weight, bias, self.device))
    }

    fn norm(&mut self, n: &NormLayout) -> Result<Norm> {
        let weight = param1(self.files.take(&n.weight, &[n.dim])?, self.device);
        let bias = match &n.bias {
            Some(b) => Some(param1(self.files.take(b, &[n.dim])?, self.device)),
            None => None,
        };
        Ok(Norm {
            weight,
            bias,
            eps: n.eps,
            rms: n.rms,
        })
    }
}

/// The inverse of reading a linear: pushes its parts' Hugging Face tensors.
fn write_linear(lin: &Linear, l: &LinearLayout, out: &mut Vec<(String, HostTensor)>) {
    let w = host(&lin.weight).transpose2(); // [total, in]
    let [total, in_dim] = [w.shape[0], w.shape[1]];
    let b = lin.bias.as_ref().map(host);
    // Undo the permutation: stored row perm[r] = decoder row r.
    let (w, b) = match &l.perm {
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
    for p in &l.parts {
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

/// Pushes a norm's tensors.
fn write_norm(norm: &Norm, l: &NormLayout, out: &mut Vec<(String, HostTensor)>) {
    out.push((l.weight.clone(), host(&norm.weight)));
    if let (Some(b), Some(name)) = (&norm.bias, &l.bias) {
        out.push((name.clone(), host(b)));
    }
}

/// Seeded source of fresh weights (host-side, so every backend gets the same numbers).
pub struct Init {
    rng: StdRng,
    std: f32,
    device: Device,
}

impl Init {
    /// A generator of `N(0, std)` weights seeded by `seed`, for parameters on `device`.
    pub fn new(seed: u64, std: f64, device: &Device) -> Self {
        Init {
            rng: StdRng::seed_from_u64(seed),
            std: std as f32,
            device: device.clone(),
        }
    }

    /// Normal draws (Box-Muller) filling `shape`.
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
}

impl Source for Init {
    fn embed(&mut self, _: &str, shape: [usize; 2]) -> Result<HostTensor> {
        Ok(self.normal(shape.to_vec()))
    }

    fn lm_head(&mut self, _: &str, [vocab, hidden]: [usize; 2]) -> Result<HostTensor> {
        Ok(self.normal(vec![hidden, vocab]))
    }

    fn tied_lm_head(&mut self, _: &str) {}

    /// Normal weight drawn in the decoder's `[in, out]` order, zero bias, as transformers
    /// initializes.
    fn linear(&mut self, l: &LinearLayout) -> Result<Linear> {
        let out = l.out_dim();
        let w = self.normal(vec![l.in_dim, out]);
        let b = l
            .has_bias()
            .then(|| HostTensor::new(vec![out], vec![0.0; out]));
        Ok(Linear::from_host(w, b, &self.device))
    }

    /// Ones, and zero bias for LayerNorm.
    fn norm(&mut self, n: &NormLayout) -> Result<Norm> {
        let filled = |v: f32| HostTensor::new(vec![n.dim], vec![v; n.dim]);
        Ok(Norm {
            weight: param1(filled(1.0), &self.device),
            bias: n.bias.as_ref().map(|_| param1(filled(0.0), &self.device)),
            eps: n.eps,
            rms: n.rms,
        })
    }
}
