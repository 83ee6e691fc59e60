//! Causal attention straight from the fused q/k/v projection, on flex: the split into heads, the
//! rotary embedding, grouped-query heads, the attention and the move back to token rows as one
//! differentiable operation with its own backward pass (a burn backend extension).
//!
//! Composed from burn's ops, the layer between the q/k/v matmul and the output projection is
//! three slices, reshapes and transposes, the rotation (two slices, a `cat`, two products and a
//! sum for q and for k), `repeat_kv`'s copy, contiguous copies for the kernel, and a transpose
//! of the output; under autodiff each has a backward, and each slice's writes a zero tensor the
//! size of the whole projection (taking them away cut the main job's CPU time from about 100 s
//! to 89 s).
//! Here (`sepo_kernels::split_rope` and friends, one pass each):
//! - forward: split and rotate, the kernel crate's causal attention with key/value heads as they
//!   are, output to token rows;
//! - backward: split and rotate again, the attention's gradient from the forward's output and
//!   log-denominators, the rotation's transpose written straight into the projection's gradient.
//!
//! The backward keeps the projection, the output (which the output projection keeps anyway) and
//! one log-denominator per query, so it does not run the attention's forward again. It applies
//! where the kernel does: flex, f32, a supported head width, a CPU with the kernel's
//! instructions, and a plain causal product (no cache, no mask); the decoder composes the layer
//! otherwise ([`usable`]), except for a cache without gradients, which
//! [`super::inference::qkv_cached`] continues through the same split and kernel. The test below
//! checks values and gradients against the composed layer.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, backend_extension};
use burn::tensor::{Device, Tensor};

/// Attention from a fused `[q | k | v]` projection, with its gradient (flex only: the decoder
/// takes this path only where [`usable`] says so).
#[backend_extension(Flex: cfg(feature = "flex"), Autodiff)]
pub trait QkvAttention: Backend {
    /// `qkv` `[batch, seq, (heads + 2 kv_heads) * d]`, rotation tables `cos` and `sin` `[seq,
    /// rot]` (as the decoder builds them): the attention output `[batch, seq, heads * d]`.
    fn qkv_attention(
        qkv: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        heads: usize,
        kv_heads: usize,
    ) -> FloatTensor<Self>;

    /// [`QkvAttention::qkv_attention`] and each query's natural-log softmax denominator
    /// `[batch, heads, seq]`, for the backward pass.
    fn qkv_attention_lse(
        qkv: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        heads: usize,
        kv_heads: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// The gradient with respect to `qkv` for the output gradient `dout`, given the forward's
    /// output `out` and log-denominators `lse` ([`QkvAttention::qkv_attention_lse`]).
    #[allow(clippy::too_many_arguments)]
    fn qkv_attention_backward(
        qkv: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        dout: FloatTensor<Self>,
        heads: usize,
        kv_heads: usize,
    ) -> FloatTensor<Self>;
}

/// Whether [`attention`] runs on `device` for `head_dim`-wide heads: flex (with or without
/// autodiff), a head width the kernel has, a CPU it is vectorized on.
pub(crate) fn usable(device: &Device, head_dim: usize) -> bool {
    #[cfg(test)]
    if super::inference::burn_only() {
        return false;
    }
    crate::device::is_flex(device)
        && sepo_kernels::supports(head_dim)
        && sepo_kernels::accelerated()
}

/// The attention of `qkv` `[batch, seq, (heads + 2 kv_heads) * d]` (f32), positions `0..seq`,
/// rotated by the tables `cos` and `sin` `[seq, rot]`: `[batch, seq, heads * d]`. Only where
/// [`usable`].
pub(crate) fn attention(
    qkv: Tensor<3>,
    cos: &Tensor<2>,
    sin: &Tensor<2>,
    heads: usize,
    kv_heads: usize,
) -> Tensor<3> {
    #[cfg(test)]
    super::inference::count_kernel_call();
    Tensor::from_dispatch(<Dispatch as QkvAttention>::qkv_attention(
        qkv.into_dispatch(),
        cos.clone().into_dispatch(),
        sin.clone().into_dispatch(),
        heads,
        kv_heads,
    ))
}

#[cfg(feature = "flex")]
mod flex {
    use burn::backend::TensorMetadata;
    use burn::backend::flex::FlexTensor;
    use burn::backend::tensor::FloatTensor;
    use burn::tensor::TensorData;
    use sepo_kernels::{AttentionShape, QkvShape};

    use super::QkvAttention;

    type Flex = burn::backend::Flex;

    /// The shapes of one call.
    fn shapes(
        qkv: &FlexTensor,
        cos: &FlexTensor,
        heads: usize,
        kv_heads: usize,
    ) -> (QkvShape, AttentionShape) {
        let dims = qkv.shape();
        let [batch, seq, width] = [dims[0], dims[1], dims[2]];
        let head_dim = width / (heads + 2 * kv_heads);
        let rot = cos.shape()[1];
        let split = QkvShape {
            batch,
            seq,
            heads,
            kv_heads,
            head_dim,
            rot,
        };
        let attend = AttentionShape {
            batch,
            heads,
            kv_heads,
            seq,
            past: 0,
            head_dim,
        };
        (split, attend)
    }

    impl QkvAttention for Flex {
        fn qkv_attention(
            qkv: FloatTensor<Self>,
            cos: FloatTensor<Self>,
            sin: FloatTensor<Self>,
            heads: usize,
            kv_heads: usize,
        ) -> FloatTensor<Self> {
            Self::qkv_attention_lse(qkv, cos, sin, heads, kv_heads).0
        }

        fn qkv_attention_lse(
            qkv: FloatTensor<Self>,
            cos: FloatTensor<Self>,
            sin: FloatTensor<Self>,
            heads: usize,
            kv_heads: usize,
        ) -> (FloatTensor<Self>, FloatTensor<Self>) {
            let (split, attend) = shapes(&qkv, &cos, heads, kv_heads);
            let [qkv, cos, sin] = [&qkv, &cos, &sin].map(|t| t.to_contiguous());
            let (q, k, v) =
                sepo_kernels::split_rope(qkv.storage(), cos.storage(), sin.storage(), split);
            let (out, lse) = sepo_kernels::causal_attention_lse(&q, &k, &v, attend);
            let (b, s, d) = (split.batch, split.seq, split.head_dim);
            let rows = sepo_kernels::heads_to_rows(&out, b, heads, s, d);
            (
                FlexTensor::from_data(TensorData::new(rows, [b, s, heads * d])),
                FlexTensor::from_data(TensorData::new(lse, [b, heads, s])),
            )
        }

        fn qkv_attention_backward(
            qkv: FloatTensor<Self>,
            cos: FloatTensor<Self>,
            sin: FloatTensor<Self>,
            out: FloatTensor<Self>,
            lse: FloatTensor<Self>,
            dout: FloatTensor<Self>,
            heads: usize,
            kv_heads: usize,
        ) -> FloatTensor<Self> {
            let (split, attend) = shapes(&qkv, &cos, heads, kv_heads);
            let [qkv, cos, sin, out, lse, dout] =
                [&qkv, &cos, &sin, &out, &lse, &dout].map(|t| t.to_contiguous());
            let (cos, sin) = (cos.storage(), sin.storage());
            let (q, k, v) = sepo_kernels::split_rope(qkv.storage(), cos, sin, split);
            let (b, s, d) = (split.batch, split.seq, split.head_dim);
            let out = sepo_kernels::rows_to_heads(out.storage(), b, heads, s, d);
            let lse = lse.storage();
            let dout = sepo_kernels::rows_to_heads(dout.storage(), b, heads, s, d);
            let (dq, dk, dv) =
                sepo_kernels::causal_attention_backward(&q, &k, &v, &out, &dout, lse, attend);
            let dqkv = sepo_kernels::merge_rope_grad(&dq, &dk, &dv, cos, sin, split);
            FlexTensor::from_data(TensorData::new(dqkv, [b, s, split.width()]))
        }
    }
}

/// Autodiff: the inner backend's forward, recorded as one node whose backward is the inner
/// backend's [`QkvAttention::qkv_attention_backward`]. It keeps the projection, the tables
/// (constants), the output and the log-denominators.
impl<B: Backend + QkvAttention, C: CheckpointStrategy> QkvAttention for Autodiff<B, C> {
    fn qkv_attention(
        qkv: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        heads: usize,
        kv_heads: usize,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Attend;

        type Inner<B> = <B as burn::backend::BackendTypes>::FloatTensorPrimitive;

        impl<B: Backend + QkvAttention> Backward<B, 1> for Attend {
            /// The projection, the tables, the output, the log-denominators, the head counts.
            type State = ([Inner<B>; 5], usize, usize);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let ([qkv, cos, sin, out, lse], heads, kv_heads) = ops.state;
                let dout = grads.consume::<B>(&ops.node);
                let [parent] = ops.parents;
                if let Some(node) = parent {
                    let dqkv =
                        B::qkv_attention_backward(qkv, cos, sin, out, lse, dout, heads, kv_heads);
                    grads.register::<B>(node.id, dqkv);
                }
            }
        }

        // The tables are constants: only the projection is a parent.
        let nodes = [qkv.node()];
        let qkv = qkv.into_primitive();
        let (cos, sin) = (cos.into_primitive(), sin.into_primitive());
        match Attend.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (out, lse) =
                    B::qkv_attention_lse(qkv.clone(), cos.clone(), sin.clone(), heads, kv_heads);
                prep.finish(([qkv, cos, sin, out.clone(), lse], heads, kv_heads), out)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::qkv_attention(qkv, cos, sin, heads, kv_heads))
            }
        }
    }

    fn qkv_attention_lse(
        _qkv: FloatTensor<Self>,
        _cos: FloatTensor<Self>,
        _sin: FloatTensor<Self>,
        _heads: usize,
        _kv_heads: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!("the log-denominators are the inner backend's, for its backward pass")
    }

    fn qkv_attention_backward(
        _qkv: FloatTensor<Self>,
        _cos: FloatTensor<Self>,
        _sin: FloatTensor<Self>,
        _out: FloatTensor<Self>,
        _lse: FloatTensor<Self>,
        _dout: FloatTensor<Self>,
        _heads: usize,
        _kv_heads: usize,
    ) -> FloatTensor<Self> {
        unreachable!("the backward pass runs on the inner backend")
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::module::attention_fallback;
    use burn::tensor::ops::AttentionModuleOptions;
    use burn::tensor::{Tensor, TensorData};

    use super::{attention, usable};
    use crate::model::tests::{max_diff, uniform};

    /// Rotation tables `[seq, rot]` as the decoder builds them (positions `0..seq`).
    fn tables(seq: usize, rot: usize, device: &burn::tensor::Device) -> (Tensor<2>, Tensor<2>) {
        let half = rot / 2;
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for t in 0..seq {
            let f: Vec<f32> = (0..half)
                .map(|i| t as f32 / 10_000f32.powf(2.0 * i as f32 / rot as f32))
                .collect();
            cos.extend(f.iter().chain(&f).map(|x| x.cos()));
            sin.extend(f.iter().map(|x| -x.sin()).chain(f.iter().map(|x| x.sin())));
        }
        let t = |v: Vec<f32>| Tensor::from_data(TensorData::new(v, [seq, rot]), device);
        (t(cos), t(sin))
    }

    /// The layer composed from burn's ops, written out independently of the decoder: slices,
    /// the rotation `x * cos + [x2, x1] * sin` on the first `rot` channels, key/value heads
    /// repeated, burn's decomposed causal attention, the output back to token rows.
    fn composed(
        qkv: Tensor<3>,
        cos: &Tensor<2>,
        sin: &Tensor<2>,
        heads: usize,
        kv_heads: usize,
    ) -> Tensor<3> {
        let [b, s, width] = qkv.dims();
        let d = width / (heads + 2 * kv_heads);
        let rot = cos.dims()[1];
        let part = |first: usize, n: usize| {
            qkv.clone()
                .slice_dim(2, first * d..(first + n) * d)
                .reshape([b, s, n, d])
                .swap_dims(1, 2)
        };
        let rotate = |x: Tensor<4>| {
            let (c, sn) = (
                cos.clone().reshape([1, 1, s, rot]),
                sin.clone().reshape([1, 1, s, rot]),
            );
            let x_rot = x.clone().slice_dim(3, 0..rot);
            let swapped = Tensor::cat(
                vec![
                    x_rot.clone().slice_dim(3, rot / 2..rot),
                    x_rot.clone().slice_dim(3, 0..rot / 2),
                ],
                3,
            );
            let y = x_rot * c + swapped * sn;
            Tensor::cat(vec![y, x.slice_dim(3, rot..d)], 3)
        };
        let repeat = |x: Tensor<4>| {
            x.unsqueeze_dim::<5>(2)
                .expand([b, kv_heads, heads / kv_heads, s, d])
                .reshape([b, heads, s, d])
        };
        let q = rotate(part(0, heads));
        let k = repeat(rotate(part(heads, kv_heads)));
        let v = repeat(part(heads + kv_heads, kv_heads));
        let opts = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: true,
        };
        attention_fallback(q, k, v, None, None, opts)
            .swap_dims(1, 2)
            .reshape([b, s, heads * d])
    }

    /// Values and the projection's gradient equal the composed layer's (to f32 rounding) on
    /// flex, plain and autodiff: grouped-query and plain heads, partial rotation, odd lengths,
    /// one token.
    #[test]
    fn matches_the_composed_layer_with_gradients() {
        let Ok(base) = crate::device::parse_device("flex") else {
            return;
        };
        for (b, s, heads, kv_heads, d, rot) in [
            (2, 37, 8, 4, 8, 8),
            (1, 70, 2, 2, 16, 16),
            (3, 1, 4, 1, 8, 8),
            (1, 130, 4, 2, 32, 8),
        ] {
            if !sepo_kernels::accelerated() {
                return;
            }
            let ad = base.clone().autodiff();
            assert!(usable(&base, d) && usable(&ad, d));
            let qkv = uniform([b, s, (heads + 2 * kv_heads) * d], 1, 2.0, &ad);
            let w = uniform([b, s, heads * d], 2, 1.0, &ad);
            let (cos, sin) = tables(s, rot, &ad);
            let run = |fused: bool| {
                let x = qkv.clone().require_grad();
                let out = if fused {
                    attention(x.clone(), &cos, &sin, heads, kv_heads)
                } else {
                    composed(x.clone(), &cos, &sin, heads, kv_heads)
                };
                let grads = (out.clone() * w.clone()).sum().backward();
                (out.inner(), x.grad(&grads).unwrap())
            };
            let (fo, fg) = run(true);
            let (ro, rg) = run(false);
            let shape = (b, s, heads, kv_heads, d, rot);
            let diff = max_diff(fo, ro);
            assert!(diff < 2e-5, "{shape:?} out: {diff}");
            let diff = max_diff(fg, rg);
            assert!(diff < 2e-5, "{shape:?} dqkv: {diff}");
            // Without autodiff: the same forward.
            let inner = |t: &Tensor<2>| t.clone().inner();
            let plain = attention(
                qkv.clone().inner(),
                &inner(&cos),
                &inner(&sin),
                heads,
                kv_heads,
            );
            let reference = composed(
                qkv.clone().inner(),
                &inner(&cos),
                &inner(&sin),
                heads,
                kv_heads,
            );
            assert!(max_diff(plain, reference) < 2e-5, "{shape:?} plain");
        }
    }
}
