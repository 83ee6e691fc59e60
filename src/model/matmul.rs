//! `x @ w` for forwards without gradients on flex, without burn-flex's copy of the output.
//!
//! burn-flex allocates a matmul's output with `FlexTensor::empty`: a zero-filled `Vec<u8>`,
//! which cubecl's `Bytes::from_bytes_vec` then copies into a 16-byte-aligned buffer, so every
//! output is filled with zeros and copied before gemm writes it. In the long-sequence `score`
//! benchmark that copy alone was 3.8% of the CPU samples (besides its page faults). Here gemm
//! writes into a `Vec<f32>` that flex then keeps as it is (`TensorData::new` takes the buffer),
//! with the arguments burn-flex passes (strides, the same choice of threads), so the values are
//! the same, bit for bit (a test compares them).
//!
//! Only forwards without gradients take it (score, reference log-probs, evaluate, generation):
//! autodiff records burn's matmul for its backward pass.

use burn::tensor::{DType, Tensor};

/// `x @ w` for `x` `[m, k]` and `w` `[k, n]`, or `None` where burn's matmul should run instead:
/// not flex, autodiff, not f32, an empty side, or a layout gemm is not given here.
pub fn matmul(x: &Tensor<2>, w: &Tensor<2>) -> Option<Tensor<2>> {
    let device = x.device();
    let usable = x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && crate::device::is_flex(&device)
        && !device.is_autodiff();
    if !usable {
        return None;
    }
    #[cfg(feature = "flex")]
    {
        flex::matmul(x, w)
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = w;
        None
    }
}

#[cfg(feature = "flex")]
mod flex {
    use burn::backend::Flex;
    use burn::backend::flex::FlexTensor;
    use burn::tensor::{Tensor, TensorData};

    /// burn-flex's threshold (`ops/matmul.rs`): gemm on all threads from this many
    /// multiply-adds, on one below it.
    const PARALLEL_THRESHOLD: usize = 192 * 192 * 192;

    /// A matrix operand: its storage, the offset of element (0, 0), and its row and column
    /// strides, checked to stay inside the storage for `rows x cols`.
    struct Operand {
        tensor: FlexTensor,
        offset: usize,
        row_stride: isize,
        col_stride: isize,
    }

    impl Operand {
        fn of(t: &Tensor<2>) -> Option<Operand> {
            let tensor = t.clone().try_into_primitive::<Flex>().ok()?;
            let layout = tensor.layout();
            let [rows, cols] = [layout.shape()[0], layout.shape()[1]];
            let strides = layout.strides();
            let (row_stride, col_stride) = (strides[0], strides[1]);
            if rows == 0 || cols == 0 || row_stride < 0 || col_stride < 0 {
                return None;
            }
            let offset = layout.start_offset();
            let last = offset + (rows - 1) * row_stride as usize + (cols - 1) * col_stride as usize;
            (last < tensor.storage::<f32>().len()).then_some(Operand {
                tensor,
                offset,
                row_stride,
                col_stride,
            })
        }

        fn ptr(&self) -> *const f32 {
            self.tensor.storage::<f32>()[self.offset..].as_ptr()
        }
    }

    pub(super) fn matmul(x: &Tensor<2>, w: &Tensor<2>) -> Option<Tensor<2>> {
        let ([m, k], [k2, n]) = (x.dims(), w.dims());
        if k != k2 {
            return None;
        }
        let (lhs, rhs) = (Operand::of(x)?, Operand::of(w)?);
        let parallelism = if m.saturating_mul(n).saturating_mul(k) >= PARALLEL_THRESHOLD {
            gemm::Parallelism::Rayon(0)
        } else {
            gemm::Parallelism::None
        };
        let mut out: Vec<f32> = Vec::with_capacity(m * n);
        // SAFETY: `Operand::of` checked that every element gemm reads (`rows x cols` from the
        // offset with the given non-negative strides) lies inside its storage, which the
        // operands hold alive across the call; `out` has room for `m * n` values, written
        // row-major (column stride 1, row stride `n`). With `read_dst` false gemm writes every
        // element of `dst` (as `beta * lhs @ rhs`, beta one) and reads none, so all `m * n`
        // are initialized when `set_len` runs.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                out.as_mut_ptr(),
                1,
                n as isize,
                false,
                lhs.ptr(),
                lhs.col_stride,
                lhs.row_stride,
                rhs.ptr(),
                rhs.col_stride,
                rhs.row_stride,
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
            out.set_len(m * n);
        }
        let t = FlexTensor::from_data(TensorData::new(out, [m, n]));
        Some(Tensor::from_primitive::<Flex>(t))
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Tensor;

    use super::matmul;
    use crate::model::tests::uniform;

    /// The same bits as burn's matmul, for contiguous and transposed operands, above and below
    /// the threshold for threads; and `None` under autodiff.
    #[test]
    fn gives_burns_values_bit_for_bit() {
        let Ok(dev) = crate::device::parse_device("flex") else {
            return;
        };
        for (m, k, n) in [(1, 1, 1), (7, 5, 3), (300, 64, 512), (64, 200, 96)] {
            let x: Tensor<2> = uniform([m, k], 1, 1.0, &dev);
            let w: Tensor<2> = uniform([k, n], 2, 1.0, &dev);
            let wt: Tensor<2> = uniform([n, k], 3, 1.0, &dev).transpose();
            for w in [w, wt] {
                let ours = matmul(&x, &w).expect("flex f32 takes it");
                let burn = x.clone().matmul(w.clone());
                assert_eq!(ours.dims(), burn.dims());
                let (a, b) = (ours.into_data(), burn.into_data());
                let bits = |d: burn::tensor::TensorData| -> Vec<u32> {
                    d.try_to_vec::<f32>()
                        .unwrap()
                        .iter()
                        .map(|v| v.to_bits())
                        .collect()
                };
                assert!(bits(a) == bits(b), "{m}x{k}x{n}");
            }
        }
        let ad = dev.autodiff();
        let x: Tensor<2> = uniform([4, 4], 1, 1.0, &ad);
        assert!(matmul(&x, &x).is_none());
    }
}
