//! Box-Muller normal draws from a stream of random words: the arithmetic of every fresh weight a
//! `model` stage draws from `config:`. Here so that it is optimized in the dev profile too (in the
//! sepo crate, unoptimized, the loop around the `ln`/`cos`/`sin` calls cost about as much as they
//! do); the values are exactly those of the definition below, which the model stage's hash pins.

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
