//! Fault injection for the test suite, through one switch: `SEPO_TEST_HOOK=<point>:<arg>` makes
//! sepo die (or panic) at a named point, so tests can prove what a kill -9 or a bug there leaves
//! behind. Unset (always, outside tests) it costs one environment lookup per point passed.
//!
//! Points: `abort-before-commit:<stage>` (complete output, not yet committed),
//! `abort-after-checkpoint:<step>` (a train stage right after writing a checkpoint),
//! `panic-in-stage:<stage>` (a bug inside a stage), `gc-after-rename:<kind>.<hash>` (gc has
//! moved an artifact out of the live tree, not yet deleted it).

pub const VAR: &str = "SEPO_TEST_HOOK";

/// Whether the switch names this point with this argument.
pub fn hit(point: &str, arg: &str) -> bool {
    std::env::var(VAR).is_ok_and(|v| v.split_once(':') == Some((point, arg)))
}

/// Dies the hardest way (no unwinding, no cleanup), as a kill -9 would.
pub fn abort_at(point: &str, arg: &str) {
    if hit(point, arg) {
        std::process::abort();
    }
}

/// Panics, as a bug would.
pub fn panic_at(point: &str, arg: &str) {
    if hit(point, arg) {
        panic!("{VAR}: injected panic at {point}:{arg}");
    }
}
