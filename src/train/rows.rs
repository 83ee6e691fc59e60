//! Which rows of the train split a `train` stage trains on. Shared by the stage and by `evaluate`,
//! which must prove a judge never saw the oracle's rows.

/// The rows of `n` (the train split) a train stage uses: `data_fraction`'s seeded [`subset`], or with
/// `complement` exactly the others (file order kept).
pub fn pick_rows(n: usize, fraction: f64, complement: bool, seed: u64) -> Vec<usize> {
    let keep = subset(n, fraction, seed);
    if !complement {
        return keep;
    }
    (0..n).filter(|i| keep.binary_search(i).is_err()).collect()
}

/// The rows of the train split kept by `data_fraction` (a seeded subset, file order kept).
pub fn subset(n: usize, fraction: f64, seed: u64) -> Vec<usize> {
    use rand::SeedableRng;
    use rand::seq::SliceRandom;
    if fraction >= 1.0 {
        return (0..n).collect();
    }
    let k = ((fraction * n as f64).ceil() as usize).clamp(1, n.max(1));
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed ^ 0x5e90_da7a));
    idx.truncate(k);
    idx.sort_unstable();
    idx
}
