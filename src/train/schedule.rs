//! Learning-rate schedule: linear warm-up from 0, then cosine decay to 0 —
//! `transformers.get_cosine_schedule_with_warmup` (num_cycles 0.5) with
//! `num_warmup_steps = ceil(warmup_ratio * total_steps)` (the HF Trainer's `get_warmup_steps`).
//!
//! `step` counts optimizer updates already taken: the first update uses `lr_at(0, ..)`, which is 0
//! whenever there is any warm-up (as in the HF Trainer). The value transformers' scheduler reports
//! (`get_last_lr()`) after `k` scheduler steps is `lr_at(k, ..)`.

/// `ceil(warmup_ratio * total_steps)`, computed in f64 exactly as Python's
/// `math.ceil(num_training_steps * warmup_ratio)`: `100 * 0.07` is `7.000000000000001`, so 8.
pub fn num_warmup_steps(total_steps: u64, warmup_ratio: f64) -> u64 {
    let w = (total_steps as f64 * warmup_ratio).ceil();
    if w.is_finite() && w > 0.0 {
        w as u64
    } else {
        0
    }
}

/// The learning rate for update number `step + 1` (`step` from 0).
pub fn lr_at(step: u64, total_steps: u64, base_lr: f64, warmup_ratio: f64) -> f64 {
    base_lr
        * factor(
            step,
            total_steps,
            num_warmup_steps(total_steps, warmup_ratio),
        )
}

/// transformers' `_get_cosine_schedule_with_warmup_lr_lambda` (num_cycles 0.5, min_lr_rate 0).
fn factor(step: u64, total: u64, warmup: u64) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    let f = 0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos());
    f.max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    const FIXTURE: &str = include_str!("../../tests/fixtures/optim.json");

    /// Every value of `get_cosine_schedule_with_warmup` recorded by scripts/make_fixtures.py
    /// (`optim_fixtures`, transformers 5.24.0): lr after k scheduler steps, k = 0..=total.
    #[test]
    fn matches_transformers_cosine_with_warmup() {
        let fx: Value = serde_json::from_str(FIXTURE).unwrap();
        let sched = &fx["cosine_schedule"];
        let base = sched["base_lr"].as_f64().unwrap();
        let mut n = 0;
        for case in sched["cases"].as_array().unwrap() {
            let total = case["total_steps"].as_u64().unwrap();
            let ratio = case["warmup_ratio"].as_f64().unwrap();
            assert_eq!(
                num_warmup_steps(total, ratio),
                case["num_warmup_steps"].as_u64().unwrap(),
                "{case}"
            );
            for (k, want) in case["lr"].as_array().unwrap().iter().enumerate() {
                let want = want.as_f64().unwrap();
                let got = lr_at(k as u64, total, base, ratio);
                assert!(
                    (got - want).abs() <= 1e-15,
                    "total {total} ratio {ratio} step {k}: {got} vs {want}"
                );
                n += 1;
            }
        }
        assert!(n > 150);
    }

    #[test]
    fn shape_of_the_schedule() {
        assert_eq!(num_warmup_steps(100, 0.07), 8); // 100 * 0.07 = 7.000000000000001
        assert_eq!(num_warmup_steps(10, 0.0), 0);
        assert_eq!(lr_at(0, 10, 1.0, 0.0), 1.0); // no warm-up: starts at base
        assert_eq!(lr_at(0, 10, 1.0, 0.1), 0.0); // warm-up: first update at lr 0
        assert_eq!(lr_at(1, 10, 1.0, 0.1), 1.0); // end of warm-up = peak
        assert!(lr_at(10, 10, 1.0, 0.1).abs() < 1e-16); // decays to 0
    }
}
