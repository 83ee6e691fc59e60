//! The log-softmax of each row of logits gathered at one target column, and its gradient: what
//! every log-prob in training, scoring and evaluation is made of, over the LM head's output
//! `[rows, vocab]` (the largest tensor of a small model's step).
//!
//! Composed from tensor ops, `x - max`, `exp`, `sum`, `log` and `gather` each write or read a
//! `rows x vocab` tensor, and the backward writes four more. Here each row is worked on where it
//! sits in cache: its maximum, then the sum of `exp(x - max)` (the log-denominator `lse`), then
//! the gathered value; the backward recomputes `lse` the same way and writes only the gradient
//! `dout * (onehot(target) - exp(x - lse))`. Rows are shared on rayon's global pool.

use bytemuck::Zeroable;
use macerator::{AutoArch, Scalar, Simd, Vector, WithSimd};
use rayon::prelude::*;

use crate::exp2;

/// Rows per rayon task: a 32000-column row is 128 KB, so a task is a few hundred KB of logits.
const ROWS_PER_TASK: usize = 4;

/// `log_softmax(logits[r])[targets[r]]` for each row `r` of `logits` (`[rows, vocab]`,
/// row-major): `x[t] - max - ln(sum(exp(x - max)))`.
///
/// # Panics
/// If `logits` is not `targets.len()` rows of `vocab`, or a target is not below `vocab`.
pub fn gather_logprobs(logits: &[f32], vocab: usize, targets: &[usize]) -> Vec<f32> {
    check(logits.len(), vocab, targets, None);
    let mut out = vec![0f32; targets.len()];
    if vocab == 0 {
        return out;
    }
    out.par_chunks_mut(ROWS_PER_TASK)
        .zip(logits.par_chunks(ROWS_PER_TASK * vocab))
        .zip(targets.par_chunks(ROWS_PER_TASK))
        .for_each(|((out, x), t)| {
            for ((o, x), &t) in out.iter_mut().zip(x.chunks_exact(vocab)).zip(t) {
                *o = x[t] - row_lse(x);
            }
        });
    out
}

/// The gradient of [`gather_logprobs`] with respect to the logits for the output gradient
/// `dout` (`[rows]`): `dout[r] * ([j == targets[r]] - softmax(logits[r])[j])`, `[rows, vocab]`.
///
/// # Panics
/// As [`gather_logprobs`], and if `dout` is not one value per row.
pub fn gather_logprobs_backward(
    logits: &[f32],
    vocab: usize,
    targets: &[usize],
    dout: &[f32],
) -> Vec<f32> {
    check(logits.len(), vocab, targets, Some(dout.len()));
    let mut grad = vec![0f32; logits.len()];
    if vocab == 0 {
        return grad;
    }
    grad.par_chunks_mut(ROWS_PER_TASK * vocab)
        .zip(logits.par_chunks(ROWS_PER_TASK * vocab))
        .zip(
            targets
                .par_chunks(ROWS_PER_TASK)
                .zip(dout.par_chunks(ROWS_PER_TASK)),
        )
        .for_each(|((grad, x), (t, g))| {
            for (((grad, x), &t), &g) in grad
                .chunks_exact_mut(vocab)
                .zip(x.chunks_exact(vocab))
                .zip(t)
                .zip(g)
            {
                let lse = row_lse(x);
                AutoArch::new().dispatch(RowGrad { x, lse, g, grad });
                grad[t] += g;
            }
        });
    grad
}

fn check(len: usize, vocab: usize, targets: &[usize], dout: Option<usize>) {
    assert_eq!(
        len,
        targets.len() * vocab,
        "logits: one row of {vocab} per target"
    );
    if let Some(d) = dout {
        assert_eq!(d, targets.len(), "dout: one value per row");
    }
    if let Some(&t) = targets.iter().find(|&&t| t >= vocab) {
        panic!("target {t} is outside the vocabulary of {vocab}");
    }
}

/// `ln(sum(exp(x)))` of one row, max-subtracted.
fn row_lse(x: &[f32]) -> f32 {
    AutoArch::new().dispatch(RowLse(x))
}

struct RowLse<'a>(&'a [f32]);

impl WithSimd for RowLse<'_> {
    type Output = f32;

    // Inlined into macerator's function for the detected instruction set.
    #[inline(always)]
    fn with_simd<S: Simd>(self) -> f32 {
        // Vectors from the row's start, whatever its address (copied in: one unaligned load
        // once optimized), so that the sum's order, and so its rounding, depends only on the
        // row: `align_to` would move the split with the allocation, and the same training run
        // would not give the same bytes twice.
        let w = f32::lanes::<S>();
        let n = self.0.len() / w * w;
        let (body, tail) = self.0.split_at(n);
        let load = |x: &[f32]| {
            let mut v = [Vector::<S, f32>::zeroed()];
            bytemuck::cast_slice_mut::<Vector<S, f32>, f32>(&mut v).copy_from_slice(x);
            v[0]
        };
        // Two accumulators, so that the loop is not one dependency chain.
        let (mut m0, mut m1) = (
            f32::NEG_INFINITY.splat::<S>(),
            f32::NEG_INFINITY.splat::<S>(),
        );
        for pair in body.chunks(2 * w) {
            m0 = m0.max(load(&pair[..w]));
            if pair.len() == 2 * w {
                m1 = m1.max(load(&pair[w..]));
            }
        }
        let max = tail.iter().fold(m0.max(m1).reduce_max(), |m, &x| m.max(x));
        if !max.is_finite() {
            // All -inf, or an infinity in the row: log-softmax is NaN, as the definition's
            // `x - max` makes it (a NaN anywhere does so below).
            return f32::NAN;
        }
        // exp(x - max) = 2^(x log2(e) - max log2(e)), the kernel's base-2 exponential.
        let l2e = std::f32::consts::LOG2_E;
        let (lv, mv) = (l2e.splat::<S>(), (-max * l2e).splat::<S>());
        let (mut s0, mut s1) = (0f32.splat::<S>(), 0f32.splat::<S>());
        for pair in body.chunks(2 * w) {
            s0 += exp2::<S>(load(&pair[..w]).mul_add(lv, mv));
            if pair.len() == 2 * w {
                s1 += exp2::<S>(load(&pair[w..]).mul_add(lv, mv));
            }
        }
        let sum = tail
            .iter()
            .fold((s0 + s1).reduce_add(), |s, &x| s + ((x - max) * l2e).exp2());
        max + sum.ln()
    }
}

/// `grad = -g * exp(x - lse)`, one row.
struct RowGrad<'a> {
    x: &'a [f32],
    lse: f32,
    g: f32,
    grad: &'a mut [f32],
}

impl WithSimd for RowGrad<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self) {
        let w = f32::lanes::<S>();
        let l2e = std::f32::consts::LOG2_E;
        let (lv, mv, gv) = (
            l2e.splat::<S>(),
            (-self.lse * l2e).splat::<S>(),
            (-self.g).splat::<S>(),
        );
        let n = self.x.len() / w * w;
        // The logits and the gradient need not share an alignment: each vector is copied in
        // and out (one unaligned load and store once optimized).
        let mut v = [Vector::<S, f32>::zeroed()];
        for (x, o) in self.x[..n]
            .chunks_exact(w)
            .zip(self.grad[..n].chunks_exact_mut(w))
        {
            bytemuck::cast_slice_mut::<Vector<S, f32>, f32>(&mut v).copy_from_slice(x);
            v[0] = gv * exp2::<S>(v[0].mul_add(lv, mv));
            o.copy_from_slice(bytemuck::cast_slice(&v));
        }
        for (x, o) in self.x[n..].iter().zip(&mut self.grad[n..]) {
            *o = -self.g * ((x - self.lse) * l2e).exp2();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::random;

    /// The definition in f64: log-probs and their gradient.
    fn definition(x: &[f32], vocab: usize, t: &[usize], g: &[f32]) -> (Vec<f64>, Vec<f64>) {
        let mut lp = vec![];
        let mut grad = vec![];
        for (r, row) in x.chunks_exact(vocab).enumerate() {
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let lse = max
                + row
                    .iter()
                    .map(|&v| (v as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            lp.push(row[t[r]] as f64 - lse);
            for (j, &v) in row.iter().enumerate() {
                let onehot = if j == t[r] { 1.0 } else { 0.0 };
                grad.push(g[r] as f64 * (onehot - (v as f64 - lse).exp()));
            }
        }
        (lp, grad)
    }

    /// Matches the definition to f32 rounding, for vocabularies that fill no vector, leave a
    /// remainder, or are large, and for rows with a large spread.
    #[test]
    fn matches_the_definition() {
        for (rows, vocab, amp) in [
            (3, 1, 1.0),
            (5, 7, 3.0),
            (9, 17, 10.0),
            (6, 512, 4.0),
            (3, 32000, 8.0),
            (2, 1000, 60.0),
        ] {
            let x = random(rows * vocab, vocab as u64, amp);
            let t: Vec<usize> = (0..rows).map(|r| (r * 7919) % vocab).collect();
            let g = random(rows, 3, 2.0);
            let (lp, grad) = definition(&x, vocab, &t, &g);
            let got = gather_logprobs(&x, vocab, &t);
            for (a, b) in got.iter().zip(&lp) {
                assert!(
                    (*a as f64 - b).abs() < 2e-5 * (1.0 + b.abs()),
                    "{rows}x{vocab}: {a} vs {b}"
                );
            }
            let got = gather_logprobs_backward(&x, vocab, &t, &g);
            for (a, b) in got.iter().zip(&grad) {
                assert!(
                    (*a as f64 - b).abs() < 2e-6,
                    "{rows}x{vocab} grad: {a} vs {b}"
                );
            }
        }
    }

    /// The same row gives the same bits wherever it sits in memory: a training run must write
    /// the same weights whatever the allocator does (tests/gradient_checkpointing.rs caught
    /// a sum split at the row's first aligned vector).
    #[test]
    fn results_do_not_depend_on_the_address() {
        let vocab = 1000;
        let x = random(vocab, 5, 20.0);
        let mut buf = vec![0f32; vocab + 32];
        let mut seen = None;
        for offset in 0..17 {
            buf[offset..offset + vocab].copy_from_slice(&x);
            let row = &buf[offset..offset + vocab];
            let lp = gather_logprobs(row, vocab, &[3])[0].to_bits();
            let grad: Vec<u32> = gather_logprobs_backward(row, vocab, &[3], &[0.5])
                .iter()
                .map(|g| g.to_bits())
                .collect();
            match &seen {
                None => seen = Some((lp, grad)),
                Some(first) => assert!(*first == (lp, grad), "offset {offset}"),
            }
        }
    }

    #[test]
    fn non_finite_rows_follow_the_definition() {
        let x = [
            0.0,
            f32::NEG_INFINITY,
            1.0,
            f32::NEG_INFINITY,
            2.0,
            f32::NAN,
        ];
        let lp = gather_logprobs(&x, 3, &[0, 0]);
        assert!((lp[0] - (0.0 - (1.0f32 + 1f32.exp()).ln())).abs() < 1e-6);
        assert!(lp[1].is_nan());
    }

    #[test]
    #[should_panic(expected = "outside the vocabulary")]
    fn a_target_past_the_vocabulary_panics() {
        gather_logprobs(&[0.0; 4], 2, &[0, 2]);
    }
}
