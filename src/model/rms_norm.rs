//! RMSNorm (`weight * (x * rsqrt(mean(x^2) + eps))`, the Llama family's norm) as one
//! differentiable operation with its own backward pass (a burn backend extension), on flex.
//!
//! Composed from burn's ops it is seven operations (square, mean, add, sqrt, reciprocal, two
//! products), each writing a tensor, with as many again in autodiff's backward; eleven norms run
//! per forward of a five-layer model. Here the kernel crate's [`sepo_kernels::rms_norm`] and its
//! gradient are one pass each, keeping the input, the scale and one number per row for the
//! backward. Only f32 inputs on flex take it (the residual stream is f32 under every precision);
//! elsewhere [`super::transformer::Norm`] composes the norm. The test below checks values and
//! gradients against the composed norm.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, backend_extension};
use burn::tensor::{DType, Tensor};

/// RMSNorm of rows with its gradient (flex only: [`rms_norm`] takes it only there).
#[backend_extension(Flex: cfg(feature = "flex"), Autodiff)]
pub trait RmsNorm: Backend {
    /// `(x * r) * w` for `x` `[rows, n]`, `w` `[n]`, `r = 1 / sqrt(mean(x^2) + eps)` per row.
    fn rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f64) -> FloatTensor<Self>;

    /// [`RmsNorm::rms_norm`] and each row's `r` (`[rows]`), for the backward pass.
    fn rms_norm_r(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// The gradients `(dx, dw)` for the output gradient `dy`, given the forward's `r`.
    fn rms_norm_backward(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        r: FloatTensor<Self>,
        dy: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
}

/// RMSNorm of `x` over its last dimension, scaled by `w`, or `None` where the operation does not
/// apply (not flex, not f32) and the caller composes it.
pub fn rms_norm<const D: usize>(x: Tensor<D>, w: Tensor<1>, eps: f64) -> Option<Tensor<D>> {
    let usable =
        x.dtype() == DType::F32 && w.dtype() == DType::F32 && crate::device::is_flex(&x.device());
    if !usable {
        return None;
    }
    let dims = x.dims();
    let n = dims[D - 1];
    let rows = x.reshape([dims.iter().product::<usize>() / n.max(1), n]);
    let y = Tensor::<2>::from_dispatch(<Dispatch as RmsNorm>::rms_norm(
        rows.into_dispatch(),
        w.into_dispatch(),
        eps,
    ));
    Some(y.reshape(dims))
}

#[cfg(feature = "flex")]
mod flex {
    use burn::backend::TensorMetadata;
    use burn::backend::flex::FlexTensor;
    use burn::backend::tensor::FloatTensor;
    use burn::tensor::TensorData;

    use super::RmsNorm;

    type Flex = burn::backend::Flex;

    fn tensor(values: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
        FlexTensor::from_data(TensorData::new(values, shape))
    }

    impl RmsNorm for Flex {
        fn rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
            Self::rms_norm_r(x, w, eps).0
        }

        fn rms_norm_r(
            x: FloatTensor<Self>,
            w: FloatTensor<Self>,
            eps: f64,
        ) -> (FloatTensor<Self>, FloatTensor<Self>) {
            let shape = x.shape().to_vec();
            let (x, w) = (x.to_contiguous(), w.to_contiguous());
            let (y, r) = sepo_kernels::rms_norm(x.storage(), w.storage(), eps as f32);
            let rows = r.len();
            (tensor(y, shape), tensor(r, vec![rows]))
        }

        fn rms_norm_backward(
            x: FloatTensor<Self>,
            w: FloatTensor<Self>,
            r: FloatTensor<Self>,
            dy: FloatTensor<Self>,
        ) -> (FloatTensor<Self>, FloatTensor<Self>) {
            let shape = x.shape().to_vec();
            let [x, w, r, dy] = [&x, &w, &r, &dy].map(|t| t.to_contiguous());
            let (dx, dw) = sepo_kernels::rms_norm_backward(
                x.storage(),
                w.storage(),
                r.storage(),
                dy.storage(),
            );
            let n = dw.len();
            (tensor(dx, shape), tensor(dw, vec![n]))
        }
    }
}

/// Autodiff: the inner backend's forward, recorded as one node with the input and the scale as
/// parents, whose backward is the inner backend's [`RmsNorm::rms_norm_backward`]. It keeps the
/// input, the scale and `r`.
impl<B: Backend + RmsNorm, C: CheckpointStrategy> RmsNorm for Autodiff<B, C> {
    fn rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Normalize;

        type Inner<B> = <B as burn::backend::BackendTypes>::FloatTensorPrimitive;

        impl<B: Backend + RmsNorm> Backward<B, 2> for Normalize {
            /// The input, the scale, each row's `r`.
            type State = [Inner<B>; 3];

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let [x, w, r] = ops.state;
                let dy = grads.consume::<B>(&ops.node);
                let (dx, dw) = B::rms_norm_backward(x, w, r, dy);
                let [px, pw] = ops.parents;
                for (parent, grad) in [(px, dx), (pw, dw)] {
                    if let Some(node) = parent {
                        grads.register::<B>(node.id, grad);
                    }
                }
            }
        }

        let nodes = [x.node(), w.node()];
        let (x, w) = (x.into_primitive(), w.into_primitive());
        match Normalize.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (y, r) = B::rms_norm_r(x.clone(), w.clone(), eps);
                prep.finish([x, w, r], y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::rms_norm(x, w, eps)),
        }
    }

    fn rms_norm_r(
        _x: FloatTensor<Self>,
        _w: FloatTensor<Self>,
        _eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!("`r` is the inner backend's, for its backward pass")
    }

    fn rms_norm_backward(
        _x: FloatTensor<Self>,
        _w: FloatTensor<Self>,
        _r: FloatTensor<Self>,
        _dy: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!("the backward pass runs on the inner backend")
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Tensor;

    use super::rms_norm;
    use crate::model::tests::{max_diff, uniform};

    /// The norm as `Norm::forward` composes it.
    fn composed(x: Tensor<3>, w: Tensor<1>, eps: f64) -> Tensor<3> {
        let var = x.clone().square().mean_dim(2);
        let inv = (var + eps).sqrt().recip();
        (x * inv) * w.unsqueeze()
    }

    /// Values and both gradients equal the composed norm's (to f32 rounding) on flex, plain and
    /// autodiff.
    #[test]
    fn matches_the_composed_norm_with_gradients() {
        let Ok(base) = crate::device::parse_device("flex") else {
            return;
        };
        for (b, s, n) in [(2, 37, 64), (1, 1, 8), (3, 70, 48)] {
            let ad = base.clone().autodiff();
            let x = uniform([b, s, n], 1, 3.0, &ad);
            let w = uniform([n], 2, 1.5, &ad);
            let c = uniform([b, s, n], 3, 1.0, &ad);
            let run = |fused: bool| {
                let (x, w) = (x.clone().require_grad(), w.clone().require_grad());
                let y = if fused {
                    rms_norm(x.clone(), w.clone(), 1e-5).expect("flex takes the operation")
                } else {
                    composed(x.clone(), w.clone(), 1e-5)
                };
                let grads = (y.clone() * c.clone()).sum().backward();
                (y.inner(), x.grad(&grads).unwrap(), w.grad(&grads).unwrap())
            };
            let (fy, fx, fw) = run(true);
            let (ry, rx, rw) = run(false);
            assert!(max_diff(fy, ry) < 1e-5, "{b}x{s}x{n} y");
            assert!(max_diff(fx, rx) < 1e-4, "{b}x{s}x{n} dx");
            assert!(max_diff(fw, rw) < 1e-3, "{b}x{s}x{n} dw");
            let plain = rms_norm(x.clone().inner(), w.clone().inner(), 1e-5).unwrap();
            assert!(max_diff(plain, composed(x.inner(), w.inner(), 1e-5)) < 1e-5);
        }
    }
}
