//! `log_softmax(logits)` gathered at target tokens as one differentiable operation with its own
//! backward pass (a burn backend extension): every log-prob sepo computes, in training, scoring
//! and evaluation.
//!
//! Composed from burn's ops (max, subtract, exp, sum, log, gather), the forward writes three
//! `[rows, vocab]` tensors and autodiff's backward four more; over a 32000-token vocabulary these
//! are the largest tensors of a small model's step, and burn-flex's `exp` is a scalar libm call
//! per element. Here:
//! - Flex: the kernel crate's [`sepo_kernels::gather_logprobs`] and its gradient, a row at a time
//!   in cache with a vectorized exponential; the backward recomputes each row's log-denominator
//!   instead of keeping anything of size `rows x vocab` but the logits;
//! - LibTorch: torch's fused `log_softmax` and `gather`; the backward is
//!   `dout * (onehot - softmax)` from torch's fused `softmax`;
//! - elsewhere (a CPU without AVX2 + FMA): the composed ops, as before.
//!
//! The tests check values and gradients against the composed ops on the build's CPU device.

// burn 0.22 marks its LibTorch types deprecated (burn-tch is on its way out); sepo still uses them
// for CUDA, as src/device.rs does.
#![allow(deprecated)]

use burn::backend::TensorMetadata;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Autodiff, Backend, Dispatch, backend_extension};
use burn::tensor::ops::IndexingUpdateOp;
use burn::tensor::{Int, Tensor};

/// The log-softmax of each row gathered at its target, with its gradient, per backend.
#[backend_extension(Flex: cfg(feature = "flex"), LibTorch: cfg(feature = "tch"), Autodiff)]
pub trait GatherLogprobs: Backend {
    /// `log_softmax(logits[r])[targets[r]]` for `logits` `[rows, vocab]` (f32) and `targets`
    /// `[rows]` (valid ids): `[rows]`.
    fn gather_logprobs(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self>;

    /// The gradient with respect to the logits for the output gradient `dout` `[rows]`:
    /// `dout[r] * (onehot(targets[r]) - softmax(logits[r]))`, `[rows, vocab]`.
    fn gather_logprobs_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        dout: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// `log_softmax(logits)[b, t, targets[b, t]]`, `[batch, seq]`, in f32 (any device sepo builds,
/// with or without autodiff). Targets must be valid ids.
pub fn gather_logprobs(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<2> {
    let [batch, seq, vocab] = logits.dims();
    let rows = batch * seq;
    let logits = logits.reshape([rows, vocab]).into_dispatch();
    let targets = targets.reshape([rows]).into_dispatch();
    Tensor::<1>::from_dispatch(<Dispatch as GatherLogprobs>::gather_logprobs(
        logits, targets,
    ))
    .reshape([batch, seq])
}

/// The composed forward: `(x_target - max) - log(sum(exp(x - max)))`.
fn composed<B: Backend>(logits: FloatTensor<B>, targets: IntTensor<B>) -> FloatTensor<B> {
    let max = B::float_max_dim(logits.clone(), 1); // [rows, 1]
    let shifted = B::float_sub(logits, max);
    let lse = B::float_log(B::float_sum_dim(B::float_exp(shifted.clone()), 1));
    let rows = lse.shape()[0];
    let picked = B::float_gather(1, shifted, B::int_reshape(targets, [rows, 1].into()));
    B::float_reshape(B::float_sub(picked, lse), [rows].into())
}

/// The composed gradient: `dout * (onehot - exp(x - lse))`.
fn composed_backward<B: Backend>(
    logits: FloatTensor<B>,
    targets: IntTensor<B>,
    dout: FloatTensor<B>,
) -> FloatTensor<B> {
    let max = B::float_max_dim(logits.clone(), 1);
    let shifted = B::float_sub(logits, max);
    let p = B::float_exp(shifted);
    let sum = B::float_sum_dim(p.clone(), 1);
    let rows = sum.shape()[0];
    let g = B::float_reshape(dout, [rows, 1].into());
    let minus_p = B::float_neg(B::float_div(p, sum));
    let grad = B::float_mul(minus_p, g.clone());
    let at = B::int_reshape(targets, [rows, 1].into());
    B::float_scatter(1, grad, at, g, IndexingUpdateOp::Add)
}

#[cfg(feature = "flex")]
impl GatherLogprobs for burn::backend::Flex {
    fn gather_logprobs(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
        match flex_kernel::inputs(&logits, &targets) {
            Some((vocab, t)) => {
                let x = logits.to_contiguous();
                let out = sepo_kernels::gather_logprobs(x.storage(), vocab, &t);
                flex_kernel::tensor(out, [t.len()])
            }
            None => composed::<Self>(logits, targets),
        }
    }

    fn gather_logprobs_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        dout: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        match flex_kernel::inputs(&logits, &targets) {
            Some((vocab, t)) if dout.dtype() == burn::tensor::DType::F32 => {
                let (x, g) = (logits.to_contiguous(), dout.to_contiguous());
                let grad =
                    sepo_kernels::gather_logprobs_backward(x.storage(), vocab, &t, g.storage());
                flex_kernel::tensor(grad, [t.len(), vocab])
            }
            _ => composed_backward::<Self>(logits, targets, dout),
        }
    }
}

#[cfg(feature = "flex")]
mod flex_kernel {
    use burn::backend::TensorMetadata;
    use burn::backend::flex::FlexTensor;
    use burn::tensor::{DType, TensorData};

    /// The vocabulary and the targets as indices when the kernel applies: f32 logits, a CPU
    /// with AVX2 + FMA (elsewhere the kernel's fused multiply-adds are libm calls), targets in
    /// range (out of range, the composed ops report it as they always have).
    pub(super) fn inputs(logits: &FlexTensor, targets: &FlexTensor) -> Option<(usize, Vec<usize>)> {
        let vocab = logits.shape()[1];
        if logits.dtype() != DType::F32 || !sepo_kernels::accelerated() {
            return None;
        }
        let t = targets
            .clone()
            .into_data()
            .convert::<i64>()
            .into_vec::<i64>()
            .ok()?;
        let t: Vec<usize> = t
            .into_iter()
            .map(|t| usize::try_from(t).ok())
            .collect::<Option<_>>()?;
        t.iter().all(|&t| t < vocab).then_some((vocab, t))
    }

    /// A flex tensor of `values` in `shape`.
    pub(super) fn tensor<const D: usize>(values: Vec<f32>, shape: [usize; D]) -> FlexTensor {
        FlexTensor::from_data(TensorData::new(values, shape))
    }
}

#[cfg(feature = "tch")]
impl GatherLogprobs for burn::backend::LibTorch {
    fn gather_logprobs(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
        let x = &logits.tensor;
        let t = targets.tensor.to_kind(tch::Kind::Int64).unsqueeze(1);
        let out = x
            .log_softmax(1, x.kind())
            .gather(1, &t, false)
            .squeeze_dim(1);
        burn::backend::libtorch::TchTensor::new(out)
    }

    fn gather_logprobs_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        dout: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let x = &logits.tensor;
        let t = targets.tensor.to_kind(tch::Kind::Int64).unsqueeze(1);
        let g = dout.tensor.unsqueeze(1);
        let grad = (x.softmax(1, x.kind()) * g.neg()).scatter_add(1, &t, &g);
        burn::backend::libtorch::TchTensor::new(grad)
    }
}

/// Autodiff: the inner backend's forward, recorded as one node whose backward is the inner
/// backend's [`GatherLogprobs::gather_logprobs_backward`]. The logits and targets are kept.
impl<B: Backend + GatherLogprobs, C: CheckpointStrategy> GatherLogprobs for Autodiff<B, C> {
    fn gather_logprobs(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Gather;

        type Float<B> = <B as burn::backend::BackendTypes>::FloatTensorPrimitive;
        type IntOf<B> = <B as burn::backend::BackendTypes>::IntTensorPrimitive;

        impl<B: Backend + GatherLogprobs> Backward<B, 1> for Gather {
            type State = (Float<B>, IntOf<B>);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let (logits, targets) = ops.state;
                let dout = grads.consume::<B>(&ops.node);
                let [parent] = ops.parents;
                if let Some(node) = parent {
                    let grad = B::gather_logprobs_backward(logits, targets, dout);
                    grads.register::<B>(node.id, grad);
                }
            }
        }

        let nodes = [logits.node()];
        let logits = logits.into_primitive();
        match Gather.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = B::gather_logprobs(logits.clone(), targets.clone());
                prep.finish((logits, targets), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::gather_logprobs(logits, targets)),
        }
    }

    fn gather_logprobs_backward(
        _logits: FloatTensor<Self>,
        _targets: IntTensor<Self>,
        _dout: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        unreachable!("the backward pass runs on the inner backend")
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Int, Tensor, TensorData};

    use burn::backend::Dispatch;

    use super::{composed, composed_backward, gather_logprobs};
    use crate::model::tests::{max_diff, uniform};

    /// The composed ops on burn tensors, as `gather_logprobs` was written before the extension.
    fn reference(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<2> {
        let max = logits.clone().detach().max_dim(2);
        let shifted = logits - max;
        let lse = shifted.clone().exp().sum_dim(2).log();
        let picked = shifted.gather(2, targets.unsqueeze_dim::<3>(2));
        (picked - lse).squeeze_dim::<2>(2)
    }

    /// Values and gradients equal the composed ops (to f32 rounding) on the build's default CPU
    /// device (flex, or tch-cpu with `--features tch`), with and without autodiff, for
    /// vocabularies below, at and past a vector's width.
    #[test]
    fn matches_the_composed_ops_with_gradients() {
        let base = crate::device::parse_device("cpu").unwrap();
        for (b, s, v, amp) in [
            (2, 3, 5, 3.0),
            (1, 7, 512, 8.0),
            (3, 2, 1000, 30.0),
            (1, 1, 1, 1.0),
        ] {
            let ad = base.clone().autodiff();
            let logits = uniform([b, s, v], 1, amp, &ad);
            let ids: Vec<i64> = (0..b * s).map(|i| (i * 7919 % v) as i64).collect();
            let targets = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, s]), &ad);
            let w = uniform([b, s], 2, amp, &ad);
            let run = |fused: bool| {
                let x = logits.clone().require_grad();
                let out = if fused {
                    gather_logprobs(x.clone(), targets.clone())
                } else {
                    reference(x.clone(), targets.clone())
                };
                let grads = (out.clone() * w.clone()).sum().backward();
                (out.inner().unsqueeze_dim::<3>(2), x.grad(&grads).unwrap())
            };
            let (fo, fg) = run(true);
            let (ro, rg) = run(false);
            assert!(max_diff(fo, ro) < 2e-5 * amp, "{b}x{s}x{v} values");
            assert!(
                max_diff(fg, rg.clone()) < 2e-6 * amp,
                "{b}x{s}x{v} gradients"
            );
            // Without autodiff: the same forward, and the composed ops of the inner backend.
            let plain = gather_logprobs(logits.clone().inner(), targets.clone().inner());
            let direct = reference(logits.clone().inner(), targets.clone().inner());
            assert!(max_diff::<2>(plain, direct) < 2e-5 * amp);
            // The fallback (a CPU without AVX2 + FMA) on the inner backend: the same values and
            // the same gradient as the reference's autodiff.
            let (x, t) = (logits.clone().inner(), targets.clone().inner());
            let rows = b * s;
            let flat = |x: Tensor<3>| x.reshape([rows, v]).into_dispatch();
            let out =
                composed::<Dispatch>(flat(x.clone()), t.clone().reshape([rows]).into_dispatch());
            let out = Tensor::<1>::from_dispatch(out).reshape([b, s, 1]);
            let direct = reference(x.clone(), t.clone()).unsqueeze_dim::<3>(2);
            assert!(
                max_diff(out, direct) < 2e-5 * amp,
                "{b}x{s}x{v} composed values"
            );
            let g = composed_backward::<Dispatch>(
                flat(x),
                t.reshape([rows]).into_dispatch(),
                w.clone().inner().reshape([rows]).into_dispatch(),
            );
            let g = Tensor::<2>::from_dispatch(g).reshape([b, s, v]);
            assert!(
                max_diff(g, rg.inner()) < 2e-6 * amp,
                "{b}x{s}x{v} composed gradients"
            );
        }
    }
}
