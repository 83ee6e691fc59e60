//! Where a training step's time goes, for diagnosing speed on an asynchronous device (a GPU):
//! with `SEPO_STEP_PHASES=1` in the environment, the loop waits for the device after each phase
//! of every step (forward with its metrics, backward, gradient clipping, optimizer) and prints
//! the mean of each to stderr when training ends, leaving out the first step (allocations, kernel
//! selection) when there are more. The waits serialize host and device, so the
//! phases add up to a little more than an unobserved step; off (the default), nothing waits.
//! `scripts/bench_torch.py --phases` times PyTorch's step the same way (`bench/gpu.sh PHASES=1`).

use std::time::Instant;

use burn::tensor::Device;

/// The environment switch.
pub const VAR: &str = "SEPO_STEP_PHASES";

/// The phases, in step order.
pub const NAMES: [&str; 4] = ["forward", "backward", "clip", "optimizer"];

/// Per-phase wall time, summed over steps; inert unless [`VAR`] is set.
pub struct Phases {
    device: Option<Device>,
    last: Instant,
    /// The first step's phases (reported alone only when it is the only step).
    first: [f64; 4],
    /// The later steps' phases, summed.
    totals: [f64; 4],
    steps: u64,
}

impl Phases {
    /// On when `SEPO_STEP_PHASES` is set to anything but `0` or the empty string.
    pub fn from_env(device: &Device) -> Self {
        let on = std::env::var(VAR).is_ok_and(|v| !v.is_empty() && v != "0");
        Phases {
            device: on.then(|| device.clone()),
            last: Instant::now(),
            first: [0.0; 4],
            totals: [0.0; 4],
            steps: 0,
        }
    }

    /// Starts a step's clock (after the device has finished the work before it).
    pub fn start(&mut self) {
        if self.device.is_some() {
            self.wait();
            self.last = Instant::now();
        }
    }

    /// Ends phase `i` of [`NAMES`]: waits for the device, then charges the time since the last
    /// mark to the phase. The optimizer phase (the last) also counts a step.
    pub fn mark(&mut self, i: usize) {
        if self.device.is_some() {
            self.wait();
            let now = Instant::now();
            let sums = if self.steps == 0 {
                &mut self.first
            } else {
                &mut self.totals
            };
            sums[i] += (now - self.last).as_secs_f64();
            self.last = now;
            if i + 1 == NAMES.len() {
                self.steps += 1;
            }
        }
    }

    fn wait(&self) {
        if let Some(d) = &self.device {
            // A failed wait only blurs the diagnostic; the step's own reads report device errors.
            let _ = d.sync();
        }
    }

    /// `forward 41.2 ms, backward 80.3 ms, ...` per step (the steps after the first, or the
    /// first alone), or `None` when off or no step ran.
    pub fn summary(&self) -> Option<String> {
        (self.device.is_some() && self.steps > 0).then(|| {
            let (sums, n, which) = match self.steps {
                1 => (self.first, 1, "the only step"),
                n => (self.totals, n - 1, "the steps after the first"),
            };
            let parts: Vec<String> = NAMES
                .iter()
                .zip(sums)
                .map(|(name, t)| format!("{name} {:.1} ms", 1e3 * t / n as f64))
                .collect();
            format!(
                "{} per step over {which} ({n}; device waited for after each phase)",
                parts.join(", ")
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_unless_asked_and_sums_per_step_when_on() {
        let device = crate::device::parse_device("flex").unwrap();
        let mut off = Phases::from_env(&device);
        off.device = None;
        off.start();
        off.mark(3);
        assert_eq!(off.summary(), None, "off: no summary, no step counted");

        let mut on = Phases {
            device: Some(device),
            last: Instant::now(),
            first: [0.0; 4],
            totals: [0.0; 4],
            steps: 0,
        };
        let step = |on: &mut Phases, ms: u64| {
            on.start();
            for i in 0..4 {
                std::thread::sleep(std::time::Duration::from_millis(ms * (i as u64 + 1)));
                on.mark(i);
            }
        };
        step(&mut on, 10); // a slow first step: 10, 20, 30, 40 ms
        assert_eq!(on.steps, 1);
        assert!(on.summary().unwrap().contains("the only step (1;"));
        for _ in 0..2 {
            step(&mut on, 2); // 2, 4, 6, 8 ms
        }
        assert_eq!(on.steps, 3);
        // The later steps' means are at least what they slept, phase by phase, and the first
        // step's time is kept apart from them.
        for (i, t) in on.totals.iter().enumerate() {
            let mean = t / 2.0;
            assert!(mean >= 0.002 * (i as f64 + 1.0), "phase {i}: {mean}");
            assert!(
                on.first[i] >= 0.010 * (i as f64 + 1.0),
                "first step, phase {i}"
            );
        }
        let s = on.summary().unwrap();
        assert!(
            s.starts_with("forward ")
                && s.contains("optimizer")
                && s.contains("after the first (2;"),
            "{s}"
        );
    }
}
