//! `sepo status` says why each stale stage is stale, as DVC does: never built, parameters (which
//! keys, old → new), inputs, external files, the stage code's version, a deleted artifact.

mod common;

use common::*;

/// `status --json` as (stage, state, why joined).
fn whys(p: &str, extra: &[&str]) -> Vec<(String, String, String)> {
    status_json(p, extra)
        .iter()
        .map(|s| {
            let why: Vec<&str> = s["why"]
                .as_array()
                .unwrap()
                .iter()
                .map(|w| w.as_str().unwrap())
                .collect();
            (
                s["stage"].as_str().unwrap().to_string(),
                s["state"].as_str().unwrap().to_string(),
                why.join("; "),
            )
        })
        .collect()
}

#[test]
fn status_and_run_say_why_a_stage_is_stale() {
    let dir = tempfile::tempdir().unwrap();
    // A copy of the data, so the test can edit it.
    let data_file = dir.path().join("rows.jsonl");
    std::fs::copy(data("data/ultrafeedback/h4_schema_200.jsonl"), &data_file).unwrap();
    let yaml = small_yaml("").replace(
        &data("data/ultrafeedback/h4_schema_200.jsonl"),
        &data_file.display().to_string(),
    );
    let p = pipeline(dir.path(), &yaml);

    assert!(whys(&p, &[]).iter().all(|s| s.2 == "never built"));
    let r = sepo(&["run", &p]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("stale  tokens: never built"),
        "{}",
        r.stderr
    );
    assert!(
        whys(&p, &[])
            .iter()
            .all(|s| s.1 == "fresh" && s.2.is_empty())
    );

    // A parameter: the key, old → new; downstream names its changed input.
    let w = whys(&p, &["--set", "tokens.max_len=64"]);
    assert_eq!(w[2].2, "params: max_len 128 → 64", "{w:?}");
    let r = sepo(&["status", &p, "--set", "tokens.max_len=64"]);
    assert!(
        r.stdout.contains("(params: max_len 128 → 64)"),
        "{}",
        r.stdout
    );

    // The data file: the file, then its consumers' input.
    let mut text = std::fs::read_to_string(&data_file).unwrap();
    text.push('\n');
    text.push_str(
        text.lines()
            .next()
            .unwrap()
            .to_string()
            .replace("\"prompt\": \"", "\"prompt\": \"Again: ")
            .as_str(),
    );
    text.push('\n');
    std::fs::write(&data_file, text).unwrap();
    let w = whys(&p, &[]);
    assert!(w[0].2.contains("rows.jsonl changed"), "{w:?}");
    assert_eq!(w[1].2, "");
    assert_eq!(w[2].2, "input `pairs` (data) changed", "{w:?}");
    let r = sepo(&["run", &p]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("stale  pairs: file"), "{}", r.stderr);

    // A deleted artifact.
    let path = sepo(&["show", &p, "tokens", "--path"])
        .stdout
        .trim()
        .to_string();
    std::fs::remove_dir_all(&path).unwrap();
    assert_eq!(
        whys(&p, &[])[2].2,
        "its artifact was deleted (by gc or by hand)"
    );
}
