//! The gated MLP's activation, `silu(gate) * up`, as one differentiable operation with its own
//! backward pass (a burn backend extension), taken straight from the fused `[gate | up]`
//! projection.
//!
//! Composed from burn's ops it slices the projection twice (two copies), runs a sigmoid whose
//! every element is a libm `expf` on flex, and multiplies twice; autodiff's backward is as many
//! ops again. Here:
//! - Flex: the kernel crate's [`sepo_kernels::swiglu`] and its gradient, one pass each with a
//!   vectorized exponential, keeping only the projection for the backward;
//! - LibTorch: torch's `silu` on the two halves (views), and the gradient written out with
//!   torch's `sigmoid`.
//!
//! Only f32 projections take it (under mixed precision the MLP runs composed, in the low
//! precision, as transformers' does under autocast). The tests check values and gradients
//! against the composed ops on the build's CPU device.

// burn 0.22 marks its LibTorch types deprecated (burn-tch is on its way out); sepo still uses them
// for CUDA, as src/device.rs does.
#![allow(deprecated)]

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Dispatch, backend_extension};
use burn::tensor::{DType, Tensor};

/// `silu(gate) * up` of a fused `[gate | up]` projection, with its gradient, per backend.
#[backend_extension(Flex: cfg(feature = "flex"), LibTorch: cfg(feature = "tch"), Autodiff)]
pub trait Swiglu: Backend {
    /// `silu(h[.., j]) * h[.., inter + j]` for `h` `[rows, 2 * inter]` (f32): `[rows, inter]`.
    fn swiglu(h: FloatTensor<Self>) -> FloatTensor<Self>;

    /// The gradient with respect to `h` for the output gradient `dout` `[rows, inter]`:
    /// `[dout * up * silu'(gate) | dout * silu(gate)]`.
    fn swiglu_backward(h: FloatTensor<Self>, dout: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// `silu(gate) * up` of `h` `[batch, seq, 2 * inter]` (`[gate | up]`), `[batch, seq, inter]`,
/// or `None` when `h` is not f32 (the caller composes it then).
pub fn swiglu(h: &Tensor<3>) -> Option<Tensor<3>> {
    if h.dtype() != DType::F32 {
        return None;
    }
    let [batch, seq, two_inter] = h.dims();
    let rows = h.clone().reshape([batch * seq, two_inter]).into_dispatch();
    let out = Tensor::<2>::from_dispatch(<Dispatch as Swiglu>::swiglu(rows));
    Some(out.reshape([batch, seq, two_inter / 2]))
}

#[cfg(feature = "flex")]
impl Swiglu for burn::backend::Flex {
    fn swiglu(h: FloatTensor<Self>) -> FloatTensor<Self> {
        let [rows, two_inter] = flex::dims(&h);
        let h = h.to_contiguous();
        flex::tensor(
            sepo_kernels::swiglu(h.storage(), two_inter / 2),
            [rows, two_inter / 2],
        )
    }

    fn swiglu_backward(h: FloatTensor<Self>, dout: FloatTensor<Self>) -> FloatTensor<Self> {
        let [rows, two_inter] = flex::dims(&h);
        let (h, dout) = (h.to_contiguous(), dout.to_contiguous());
        let dh = sepo_kernels::swiglu_backward(h.storage(), two_inter / 2, dout.storage());
        flex::tensor(dh, [rows, two_inter])
    }
}

#[cfg(feature = "flex")]
mod flex {
    use burn::backend::TensorMetadata;
    use burn::backend::flex::FlexTensor;
    use burn::tensor::TensorData;

    /// `[rows, 2 * inter]`.
    pub(super) fn dims(h: &FlexTensor) -> [usize; 2] {
        let s = h.shape();
        [s[0], s[1]]
    }

    /// A flex tensor of `values` in `shape`.
    pub(super) fn tensor(values: Vec<f32>, shape: [usize; 2]) -> FlexTensor {
        FlexTensor::from_data(TensorData::new(values, shape))
    }
}

#[cfg(feature = "tch")]
impl Swiglu for burn::backend::LibTorch {
    fn swiglu(h: FloatTensor<Self>) -> FloatTensor<Self> {
        let (g, u) = halves(&h.tensor);
        burn::backend::libtorch::TchTensor::new(g.silu() * u)
    }

    fn swiglu_backward(h: FloatTensor<Self>, dout: FloatTensor<Self>) -> FloatTensor<Self> {
        let (g, u) = halves(&h.tensor);
        let d = &dout.tensor;
        let s = g.sigmoid();
        // silu'(g) = s (1 + g (1 - s)); silu(g) = g s.
        let dg = d * &u * &s * (&g * (1.0 - &s) + 1.0);
        let du = d * &g * &s;
        burn::backend::libtorch::TchTensor::new(tch::Tensor::cat(&[dg, du], 1))
    }
}

/// The gate and up halves of `[rows, 2 * inter]` (views).
#[cfg(feature = "tch")]
fn halves(h: &tch::Tensor) -> (tch::Tensor, tch::Tensor) {
    let inter = h.size()[1] / 2;
    (h.narrow(1, 0, inter), h.narrow(1, inter, inter))
}

/// Autodiff: the inner backend's forward, recorded as one node whose backward is the inner
/// backend's [`Swiglu::swiglu_backward`]. Only the projection is kept.
impl<B: Backend + Swiglu, C: CheckpointStrategy> Swiglu for Autodiff<B, C> {
    fn swiglu(h: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct Gated;

        type Float<B> = <B as burn::backend::BackendTypes>::FloatTensorPrimitive;

        impl<B: Backend + Swiglu> Backward<B, 1> for Gated {
            type State = Float<B>;

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let dout = grads.consume::<B>(&ops.node);
                let [parent] = ops.parents;
                if let Some(node) = parent {
                    grads.register::<B>(node.id, B::swiglu_backward(ops.state, dout));
                }
            }
        }

        let nodes = [h.node()];
        let h = h.into_primitive();
        match Gated.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = B::swiglu(h.clone());
                prep.finish(h, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::swiglu(h)),
        }
    }

    fn swiglu_backward(_h: FloatTensor<Self>, _dout: FloatTensor<Self>) -> FloatTensor<Self> {
        unreachable!("the backward pass runs on the inner backend")
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Tensor;
    use burn::tensor::activation::silu;

    use super::swiglu;
    use crate::model::tests::{max_diff, uniform};

    /// Values and gradients equal the composed ops that `Decoder::mlp` used before (to f32
    /// rounding) on the build's default CPU device (flex, or tch-cpu with `--features tch`), with
    /// and without autodiff; bf16 is left to the caller.
    #[test]
    fn matches_the_composed_ops_with_gradients() {
        let base = crate::device::parse_device("cpu").unwrap();
        for (b, s, i, amp) in [(2, 3, 5, 3.0), (1, 7, 172, 6.0), (2, 2, 688, 20.0)] {
            let ad = base.clone().autodiff();
            let h = uniform([b, s, 2 * i], 1, amp, &ad);
            let w = uniform([b, s, i], 2, amp, &ad);
            let run = |fused: bool| {
                let x = h.clone().require_grad();
                let out = if fused {
                    swiglu(&x).unwrap()
                } else {
                    silu(x.clone().slice_dim(2, 0..i)) * x.clone().slice_dim(2, i..2 * i)
                };
                let grads = (out.clone() * w.clone()).sum().backward();
                (out.inner(), x.grad(&grads).unwrap())
            };
            let (fo, fg) = run(true);
            let (ro, rg) = run(false);
            assert!(max_diff(fo, ro) < 1e-5 * amp * amp, "{b}x{s}x{i} values");
            assert!(max_diff(fg, rg) < 1e-5 * amp * amp, "{b}x{s}x{i} gradients");
            let plain = swiglu(&h.clone().inner()).unwrap();
            let x = h.clone().inner();
            let direct = silu(x.clone().slice_dim(2, 0..i)) * x.slice_dim(2, i..2 * i);
            assert!(
                max_diff(plain, direct) < 1e-5 * amp * amp,
                "{b}x{s}x{i} no autodiff"
            );
        }
        // Not f32: the caller's composed ops.
        let h = Tensor::<3>::zeros([1, 2, 4], &base).cast(burn::tensor::FloatDType::BF16);
        assert!(swiglu(&h).is_none());
    }
}
