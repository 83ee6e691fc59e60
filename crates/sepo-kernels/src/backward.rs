//! The gradient of [`crate::causal_attention`] (training), flash-style: the probabilities are
//! recomputed from q, k and the forward's per-query log-denominators (`lse`), one query row at a
//! time against the keys it sees, and never stored.
//!
//! With `P_ij = exp(s q_i.k_j - lse_i)` (s = 1/sqrt(d)), `D_i = dout_i . out_i`:
//! `dv_j = sum_i P_ij dout_i`, `dP_ij = dout_i . v_j`, `dS_ij = P_ij (dP_ij - D_i)`,
//! `dq_i = s sum_j dS_ij k_j`, `dk_j = s sum_i dS_ij q_i`.
//!
//! One task per (batch row, key/value head) on rayon: it owns that head's dk and dv and walks
//! every query head of its group, so nothing is shared between tasks. Keys, values and their
//! gradients sit in the forward's transposed blocks (`[d][lanes]` per vector of keys), so each
//! (query, key vector) step is fused multiply-adds across `lanes` keys at once.

use aligned_vec::{AVec, ConstAlign};
use bytemuck::Zeroable;
use macerator::{AutoArch, Scalar, Simd, Vector, WithSimd};
use rayon::prelude::*;

use crate::{AttentionShape, Lanes, dot, exp2, hide_from, to_blocks};

/// The gradients `(dq, dk, dv)` of [`crate::causal_attention`] for the output gradient `dout`,
/// from the inputs, the output and [`crate::causal_attention_lse`]'s `lse`. Shapes as there;
/// `past` must be 0 (training has no cache).
///
/// # Panics
/// On slices of the wrong length, `past > 0`, or an unsupported `head_dim`.
#[allow(clippy::too_many_arguments)]
pub fn causal_attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    dout: &[f32],
    lse: &[f32],
    shape: AttentionShape,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    assert_eq!(shape.past, 0, "the backward pass takes no cache");
    shape.check(
        &[("q", q.len()), ("out", out.len()), ("dout", dout.len())],
        k.len(),
        v.len(),
    );
    assert_eq!(
        lse.len(),
        shape.batch * shape.heads * shape.seq,
        "lse length"
    );
    let inputs = Inputs {
        q,
        k,
        v,
        out,
        dout,
        lse,
        shape,
    };
    match shape.head_dim {
        8 => run::<8>(inputs),
        16 => run::<16>(inputs),
        32 => run::<32>(inputs),
        64 => run::<64>(inputs),
        128 => run::<128>(inputs),
        d => panic!("head_dim {d} has no attention kernel (see `supports`)"),
    }
}

#[derive(Clone, Copy)]
struct Inputs<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    out: &'a [f32],
    dout: &'a [f32],
    lse: &'a [f32],
    shape: AttentionShape,
}

fn run<const D: usize>(x: Inputs) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let AttentionShape {
        heads,
        kv_heads,
        seq,
        ..
    } = x.shape;
    let group = heads / kv_heads;
    let mut dq = vec![0f32; x.q.len()];
    let mut dk = vec![0f32; x.k.len()];
    let mut dv = vec![0f32; x.v.len()];
    if dq.is_empty() || seq == 0 {
        return (dq, dk, dv);
    }
    let w = AutoArch::new().dispatch(Lanes);
    // Task `t` = (batch row, kv head): its keys and values, its dk and dv, and the queries (and
    // their dq) of its `group` query heads, all contiguous.
    dq.par_chunks_mut(group * seq * D)
        .zip(dk.par_chunks_mut(seq * D).zip(dv.par_chunks_mut(seq * D)))
        .enumerate()
        .for_each(|(t, (dq, (dk, dv)))| {
            let kv = t * seq * D..(t + 1) * seq * D;
            let qs = t * group * seq * D..(t + 1) * group * seq * D;
            let rows = t * group * seq..(t + 1) * group * seq;
            AutoArch::new().dispatch(HeadGrad::<D> {
                q: &x.q[qs.clone()],
                k: &x.k[kv.clone()],
                v: &x.v[kv],
                out: &x.out[qs.clone()],
                dout: &x.dout[qs],
                lse: &x.lse[rows],
                seq,
                width: w,
                dq,
                dk,
                dv,
            })
        });
    (dq, dk, dv)
}

/// One task: one key/value head and the query heads that read it.
struct HeadGrad<'a, const D: usize> {
    /// `[group, seq, D]`, as `out`, `dout` and `dq`.
    q: &'a [f32],
    /// `[seq, D]`, as `v`, `dk` and `dv`.
    k: &'a [f32],
    v: &'a [f32],
    out: &'a [f32],
    dout: &'a [f32],
    /// `[group, seq]`.
    lse: &'a [f32],
    seq: usize,
    /// Keys per vector: the lanes of the dispatched instruction set.
    width: usize,
    dq: &'a mut [f32],
    dk: &'a mut [f32],
    dv: &'a mut [f32],
}

impl<const D: usize> WithSimd for HeadGrad<'_, D> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self) {
        self.run::<S>();
    }
}

impl<const D: usize> HeadGrad<'_, D> {
    #[inline(always)]
    fn run<S: Simd>(self) {
        let w = self.width;
        assert_eq!(w, f32::lanes::<S>(), "the dispatched lanes");
        let seq = self.seq;
        let blocks = seq.div_ceil(w);
        // Keys and values, and their gradients, as blocks of `[D][w]` (the last zero-padded).
        let transposed = |rows: &[f32]| {
            let mut t = AVec::<f32, ConstAlign<64>>::new(64);
            t.resize(blocks * D * w, 0.0);
            to_blocks::<D>(rows, w, &mut t);
            t
        };
        let (kt, vt) = (transposed(self.k), transposed(self.v));
        let kt: &[Vector<S, f32>] = bytemuck::cast_slice(&kt);
        let vt: &[Vector<S, f32>] = bytemuck::cast_slice(&vt);
        let zero = Vector::<S, f32>::zeroed();
        let mut dkt = vec![zero; blocks * D];
        let mut dvt = vec![zero; blocks * D];
        let scale = 1.0 / (D as f32).sqrt();
        let log2e = std::f32::consts::LOG2_E;
        for (r, lse) in self.lse.iter().enumerate() {
            let i = r % seq;
            let row = r * D..(r + 1) * D;
            let (q, o, g) = (
                &self.q[row.clone()],
                &self.out[row.clone()],
                &self.dout[row],
            );
            let d_i: f32 = g.iter().zip(o).map(|(g, o)| g * o).sum();
            // Base-2 scores (the factor on q), the log-denominator in base 2.
            let q2: [Vector<S, f32>; D] = std::array::from_fn(|c| (q[c] * scale * log2e).splat());
            let qs: [Vector<S, f32>; D] = std::array::from_fn(|c| (q[c] * scale).splat());
            let gv: [Vector<S, f32>; D] = std::array::from_fn(|c| g[c].splat());
            let m = (lse * log2e).splat::<S>();
            let dd = d_i.splat::<S>();
            let mut dqa = [zero; D];
            let end = i + 1;
            for j in 0..end.div_ceil(w) {
                let kb: &[Vector<S, f32>; D] = kt[j * D..(j + 1) * D].try_into().expect("keys");
                let vb: &[Vector<S, f32>; D] = vt[j * D..(j + 1) * D].try_into().expect("values");
                let mut s = dot(&q2, kb);
                hide_from(&mut s, j * w, end);
                let p = exp2::<S>(s - m);
                let ds = p * (dot(&gv, vb) - dd);
                let dkb: &mut [Vector<S, f32>; D] =
                    (&mut dkt[j * D..(j + 1) * D]).try_into().expect("dk");
                for c in 0..D {
                    dkb[c] = ds.mul_add(qs[c], dkb[c]);
                    dqa[c] = ds.mul_add(kb[c], dqa[c]);
                }
                let dvb: &mut [Vector<S, f32>; D] =
                    (&mut dvt[j * D..(j + 1) * D]).try_into().expect("dv");
                for c in 0..D {
                    dvb[c] = p.mul_add(gv[c], dvb[c]);
                }
            }
            for (d, a) in self.dq[r * D..(r + 1) * D].iter_mut().zip(&dqa) {
                *d = a.reduce_add() * scale;
            }
        }
        let untransposed = |t: &[Vector<S, f32>], rows: &mut [f32]| {
            let t: &[f32] = bytemuck::cast_slice(t);
            for (j, r) in rows.chunks_exact_mut(D).enumerate() {
                let at = j / w * D * w + j % w;
                for c in 0..D {
                    r[c] = t[at + c * w];
                }
            }
        };
        untransposed(&dkt, self.dk);
        untransposed(&dvt, self.dv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::causal_attention_lse;

    /// The definition in f64: forward, then the gradients of `sum(out * dout)`.
    #[allow(clippy::type_complexity)]
    fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        dout: &[f32],
        s: AttentionShape,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (d, n) = (s.head_dim, s.seq);
        let group = s.heads / s.kv_heads;
        let scale = 1.0 / (d as f64).sqrt();
        let mut dq = vec![0f64; q.len()];
        let mut dk = vec![0f64; k.len()];
        let mut dv = vec![0f64; v.len()];
        for b in 0..s.batch {
            for h in 0..s.heads {
                let kvh = b * s.kv_heads + h / group;
                let qh = (b * s.heads + h) * n * d;
                let kh = kvh * n * d;
                for i in 0..n {
                    let qi = |c: usize| q[qh + i * d + c] as f64;
                    let gi = |c: usize| dout[qh + i * d + c] as f64;
                    let sc: Vec<f64> = (0..=i)
                        .map(|j| {
                            (0..d)
                                .map(|c| qi(c) * k[kh + j * d + c] as f64)
                                .sum::<f64>()
                                * scale
                        })
                        .collect();
                    let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = sc.iter().map(|x| (x - mx).exp()).collect();
                    let z: f64 = e.iter().sum();
                    let p: Vec<f64> = e.iter().map(|x| x / z).collect();
                    let o: Vec<f64> = (0..d)
                        .map(|c| (0..=i).map(|j| p[j] * v[kh + j * d + c] as f64).sum())
                        .collect();
                    let dd: f64 = (0..d).map(|c| gi(c) * o[c]).sum();
                    for j in 0..=i {
                        let dp: f64 = (0..d).map(|c| gi(c) * v[kh + j * d + c] as f64).sum();
                        let ds = p[j] * (dp - dd);
                        for c in 0..d {
                            dv[kh + j * d + c] += p[j] * gi(c);
                            dq[qh + i * d + c] += ds * k[kh + j * d + c] as f64 * scale;
                            dk[kh + j * d + c] += ds * qi(c) * scale;
                        }
                    }
                }
            }
        }
        (dq, dk, dv)
    }

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
            })
            .collect()
    }

    #[test]
    fn gradients_match_the_definition() {
        for (batch, heads, kv_heads, seq, head_dim) in [
            (2, 4, 2, 19, 8),
            (1, 2, 2, 40, 16),
            (1, 3, 1, 7, 32),
            (2, 2, 2, 33, 64),
            (1, 1, 1, 1, 128),
            (1, 2, 1, 70, 128),
        ] {
            let shape = AttentionShape {
                batch,
                heads,
                kv_heads,
                seq,
                past: 0,
                head_dim,
            };
            let nq = batch * heads * seq * head_dim;
            let nk = batch * kv_heads * seq * head_dim;
            let (q, k, v, g) = (random(nq, 1), random(nk, 2), random(nk, 3), random(nq, 4));
            let (out, lse) = causal_attention_lse(&q, &k, &v, shape);
            let (dq, dk, dv) = causal_attention_backward(&q, &k, &v, &out, &g, &lse, shape);
            let (wq, wk, wv) = naive(&q, &k, &v, &g, shape);
            for (name, got, want) in [("dq", dq, wq), ("dk", dk, wk), ("dv", dv, wv)] {
                let err = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (*a as f64 - b).abs())
                    .fold(0.0, f64::max);
                assert!(err < 2e-4, "{shape:?} {name}: {err}");
            }
        }
    }
}
