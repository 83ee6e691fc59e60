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
            ("dpo", "527ba79c2a229ae3afc5"),
            ("ipo", "5015f5a308f0f8ea9a9d"),
            ("simpo", "359288c414c074d19555"),
            ("judge", "b06e6b54334767b7da95"),
            ("report", "612eb33137bc4a791473"),
        ])
    );
}

#[test]
fn hh_rlhf_pipeline_hashes_are_pinned() {
    assert_eq!(
        hashes("pipelines/hh-rlhf.yaml"),
        pinned(&[
            ("pairs", "8b0a818d15f8d721b1ca"),
            ("tok", "18be5d55e42cf5fd5781"),
            ("tokens", "70a5ef50f04f67a65557"),
            ("base", "25a2a23398edaac016e9"),
            ("ref", "1edeb79ace69768a7e02"),
            ("oracle", "ee11ffc9015d1ff261d7"),
            ("scores", "13de18028f189e6aaea5"),
            ("keys", "9709eb09066d5cf03693"),
            ("policy", "036e5d764a8306f2d987"),
            ("dpo", "b04330e54884ea860458"),
            ("ipo", "e96bb28de71e508f0d7e"),
            ("simpo", "74743453b94ef37137be"),
            ("judge", "34eb0f90f0fe8de0aa11"),
            ("report", "b3fa1be53668c38b06da"),
        ])
    );
}
