//! The one path between a [`Layout`] and the decoder, for every family and both heads (a causal
//! LM's output projection, a reward model's score): loading Hugging Face tensors (`[out, in]`
//! linears, separate or interleaved projections) into the decoder's fused `[in, out]`
//! parameters, exporting them back, and drawing fresh seeded weights.

use anyhow::Result;
use burn::tensor::Device;
use rand::{Rng, SeedableRng, rngs::StdRng};

use super::config::ModelConfig;
use super::layout::{Head, Layout, LinearLayout, NormLayout};
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
    /// A reward model's score, stored `[num_labels, hidden]`, in the decoder's
    /// `[hidden, num_labels]`.
    fn score(&mut self, name: &str, labels_hidden: [usize; 2]) -> Result<HostTensor>;
    /// A decoder linear.
    fn linear(&mut self, l: &LinearLayout) -> Result<Linear>;
    /// A norm.
    fn norm(&mut self, n: &NormLayout) -> Result<Norm>;
}

/// The decoder (its `lm_head` `None` for a reward model) and, for a reward model, its score.
fn build(
    c: &ModelConfig,
    layout: &Layout,
    src: &mut impl Source,
    device: &Device,
) -> Result<(Decoder, Option<Linear>)> {
    // Validates the config, so that the layout's sizes are sane.
    let spec = Spec::from_config(c)?;
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
    let (lm_head, score) = match &layout.head {
        Head::LmHead { name, tied: true } => {
            src.tied_lm_head(name);
            (None, None)
        }
        Head::LmHead { name, tied: false } => (
            Some(param2(src.lm_head(name, layout.vocab_hidden)?, device)),
            None,
        ),
        Head::Score { name, num_labels } => {
            let w = src.score(name, [*num_labels, layout.vocab_hidden[1]])?;
            (None, Some(Linear::from_host(w, None, device)))
        }
    };
    let decoder = Decoder {
        embed,
        blocks,
        final_norm,
        lm_head,
        spec,
    };
    Ok((decoder, score))
}

/// Loads a causal LM's decoder from Hugging Face tensors. Every tensor of the layout must be
/// there with its shape, and no other (recomputed buffers aside); errors name the tensor and
/// the shapes.
pub fn load(c: &ModelConfig, files: &mut WeightFiles, device: &Device) -> Result<Decoder> {
    Ok(load_layout(c, &Layout::new(c), files, device)?.0)
}

/// Loads a reward model (`*ForSequenceClassification`): its decoder (without LM head) and its
/// score `[hidden, num_labels]`, by the same rules as [`load`].
pub fn load_reward(
    c: &ModelConfig,
    num_labels: usize,
    files: &mut WeightFiles,
    device: &Device,
) -> Result<(Decoder, Linear)> {
    let (decoder, score) = load_layout(c, &Layout::reward(c, num_labels), files, device)?;
    Ok((decoder, score.expect("a reward layout has a score")))
}

fn load_layout(
    c: &ModelConfig,
    layout: &Layout,
    files: &mut WeightFiles,
    device: &Device,
) -> Result<(Decoder, Option<Linear>)> {
    let built = build(c, layout, &mut Reader { files, device }, device)?;
    files.finish(|name| layout.ignorable(name))?;
    Ok(built)
}

/// A fresh decoder with weights drawn from `N(0, initializer_range)` seeded by `seed` (norms
/// one, biases zero), in the order of the layout.
pub fn init(c: &ModelConfig, device: &Device, seed: u64) -> Result<Decoder> {
    let mut init = Init::new(seed, c.initializer_range, device);
    Ok(build(c, &Layout::new(c), &mut init, device)?.0)
}

/// A fresh reward-model score `[hidden, num_labels]`, drawn as transformers' `_init_weights`
/// draws a linear (`N(0, initializer_range)`, no bias), seeded by `seed`, host-side (the same
/// numbers on every backend).
pub fn init_score(c: &ModelConfig, num_labels: usize, device: &Device, seed: u64) -> Linear {
    let w = Init::new(seed, c.initializer_range, device).normal(vec![num_labels, c.hidden_size]);
    Linear::from_host(w.transpose2(), None, device)
}

/// The Hugging Face tensors of a causal LM's decoder, in the layout's order.
pub fn export(c: &ModelConfig, d: &Decoder) -> Vec<(String, HostTensor)> {
    export_layout(&Layout::new(c), d, None)
}

/// The Hugging Face tensors of a reward model, in the layout's order (`score.weight` last).
pub fn export_reward(c: &ModelConfig, d: &Decoder, score: &Linear) -> Vec<(String, HostTensor)> {
    let num_labels = score.weight.val().dims()[1];
    export_layout(&Layout::reward(c, num_labels), d, Some(score))
}

fn export_layout(
    layout: &Layout,
    d: &Decoder,
    score: Option<&Linear>,
) -> Vec<(String, HostTensor)> {
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
    match (&layout.head, &d.lm_head, score) {
        (Head::LmHead { name, .. }, Some(w), _) => out.push((name.clone(), host(w).transpose2())),
        (Head::Score { name, .. }, _, Some(s)) => {
            out.push((name.clone(), host(&s.weight).transpose2()))
        }
        _ => {}
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

    fn score(&mut self, name: &str, labels_hidden: [usize; 2]) -> Result<HostTensor> {
        Ok(self.files.take(name, &labels_hidden)?.transpose2())
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

    fn score(&mut self, _: &str, labels_hidden: [usize; 2]) -> Result<HostTensor> {
        Ok(self.normal(labels_hidden.to_vec()).transpose2())
    }

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
