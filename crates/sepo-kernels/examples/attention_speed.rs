//! Throughput of `causal_attention` on stories260K's attention shape (8 heads, 4 kv heads,
//! head_dim 8) at the score benchmark's lengths: `cargo run -p sepo-kernels --example
//! attention_speed [SEQ] [BATCH] [HEAD_DIM] [backward]`. Prints visible (query, key) pairs per
//! second, of the forward or (with `backward`) of the gradient (training).

use std::time::Instant;

use sepo_kernels::{
    AttentionShape, causal_attention, causal_attention_backward, causal_attention_lse,
};

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
    let backward = std::env::args().nth(4).is_some_and(|a| a == "backward");
    let (out, lse) = causal_attention_lse(&q, &k, &v, shape);
    let dout = fill(q.len(), 4);
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        if backward {
            std::hint::black_box(causal_attention_backward(
                &q, &k, &v, &out, &dout, &lse, shape,
            ));
        } else {
            std::hint::black_box(causal_attention(&q, &k, &v, shape));
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    let what = if backward { "backward" } else { "forward" };
    println!(
        "{what} seq {seq} batch {batch} d {head_dim}: {:.1} ms, {:.2} G pairs/s",
        best * 1e3,
        pairs / best / 1e9
    );
}
