//! One AdamW update of a flattened parameter, as one backend operation (a burn backend
//! extension, like `src/model/attention/`).
//!
//! burn's tensors are values: written with them, the update is 13 element-wise operations, each
//! reading its inputs and writing a new tensor (about 32 passes over the parameter's size). On
//! LibTorch it runs torch's own in-place kernels instead, in the order `torch.optim.AdamW`'s
//! single-tensor path calls them (`mul_`, `lerp_`, `mul_`/`addcmul_`, `sqrt`/`div_`/`add_`,
//! `addcdiv_`): 9 kernels and about 23 passes, no new buffers for the parameter or the moments,
//! and the arithmetic of the kernels PyTorch itself uses. Flex runs the burn operations' own
//! arithmetic in one pass (`sepo_kernels::adamw`: the same bits as the decomposed update, which
//! stays for buffers that are not flat f32). A tensor whose buffer is shared is copied before it
//! is written, so no other holder ever sees an update.

// burn 0.22 marks its LibTorch types deprecated (burn-tch is on its way out); sepo still uses them
// for CUDA, as src/device.rs does.
#![allow(deprecated)]

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::Tensor;

/// The scalars of one update of one parameter, as `torch.optim.AdamW` computes them (f64, like
/// its Python floats).
#[derive(Clone, Copy, Debug)]
pub struct Coefs {
    /// `1 - lr * weight_decay` (decoupled decay), or `None` when the parameter is not decayed.
    pub decay: Option<f64>,
    pub beta1: f64,
    pub beta2: f64,
    /// `lr / (1 - beta1^t)`.
    pub step_size: f64,
    /// `sqrt(1 - beta2^t)`.
    pub bias_correction2_sqrt: f64,
    pub eps: f64,
}

/// AdamW's update of a parameter `p` with gradient `g` and moments `m`, `v`, per backend.
#[backend_extension(Flex: cfg(feature = "flex"), LibTorch: cfg(feature = "tch"))]
pub trait AdamWUpdate: Backend {
    /// The updated `(p, m, v)`; all four inputs are 1-D and of one length.
    fn adamw_update(
        p: FloatTensor<Self>,
        g: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        c: Coefs,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// [`AdamWUpdate::adamw_update`] on burn tensors of any device sepo builds.
pub fn adamw_update(
    p: Tensor<1>,
    g: Tensor<1>,
    m: Tensor<1>,
    v: Tensor<1>,
    c: Coefs,
) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
    let (p, m, v) = <Dispatch as AdamWUpdate>::adamw_update(
        p.into_dispatch(),
        g.into_dispatch(),
        m.into_dispatch(),
        v.into_dispatch(),
        c,
    );
    (
        Tensor::from_dispatch(p),
        Tensor::from_dispatch(m),
        Tensor::from_dispatch(v),
    )
}

/// The update written with burn's value operations, in torch's order:
///
/// ```text
/// p = p * decay                                  (when decayed)
/// m = m + (g - m) * (1 - beta1)                  (lerp with a weight below 0.5)
/// v = v * beta2 + ((1 - beta2) * g) * g          (mul_(beta2).addcmul_(g, g, 1 - beta2))
/// p = p + (-step_size * m) / (sqrt(v) / bias_correction2_sqrt + eps)    (addcdiv_)
/// ```
#[cfg(feature = "flex")]
fn decomposed<B: Backend>(
    p: FloatTensor<B>,
    g: FloatTensor<B>,
    m: FloatTensor<B>,
    v: FloatTensor<B>,
    c: Coefs,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    use burn::backend::{Scalar, TensorMetadata};
    let dtype = p.dtype();
    let s = |x: f64| Scalar::new(x, &dtype);
    let p = match c.decay {
        Some(d) => B::float_mul_scalar(p, s(d)),
        None => p,
    };
    let m = B::float_add(
        m.clone(),
        B::float_mul_scalar(B::float_sub(g.clone(), m), s(1.0 - c.beta1)),
    );
    let v = B::float_add(
        B::float_mul_scalar(v, s(c.beta2)),
        B::float_mul(B::float_mul_scalar(g.clone(), s(1.0 - c.beta2)), g),
    );
    let denom = B::float_add_scalar(
        B::float_div_scalar(B::float_sqrt(v.clone()), s(c.bias_correction2_sqrt)),
        s(c.eps),
    );
    let p = B::float_add(
        p,
        B::float_div(B::float_mul_scalar(m.clone(), s(-c.step_size)), denom),
    );
    (p, m, v)
}

#[cfg(feature = "flex")]
impl AdamWUpdate for burn::backend::Flex {
    /// The kernel crate's one-pass update (`sepo_kernels::adamw`: the decomposed update's
    /// arithmetic, the same bits), in place in each buffer this update owns alone and in a copy
    /// of one that is shared (burn-flex's copy-on-write), for f32 buffers laid out flat from
    /// their start; anything else takes the decomposed update.
    fn adamw_update(
        p: FloatTensor<Self>,
        g: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        c: Coefs,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        use burn::backend::TensorMetadata;
        let n = p.shape().num_elements();
        let flat = |t: &FloatTensor<Self>| {
            t.dtype() == burn::tensor::DType::F32 && t.layout().contiguous_offsets() == Some((0, n))
        };
        if ![&p, &g, &m, &v].into_iter().all(flat) {
            return decomposed::<Self>(p, g, m, v, c);
        }
        // burn-flex rounds each f64 scalar to f32 once, as here.
        let scalars = sepo_kernels::AdamWScalars {
            decay: c.decay.map(|d| d as f32),
            one_minus_beta1: (1.0 - c.beta1) as f32,
            beta2: c.beta2 as f32,
            one_minus_beta2: (1.0 - c.beta2) as f32,
            neg_step_size: (-c.step_size) as f32,
            bias_correction2_sqrt: c.bias_correction2_sqrt as f32,
            eps: c.eps as f32,
        };
        let (mut p, mut m, mut v) = (p, m, v);
        // `storage_mut` copies a buffer someone else still holds before it is written.
        sepo_kernels::adamw(
            &mut p.storage_mut::<f32>()[..n],
            &g.storage::<f32>()[..n],
            &mut m.storage_mut::<f32>()[..n],
            &mut v.storage_mut::<f32>()[..n],
            scalars,
        );
        (p, m, v)
    }
}

#[cfg(feature = "tch")]
impl AdamWUpdate for burn::backend::LibTorch {
    fn adamw_update(
        p: FloatTensor<Self>,
        g: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        c: Coefs,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        use burn::backend::libtorch::TchTensor;
        // Ours to write: the buffer itself when nothing else holds it, else a copy.
        let own = |t: TchTensor| {
            if t.can_mut() {
                t.tensor
            } else {
                t.tensor.copy()
            }
        };
        let (mut p, mut m, mut v, g) = (own(p), own(m), own(v), g.tensor);
        if let Some(d) = c.decay {
            let _ = p.g_mul_scalar_(d);
        }
        let _ = m.lerp_(&g, 1.0 - c.beta1);
        // addcmul_(g, g, value = 1 - beta2): tch's addcmul_ has no `value`, so the scaled factor
        // is made first; `(value * g) * g` is also the order torch's kernel multiplies in.
        let _ = v.g_mul_scalar_(c.beta2);
        let _ = v.addcmul_(&g.g_mul_scalar(1.0 - c.beta2), &g);
        let mut denom = v.sqrt();
        let _ = denom.g_div_scalar_(c.bias_correction2_sqrt);
        let _ = denom.g_add_scalar_(c.eps);
        // addcdiv_(m, denom, value = -step_size): `(value * m) / denom`, as torch's kernel.
        let _ = p.addcdiv_(&m.g_mul_scalar(-c.step_size), &denom);
        (TchTensor::new(p), TchTensor::new(m), TchTensor::new(v))
    }
}

#[cfg(all(test, feature = "tch", feature = "flex"))]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    fn tensor(values: &[f32], device: &Device) -> Tensor<1> {
        Tensor::from_data(TensorData::new(values.to_vec(), [values.len()]), device)
    }

    fn values(t: &Tensor<1>) -> Vec<f32> {
        t.to_data().convert::<f32>().to_vec::<f32>().unwrap()
    }

    /// torch's in-place kernels on LibTorch give burn's decomposed update (within rounding: the
    /// kernels may fuse a multiply-add), and never write a buffer someone else still holds.
    #[test]
    fn libtorch_in_place_update_matches_the_decomposed_one_and_spares_shared_buffers() {
        let n = 1000;
        let wave =
            |a: f32, b: f32| -> Vec<f32> { (0..n).map(|i| a * ((i as f32) * b).sin()).collect() };
        let (p0, g0, m0) = (wave(0.5, 0.37), wave(0.01, 1.3), wave(0.002, 0.71));
        let v0: Vec<f32> = wave(1e-4, 0.23).iter().map(|x| x.abs()).collect();
        let c = Coefs {
            decay: Some(1.0 - 1e-3 * 0.01),
            beta1: 0.9,
            beta2: 0.999,
            step_size: 1e-3 / (1.0 - 0.9f64.powi(3)),
            bias_correction2_sqrt: (1.0 - 0.999f64.powi(3)).sqrt(),
            eps: 1e-8,
        };
        let run = |device: &Device, keep: bool| {
            let [p, g, m, v] = [&p0, &g0, &m0, &v0].map(|x| tensor(x, device));
            let held = keep.then(|| (p.clone(), m.clone(), v.clone()));
            let (p, m, v) = adamw_update(p, g, m, v, c);
            if let Some((hp, hm, hv)) = held {
                // The copies still hold the values from before the update.
                assert_eq!(values(&hp), p0);
                assert_eq!(values(&hm), m0);
                assert_eq!(values(&hv), v0);
            }
            [values(&p), values(&m), values(&v)]
        };
        let flex = run(&crate::device::parse_device("flex").unwrap(), false);
        let tch = crate::device::parse_device("tch-cpu").unwrap();
        let (owned, shared) = (run(&tch, false), run(&tch, true));
        assert_eq!(
            owned, shared,
            "writing in place or into a copy: the same numbers"
        );
        for (k, (a, b)) in flex.iter().zip(&owned).enumerate() {
            for (x, y) in a.iter().zip(b) {
                assert!(
                    (x - y).abs() <= 1e-6 * x.abs().max(1e-3),
                    "tensor {k}: flex {x}, tch {y}"
                );
            }
        }
        // The update moved the parameter.
        assert_ne!(owned[0], p0);
    }
}

#[cfg(all(test, feature = "flex"))]
mod flex_tests {
    use super::*;
    use burn::tensor::TensorData;

    /// The one-pass update on flex gives the decomposed update's bits, with and without decay,
    /// and leaves a buffer that someone else still holds as it was.
    #[test]
    fn one_pass_update_is_the_decomposed_one_and_spares_shared_buffers() {
        let flex = crate::device::parse_device("flex").unwrap();
        let n = 70_001;
        let wave =
            |a: f32, b: f32| -> Vec<f32> { (0..n).map(|i| a * ((i as f32) * b).sin()).collect() };
        let (p0, g0, m0) = (wave(0.5, 0.37), wave(0.01, 1.3), wave(0.002, 0.71));
        let v0: Vec<f32> = wave(1e-4, 0.23).iter().map(|x| x.abs()).collect();
        let t = |x: &[f32]| Tensor::<1>::from_data(TensorData::new(x.to_vec(), [n]), &flex);
        let bits = |t: Tensor<1>| t.to_data().to_vec::<f32>().unwrap();
        for decay in [Some(1.0 - 1e-3 * 0.01), None] {
            let c = Coefs {
                decay,
                beta1: 0.9,
                beta2: 0.999,
                step_size: 1e-3 / (1.0 - 0.9f64.powi(3)),
                bias_correction2_sqrt: (1.0 - 0.999f64.powi(3)).sqrt(),
                eps: 1e-8,
            };
            let [p, g, m, v] = [&p0, &g0, &m0, &v0].map(|x| t(x));
            let held = p.clone();
            let (fp, fm, fv) = adamw_update(p, g, m, v, c);
            assert_eq!(bits(held), p0, "a held copy keeps its values");
            let ft = |x: &[f32]| {
                burn::backend::flex::FlexTensor::from_data(TensorData::new(x.to_vec(), [n]))
            };
            let [p, g, m, v] = [&p0, &g0, &m0, &v0].map(|x| ft(x));
            let (dp, dm, dv) = decomposed::<burn::backend::Flex>(p, g, m, v, c);
            let flex_bits =
                |x: burn::backend::flex::FlexTensor| x.into_data().to_vec::<f32>().unwrap();
            assert_eq!(bits(fp.clone()), flex_bits(dp), "p");
            assert_eq!(bits(fm), flex_bits(dm), "m");
            assert_eq!(bits(fv), flex_bits(dv), "v");
            assert_ne!(bits(fp), p0, "the update moved the parameter");
        }
    }
}
