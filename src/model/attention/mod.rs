//! Causal self-attention as one differentiable operation with its own backward pass (a burn
//! backend extension), for the training forward and every no-grad forward of a square causal
//! product (no cache, no mask).
//!
//! burn 0.22's autodiff decorator has no attention of its own: it composes every backend's
//! attention from matmul, mask, softmax and matmul, so a training step keeps `[batch, heads, seq,
//! seq]` scores and probabilities for the backward pass and LibTorch's fused kernels (flash /
//! memory-efficient SDPA on CUDA) never run while training. Here the forward is the backend's
//! fused attention, nothing of size `seq x seq` is kept, and the backward recomputes what it needs
//! from q, k and v:
//! - LibTorch: `scaled_dot_product_attention(is_causal)` forward; the backward replays it under
//!   torch's own autograd, so torch's fused backward kernel computes the gradients;
//! - Flex: the kernel crate's causal attention (`sepo_kernels`: vectorized, only the keys each
//!   query sees, flash-style online softmax) forward and backward, which recomputes the
//!   probabilities row by row from the forward's log-denominators; where the kernel does not
//!   apply (not f32, an odd head width, a CPU without AVX2 + FMA), burn-flex's attention and the
//!   softmax-attention gradient written out on recomputed probabilities.
//!
//! Both are checked against burn's decomposed attention (values and gradients) in the tests below.
//! [`inference`] is the flex kernel for no-grad forwards that continue a KV cache; [`qkv`] is the
//! whole layer from the fused q/k/v projection (split, rotary embedding, attention) on flex,
//! which the decoder takes wherever it applies.

// burn 0.22 marks its LibTorch types deprecated (burn-tch is on its way out); sepo still uses them
// for CUDA, as src/device.rs does.
#![allow(deprecated)]

pub(crate) mod inference;
pub(crate) mod qkv;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, backend_extension};
use burn::tensor::Tensor;

/// Causal scaled-dot-product attention with its gradient, per backend.
#[backend_extension(Flex: cfg(feature = "flex"), LibTorch: cfg(feature = "tch"), Autodiff)]
pub trait CausalAttention: Backend {
    /// `softmax(q k^T * scale, causal) v` for `q`, `k`, `v` of shape `[batch, heads, seq, dim]`
    /// (key/value heads already repeated to the query heads).
    fn causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self>;

    /// The gradients `(dq, dk, dv)` of [`CausalAttention::causal_attention`] for the output
    /// gradient `dout`, recomputing the forward's intermediates.
    fn causal_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        dout: FloatTensor<Self>,
        scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// [`CausalAttention::causal_attention`] on burn tensors (any device sepo builds, with or without
/// autodiff).
pub fn causal_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    let scale = 1.0 / (q.dims()[3] as f64).sqrt();
    Tensor::from_dispatch(<Dispatch as CausalAttention>::causal_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        scale,
    ))
}

#[cfg(feature = "flex")]
impl CausalAttention for burn::backend::Flex {
    fn causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        if let Some(shape) = flex_kernel::shape(&q, &k, &v, scale) {
            let [q, k, v] = [&q, &k, &v].map(|t| t.to_contiguous());
            let (out, _) =
                sepo_kernels::causal_attention_lse(q.storage(), k.storage(), v.storage(), shape);
            return flex_kernel::tensor(out, q.layout().shape().clone());
        }
        use burn::backend::ops::ModuleOps;
        let opts = burn::tensor::ops::AttentionModuleOptions {
            scale: Some(scale),
            softcap: None,
            is_causal: true,
        };
        Self::attention(q, k, v, None, None, opts)
    }

    fn causal_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        dout: FloatTensor<Self>,
        scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        if let Some(shape) = flex_kernel::shape(&q, &k, &v, scale)
            && dout.dtype() == burn::tensor::DType::F32
        {
            // The forward again, for its output and log-denominators (cheaper than keeping
            // them: a third of the backward's work), then the kernel's gradient.
            let [q, k, v, dout] = [&q, &k, &v, &dout].map(|t| t.to_contiguous());
            let (qs, ks, vs) = (q.storage(), k.storage(), v.storage());
            let (out, lse) = sepo_kernels::causal_attention_lse(qs, ks, vs, shape);
            let (dq, dk, dv) = sepo_kernels::causal_attention_backward(
                qs,
                ks,
                vs,
                &out,
                dout.storage(),
                &lse,
                shape,
            );
            let to = |x: Vec<f32>, like: &FloatTensor<Self>| {
                flex_kernel::tensor(x, like.layout().shape().clone())
            };
            return (to(dq, &q), to(dk, &k), to(dv, &v));
        }
        recomputed_backward::<Self>(q, k, v, dout, scale)
    }
}

/// The kernel crate's attention on flex tensors (`sepo_kernels`: vectorized, optimized in
/// every profile, only the keys each query sees).
#[cfg(feature = "flex")]
mod flex_kernel {
    use burn::backend::TensorMetadata;
    use burn::backend::flex::FlexTensor;
    use burn::tensor::{DType, TensorData};

    /// The kernel's shape for `q`, `k`, `v` `[batch, heads, seq, d]` (key/value heads already
    /// repeated), or `None` where it does not apply: not f32, a head width it has no kernel
    /// for, a CPU without AVX2 + FMA, a scale other than `1/sqrt(d)`.
    pub(super) fn shape(
        q: &FlexTensor,
        k: &FlexTensor,
        v: &FlexTensor,
        scale: f64,
    ) -> Option<sepo_kernels::AttentionShape> {
        let dims = q.shape();
        let [batch, heads, seq, head_dim] = [dims[0], dims[1], dims[2], dims[3]];
        let usable = [q.dtype(), k.dtype(), v.dtype()] == [DType::F32; 3]
            && k.shape() == dims
            && v.shape() == dims
            && sepo_kernels::supports(head_dim)
            && sepo_kernels::accelerated()
            && (scale - 1.0 / (head_dim as f64).sqrt()).abs() < 1e-12;
        usable.then_some(sepo_kernels::AttentionShape {
            batch,
            heads,
            kv_heads: heads,
            seq,
            past: 0,
            head_dim,
        })
    }

    /// A flex tensor of `values` in `shape`.
    pub(super) fn tensor(values: Vec<f32>, shape: burn::tensor::Shape) -> FlexTensor {
        FlexTensor::from_data(TensorData::new(values, shape))
    }
}

#[cfg(feature = "tch")]
impl CausalAttention for burn::backend::LibTorch {
    fn causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        burn::backend::libtorch::TchTensor::new(sdpa(&q.tensor, &k.tensor, &v.tensor, scale))
    }

    fn causal_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        dout: FloatTensor<Self>,
        scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        // Torch's autograd on a replay of the forward: its fused backward kernel (flash /
        // memory-efficient on CUDA) computes the gradients. `<out, dout>` summed has gradient
        // `dout` with respect to `out`.
        let mut grads = tch::with_grad(|| {
            let leaf = |t: &tch::Tensor| t.detach().set_requires_grad(true);
            let (q, k, v) = (leaf(&q.tensor), leaf(&k.tensor), leaf(&v.tensor));
            let out = sdpa(&q, &k, &v, scale);
            let dot = (out * &dout.tensor).sum(dout.tensor.kind());
            tch::Tensor::run_backward(&[dot], &[&q, &k, &v], false, false)
        });
        let new = burn::backend::libtorch::TchTensor::new;
        let dv = new(grads.pop().expect("dv"));
        let dk = new(grads.pop().expect("dk"));
        let dq = new(grads.pop().expect("dq"));
        (dq, dk, dv)
    }
}

/// torch's causal `scaled_dot_product_attention` (no dropout, no mask, heads already repeated).
#[cfg(feature = "tch")]
fn sdpa(q: &tch::Tensor, k: &tch::Tensor, v: &tch::Tensor, scale: f64) -> tch::Tensor {
    tch::Tensor::scaled_dot_product_attention(
        q,
        k,
        v,
        None::<tch::Tensor>,
        0.0,
        true,
        Some(scale),
        false,
    )
}

/// The attention gradient on the backend's own ops, from probabilities recomputed from q and k:
/// `P = softmax(q k^T s, causal)`, `dv = P^T dout`, `dP = dout v^T`,
/// `dS = P * (dP - rowsum(P * dP))`, `dq = dS k s`, `dk = dS^T q s`.
fn recomputed_backward<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    dout: FloatTensor<B>,
    scale: f64,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    use burn::backend::Scalar;
    use burn::backend::TensorMetadata;
    // Low-precision inputs are worked on in f32 and the gradients rounded once at the end, as
    // fused attention kernels accumulate (rounding P, dP and dS to bf16 would add error that no
    // reference implementation has).
    let dtype = q.dtype();
    if dtype != burn::tensor::DType::F32 {
        let f32 = burn::tensor::FloatDType::F32;
        let up = |t: FloatTensor<B>| B::float_cast(t, f32);
        let (dq, dk, dv) = recomputed_backward::<B>(up(q), up(k), up(v), up(dout), scale);
        let down = |t: FloatTensor<B>| B::float_cast(t, dtype.into());
        return (down(dq), down(dk), down(dv));
    }
    let seq = q.shape()[2];
    let device = q.device();
    let kt = B::float_swap_dims(k.clone(), 2, 3);
    let scores = B::float_mul_scalar(B::float_matmul(q.clone(), kt), Scalar::Float(scale));
    let mut above = Vec::with_capacity(seq * seq);
    for i in 0..seq {
        above.extend((0..seq).map(|j| j > i));
    }
    let mask = B::bool_from_data(
        burn::tensor::TensorData::new(above, [1, 1, seq, seq]),
        &device,
    );
    let scores = B::float_mask_fill(scores, mask, Scalar::Float(f64::NEG_INFINITY));
    let max = B::float_max_dim(scores.clone(), 3);
    let p = B::float_exp(B::float_sub(scores, max));
    let sum = B::float_sum_dim(p.clone(), 3);
    let p = B::float_div(p, sum);
    let dv = B::float_matmul(B::float_swap_dims(p.clone(), 2, 3), dout.clone());
    let dp = B::float_matmul(dout, B::float_swap_dims(v, 2, 3));
    let row = B::float_sum_dim(B::float_mul(p.clone(), dp.clone()), 3);
    let ds = B::float_mul_scalar(B::float_mul(p, B::float_sub(dp, row)), Scalar::Float(scale));
    let dq = B::float_matmul(ds.clone(), k);
    let dk = B::float_matmul(B::float_swap_dims(ds, 2, 3), q);
    (dq, dk, dv)
}

/// Autodiff: the inner backend's fused forward, recorded as one node whose backward is the
/// inner backend's [`CausalAttention::causal_attention_backward`]. Only q, k and v are kept.
impl<B: Backend + CausalAttention, C: CheckpointStrategy> CausalAttention for Autodiff<B, C> {
    fn causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Attend;

        type Inner<B> = <B as burn::backend::BackendTypes>::FloatTensorPrimitive;

        impl<B: Backend + CausalAttention> Backward<B, 3> for Attend {
            type State = (Inner<B>, Inner<B>, Inner<B>, f64);

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let (q, k, v, scale) = ops.state;
                let dout = grads.consume::<B>(&ops.node);
                let (dq, dk, dv) = B::causal_attention_backward(q, k, v, dout, scale);
                let [pq, pk, pv] = ops.parents;
                for (parent, grad) in [(pq, dq), (pk, dk), (pv, dv)] {
                    if let Some(node) = parent {
                        grads.register::<B>(node.id, grad);
                    }
                }
            }
        }

        let nodes = [q.node(), k.node(), v.node()];
        let (q, k, v) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
        match Attend.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = B::causal_attention(q.clone(), k.clone(), v.clone(), scale);
                prep.finish((q, k, v, scale), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::causal_attention(q, k, v, scale)),
        }
    }

    fn causal_attention_backward(
        _q: FloatTensor<Self>,
        _k: FloatTensor<Self>,
        _v: FloatTensor<Self>,
        _dout: FloatTensor<Self>,
        _scale: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!("the backward pass runs on the inner backend")
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Tensor;
    use burn::tensor::module::attention_fallback;
    use burn::tensor::ops::AttentionModuleOptions;

    use super::causal_attention;
    use crate::model::tests::{max_diff, uniform};

    /// Values and gradients equal burn's decomposed causal attention (to f32 rounding), on the
    /// default CPU device of the build (flex, or tch-cpu with `--features tch`), plain and
    /// autodiff, for a few shapes.
    #[test]
    fn matches_the_decomposed_attention_with_gradients() {
        let base = crate::device::parse_device("cpu").unwrap();
        for (b, h, s, d) in [(2, 3, 17, 8), (1, 2, 64, 16), (3, 1, 1, 4), (1, 4, 130, 32)] {
            let ad = base.clone().autodiff();
            let rand = |seed: u64| uniform([b, h, s, d], seed, 2.0, &ad);
            let (q, k, v, w) = (rand(1), rand(2), rand(3), rand(4));
            let run = |fused: bool| {
                let (q, k, v) = (
                    q.clone().require_grad(),
                    k.clone().require_grad(),
                    v.clone().require_grad(),
                );
                let out = if fused {
                    causal_attention(q.clone(), k.clone(), v.clone())
                } else {
                    let opts = AttentionModuleOptions {
                        scale: None,
                        softcap: None,
                        is_causal: true,
                    };
                    attention_fallback(q.clone(), k.clone(), v.clone(), None, None, opts)
                };
                let grads = (out.clone() * w.clone()).sum().backward();
                let g = |t: &Tensor<4>| t.grad(&grads).unwrap();
                (out.inner(), g(&q), g(&k), g(&v))
            };
            let (fo, fq, fk, fv) = run(true);
            let (ro, rq, rk, rv) = run(false);
            for (name, x, y) in [
                ("out", fo, ro),
                ("dq", fq, rq),
                ("dk", fk, rk),
                ("dv", fv, rv),
            ] {
                let diff = max_diff(x, y);
                assert!(diff < 2e-5, "{b}x{h}x{s}x{d} {name}: {diff}");
            }
            // Without autodiff: the same forward.
            let inner = |t: &Tensor<4>| t.clone().inner();
            let plain = causal_attention(inner(&q), inner(&k), inner(&v));
            let opts = AttentionModuleOptions {
                scale: None,
                softcap: None,
                is_causal: true,
            };
            let reference = attention_fallback(inner(&q), inner(&k), inner(&v), None, None, opts);
            assert!(max_diff(plain, reference) < 2e-5);
        }
    }
}
