//! sepo's CPU kernels, in safe Rust, compiled at `opt-level = 3` in every profile (the root
//! `Cargo.toml` sets it for the dev profile, where the sepo crate itself is unoptimized).
//!
//! [`causal_attention`]: scaled dot-product attention, causal, with grouped-query heads and
//! cached keys. It is flash-style: each block of queries walks its key tiles with an online
//! softmax, never materializing a `seq x seq` score matrix, and it visits only the keys a query
//! may see (burn-flex's tiled kernel also computes the masked half). [`causal_attention_lse`]
//! also returns each query's log-denominator, from which [`backward`] recomputes the
//! probabilities for the gradient (training).
//!
//! Vectorization without `unsafe`: the kernel is written once over macerator's `Vector<S, f32>`
//! (explicit lanes, fused multiply-adds) and run through its safe run-time dispatch
//! (`AutoArch`), which inlines it into a function compiled for the CPU's best instruction set
//! (AVX-512: 16 lanes, AVX2 + FMA: 8). Keys, values and the running sums live in 64-byte aligned
//! buffers that a task views as `&[Vector]` (`bytemuck::cast_slice`: a `Vector` is plain data),
//! so the inner loops index vectors with no per-load checks (loading each vector from an `f32`
//! slice left length checks in the dev profile's loops: 1.75x slower). Keys and values are laid
//! out transposed per vector of keys (`[d][lanes]`), so that the scores of `lanes` keys are `d`
//! fused multiply-adds with broadcast query channels and the weighted values `d` more, with no
//! horizontal work until a query's last tile. Heads of 32 channels or more keep values as rows
//! and each query's weighted sums a lane per channel (`d / lanes` vectors, which fit in
//! registers where `d` did not): each key's weight, broadcast, multiplies its row in. The
//! exponential is a degree-6 polynomial for `2^x` (Cephes' `exp2f`, within 2 ulp), on scores
//! pre-scaled by `log2(e)`.
//!
//! [`gather_logprobs`] and its gradient: the log-softmax of each row of logits at one target
//! column, a row at a time in cache, with the same exponential (see [`logprobs`]).
//!
//! [`swiglu`] and its gradient: the gated MLP's `silu(gate) * up` straight from the fused
//! projection, one pass with the same exponential (see [`swiglu`](mod@swiglu)).
//!
//! [`rms_norm`] and its gradient: the Llama family's norm, one pass over the rows each (see
//! [`rms_norm`](mod@rms_norm)).
//!
//! [`split_rope`] and its gradient: the fused q/k/v projection split into heads with the rotary
//! embedding applied, and the head/token layout moves around attention, one pass each (see
//! [`rope`]).
//!
//! [`adamw`]: one AdamW update of a flat parameter in place, one pass (see [`adamw`](mod@adamw)).
//!
//! [`fill_normal`] and [`box_muller`]: the normal draws of fresh weights (see [`normal`]).
//!
//! [`transpose`](fn@transpose) and [`transpose_columns`]: a matrix, or a column range of it,
//! as rows, for loading and saving weights (see [`transpose`](mod@transpose)).
//!
//! Every dependency (macerator, rayon, bytemuck, aligned-vec, chacha20, rand, rand_distr) is
//! already compiled for burn at these versions and features: this crate adds none to the build.

#![forbid(unsafe_code)]

pub mod adamw;
pub mod backward;
pub mod logprobs;
pub mod normal;
pub mod rms_norm;
pub mod rope;
pub mod swiglu;
pub mod transpose;

pub use adamw::{AdamWScalars, adamw};
pub use backward::causal_attention_backward;
pub use logprobs::{gather_logprobs, gather_logprobs_backward};
pub use normal::{NORMAL_BLOCK, box_muller, fill_normal};
pub use rms_norm::{rms_norm, rms_norm_backward};
pub use rope::{QkvShape, heads_to_rows, merge_rope_grad, rows_to_heads, split_rope};
pub use swiglu::{swiglu, swiglu_backward};
pub use transpose::{transpose, transpose_columns};

use aligned_vec::{AVec, ConstAlign};
use bytemuck::Zeroable;
use macerator::{AutoArch, Scalar, Simd, Vector, WithSimd};
use rayon::prelude::*;

/// The shape of a [`causal_attention`] call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Batch rows.
    pub batch: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads; `heads` must be a multiple (query head `h` reads key/value head
    /// `h / (heads / kv_heads)`).
    pub kv_heads: usize,
    /// Queries per head.
    pub seq: usize,
    /// Cached keys before the first query: query `i` sits at position `past + i` and sees keys
    /// `0..=past + i`; keys and values hold `past + seq` positions.
    pub past: usize,
    /// Channels per head; see [`supports`].
    pub head_dim: usize,
}

impl AttentionShape {
    /// Panics unless `heads` is a multiple of `kv_heads` and the query-shaped slices (queries,
    /// and the backward's output and its gradient) and key/value slices have this shape's
    /// lengths: the checks both kernel entry points make before indexing.
    fn check(&self, query_like: &[(&str, usize)], k: usize, v: usize) {
        let AttentionShape {
            batch,
            heads,
            kv_heads,
            seq,
            past,
            head_dim,
        } = *self;
        assert!(
            kv_heads > 0 && heads.is_multiple_of(kv_heads),
            "heads {heads} is not a multiple of kv_heads {kv_heads}"
        );
        for &(name, len) in query_like {
            assert_eq!(len, batch * heads * seq * head_dim, "{name} length");
        }
        let kv_len = batch * kv_heads * (past + seq) * head_dim;
        assert_eq!(k, kv_len, "key length");
        assert_eq!(v, kv_len, "value length");
    }
}

/// Whether [`causal_attention`] handles heads `head_dim` wide: each supported width is its own
/// compiled kernel, so that a query's accumulators are registers.
pub fn supports(head_dim: usize) -> bool {
    matches!(head_dim, 8 | 16 | 32 | 64 | 128)
}

/// Whether this CPU runs the kernel vectorized with fused multiply-adds (x86-64: AVX2 and FMA;
/// AArch64: always). Elsewhere it is correct but slow (`f32::mul_add` becomes a libm call), and
/// callers should keep their other path.
pub fn accelerated() -> bool {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(target_arch = "aarch64")]
    {
        true
    }
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// Causal attention `softmax(q k^T / sqrt(d)) v` of `q` `[batch, heads, seq, d]` over `k` and
/// `v` `[batch, kv_heads, past + seq, d]` (row-major, contiguous), each query over the keys up
/// to its own position (see [`AttentionShape`]). Returns `[batch, heads, seq, d]`.
///
/// Work is shared on rayon's global pool by (batch row, head, block of queries).
///
/// # Panics
/// If the slices do not have the shape's lengths, `heads` is not a multiple of `kv_heads`, or
/// `head_dim` is not [`supports`]ed.
pub fn causal_attention(q: &[f32], k: &[f32], v: &[f32], shape: AttentionShape) -> Vec<f32> {
    causal_attention_lse(q, k, v, shape).0
}

/// [`causal_attention`] and, per query, the log of its softmax denominator (natural log,
/// `lse_i = log sum_j exp(q_i k_j / sqrt(d))`, `[batch, heads, seq]`), which the backward pass
/// ([`backward::causal_attention_backward`]) uses to recompute the probabilities.
pub fn causal_attention_lse(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: AttentionShape,
) -> (Vec<f32>, Vec<f32>) {
    shape.check(&[("query", q.len())], k.len(), v.len());
    match shape.head_dim {
        8 => run::<8>(q, k, v, shape),
        16 => run::<16>(q, k, v, shape),
        32 => run::<32>(q, k, v, shape),
        64 => run::<64>(q, k, v, shape),
        128 => run::<128>(q, k, v, shape),
        d => panic!("head_dim {d} has no attention kernel (see `supports`)"),
    }
}

/// Queries per task for `d`-wide heads: their sums (`rows * d` vectors) stay at 16 KiB with
/// 16 lanes, in L1 beside the key and value tile.
fn block_rows(d: usize) -> usize {
    (256 / d).clamp(2, 32)
}

/// Key vectors (of `width` keys) per tile: 4096 floats of keys and as many of values (32 KiB),
/// 512 keys at `d` = 8 with 16 lanes, 32 at `d` = 128.
fn tile_vecs(d: usize, width: usize) -> usize {
    (4096 / (d * width)).clamp(2, 256)
}

/// Rows `[n, D]` into blocks of `w` rows, each `[D][w]` (channel-major: channel `c` of row `j`
/// at `j / w * D * w + c * w + j % w`); `blocks` holds `n.div_ceil(w)` of them, and what the
/// rows leave of the last stays as it was (zero).
pub(crate) fn to_blocks<const D: usize>(rows: &[f32], w: usize, blocks: &mut [f32]) {
    for (j, r) in rows.chunks_exact(D).enumerate() {
        let at = j / w * D * w + j % w;
        for c in 0..D {
            blocks[at + c * w] = r[c];
        }
    }
}

/// `sum_c a[c] * b[c]` lane by lane: two chains of fused multiply-adds, so that their latency
/// overlaps.
#[inline(always)]
pub(crate) fn dot<S: Simd, const D: usize>(
    a: &[Vector<S, f32>; D],
    b: &[Vector<S, f32>; D],
) -> Vector<S, f32> {
    let mut s0 = 0f32.splat::<S>();
    let mut s1 = 0f32.splat::<S>();
    for c in (0..D).step_by(2) {
        s0 = a[c].mul_add(b[c], s0);
        s1 = a[c + 1].mul_add(b[c + 1], s1);
    }
    s0 + s1
}

/// Gives the lanes of `s`, the scores of keys `key..key + lanes`, that sit at or past `end` (a
/// query's first hidden key) no weight: -inf. Only the vector on the diagonal has any.
#[inline(always)]
pub(crate) fn hide_from<S: Simd>(s: &mut Vector<S, f32>, key: usize, end: usize) {
    if key + f32::lanes::<S>() > end {
        let lanes: &mut [f32] = bytemuck::cast_slice_mut(std::slice::from_mut(s));
        for (x, l) in lanes.iter_mut().enumerate() {
            if key + x >= end {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

/// f32 lanes of the instruction set [`AutoArch`] picks on this CPU.
pub(crate) struct Lanes;

impl WithSimd for Lanes {
    type Output = usize;

    #[inline(always)]
    fn with_simd<S: Simd>(self) -> usize {
        f32::lanes::<S>()
    }
}

fn run<const D: usize>(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: AttentionShape,
) -> (Vec<f32>, Vec<f32>) {
    let AttentionShape {
        heads,
        kv_heads,
        seq,
        past,
        ..
    } = shape;
    let keys = past + seq;
    let mut out = vec![0f32; q.len()];
    let mut lse = vec![0f32; q.len() / D];
    if out.is_empty() {
        return (out, lse);
    }
    // Keys per kv head as blocks of `w` keys (one vector), each `[D][w]` (channel-major), the
    // last block zero-padded: block `j` of a head is `D` vectors. Values the same, or, for
    // wide heads ([`wide`]), as rows `[key][D]` (zero-padded to whole blocks): block `j` is
    // still `D` vectors.
    let w = AutoArch::new().dispatch(Lanes);
    let block = D * w;
    let per_head = keys.div_ceil(w) * block;
    // 64-byte aligned, so that each task views a head's blocks as vectors (`cast_slice`).
    let mut kt = AVec::<f32, ConstAlign<64>>::new(64);
    kt.resize(k.len() / (keys * D) * per_head, 0.0);
    let mut vt = kt.clone();
    kt.par_chunks_mut(per_head)
        .zip(vt.par_chunks_mut(per_head))
        .zip(k.par_chunks(keys * D).zip(v.par_chunks(keys * D)))
        .for_each(|((kt, vt), (k, v))| {
            to_blocks::<D>(k, w, kt);
            if wide(D, w) {
                vt[..v.len()].copy_from_slice(v);
            } else {
                to_blocks::<D>(v, w, vt);
            }
        });
    // Scores in base 2: `exp(x / sqrt(d)) = 2^(x * log2(e) / sqrt(d))`, the factor on q.
    let scale = std::f32::consts::LOG2_E / (D as f32).sqrt();
    let rows = block_rows(D);
    let group = heads / kv_heads;
    let (kt, vt): (&[f32], &[f32]) = (&kt, &vt);
    out.par_chunks_mut(seq * D)
        .zip(lse.par_chunks_mut(seq))
        .zip(q.par_chunks(seq * D))
        .enumerate()
        .for_each(|(bh, ((out, lse), q))| {
            let (b, h) = (bh / heads, bh % heads);
            let kv = b * kv_heads + h / group;
            let kt = &kt[kv * per_head..(kv + 1) * per_head];
            let vt = &vt[kv * per_head..(kv + 1) * per_head];
            out.par_chunks_mut(rows * D)
                .zip(lse.par_chunks_mut(rows))
                .zip(q.par_chunks(rows * D))
                .enumerate()
                .for_each(|(i, ((out, lse), q))| {
                    AutoArch::new().dispatch(QueryBlock::<D> {
                        q,
                        kt,
                        vt,
                        width: w,
                        first: past + i * rows,
                        scale,
                        out,
                        lse,
                    })
                });
        });
    (out, lse)
}

/// One task: consecutive queries of one head against that head's keys and values.
struct QueryBlock<'a, const D: usize> {
    /// `[rows, D]`.
    q: &'a [f32],
    /// Keys, blocks of `[D][width]`.
    kt: &'a [f32],
    /// Values, the same layout.
    vt: &'a [f32],
    /// Keys per block: the lanes of the dispatched instruction set.
    width: usize,
    /// Position of the first query.
    first: usize,
    /// Factor on the scores (`log2(e) / sqrt(D)`).
    scale: f32,
    /// `[rows, D]`.
    out: &'a mut [f32],
    /// `[rows]`: each query's natural-log softmax denominator.
    lse: &'a mut [f32],
}

impl<const D: usize> WithSimd for QueryBlock<'_, D> {
    type Output = ();

    // Inlined into macerator's function for the detected instruction set: everything below is
    // compiled for it.
    #[inline(always)]
    fn with_simd<S: Simd>(self) {
        self.run::<S>();
    }
}

impl<const D: usize> QueryBlock<'_, D> {
    #[inline(always)]
    fn run<S: Simd>(self) {
        let w = self.width;
        assert_eq!(w, f32::lanes::<S>(), "the dispatched lanes");
        // The blocks as vectors: block `j`, channel `c` is vector `j * D + c`.
        let kt: &[Vector<S, f32>] = bytemuck::cast_slice(self.kt);
        let vt: &[Vector<S, f32>] = bytemuck::cast_slice(self.vt);
        let rows = self.out.len() / D;
        let zero = Vector::<S, f32>::zeroed();
        // Per query: running maximum (base-2 score), per-lane sums of weights and of weighted
        // values (`D` vectors).
        let wide = wide(D, w);
        // Sums of weighted values per query: `D` vectors (a lane per key), or for wide heads
        // `D / w` (a lane per channel).
        let per_query = if wide { D / w } else { D };
        let mut max = vec![f32::NEG_INFINITY; rows];
        let mut sum = vec![zero; rows];
        let mut acc = vec![zero; rows * per_query];
        let tile = tile_vecs(D, w);
        let mut scores = vec![zero; tile];
        let last_vec = (self.first + rows).div_ceil(w);
        // Key tiles outer, queries inner: a tile is read from L2 once per block of queries.
        for t0 in (0..last_vec).step_by(tile) {
            let t1 = (t0 + tile).min(last_vec);
            for r in 0..rows {
                let end = self.first + r + 1;
                let v1 = end.div_ceil(w).min(t1);
                if v1 <= t0 {
                    continue;
                }
                let q: &[f32; D] = self.q[r * D..(r + 1) * D].try_into().expect("a query");
                let kb = &kt[t0 * D..v1 * D];
                let tile_max = row_scores::<S, D>(q, self.scale, kb, t0 * w, end, &mut scores);
                let vb = &vt[t0 * D..v1 * D];
                let acc = &mut acc[r * per_query..(r + 1) * per_query];
                if wide {
                    let running = (&mut max[r], &mut sum[r]);
                    row_values_wide::<S, D>(vb, tile_max, &scores, running, acc);
                } else {
                    let acc: &mut [Vector<S, f32>; D] = acc.try_into().expect("a query's sums");
                    row_values::<S, D>(vb, tile_max, &scores, &mut max[r], &mut sum[r], acc);
                }
            }
        }
        for (r, o) in self.out.chunks_exact_mut(D).enumerate() {
            let total = sum[r].reduce_add();
            // Scores were in base 2, less the running maximum.
            self.lse[r] = (max[r] + total.log2()) * std::f32::consts::LN_2;
            let acc = &acc[r * per_query..(r + 1) * per_query];
            if wide {
                let acc: &[f32] = bytemuck::cast_slice(acc);
                for (o, a) in o.iter_mut().zip(acc) {
                    *o = a / total;
                }
            } else {
                for (o, a) in o.iter_mut().zip(acc) {
                    *o = a.reduce_add() / total;
                }
            }
        }
    }
}

/// One query's base-2 scores against the key blocks `kb` (`D` vectors each, the first key at
/// `first`; keys `0..end` visible, the others get -inf) into `scores`; returns their maximum.
#[inline(always)]
fn row_scores<S: Simd, const D: usize>(
    q: &[f32; D],
    scale: f32,
    kb: &[Vector<S, f32>],
    first: usize,
    end: usize,
    scores: &mut [Vector<S, f32>],
) -> f32 {
    let w = f32::lanes::<S>();
    // A plain loop, not `array::from_fn`: a closure is compiled without the dispatched
    // instruction set.
    let mut qv = [0f32.splat::<S>(); D];
    for c in 0..D {
        qv[c] = (q[c] * scale).splat::<S>();
    }
    let mut vmax = f32::NEG_INFINITY.splat::<S>();
    for (j, (kb, s)) in kb.chunks_exact(D).zip(scores.iter_mut()).enumerate() {
        let kb: &[Vector<S, f32>; D] = kb.try_into().expect("a key block");
        *s = dot(&qv, kb);
        hide_from(s, first + j * w, end);
        vmax = vmax.max(*s);
    }
    vmax.reduce_max()
}

/// Folds one query's `scores` of the value blocks `vb` (maximum `tile_max`) into its running
/// maximum, sums of weights and weighted values (the online softmax).
#[inline(always)]
fn row_values<S: Simd, const D: usize>(
    vb: &[Vector<S, f32>],
    tile_max: f32,
    scores: &[Vector<S, f32>],
    max: &mut f32,
    sum: &mut Vector<S, f32>,
    acc: &mut [Vector<S, f32>; D],
) {
    // Small heads keep their sums in registers through the tile.
    let mut sv = *sum;
    let mut av = *acc;
    let m = raise_max(tile_max, max, &mut sv, &mut av);
    let n = vb.len() / D;
    let mut j = 0;
    // Four vectors of keys a step, their exponentials first: one at a time, the polynomial's
    // chain of dependent operations kept this CPU's two FMA ports from filling (the kernel was
    // about 7% slower at 8-wide heads). The arithmetic per query is the same, in the same
    // order. (A plain loop for `p`: a closure is compiled without the dispatched instruction
    // set, and was 15 times slower.)
    while j + UNROLL <= n {
        let mut p = [m; UNROLL];
        for u in 0..UNROLL {
            p[u] = exp2::<S>(scores[j + u] - m);
        }
        for (u, p) in p.into_iter().enumerate() {
            let v: &[Vector<S, f32>; D] = vb[(j + u) * D..(j + u + 1) * D]
                .try_into()
                .expect("a value block");
            sv += p;
            for (a, v) in av.iter_mut().zip(v) {
                *a = p.mul_add(*v, *a);
            }
        }
        j += UNROLL;
    }
    for (vb, s) in vb[j * D..].chunks_exact(D).zip(&scores[j..]) {
        let vb: &[Vector<S, f32>; D] = vb.try_into().expect("a value block");
        let p = exp2::<S>(*s - m);
        sv += p;
        for (a, v) in av.iter_mut().zip(vb) {
            *a = p.mul_add(*v, *a);
        }
    }
    *sum = sv;
    *acc = av;
}

/// Vectors of keys per step of [`row_values`].
const UNROLL: usize = 4;

/// The online softmax's step to a new tile: when the tile's maximum `tile_max` exceeds the
/// running one, the sums `sum` and `acc` are scaled to it; returns the running maximum, splat.
#[inline(always)]
fn raise_max<S: Simd>(
    tile_max: f32,
    max: &mut f32,
    sum: &mut Vector<S, f32>,
    acc: &mut [Vector<S, f32>],
) -> Vector<S, f32> {
    if tile_max > *max {
        // 0 on the first tile (max = -inf), when the sums are still 0.
        let f = (*max - tile_max).exp2().splat::<S>();
        *sum *= f;
        for a in acc.iter_mut() {
            *a *= f;
        }
        *max = tile_max;
    }
    max.splat::<S>()
}

/// Whether `d`-wide heads keep each query's weighted sums a lane per channel ([`row_values_wide`],
/// `d / lanes` vectors) rather than a lane per key ([`row_values`], `d` vectors): from 32
/// channels, `d` vectors per query no longer fit in registers and every key vector stored and
/// reloaded them all.
#[inline(always)]
fn wide(d: usize, lanes: usize) -> bool {
    d >= 32 && d.is_multiple_of(lanes)
}

/// [`row_values`] for wide heads ([`wide`]): the values `vb` are rows (`D / w` vectors per key),
/// and each key's weight, broadcast, multiplies its row into `acc`, the query's sums a lane per
/// channel.
#[inline(always)]
fn row_values_wide<S: Simd, const D: usize>(
    vb: &[Vector<S, f32>],
    tile_max: f32,
    scores: &[Vector<S, f32>],
    (max, sum): (&mut f32, &mut Vector<S, f32>),
    acc: &mut [Vector<S, f32>],
) {
    let w = f32::lanes::<S>();
    let per_key = D / w;
    let mut sv = *sum;
    let m = raise_max(tile_max, max, &mut sv, acc);
    for (vb, s) in vb.chunks_exact(D).zip(scores) {
        let p = [exp2::<S>(*s - m)];
        sv += p[0];
        let weights: &[f32] = bytemuck::cast_slice(&p);
        for (row, &p) in vb.chunks_exact(per_key).zip(weights) {
            let p = p.splat::<S>();
            for (a, v) in acc.iter_mut().zip(row) {
                *a = p.mul_add(*v, *a);
            }
        }
    }
    *sum = sv;
}

/// `2^x` lane by lane for `x <= 0` (what softmax takes), 0 below -126 (f32's smallest normal
/// exponent) and for -inf: `2^n * 2^f` with `n` the nearest integer and `f` in `[-0.5, 0.5]`,
/// `2^f` Cephes' `exp2f` polynomial (relative error under 2e-7), `2^n` built in the exponent
/// bits.
#[inline(always)]
pub(crate) fn exp2<S: Simd>(x: Vector<S, f32>) -> Vector<S, f32> {
    // Adding 1.5 * 2^23 rounds to an integer, held in the low mantissa bits.
    let round = 12_582_912f32.splat::<S>();
    let low = (-126f32).splat::<S>();
    let xc = x.max(low);
    let t = xc + round;
    let f = xc - (t - round);
    let mut p = 1.535_336_2e-4_f32.splat::<S>();
    for c in [
        1.339_887_4e-3,
        9.618_437e-3,
        5.550_332_5e-2,
        2.402_264_8e-1,
        6.931_472e-1,
        1.0,
    ] {
        p = p.mul_add(f, c.splat::<S>());
    }
    // The low 9 bits of `t`'s pattern are `n` (two's complement): shifted into the exponent
    // field and biased, they make the float 2^n.
    let pow = ((t.reinterpret::<u32>() << 23) + (127u32 << 23).splat::<S>()).reinterpret::<f32>();
    x.lt(low).select(0f32.splat::<S>(), p * pow)
}

/// [`exp2`] on the dispatched instruction set, for the tests.
#[cfg(test)]
fn exp2_dispatched(x: f32) -> f32 {
    struct One(f32);
    impl WithSimd for One {
        type Output = f32;
        #[inline(always)]
        fn with_simd<S: Simd>(self) -> f32 {
            let v = [exp2::<S>(self.0.splat::<S>())];
            bytemuck::cast_slice::<Vector<S, f32>, f32>(&v)[0]
        }
    }
    AutoArch::new().dispatch(One(x))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, in f64: each query over keys `0..=past + i`.
    fn naive(q: &[f32], k: &[f32], v: &[f32], s: AttentionShape) -> Vec<f32> {
        let (d, keys) = (s.head_dim, s.past + s.seq);
        let group = s.heads / s.kv_heads;
        let mut out = vec![0f32; q.len()];
        for b in 0..s.batch {
            for h in 0..s.heads {
                let kv = b * s.kv_heads + h / group;
                for i in 0..s.seq {
                    let qr = &q[((b * s.heads + h) * s.seq + i) * d..][..d];
                    let visible = s.past + i + 1;
                    let sc: Vec<f64> = (0..visible)
                        .map(|j| {
                            let kr = &k[(kv * keys + j) * d..][..d];
                            qr.iter()
                                .zip(kr)
                                .map(|(a, b)| *a as f64 * *b as f64)
                                .sum::<f64>()
                                / (d as f64).sqrt()
                        })
                        .collect();
                    let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let w: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
                    let tot: f64 = w.iter().sum();
                    let o = &mut out[((b * s.heads + h) * s.seq + i) * d..][..d];
                    for (c, o) in o.iter_mut().enumerate() {
                        let acc: f64 = (0..visible)
                            .map(|j| w[j] * v[(kv * keys + j) * d + c] as f64)
                            .sum();
                        *o = (acc / tot) as f32;
                    }
                }
            }
        }
        out
    }

    /// Deterministic values in `[-amp, amp]` (xorshift), for every kernel's tests.
    pub(crate) fn random(n: usize, seed: u64, amp: f32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp
            })
            .collect()
    }

    #[test]
    fn matches_the_definition() {
        let shapes = [
            (1, 1, 1, 1, 0, 8),
            (2, 8, 4, 37, 0, 8),
            (1, 4, 1, 300, 0, 8),
            (1, 2, 2, 5, 40, 16),
            (2, 4, 2, 17, 3, 32),
            (1, 2, 1, 70, 0, 64),
            (1, 2, 2, 1, 129, 128),
            (1, 3, 3, 33, 0, 128),
        ];
        for (n, &(batch, heads, kv_heads, seq, past, head_dim)) in shapes.iter().enumerate() {
            let s = AttentionShape {
                batch,
                heads,
                kv_heads,
                seq,
                past,
                head_dim,
            };
            let kv = batch * kv_heads * (past + seq) * head_dim;
            // Large scores (amplitude 3 on q and k) so the softmax is peaked and the online
            // maximum moves between tiles.
            let q = random(batch * heads * seq * head_dim, 3 * n as u64 + 1, 3.0);
            let k = random(kv, 3 * n as u64 + 2, 3.0);
            let v = random(kv, 3 * n as u64 + 3, 1.0);
            let got = causal_attention(&q, &k, &v, s);
            let want = naive(&q, &k, &v, s);
            let diff = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff <= 1e-5, "{s:?}: differs by {diff}");
        }
    }

    #[test]
    fn exp2_is_close_to_std() {
        let mut worst = 0f32;
        for i in 0..=125_000 {
            let x = -(i as f32) * 1e-3;
            let got = exp2_dispatched(x);
            let want = x.exp2();
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 4e-7, "relative error {worst}");
        assert_eq!(exp2_dispatched(f32::NEG_INFINITY), 0.0);
    }
}
