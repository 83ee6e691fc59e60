//! The stage hashes of the shipped pipelines, pinned. A refactor must not move them (every user's
//! cache would rebuild); a change that means to (a stage's `version` bumped on purpose, a new
//! parameter default) updates the pins in the same commit and says so.

mod common;

use common::*;

fn hashes(pipeline: &str) -> Vec<(String, String)> {
    let cache = tempfile::tempdir().unwrap();
    let cache = cache.path().display().to_string();
    status_json(&data(pipeline), &["--cache", &cache])
        .iter()
        .map(|s| {
            (
                s["stage"].as_str().unwrap().to_string(),
                s["hash"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn pinned(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[test]
fn ultrafeedback_pipeline_hashes_are_pinned() {
    assert_eq!(
        hashes("pipelines/ultrafeedback.yaml"),
        pinned(&[
            ("pairs", "386d872ecab8df54dcd2"),
            ("tok", "18be5d55e42cf5fd5781"),
            ("tokens", "cf82b7b481b3125c55d7"),
            ("base", "25a2a23398edaac016e9"),
            ("ref", "0917ebbfd62f1c72137e"),
            ("oracle", "959109ae4a6624e08518"),
            ("scores", "9aec95bd7d51459be0f9"),
            ("keys", "87820011a9df2d2e91f6"),
            ("policy", "a2472cd06986f0155ddc"),
            ("dpo", "a10311cb2b7cb1fcafd2"),
        ])
    );
}

#[test]
fn hh_rlhf_pipeline_hashes_are_pinned() {
    assert_eq!(
        hashes("pipelines/hh-rlhf.yaml"),
        pinned(&[
            ("pairs", "8b0a818d15f8d721b1ca"),
            ("tok", "7842b2fda3fda69ab0e6"),
            ("tokens", "2e0be3bf4bdb2ae8f942"),
        ])
    );
}
