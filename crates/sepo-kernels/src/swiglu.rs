//! The gated MLP's activation, `silu(gate) * up`, and its gradient, read straight from the fused
//! `[gate | up]` projection (`[rows, 2 * inter]`): Llama-family models spend a training step's
//! element-wise time here. Composed from tensor ops it is two slices (copies), a sigmoid with a
//! libm `expf` per element, two products, and in the backward as many again; here each is one
//! pass with the kernel crate's vectorized exponential.

use bytemuck::Zeroable;
use macerator::{AutoArch, Scalar, Simd, Vector, WithSimd};
use rayon::prelude::*;

use crate::exp2;

/// Rows per rayon task.
const ROWS_PER_TASK: usize = 16;

/// `silu(h[r, j]) * h[r, inter + j]` for `h` `[rows, 2 * inter]` (row-major): `[rows, inter]`.
///
/// # Panics
/// If `h` is not whole rows of `2 * inter`.
pub fn swiglu(h: &[f32], inter: usize) -> Vec<f32> {
    check(h.len(), inter, None);
    let mut out = vec![0f32; h.len() / 2];
    if inter == 0 {
        return out;
    }
    out.par_chunks_mut(ROWS_PER_TASK * inter)
        .zip(h.par_chunks(ROWS_PER_TASK * 2 * inter))
        .for_each(|(out, h)| {
            for (o, h) in out.chunks_exact_mut(inter).zip(h.chunks_exact(2 * inter)) {
                let (g, u) = h.split_at(inter);
                AutoArch::new().dispatch(Row {
                    g,
                    u,
                    dout: None,
                    out: o,
                    dup: None,
                });
            }
        });
    out
}

/// The gradient of [`swiglu`] with respect to `h` for the output gradient `dout`
/// (`[rows, inter]`): `[rows, 2 * inter]`, `dout * up * silu'(gate)` in the gate half and
/// `dout * silu(gate)` in the up half, with `silu'(x) = s (1 + x (1 - s))`, `s = sigmoid(x)`.
///
/// # Panics
/// If `h` is not whole rows of `2 * inter` or `dout` not as many rows of `inter`.
pub fn swiglu_backward(h: &[f32], inter: usize, dout: &[f32]) -> Vec<f32> {
    check(h.len(), inter, Some(dout.len()));
    let mut dh = vec![0f32; h.len()];
    if inter == 0 {
        return dh;
    }
    dh.par_chunks_mut(ROWS_PER_TASK * 2 * inter)
        .zip(h.par_chunks(ROWS_PER_TASK * 2 * inter))
        .zip(dout.par_chunks(ROWS_PER_TASK * inter))
        .for_each(|((dh, h), dout)| {
            for ((dh, h), d) in dh
                .chunks_exact_mut(2 * inter)
                .zip(h.chunks_exact(2 * inter))
                .zip(dout.chunks_exact(inter))
            {
                let (g, u) = h.split_at(inter);
                let (dg, du) = dh.split_at_mut(inter);
                AutoArch::new().dispatch(Row {
                    g,
                    u,
                    dout: Some(d),
                    out: dg,
                    dup: Some(du),
                });
            }
        });
    dh
}

fn check(len: usize, inter: usize, dout: Option<usize>) {
    assert!(
        inter == 0 && len == 0 || inter > 0 && len.is_multiple_of(2 * inter),
        "h: rows of 2 x {inter}"
    );
    if let Some(d) = dout {
        assert_eq!(2 * d, len, "dout: one row of {inter} per row of h");
    }
}

/// One row: the forward (`dout` and `dup` `None`: `out = silu(g) * u`) or the backward
/// (`out = dout * u * silu'(g)`, `dup = dout * silu(g)`).
struct Row<'a> {
    g: &'a [f32],
    u: &'a [f32],
    dout: Option<&'a [f32]>,
    out: &'a mut [f32],
    dup: Option<&'a mut [f32]>,
}

impl WithSimd for Row<'_> {
    type Output = ();

    // Inlined into macerator's function for the detected instruction set.
    #[inline(always)]
    fn with_simd<S: Simd>(self) {
        let w = f32::lanes::<S>();
        let n = self.g.len() / w * w;
        // Each vector is copied in and out (one unaligned load or store once optimized): the
        // halves of a row need not be aligned, and the result must not depend on where they
        // sit.
        let load = |x: &[f32]| {
            let mut v = [Vector::<S, f32>::zeroed()];
            bytemuck::cast_slice_mut::<Vector<S, f32>, f32>(&mut v).copy_from_slice(x);
            v[0]
        };
        let store = |v: Vector<S, f32>, out: &mut [f32]| {
            out.copy_from_slice(bytemuck::cast_slice(&[v]));
        };
        let (one, l2e) = (1f32.splat::<S>(), (-std::f32::consts::LOG2_E).splat::<S>());
        let sigmoid = |x: Vector<S, f32>| {
            // e = exp(-|x|) <= 1 (the kernel's 2^y takes y <= 0): sigmoid(x) = 1 / (1 + e) for
            // x >= 0, e / (1 + e) below.
            let e = exp2::<S>(x.abs() * l2e);
            let r = one / (one + e);
            x.ge(0f32.splat::<S>()).select(r, e * r)
        };
        let mut dup = self.dup;
        for j in (0..n).step_by(w) {
            let (g, u) = (load(&self.g[j..j + w]), load(&self.u[j..j + w]));
            let s = sigmoid(g);
            match (self.dout, dup.as_deref_mut()) {
                (Some(dout), Some(dup)) => {
                    let d = load(&dout[j..j + w]);
                    // silu'(g) = s (1 + g (1 - s))
                    let ds = s * (g * (one - s) + one);
                    store(d * u * ds, &mut self.out[j..j + w]);
                    store(d * g * s, &mut dup[j..j + w]);
                }
                _ => store(g * s * u, &mut self.out[j..j + w]),
            }
        }
        for j in n..self.g.len() {
            let (g, u) = (self.g[j], self.u[j]);
            let s = 1.0 / (1.0 + (-g).exp());
            match (self.dout, dup.as_deref_mut()) {
                (Some(dout), Some(dup)) => {
                    self.out[j] = dout[j] * u * (s * (g * (1.0 - s) + 1.0));
                    dup[j] = dout[j] * g * s;
                }
                _ => self.out[j] = g * s * u,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::random;

    /// Matches the definition in f64 (values and gradients), for widths that fill no vector,
    /// leave a remainder, or are a model's, and for large inputs (both sigmoid branches, and
    /// saturation).
    #[test]
    fn matches_the_definition() {
        for (rows, inter, amp) in [(3, 1, 2.0), (5, 7, 6.0), (20, 172, 4.0), (2, 688, 40.0)] {
            let h = random(rows * 2 * inter, inter as u64, amp);
            let d = random(rows * inter, 7, 1.5);
            let out = swiglu(&h, inter);
            let dh = swiglu_backward(&h, inter, &d);
            for r in 0..rows {
                for j in 0..inter {
                    let g = h[r * 2 * inter + j] as f64;
                    let u = h[r * 2 * inter + inter + j] as f64;
                    let s = 1.0 / (1.0 + (-g).exp());
                    let want = g * s * u;
                    let got = out[r * inter + j] as f64;
                    assert!(
                        (got - want).abs() < 2e-6 * (1.0 + want.abs()),
                        "{got} vs {want}"
                    );
                    let dd = d[r * inter + j] as f64;
                    let dg = dd * u * s * (1.0 + g * (1.0 - s));
                    let du = dd * g * s;
                    let (gg, gu) = (
                        dh[r * 2 * inter + j] as f64,
                        dh[r * 2 * inter + inter + j] as f64,
                    );
                    assert!(
                        (gg - dg).abs() < 2e-6 * (1.0 + dg.abs()),
                        "dgate {gg} vs {dg}"
                    );
                    assert!(
                        (gu - du).abs() < 2e-6 * (1.0 + du.abs()),
                        "dup {gu} vs {du}"
                    );
                }
            }
        }
    }

    /// The same rows give the same bits wherever they sit in memory.
    #[test]
    fn results_do_not_depend_on_the_address() {
        let inter = 172;
        let h = random(2 * 2 * inter, 3, 5.0);
        let d = random(2 * inter, 4, 1.0);
        let mut buf = vec![0f32; h.len() + 32];
        let mut seen = None;
        for offset in 0..17 {
            buf[offset..offset + h.len()].copy_from_slice(&h);
            let x = &buf[offset..offset + h.len()];
            let bits = |v: Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let got = (bits(swiglu(x, inter)), bits(swiglu_backward(x, inter, &d)));
            match &seen {
                None => seen = Some(got),
                Some(first) => assert!(*first == got, "offset {offset}"),
            }
        }
    }
}
