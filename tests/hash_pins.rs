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
            ("ref", "2043faae24975c344682"),
            ("oracle", "26b9221f2f03a49be670"),
            ("scores", "d2169c5ffad1a2061a83"),
            ("keys", "ca5b1e709b3e740421b7"),
            ("policy", "143d1163a300e1b691a4"),
            ("dpo", "5117b298c1c41da20a29"),
            ("ipo", "0b86daec5c2c911c5168"),
            ("simpo", "fc64a28a24695b998d40"),
            ("judge", "b06e6b54334767b7da95"),
            ("report", "475628e52f7f4f83e4d3"),
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
