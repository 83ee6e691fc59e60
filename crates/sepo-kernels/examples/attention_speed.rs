//! Throughput of `causal_attention` on stories260K's attention shape (8 heads, 4 kv heads,
//! head_dim 8) at the score benchmark's lengths: `cargo run -p sepo-kernels --example
//! attention_speed [SEQ] [BATCH] [HEAD_DIM]`. Prints visible (query, key) pairs per second.

use std::time::Instant;

use sepo_kernels::{AttentionShape, causal_attention};

fn main() {
    let arg = |i: usize, default: usize| {
        std::env::args()
            .nth(i)
            .map_or(default, |a| a.parse().expect("a number"))
    };
    let (seq, batch, head_dim) = (arg(1, 1100), arg(2, 4), arg(3, 8));
    let shape = AttentionShape {
        batch,
        heads: 8,
        kv_heads: 4,
        seq,
        past: 0,
        head_dim,
    };
    let fill = |n: usize, k: usize| -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + k * 104_729) % 2003) as f32 / 1001.0 - 1.0) * 2.0)
            .collect()
    };
    let q = fill(batch * 8 * seq * head_dim, 1);
    let kv = batch * 4 * seq * head_dim;
    let (k, v) = (fill(kv, 2), fill(kv, 3));
    let pairs = (batch * 8 * seq * (seq + 1) / 2) as f64;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        std::hint::black_box(causal_attention(&q, &k, &v, shape));
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "seq {seq} batch {batch} d {head_dim}: {:.1} ms, {:.2} G pairs/s",
        best * 1e3,
        pairs / best / 1e9
    );
}
