//! RMS normalization of rows (`y = x * r * w`, `r = 1 / sqrt(mean(x^2) + eps)`, the Llama
//! family's norm) and its gradient, one pass over the rows each. Composed from tensor ops the
//! forward is seven (square, mean, add, sqrt, reciprocal, two products), each writing a tensor,
//! and autodiff's backward as many again (one pass each way instead took a DPO stage of the
//! main job from about 10 to about 9 s of training).

use rayon::prelude::*;

/// Rows per rayon task.
const ROWS_PER_TASK: usize = 64;

/// `x` (`[rows, n]`, row-major) normalized by each row's root mean square and scaled by `w`
/// (`[n]`): `y = (x * r) * w` with `r = 1 / sqrt(mean(x^2) + eps)`, in f32 as transformers'
/// `LlamaRMSNorm` computes it (f32 statistics). Returns `y` and each row's `r` (`[rows]`, for
/// [`rms_norm_backward`]).
///
/// # Panics
/// If `x` is not whole rows of `w.len()`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let n = w.len();
    assert!(n > 0 && x.len().is_multiple_of(n), "rows of {n}");
    let mut y = vec![0f32; x.len()];
    let mut r = vec![0f32; x.len() / n];
    y.par_chunks_mut(ROWS_PER_TASK * n)
        .zip(r.par_chunks_mut(ROWS_PER_TASK))
        .zip(x.par_chunks(ROWS_PER_TASK * n))
        .for_each(|((y, r), x)| {
            for ((y, r), x) in y.chunks_exact_mut(n).zip(r).zip(x.chunks_exact(n)) {
                *r = 1.0 / (sum_of_products(x, x) / n as f32 + eps).sqrt();
                for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
                    *y = (x * *r) * w;
                }
            }
        });
    (y, r)
}

/// The gradients `(dx, dw)` of [`rms_norm`] for the output gradient `dy`, from its input, scale
/// and per-row `r`: with `g = dy * w`, `dx = r g - x r^3 (g . x) / n` and `dw = sum over rows of
/// dy x r`. `dw` is summed per task in row order and the tasks' sums in task order, so it does
/// not depend on the thread count.
///
/// # Panics
/// On slices of mismatched lengths.
pub fn rms_norm_backward(x: &[f32], w: &[f32], r: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let n = w.len();
    assert!(n > 0 && x.len().is_multiple_of(n), "rows of {n}");
    assert_eq!(r.len(), x.len() / n, "one r per row");
    assert_eq!(dy.len(), x.len(), "dy length");
    let mut dx = vec![0f32; x.len()];
    let partial: Vec<Vec<f32>> = dx
        .par_chunks_mut(ROWS_PER_TASK * n)
        .zip(r.par_chunks(ROWS_PER_TASK))
        .zip(
            x.par_chunks(ROWS_PER_TASK * n)
                .zip(dy.par_chunks(ROWS_PER_TASK * n)),
        )
        .map(|((dx, r), (x, dy))| {
            let mut dw = vec![0f32; n];
            let mut g = vec![0f32; n];
            let rows = dx.chunks_exact_mut(n).zip(r);
            for ((dx, &r), (x, dy)) in rows.zip(x.chunks_exact(n).zip(dy.chunks_exact(n))) {
                for (((g, dw), dy), (w, x)) in
                    g.iter_mut().zip(&mut dw).zip(dy).zip(w.iter().zip(x))
                {
                    *g = dy * w;
                    *dw += dy * x * r;
                }
                let c = r * r * r * sum_of_products(&g, x) / n as f32;
                for ((dx, g), x) in dx.iter_mut().zip(&g).zip(x) {
                    *dx = r * g - x * c;
                }
            }
            dw
        })
        .collect();
    let mut dw = vec![0f32; n];
    for p in &partial {
        for (a, b) in dw.iter_mut().zip(p) {
            *a += b;
        }
    }
    (dx, dw)
}

/// `sum_i a[i] * b[i]` in eight interleaved partial sums (which the compiler vectorizes).
#[inline(always)]
fn sum_of_products(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (a, b) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += a[i] * b[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::random;

    /// The definition in f64.
    fn naive(x: &[f32], w: &[f32], eps: f64) -> (Vec<f64>, Vec<f64>) {
        let n = w.len();
        let mut y = Vec::new();
        let mut r = Vec::new();
        for row in x.chunks(n) {
            let ms = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / n as f64;
            let ri = 1.0 / (ms + eps).sqrt();
            r.push(ri);
            y.extend(row.iter().zip(w).map(|(v, w)| *v as f64 * ri * *w as f64));
        }
        (y, r)
    }

    #[test]
    fn matches_the_definition() {
        for (rows, n) in [(1, 8), (3, 64), (130, 37), (70, 768)] {
            let x = random(rows * n, rows as u64, 3.0);
            let w = random(n, 7, 1.5);
            let (y, r) = rms_norm(&x, &w, 1e-5);
            let (ny, nr) = naive(&x, &w, 1e-5);
            for (a, b) in y.iter().zip(&ny).chain(r.iter().zip(&nr)) {
                assert!(
                    (*a as f64 - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "{rows}x{n}: {a} vs {b}"
                );
            }
        }
    }

    /// The gradients against central differences of `sum(y * c)` in f64 (the loss is linear in
    /// `y`, so its gradient is `dy = c`).
    #[test]
    fn gradients_match_finite_differences() {
        let (rows, n) = (5, 24);
        let x = random(rows * n, 3, 2.0);
        let w = random(n, 4, 1.5);
        let c = random(rows * n, 5, 1.0);
        let loss = |x: &[f32], w: &[f32]| -> f64 {
            let (y, _) = naive(x, w, 1e-5);
            y.iter().zip(&c).map(|(y, c)| y * *c as f64).sum()
        };
        let (_, r) = rms_norm(&x, &w, 1e-5);
        let (dx, dw) = rms_norm_backward(&x, &w, &r, &c);
        let h = 1e-3f32;
        let numeric = |v: &[f32], i: usize, of_x: bool| {
            let (mut a, mut b) = (v.to_vec(), v.to_vec());
            a[i] += h;
            b[i] -= h;
            let (la, lb) = if of_x {
                (loss(&a, &w), loss(&b, &w))
            } else {
                (loss(&x, &a), loss(&x, &b))
            };
            (la - lb) / (2.0 * h as f64)
        };
        for (i, &got) in dx.iter().enumerate() {
            let want = numeric(&x, i, true);
            assert!(
                (got as f64 - want).abs() < 2e-3 * (1.0 + want.abs()),
                "dx[{i}]"
            );
        }
        for (i, &got) in dw.iter().enumerate() {
            let want = numeric(&w, i, false);
            assert!(
                (got as f64 - want).abs() < 2e-3 * (1.0 + want.abs()),
                "dw[{i}]"
            );
        }
    }

    /// `dw` does not depend on how rayon splits the rows.
    #[test]
    fn dw_is_the_same_on_any_number_of_threads() {
        let (rows, n) = (1000, 16);
        let x = random(rows * n, 11, 2.0);
        let w = random(n, 12, 1.0);
        let dy = random(rows * n, 13, 1.0);
        let (_, r) = rms_norm(&x, &w, 1e-6);
        let run = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| rms_norm_backward(&x, &w, &r, &dy))
        };
        assert_eq!(run(1), run(3));
    }
}
