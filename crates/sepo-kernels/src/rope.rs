//! The layout work around attention, each as one pass: a fused `[q | k | v]` projection
//! (`[batch, seq, (heads + 2 kv_heads) * d]`, what a decoder's q/k/v matmul gives) split into
//! per-head q, k and v (`[batch, heads, seq, d]`) with the rotary embedding applied to q and k,
//! the gradient of that split ([`merge_rope_grad`]), and the move of per-head rows back into
//! token rows ([`heads_to_rows`], [`rows_to_heads`]).
//!
//! Composed from tensor ops this is three slices, two reshapes and transposes, the rotation as
//! two slices, a `cat`, two products and a sum per q and k, then a copy of each into contiguous
//! memory for the attention kernel; in the backward, each slice writes a zero tensor the size of
//! the whole projection and adds into it. Here each direction reads and writes every element
//! once, with the same float operations in the same order as the composed rotation (`x * cos +
//! swapped * sin`: a product, a product, a sum), so the results are bit-identical.

use rayon::prelude::*;

/// Rows (tokens) per rayon task in the row-major passes.
const ROWS_PER_TASK: usize = 32;

/// The shape of a fused q/k/v projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QkvShape {
    /// Batch rows.
    pub batch: usize,
    /// Tokens per row.
    pub seq: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Channels per head.
    pub head_dim: usize,
    /// Leading channels of each q and k head that are rotated (even, at most `head_dim`); the
    /// rest pass through (partial rotary embeddings).
    pub rot: usize,
}

impl QkvShape {
    /// Channels of one token of the projection.
    pub fn width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }

    fn check(&self, qkv: usize, cos: usize, sin: usize) {
        assert!(
            self.rot.is_multiple_of(2) && self.rot <= self.head_dim,
            "rotary width {} in heads of {}",
            self.rot,
            self.head_dim
        );
        assert_eq!(
            qkv,
            self.batch * self.seq * self.width(),
            "projection length"
        );
        assert_eq!(cos, self.seq * self.rot, "cos table length");
        assert_eq!(sin, self.seq * self.rot, "sin table length");
    }
}

/// Splits `qkv` (`[batch, seq, (heads + 2 kv_heads) * d]`, row-major) into q `[batch, heads,
/// seq, d]`, k and v `[batch, kv_heads, seq, d]`, with q and k rotated: for channel `i <
/// rot`, `y[i] = x[i] * cos[t, i] + x[i ± rot/2] * sin[t, i]`, where `cos` and `sin` (`[seq,
/// rot]`) are the decoder's tables for positions `0..seq` (each half's cosines repeated, the
/// first half's sines negated), the same for every batch row.
///
/// # Panics
/// If a slice does not have the shape's length or `rot` is odd or wider than a head.
pub fn split_rope(
    qkv: &[f32],
    cos: &[f32],
    sin: &[f32],
    s: QkvShape,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    s.check(qkv.len(), cos.len(), sin.len());
    let d = s.head_dim;
    let head_len = s.seq * d;
    // One pass per part: `heads` heads starting at head `first` of each token's channels.
    let part = |heads: usize, first: usize, rotate: bool| {
        let mut out = vec![0f32; s.batch * heads * head_len];
        if head_len == 0 {
            return out;
        }
        out.par_chunks_mut(head_len)
            .enumerate()
            .for_each(|(bh, out)| {
                let (b, h) = (bh / heads, bh % heads);
                for (t, o) in out.chunks_exact_mut(d).enumerate() {
                    let at = (b * s.seq + t) * s.width() + (first + h) * d;
                    let x = &qkv[at..at + d];
                    if rotate {
                        let table = t * s.rot..(t + 1) * s.rot;
                        rope_row(x, &cos[table.clone()], &sin[table], o);
                    } else {
                        o.copy_from_slice(x);
                    }
                }
            });
        out
    };
    let q = part(s.heads, 0, true);
    let k = part(s.kv_heads, s.heads, true);
    let v = part(s.kv_heads, s.heads + s.kv_heads, false);
    (q, k, v)
}

/// The gradient of [`split_rope`] with respect to `qkv` for the gradients of q, k and v (its
/// output shapes): `[batch, seq, (heads + 2 kv_heads) * d]`, the rotation transposed on q and
/// k: `dx[j] = dy[j] * cos[t, j] + dy[j ± rot/2] * sin[t, j ± rot/2]`.
///
/// # Panics
/// As [`split_rope`], or if a gradient does not have its part's length.
pub fn merge_rope_grad(
    dq: &[f32],
    dk: &[f32],
    dv: &[f32],
    cos: &[f32],
    sin: &[f32],
    s: QkvShape,
) -> Vec<f32> {
    let (width, d) = (s.width(), s.head_dim);
    let mut dqkv = vec![0f32; s.batch * s.seq * width];
    s.check(dqkv.len(), cos.len(), sin.len());
    let head_len = s.seq * d;
    assert_eq!(dq.len(), s.batch * s.heads * head_len, "dq length");
    assert_eq!(dk.len(), s.batch * s.kv_heads * head_len, "dk length");
    assert_eq!(dv.len(), s.batch * s.kv_heads * head_len, "dv length");
    if dqkv.is_empty() {
        return dqkv;
    }
    dqkv.par_chunks_mut(ROWS_PER_TASK * width)
        .enumerate()
        .for_each(|(task, rows)| {
            for (r, row) in rows.chunks_exact_mut(width).enumerate() {
                let bt = task * ROWS_PER_TASK + r;
                let (b, t) = (bt / s.seq, bt % s.seq);
                let table = t * s.rot..(t + 1) * s.rot;
                let (cos, sin) = (&cos[table.clone()], &sin[table]);
                let (dq_row, rest) = row.split_at_mut(s.heads * d);
                let (dk_row, dv_row) = rest.split_at_mut(s.kv_heads * d);
                let head = |heads: usize, h: usize| ((b * heads + h) * s.seq + t) * d;
                for (h, o) in dq_row.chunks_exact_mut(d).enumerate() {
                    rope_row_grad(&dq[head(s.heads, h)..][..d], cos, sin, o);
                }
                for (h, o) in dk_row.chunks_exact_mut(d).enumerate() {
                    rope_row_grad(&dk[head(s.kv_heads, h)..][..d], cos, sin, o);
                }
                for (h, o) in dv_row.chunks_exact_mut(d).enumerate() {
                    o.copy_from_slice(&dv[head(s.kv_heads, h)..][..d]);
                }
            }
        });
    dqkv
}

/// `[batch, heads, seq, d]` (per-head rows) as `[batch, seq, heads * d]` (token rows): what an
/// attention output is before its output projection.
pub fn heads_to_rows(x: &[f32], batch: usize, heads: usize, seq: usize, d: usize) -> Vec<f32> {
    assert_eq!(x.len(), batch * heads * seq * d, "length");
    let width = heads * d;
    let mut out = vec![0f32; x.len()];
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(ROWS_PER_TASK * width)
        .enumerate()
        .for_each(|(task, rows)| {
            for (r, row) in rows.chunks_exact_mut(width).enumerate() {
                let bt = task * ROWS_PER_TASK + r;
                let (b, t) = (bt / seq, bt % seq);
                for (h, o) in row.chunks_exact_mut(d).enumerate() {
                    let at = ((b * heads + h) * seq + t) * d;
                    o.copy_from_slice(&x[at..at + d]);
                }
            }
        });
    out
}

/// The inverse of [`heads_to_rows`]: `[batch, seq, heads * d]` as `[batch, heads, seq, d]`.
pub fn rows_to_heads(x: &[f32], batch: usize, heads: usize, seq: usize, d: usize) -> Vec<f32> {
    assert_eq!(x.len(), batch * heads * seq * d, "length");
    let head_len = seq * d;
    let mut out = vec![0f32; x.len()];
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(head_len)
        .enumerate()
        .for_each(|(bh, out)| {
            let (b, h) = (bh / heads, bh % heads);
            for (t, o) in out.chunks_exact_mut(d).enumerate() {
                let at = (b * seq + t) * heads * d + h * d;
                o.copy_from_slice(&x[at..at + d]);
            }
        });
    out
}

/// One head of one token rotated: `out[i] = x[i] * cos[i] + x[i ± half] * sin[i]` for `i <
/// rot` (`rot = cos.len()`), `x[i]` beyond.
#[inline(always)]
fn rope_row(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
    let rot = cos.len();
    let half = rot / 2;
    let (x1, x2) = (&x[..half], &x[half..rot]);
    for i in 0..half {
        out[i] = x1[i] * cos[i] + x2[i] * sin[i];
        out[half + i] = x2[i] * cos[half + i] + x1[i] * sin[half + i];
    }
    out[rot..].copy_from_slice(&x[rot..]);
}

/// The transpose of [`rope_row`]: `dx[j] = dy[j] * cos[j] + dy[j ± half] * sin[j ± half]`.
#[inline(always)]
fn rope_row_grad(dy: &[f32], cos: &[f32], sin: &[f32], dx: &mut [f32]) {
    let rot = cos.len();
    let half = rot / 2;
    let (d1, d2) = (&dy[..half], &dy[half..rot]);
    for i in 0..half {
        dx[i] = d1[i] * cos[i] + d2[i] * sin[half + i];
        dx[half + i] = d2[i] * cos[half + i] + d1[i] * sin[i];
    }
    dx[rot..].copy_from_slice(&dy[rot..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::random;

    /// Rotation tables as the decoder builds them, for positions `0..seq`.
    fn tables(seq: usize, rot: usize) -> (Vec<f32>, Vec<f32>) {
        let half = rot / 2;
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for t in 0..seq {
            let f: Vec<f32> = (0..half)
                .map(|i| t as f32 / 10_000f32.powf(2.0 * i as f32 / rot as f32))
                .collect();
            let c: Vec<f32> = f.iter().map(|x| x.cos()).collect();
            let s: Vec<f32> = f.iter().map(|x| x.sin()).collect();
            cos.extend(&c);
            cos.extend(&c);
            sin.extend(s.iter().map(|x| -x));
            sin.extend(&s);
        }
        (cos, sin)
    }

    fn shapes() -> [QkvShape; 4] {
        let s = |batch, seq, heads, kv_heads, head_dim, rot| QkvShape {
            batch,
            seq,
            heads,
            kv_heads,
            head_dim,
            rot,
        };
        [
            s(2, 5, 4, 2, 8, 8),
            s(1, 70, 2, 1, 16, 4),
            s(3, 33, 3, 3, 6, 0),
            s(1, 1, 8, 4, 8, 8),
        ]
    }

    /// Each output element from the definition: position `t`'s head `h` of the part.
    #[test]
    fn split_rope_is_its_definition() {
        for (n, s) in shapes().into_iter().enumerate() {
            let qkv = random(s.batch * s.seq * s.width(), n as u64 + 1, 2.0);
            let (cos, sin) = tables(s.seq, s.rot);
            let (q, k, v) = split_rope(&qkv, &cos, &sin, s);
            let d = s.head_dim;
            let half = s.rot / 2;
            for (out, heads, first, rotate) in [
                (&q, s.heads, 0, true),
                (&k, s.kv_heads, s.heads, true),
                (&v, s.kv_heads, s.heads + s.kv_heads, false),
            ] {
                for b in 0..s.batch {
                    for h in 0..heads {
                        for t in 0..s.seq {
                            let x = &qkv[(b * s.seq + t) * s.width() + (first + h) * d..][..d];
                            for i in 0..d {
                                let want = if rotate && i < s.rot {
                                    let j = if i < half { i + half } else { i - half };
                                    x[i] * cos[t * s.rot + i] + x[j] * sin[t * s.rot + i]
                                } else {
                                    x[i]
                                };
                                let got = out[((b * heads + h) * s.seq + t) * d + i];
                                assert_eq!(got, want, "{s:?} b{b} h{h} t{t} i{i}");
                            }
                        }
                    }
                }
            }
        }
    }

    /// `merge_rope_grad` is the adjoint of `split_rope`: `<split(x), g> = <x, merge(g)>` for
    /// random `x` and `g` (both linear maps), to f32 rounding.
    #[test]
    fn merge_rope_grad_is_the_adjoint_of_split_rope() {
        for (n, s) in shapes().into_iter().enumerate() {
            let qkv = random(s.batch * s.seq * s.width(), 10 + n as u64, 1.0);
            let (cos, sin) = tables(s.seq, s.rot);
            let (q, k, v) = split_rope(&qkv, &cos, &sin, s);
            let g = |len: usize, seed: u64| random(len, seed, 1.0);
            let (gq, gk, gv) = (g(q.len(), 20 + n as u64), g(k.len(), 30), g(v.len(), 40));
            let dot = |a: &[f32], b: &[f32]| -> f64 {
                a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
            };
            let lhs = dot(&q, &gq) + dot(&k, &gk) + dot(&v, &gv);
            let rhs = dot(&qkv, &merge_rope_grad(&gq, &gk, &gv, &cos, &sin, s));
            assert!(
                (lhs - rhs).abs() < 1e-4 * (1.0 + lhs.abs()),
                "{s:?}: {lhs} vs {rhs}"
            );
        }
    }

    #[test]
    fn heads_to_rows_and_back() {
        let (b, h, s, d) = (2, 3, 37, 8);
        let x = random(b * h * s * d, 5, 1.0);
        let rows = heads_to_rows(&x, b, h, s, d);
        assert_eq!(rows[(s + 2) * h * d + d + 3], x[((h + 1) * s + 2) * d + 3]);
        assert_eq!(rows_to_heads(&rows, b, h, s, d), x);
    }
}
