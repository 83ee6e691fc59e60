//! Normal draws for fresh weights, the arithmetic of every weight a `model` stage draws from
//! `config:`. Here so that it is optimized in the dev profile too (in the sepo crate, unoptimized,
//! a per-element loop costs more than the draws). The values are exactly those of the definitions
//! below, which the model stage's hash stands for.
//!
//! [`fill_normal`] (`init: ziggurat`, the default): rand_distr's ziggurat, a table lookup and a
//! multiply for 99% of draws, on independent ChaCha12 streams per block, so any number of threads
//! gives the same values. [`box_muller`] (`init: box-muller`, sepo's first sampler, kept so that
//! models built with it can be rebuilt bit for bit): one sequential stream, and a `ln`, `cos` and
//! `sin` per pair, about five times the cost.

use chacha20::ChaCha12Rng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;

/// Elements per block of [`fill_normal`]: each draws from its own stream.
pub const NORMAL_BLOCK: usize = 1 << 16;

/// Fills `out` with `std`-scaled standard normal draws: block `b` (elements
/// `b * NORMAL_BLOCK..(b + 1) * NORMAL_BLOCK`) takes, in order, rand_distr's `StandardNormal`
/// samples (f64, rounded to f32, then times `std`) from `ChaCha12Rng::seed_from_u64(seed)` set to
/// stream `(tensor << 32) | b`. Blocks run on all threads; the values do not depend on how many.
///
/// # Panics
/// If `out` has `2^32` blocks or more.
pub fn fill_normal(seed: u64, tensor: u32, std: f32, out: &mut [f32]) {
    assert!(
        out.len().div_ceil(NORMAL_BLOCK) <= u32::MAX as usize,
        "fill_normal: {} elements",
        out.len()
    );
    out.par_chunks_mut(NORMAL_BLOCK)
        .enumerate()
        .for_each(|(b, block)| {
            let mut rng = ChaCha12Rng::seed_from_u64(seed);
            rng.set_stream((u64::from(tensor) << 32) | b as u64);
            for x in block {
                let z: f64 = StandardNormal.sample(&mut rng);
                *x = z as f32 * std;
            }
        });
}

/// Fills `out` from `words`: pair `i` takes words `4i..4i + 4` as two u64 `a`, `b` (low word
/// first), `u1 = 1 - (a >> 11) 2^-53`, `u2 = (b >> 11) 2^-53`, and gives `r cos t` then `r sin t`
/// (`r = sqrt(-2 ln u1)`, `t = 2 pi u2`, in f64, rounded to f32) times `std`; an odd `out` ends
/// with a cosine. The same arithmetic, in the same order, as drawing `u1 = 1 - rng.random::<f64>()`
/// and `u2 = rng.random::<f64>()` from rand's generators.
///
/// # Panics
/// If `words` holds fewer than `4 * out.len().div_ceil(2)` words.
pub fn box_muller(words: &[u32], std: f32, out: &mut [f32]) {
    const SCALE: f64 = 1.0 / ((1u64 << 53) as f64);
    let pairs = out.len().div_ceil(2);
    assert!(
        words.len() >= 4 * pairs,
        "box_muller: {} words for {pairs} pairs",
        words.len()
    );
    for (o, w) in out.chunks_mut(2).zip(words.chunks_exact(4)) {
        let a = (u64::from(w[1]) << 32) | u64::from(w[0]);
        let b = (u64::from(w[3]) << 32) | u64::from(w[2]);
        let u1 = 1.0 - SCALE * ((a >> 11) as f64);
        let u2 = SCALE * ((b >> 11) as f64);
        let r = (-2.0 * u1.ln()).sqrt();
        let t = 2.0 * std::f64::consts::PI * u2;
        o[0] = (r * t.cos()) as f32 * std;
        if let Some(s) = o.get_mut(1) {
            *s = (r * t.sin()) as f32 * std;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, one block after another on this thread.
    fn sequential(seed: u64, tensor: u32, std: f32, n: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(n);
        for b in 0..n.div_ceil(NORMAL_BLOCK) {
            let mut rng = ChaCha12Rng::seed_from_u64(seed);
            rng.set_stream((u64::from(tensor) << 32) | b as u64);
            for _ in b * NORMAL_BLOCK..((b + 1) * NORMAL_BLOCK).min(n) {
                let z: f64 = StandardNormal.sample(&mut rng);
                out.push(z as f32 * std);
            }
        }
        out
    }

    #[test]
    fn fill_normal_is_its_definition_on_any_number_of_threads() {
        let n = 3 * NORMAL_BLOCK + 123;
        let want = sequential(7, 5, 0.02, n);
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut got = vec![0f32; n];
            pool.install(|| fill_normal(7, 5, 0.02, &mut got));
            assert_eq!(got, want, "{threads} threads");
        }
    }

    #[test]
    fn fill_normal_draws_independent_standard_normals() {
        let n = 1 << 20;
        let draw = |seed, tensor| {
            let mut v = vec![0f32; n];
            fill_normal(seed, tensor, 2.0, &mut v);
            v
        };
        let a = draw(1, 0);
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64;
        // Standard errors: 2 / 1024 for the mean, about 4 * sqrt(2 / n) = 0.0055 for the variance.
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 4.0).abs() < 0.03, "variance {var}");
        let beyond = |k: f64| a.iter().filter(|&&x| (x as f64).abs() > 2.0 * k).count() as f64;
        // P(|z| > 1) = 0.3173, P(|z| > 3) = 0.0027: the tails the ziggurat treats apart.
        assert!((beyond(1.0) / n as f64 - 0.3173).abs() < 0.003);
        assert!((beyond(3.0) / n as f64 - 0.0027).abs() < 0.0003);
        // Other blocks, tensors and seeds draw other numbers: no two of these share a value.
        let firsts = |v: &[f32]| [v[0], v[NORMAL_BLOCK], v[2 * NORMAL_BLOCK]];
        let mut seen: Vec<f32> = [a.clone(), draw(1, 1), draw(2, 0)]
            .iter()
            .flat_map(|v| firsts(v))
            .collect();
        seen.sort_by(f32::total_cmp);
        seen.dedup();
        assert_eq!(seen.len(), 9);
    }
}
