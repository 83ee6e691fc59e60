//! The decoder shared by every family: embeddings, pre-norm blocks (RMSNorm or LayerNorm),
//! rotary attention with grouped-query heads, gated (SwiGLU) or plain MLP, sequential or
//! parallel residuals, final norm and LM head.
//!
//! Layout choices (`weights.rs` translates to and from Hugging Face's, see `layout.rs`):
//! - linear weights are stored `[in, out]` (burn's layout, so `linear` needs no transpose);
//! - q, k and v are one fused projection, columns ordered `[q heads | k heads | v heads]`;
//! - the gated MLP's gate and up projections are one fused projection `[gate | up]`.

use burn::module::{Module, Param};
use burn::tensor::activation::{gelu, gelu_approximate, relu, silu};
use burn::tensor::module::{attention, attention_fallback, embedding, layer_norm, linear};
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, Device, FloatDType, Int, Tensor, TensorData};

use super::config::{Activation, ModelConfig};
use super::precision::Precision;
use super::rope::rope_inv_freq;
use super::safetensors_io::HostTensor;

/// A linear layer, weight `[in, out]`.
#[derive(Module, Debug)]
pub struct Linear {
    /// `[in, out]`.
    pub weight: Param<Tensor<2>>,
    /// `[out]`.
    pub bias: Option<Param<Tensor<1>>>,
}

impl Linear {
    /// `x @ weight + bias`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.forward_as(x, None)
    }

    /// `x @ weight + bias` computed in `dtype` (inputs and parameters cast down, the result
    /// left in `dtype`), or in f32 when `None`: see [`super::precision`].
    pub fn forward_as<const D: usize>(&self, x: Tensor<D>, dtype: Option<FloatDType>) -> Tensor<D> {
        matmul_rows(
            x,
            self.weight.val(),
            self.bias.as_ref().map(|b| b.val()),
            dtype,
        )
    }

    /// From host tensors (`weight` already `[in, out]`).
    pub fn from_host(weight: HostTensor, bias: Option<HostTensor>, device: &Device) -> Self {
        Linear {
            weight: param2(weight, device),
            bias: bias.map(|b| param1(b, device)),
        }
    }
}

/// RMSNorm (llama family) or LayerNorm (gpt_neox).
#[derive(Module, Debug)]
pub struct Norm {
    /// Scale.
    pub weight: Param<Tensor<1>>,
    /// Shift (LayerNorm only).
    pub bias: Option<Param<Tensor<1>>>,
    /// Epsilon.
    pub eps: f64,
    /// RMSNorm when true.
    pub rms: bool,
}

impl Norm {
    /// Normalizes over the last dimension, as Hugging Face does (f32 statistics; RMSNorm:
    /// `weight * (x * rsqrt(mean(x^2) + eps))`).
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        if self.rms {
            // One operation with its own backward on flex (super::rms_norm).
            if let Some(y) = super::rms_norm::rms_norm(x.clone(), self.weight.val(), self.eps) {
                return y;
            }
            let var = x.clone().square().mean_dim(D - 1);
            let inv = (var + self.eps).sqrt().recip();
            (x * inv) * self.weight.val().unsqueeze()
        } else {
            layer_norm(
                x,
                self.weight.val(),
                self.bias.as_ref().map(|b| b.val()),
                self.eps,
            )
        }
    }
}

/// One transformer block.
#[derive(Module, Debug)]
pub struct Block {
    /// Norm before attention (`input_layernorm`).
    pub ln1: Norm,
    /// Norm before the MLP (`post_attention_layernorm`).
    pub ln2: Norm,
    /// Fused q/k/v projection, `[hidden, (heads + 2 kv_heads) * head_dim]`.
    pub qkv: Linear,
    /// Attention output projection.
    pub o: Linear,
    /// MLP input: fused `[gate | up]` when gated, else `dense_h_to_4h`.
    pub mlp_in: Linear,
    /// MLP output.
    pub mlp_out: Linear,
}

/// Static shape and numerics of a decoder (not parameters).
#[derive(Debug, Clone)]
pub struct Spec {
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// Rotated channels per head.
    pub rot_dim: usize,
    /// Rotary inverse frequencies, `rot_dim / 2` of them (f32, as transformers computes them).
    pub inv_freq: Vec<f32>,
    /// MLP activation.
    pub act: Activation,
    /// Gated (SwiGLU-style) MLP.
    pub gated: bool,
    /// MLP width.
    pub intermediate: usize,
    /// Parallel residual (gpt_neox).
    pub parallel_residual: bool,
    /// Sliding attention window.
    pub window: Option<usize>,
    /// Precision of the matrix products (f32, or mixed bf16/f16; set after loading).
    pub precision: Precision,
}

impl Spec {
    /// The spec of a config.
    pub fn from_config(c: &ModelConfig) -> anyhow::Result<Spec> {
        c.validate()?;
        let family = c.architecture.family();
        let rot_dim = c.rotary_dim();
        Ok(Spec {
            n_heads: c.num_attention_heads,
            n_kv: c.num_kv_heads(),
            head_dim: c.head_dim(),
            rot_dim,
            inv_freq: rope_inv_freq(rot_dim, c.rope_theta, c.rope_scaling.as_ref()),
            act: c.activation()?,
            gated: family.gated_mlp(),
            intermediate: c.intermediate_size(),
            parallel_residual: family.parallel_residual && c.use_parallel_residual,
            window: c.attention_window(),
            precision: Precision::F32,
        })
    }
}

/// Keys and values of past positions, one entry per block (before GQA repetition).
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    /// Number of cached positions.
    pub len: usize,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }
}

/// The decoder.
#[derive(Module, Debug)]
pub struct Decoder {
    /// Token embeddings `[vocab, hidden]`.
    pub embed: Param<Tensor<2>>,
    /// Blocks.
    pub blocks: Vec<Block>,
    /// Final norm.
    pub final_norm: Norm,
    /// Output projection `[hidden, vocab]`; `None` when tied to `embed`.
    pub lm_head: Option<Param<Tensor<2>>>,
    /// Shapes and numerics.
    #[module(skip)]
    pub spec: Spec,
}

impl Decoder {
    /// Hidden states after the final norm, `[batch, seq, hidden]`. With a cache, the inputs
    /// continue the cached positions and the cache is extended.
    pub fn forward_hidden(&self, ids: Tensor<2, Int>, cache: Option<&mut KvCache>) -> Tensor<3> {
        self.forward_hidden_padded(ids, cache, None)
    }

    /// [`Decoder::forward_hidden`] for a left-padded batch: row `b` starts with `left_pad[b]`
    /// padding tokens. Each row's real tokens get positions from 0 (transformers'
    /// `position_ids = cumsum(attention_mask) - 1`) and never attend to its padding, so a row's
    /// hidden states are those of the row alone. A padding position attends only to itself (a
    /// query with every key masked would make NaN that the masked weights could not cancel).
    pub fn forward_hidden_padded(
        &self,
        ids: Tensor<2, Int>,
        mut cache: Option<&mut KvCache>,
        left_pad: Option<&[usize]>,
    ) -> Tensor<3> {
        let seq = ids.dims()[1];
        let device = ids.device();
        let past = cache.as_ref().map_or(0, |c| c.len);
        let sp = &self.spec;
        let mut x = embedding(self.embed.val(), ids);
        let ((cos, sin), mask) = match left_pad {
            Some(pads) => (
                self.rope_tables_padded(past, seq, pads, &device),
                Some(padding_mask(past, seq, pads, sp.window, &device)),
            ),
            None => (
                self.rope_tables(past, seq, &device),
                sp.window.and_then(|w| window_mask(past, seq, w, &device)),
            ),
        };
        if let Some(c) = cache.as_deref_mut()
            && c.layers.len() != self.blocks.len()
        {
            c.layers = vec![None; self.blocks.len()];
        }
        let (nh, nkv) = (sp.n_heads, sp.n_kv);
        let dt = sp.precision.compute_dtype();
        // A plain causal product in f32 on flex (training, score, reference log-probs, evaluate
        // prompts): the whole layer from the q/k/v projection as one operation with its own
        // backward (super::attention::qkv), with the tables `[seq, rot]`.
        // With a cache and no gradient, the same layer continuing the cache
        // (super::attention::inference::qkv_cached): scoring's shared prompts, generation.
        let fused = (mask.is_none() && self.fuses_attention(&device, cache.is_some())).then(|| {
            let table = |t: &Tensor<4>| t.clone().reshape([seq, sp.rot_dim]);
            (table(&cos), table(&sin))
        });
        for (li, blk) in self.blocks.iter().enumerate() {
            let h = blk.ln1.forward(x.clone());
            // Rotary embeddings and the cache stay f32 (autocast promotes q/k to f32 there).
            let qkv = to_f32(blk.qkv.forward_as(h, dt));
            let att = match (&fused, cache.as_deref_mut()) {
                (Some((cos, sin)), None) => {
                    super::attention::qkv::attention(qkv, cos, sin, nh, nkv)
                }
                (Some((cos, sin)), Some(c)) => super::attention::inference::qkv_cached(
                    qkv,
                    cos,
                    sin,
                    nh,
                    nkv,
                    &mut c.layers[li],
                ),
                (None, _) => self.composed_attention(
                    li,
                    qkv,
                    (&cos, &sin),
                    cache.as_deref_mut(),
                    mask.as_ref(),
                    past,
                ),
            };
            // The residual stream stays f32: a low-precision projection is added to it in f32.
            let a = to_f32(blk.o.forward_as(att, dt));
            if sp.parallel_residual {
                let m = self.mlp(blk, blk.ln2.forward(x.clone()));
                x = x + a + m;
            } else {
                x = x + a;
                let m = self.mlp(blk, blk.ln2.forward(x.clone()));
                x = x + m;
            }
        }
        if let Some(c) = cache {
            c.len += seq;
        }
        self.final_norm.forward(x)
    }

    /// Whether an unmasked forward on `device` (continuing a cache when `cached`) runs each
    /// attention layer as one fused operation (super::attention::qkv, or
    /// super::attention::inference::qkv_cached with a cache): f32 compute, rotary embeddings, a
    /// backend and head width with the kernel, and a cache only without gradients.
    pub(crate) fn fuses_attention(&self, device: &Device, cached: bool) -> bool {
        let sp = &self.spec;
        sp.precision.compute_dtype().is_none()
            && sp.rot_dim > 0
            && (!cached || !device.is_autodiff())
            && super::attention::qkv::usable(device, sp.head_dim)
    }

    /// Block `li`'s attention output `[batch, seq, heads * head_dim]` from its q/k/v projection,
    /// composed from burn's ops: the split into heads, the rotary embedding with the tables
    /// `(cos, sin)`, the cache (extended by these positions), key/value heads repeated, and
    /// [`attend`] in the compute precision. Every forward that [`super::attention::qkv`] and
    /// [`super::attention::inference::qkv_cached`] do not take (a mask, mixed precision, a cache
    /// under autodiff, a backend or head width without the kernel).
    fn composed_attention(
        &self,
        li: usize,
        qkv: Tensor<3>,
        (cos, sin): (&Tensor<4>, &Tensor<4>),
        cache: Option<&mut KvCache>,
        mask: Option<&Tensor<4, Bool>>,
        past: usize,
    ) -> Tensor<3> {
        let sp = &self.spec;
        let (nh, nkv, hd) = (sp.n_heads, sp.n_kv, sp.head_dim);
        let [batch, seq, _] = qkv.dims();
        let dt = sp.precision.compute_dtype();
        let q = qkv
            .clone()
            .slice_dim(2, 0..nh * hd)
            .reshape([batch, seq, nh, hd])
            .swap_dims(1, 2);
        let k = qkv
            .clone()
            .slice_dim(2, nh * hd..(nh + nkv) * hd)
            .reshape([batch, seq, nkv, hd])
            .swap_dims(1, 2);
        let v = qkv
            .slice_dim(2, (nh + nkv) * hd..(nh + 2 * nkv) * hd)
            .reshape([batch, seq, nkv, hd])
            .swap_dims(1, 2);
        let q = apply_rope(q, cos, sin, sp.rot_dim);
        let mut k = apply_rope(k, cos, sin, sp.rot_dim);
        let mut v = v;
        if let Some(c) = cache {
            if let Some((pk, pv)) = c.layers[li].take() {
                k = Tensor::cat(vec![pk, k], 2);
                v = Tensor::cat(vec![pv, v], 2);
            }
            c.layers[li] = Some((k.clone(), v.clone()));
        }
        let (k, v) = (repeat_kv(k, nh / nkv), repeat_kv(v, nh / nkv));
        let (q, k, v) = (cast(q, dt), cast(k, dt), cast(v, dt));
        let att = attend(q, k, v, mask, past);
        att.swap_dims(1, 2).reshape([batch, seq, nh * hd])
    }

    /// The MLP; under mixed precision its activation and gate product run on the
    /// low-precision projection outputs (as in transformers under autocast), its output is f32.
    fn mlp(&self, blk: &Block, x: Tensor<3>) -> Tensor<3> {
        let sp = &self.spec;
        let dt = sp.precision.compute_dtype();
        let h = blk.mlp_in.forward_as(x, dt);
        // SwiGLU in f32: one operation with its own backward (super::swiglu).
        let fused = (sp.gated && sp.act == Activation::Silu)
            .then(|| super::swiglu::swiglu(&h))
            .flatten();
        let h = if let Some(out) = fused {
            out
        } else if sp.gated {
            let i = sp.intermediate;
            let gate = h.clone().slice_dim(2, 0..i);
            let up = h.slice_dim(2, i..2 * i);
            activate(gate, sp.act) * up
        } else {
            activate(h, sp.act)
        };
        to_f32(blk.mlp_out.forward_as(h, dt))
    }

    /// Logits `[batch, seq, vocab]` of hidden states, always f32 (under mixed precision the
    /// product runs in the low precision and is cast up before any softmax, as transformers'
    /// loss does with `logits.float()`).
    pub fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        let dt = self.spec.precision.compute_dtype();
        let w = match &self.lm_head {
            Some(w) => w.val(),
            None => self.embed.val().transpose(),
        };
        to_f32(matmul_rows(hidden, w, None, dt))
    }

    /// The compute precision of the matrix products.
    pub fn precision(&self) -> Precision {
        self.spec.precision
    }

    /// Sets the compute precision of the matrix products (parameters stay f32).
    pub fn set_precision(&mut self, precision: Precision) {
        self.spec.precision = precision;
    }

    /// `cos` and signed `sin` tables `[1, 1, len, rot_dim]` for positions `start..start+len`:
    /// `rope(x) = x * cos + swap_halves(x) * sin_signed`, which is Hugging Face's
    /// `x * cos + rotate_half(x) * sin` term for term.
    fn rope_tables(&self, start: usize, len: usize, device: &Device) -> (Tensor<4>, Tensor<4>) {
        let positions: Vec<usize> = (start..start + len).collect();
        self.rope_tables_at(&positions, 1, len, device)
    }

    /// Per-row tables `[batch, 1, len, rot_dim]` for a left-padded batch: row `b`'s position
    /// `p` is `p - left_pad[b]` (0 on its padding).
    fn rope_tables_padded(
        &self,
        start: usize,
        len: usize,
        pads: &[usize],
        device: &Device,
    ) -> (Tensor<4>, Tensor<4>) {
        let positions: Vec<usize> = pads
            .iter()
            .flat_map(|&pad| (start..start + len).map(move |p| p.saturating_sub(pad)))
            .collect();
        self.rope_tables_at(&positions, pads.len(), len, device)
    }

    /// `cos` and signed `sin` tables `[rows, 1, len, rot_dim]` for `positions` (`rows * len`).
    fn rope_tables_at(
        &self,
        positions: &[usize],
        rows: usize,
        len: usize,
        device: &Device,
    ) -> (Tensor<4>, Tensor<4>) {
        let inv = &self.spec.inv_freq;
        let half = inv.len();
        let rot = 2 * half;
        let mut cos = Vec::with_capacity(positions.len() * rot);
        let mut sin = Vec::with_capacity(positions.len() * rot);
        for &p in positions {
            let pos = p as f32;
            let freqs: Vec<f32> = inv.iter().map(|f| pos * f).collect();
            let c: Vec<f32> = freqs.iter().map(|&f| (f as f64).cos() as f32).collect();
            let s: Vec<f32> = freqs.iter().map(|&f| (f as f64).sin() as f32).collect();
            cos.extend_from_slice(&c);
            cos.extend_from_slice(&c);
            sin.extend(s.iter().map(|v| -v));
            sin.extend_from_slice(&s);
        }
        let cos = Tensor::<4>::from_data(TensorData::new(cos, [rows, 1, len, rot]), device);
        let sin = Tensor::<4>::from_data(TensorData::new(sin, [rows, 1, len, rot]), device);
        (cos, sin)
    }
}

/// `x @ w + b` as one `[rows, in] @ [in, out]` matmul over all leading dimensions (burn's
/// `linear` may instead run one matmul per batch row, which is much slower on flex), in `dt`
/// when given (operands cast down, result left in `dt`).
fn matmul_rows<const D: usize>(
    x: Tensor<D>,
    w: Tensor<2>,
    b: Option<Tensor<1>>,
    dt: Option<FloatDType>,
) -> Tensor<D> {
    let (x, w, b) = (cast(x, dt), cast(w, dt), b.map(|b| cast(b, dt)));
    let dims = x.dims();
    let d_in = dims[D - 1];
    let d_out = w.dims()[1];
    let rows = dims[..D - 1].iter().product::<usize>();
    let x: Tensor<2> = x.reshape([rows, d_in]);
    // Without gradients on flex, gemm straight into the output buffer (`super::matmul`).
    let fast = match &b {
        None => super::matmul::matmul(&x, &w),
        Some(_) => None,
    };
    let y = fast.unwrap_or_else(|| linear(x, w, b));
    let mut out = dims;
    out[D - 1] = d_out;
    y.reshape(out)
}

/// Scaled dot-product attention of `q` `[b, h, s, d]` over `k`, `v` `[b, h, past + s, d]`,
/// causal (query `i` sits at position `past + i`), or under an explicit `mask` (true = masked).
///
/// A square causal product goes through [`super::attention::causal_attention`] (fused forward
/// and backward); burn's fused `attention` serves one query (which sees every key), and a
/// masked product (padding, sliding window) on LibTorch without gradients, with the mask
/// complemented. LibTorch's fused kernel aligns `is_causal` top-left, so continuing a cache with
/// several tokens, and masks under autodiff, take burn's reference implementation, which is
/// bottom-right aligned with true = masked on every backend.
fn attend(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: Option<&Tensor<4, Bool>>,
    past: usize,
) -> Tensor<4> {
    // No-grad forwards on flex (score, reference log-probs, evaluate, generation): the kernel
    // crate's causal attention, over each query's visible keys only.
    if mask.is_none()
        && let Some(out) = super::attention::inference::causal(&q, &k, &v, past)
    {
        return out;
    }
    let [batch, heads, seq, _] = q.dims();
    let opts = |is_causal| AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal,
    };
    match mask {
        Some(m) => {
            let [_, _, sq, sk] = m.dims();
            let m = m.clone().expand([batch, heads, sq, sk]);
            // Batched generation (left padding, a cache) on LibTorch: its fused kernel, handed
            // the complement of the mask, since it reads a bool mask as torch does (true =
            // attend). Without gradients only: burn's autodiff composes attention itself and
            // reads the mask burn's way.
            let device = q.device();
            if !device.is_autodiff() && crate::device::device_name(&device).starts_with("tch") {
                return attention(q, k, v, Some(m.bool_not()), None, opts(false));
            }
            attention_fallback(q, k, v, Some(m), None, opts(false))
        }
        None if seq == 1 => attention(q, k, v, None, None, opts(false)),
        // The training forward and every full-sequence forward: one fused operation with its
        // own backward (super::attention), not burn's composed attention under autodiff.
        None if past == 0 => super::attention::causal_attention(q, k, v),
        None => attention_fallback(q, k, v, None, None, opts(true)),
    }
}

/// `x` in `dt`, or unchanged when `None` (f32 compute: no cast at all).
fn cast<const D: usize>(x: Tensor<D>, dt: Option<FloatDType>) -> Tensor<D> {
    match dt {
        Some(dt) => x.cast(dt),
        None => x,
    }
}

/// `x` back in f32 (untouched when it already is, so the f32 path gains no graph nodes).
pub(crate) fn to_f32<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if x.dtype() == DType::F32 {
        x
    } else {
        x.cast(FloatDType::F32)
    }
}

fn activate<const D: usize>(x: Tensor<D>, act: Activation) -> Tensor<D> {
    match act {
        Activation::Silu => silu(x),
        Activation::Gelu => gelu(x),
        Activation::GeluTanh => gelu_approximate(x),
        Activation::Relu => relu(x),
    }
}

/// Rotates the first `rot` channels of `x` `[batch, heads, seq, head_dim]`.
fn apply_rope(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>, rot: usize) -> Tensor<4> {
    let hd = x.dims()[3];
    if rot == 0 {
        return x;
    }
    let half = rot / 2;
    let rope = |x: Tensor<4>| {
        let x1 = x.clone().slice_dim(3, 0..half);
        let x2 = x.clone().slice_dim(3, half..rot);
        let swapped = Tensor::cat(vec![x2, x1], 3);
        x * cos.clone() + swapped * sin.clone()
    };
    if rot == hd {
        rope(x)
    } else {
        let x_rot = x.clone().slice_dim(3, 0..rot);
        let x_pass = x.slice_dim(3, rot..hd);
        Tensor::cat(vec![rope(x_rot), x_pass], 3)
    }
}

/// Repeats each key/value head `rep` times: `[b, kv, s, d]` -> `[b, kv * rep, s, d]`.
fn repeat_kv(x: Tensor<4>, rep: usize) -> Tensor<4> {
    if rep == 1 {
        return x;
    }
    let [b, kv, s, d] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, kv, rep, s, d])
        .reshape([b, kv * rep, s, d])
}

/// Causal sliding-window mask `[1, 1, len, start + len]` (true = masked), or `None` when the
/// window covers every position (plain causal masking is then exact).
fn window_mask(
    start: usize,
    len: usize,
    window: usize,
    device: &Device,
) -> Option<Tensor<4, Bool>> {
    let total = start + len;
    if total <= window {
        return None;
    }
    let mut m = Vec::with_capacity(len * total);
    for qi in 0..len {
        let q = start + qi;
        for k in 0..total {
            m.push(k > q || q - k >= window);
        }
    }
    Some(Tensor::<4, Bool>::from_data(
        TensorData::new(m, [1, 1, len, total]),
        device,
    ))
}

/// The attention mask of a left-padded batch, `[batch, 1, len, start + len]` (true = masked):
/// causal, a row's padding keys hidden from its real queries, a padding query sees only itself,
/// and a sliding window when the model has one (on positions relative to the row's start).
fn padding_mask(
    start: usize,
    len: usize,
    pads: &[usize],
    window: Option<usize>,
    device: &Device,
) -> Tensor<4, Bool> {
    let total = start + len;
    let mut m = Vec::with_capacity(pads.len() * len * total);
    for &pad in pads {
        for qi in 0..len {
            let q = start + qi;
            for k in 0..total {
                let masked = if q < pad {
                    k != q
                } else {
                    k > q || k < pad || window.is_some_and(|w| q - k >= w)
                };
                m.push(masked);
            }
        }
    }
    Tensor::<4, Bool>::from_data(TensorData::new(m, [pads.len(), 1, len, total]), device)
}

/// A 2-D parameter from a host tensor.
pub fn param2(t: HostTensor, device: &Device) -> Param<Tensor<2>> {
    let shape = [t.shape[0], t.shape[1]];
    Param::from_tensor(Tensor::from_data(TensorData::new(t.data, shape), device))
}

/// A 1-D parameter from a host tensor.
pub fn param1(t: HostTensor, device: &Device) -> Param<Tensor<1>> {
    let shape = [t.shape[0]];
    Param::from_tensor(Tensor::from_data(TensorData::new(t.data, shape), device))
}

/// A parameter's values on the host.
pub fn host<const D: usize>(p: &Param<Tensor<D>>) -> HostTensor {
    let t = p.val();
    let shape = t.dims().to_vec();
    let data = t
        .try_into_vec_as::<f32>()
        .expect("reading a parameter back from the device");
    HostTensor::new(shape, data)
}
