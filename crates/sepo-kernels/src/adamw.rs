//! One AdamW update of a flat parameter, in place, in one pass: the parameter, its gradient and
//! both moments are read once and the parameter and moments written once. Composed from tensor
//! operations the update is thirteen element-wise operations, each a pass over the parameter's
//! size (with new buffers where the inputs are shared): 15.5% of the CPU samples of a one-step
//! `train` stage of a 162M-parameter model.
//!
//! The arithmetic is the composed update's, operation for operation, in f32 with the scalars
//! rounded to f32 as burn-flex rounds them, so the results are the same bits:
//!
//! ```text
//! p = p * decay                                  (when decayed)
//! m = m + (g - m) * (1 - beta1)
//! v = v * beta2 + (g * (1 - beta2)) * g
//! p = p + (m * -step_size) / (sqrt(v) / bias_correction2_sqrt + eps)
//! ```

use rayon::prelude::*;

/// Elements per rayon task.
const CHUNK: usize = 1 << 16;

/// The scalars of one update, in f32 (each `f64` value torch's AdamW computes, cast once).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWScalars {
    /// `1 - lr * weight_decay`, or `None` when the parameter is not decayed.
    pub decay: Option<f32>,
    /// `1 - beta1`.
    pub one_minus_beta1: f32,
    /// `beta2`.
    pub beta2: f32,
    /// `1 - beta2`.
    pub one_minus_beta2: f32,
    /// `-lr / (1 - beta1^t)`.
    pub neg_step_size: f32,
    /// `sqrt(1 - beta2^t)`.
    pub bias_correction2_sqrt: f32,
    /// `eps`.
    pub eps: f32,
}

/// Updates `p`, `m` and `v` in place for the gradient `g` (see the module's formulas).
///
/// # Panics
/// If the four slices are not of one length.
pub fn adamw(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: AdamWScalars) {
    let n = p.len();
    assert!(
        g.len() == n && m.len() == n && v.len() == n,
        "parameter, gradient and moments of one length"
    );
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| {
            for ((p, g), (m, v)) in p.iter_mut().zip(g).zip(m.iter_mut().zip(v.iter_mut())) {
                let decayed = match c.decay {
                    Some(d) => *p * d,
                    None => *p,
                };
                *m = *m + (g - *m) * c.one_minus_beta1;
                *v = *v * c.beta2 + (g * c.one_minus_beta2) * g;
                let denom = v.sqrt() / c.bias_correction2_sqrt + c.eps;
                *p = decayed + (*m * c.neg_step_size) / denom;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::random;

    /// The formulas one operation at a time over whole vectors (as the composed update runs),
    /// against the one-pass kernel: the same bits, with and without decay.
    #[test]
    fn equals_the_update_written_as_whole_vector_operations() {
        let n = 200_003;
        let g = random(n, 1, 0.01);
        let (p0, m0) = (random(n, 2, 0.5), random(n, 3, 0.002));
        let v0: Vec<f32> = random(n, 4, 1e-4).iter().map(|x| x.abs()).collect();
        for decay in [Some(1.0 - 1e-5f32), None] {
            let c = AdamWScalars {
                decay,
                one_minus_beta1: (1.0 - 0.9f64) as f32,
                beta2: 0.999,
                one_minus_beta2: (1.0 - 0.999f64) as f32,
                neg_step_size: (-1e-3 / (1.0 - 0.9f64.powi(3))) as f32,
                bias_correction2_sqrt: (1.0 - 0.999f64.powi(3)).sqrt() as f32,
                eps: 1e-8,
            };
            let map =
                |a: &[f32], f: &dyn Fn(f32) -> f32| a.iter().map(|x| f(*x)).collect::<Vec<_>>();
            let zip = |a: &[f32], b: &[f32], f: &dyn Fn(f32, f32) -> f32| {
                a.iter().zip(b).map(|(x, y)| f(*x, *y)).collect::<Vec<_>>()
            };
            let p = match decay {
                Some(d) => map(&p0, &|x| x * d),
                None => p0.clone(),
            };
            let m = zip(
                &m0,
                &map(&zip(&g, &m0, &|a, b| a - b), &|x| x * c.one_minus_beta1),
                &|a, b| a + b,
            );
            let v = zip(
                &map(&v0, &|x| x * c.beta2),
                &zip(&map(&g, &|x| x * c.one_minus_beta2), &g, &|a, b| a * b),
                &|a, b| a + b,
            );
            let denom = map(
                &map(&map(&v, &|x| x.sqrt()), &|x| x / c.bias_correction2_sqrt),
                &|x| x + c.eps,
            );
            let want_p = zip(
                &p,
                &zip(&map(&m, &|x| x * c.neg_step_size), &denom, &|a, b| a / b),
                &|a, b| a + b,
            );
            let (mut kp, mut km, mut kv) = (p0.clone(), m0.clone(), v0.clone());
            adamw(&mut kp, &g, &mut km, &mut kv, c);
            assert_eq!(kp, want_p);
            assert_eq!(km, m);
            assert_eq!(kv, v);
            assert_ne!(kp, p0, "the update moved the parameter");
        }
    }
}
