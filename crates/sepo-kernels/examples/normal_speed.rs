//! Throughput of `fill_normal`, the draws of a fresh model's weights: `cargo run -p sepo-kernels
//! --example normal_speed [MILLIONS]` (default 162, the weights of the weights benchmark's model).
//! Prints draws per second over five fills of one buffer; `RAYON_NUM_THREADS=1` for one thread.

use std::time::Instant;

fn main() {
    let millions: usize = std::env::args()
        .nth(1)
        .map_or(162, |a| a.parse().expect("a number"));
    let mut out = vec![0f32; millions * 1_000_000];
    // The first fill also faults the buffer's pages in.
    sepo_kernels::fill_normal(7, 1, 0.02, &mut out);
    for _ in 0..5 {
        let t = Instant::now();
        sepo_kernels::fill_normal(7, 1, 0.02, &mut out);
        let dt = t.elapsed().as_secs_f64();
        println!("{:.0} M draws/s ({dt:.3} s)", out.len() as f64 / dt / 1e6);
    }
}
