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
            ("pairs", "6ef61f8aa1afe5a402f7"),
            ("tok", "18be5d55e42cf5fd5781"),
            ("tokens", "9170131798b1f6e5b746"),
            ("base", "25a2a23398edaac016e9"),
            ("ref", "71221fc41432e34403d3"),
            ("oracle", "9b941ebaefff9c4d47bb"),
            ("scores", "bc8a387428ca80381bdc"),
            ("keys", "9daa193fcc03d5404eb9"),
            ("policy", "13eee9eba7499642c54c"),
            ("dpo", "21744a1524277a9f6d83"),
            ("ipo", "d2eead26b9f5b742ebb5"),
            ("simpo", "f40a67cb980295d52985"),
            ("judge", "40cad02810e4673160d7"),
            ("report", "6b50b9af8c73273e404f"),
        ])
    );
}
