//! Every kind of bad input exits 2, names the file and the culprit, and leaves nothing in the cache.

mod common;

use common::*;

/// Runs `sepo run` on `yaml` (with `files` written beside it) and checks the contract.
fn expect_user_error(yaml: &str, files: &[(&str, &str)], needles: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    for (name, content) in files {
        std::fs::write(dir.path().join(name), content).unwrap();
    }
    let p = pipeline(dir.path(), yaml);
    let r = sepo(&["run", &p, "-q"]);
    assert_eq!(r.code, 2, "expected exit 2, got {}: {}", r.code, r.stderr);
    assert!(r.stderr.starts_with("error: "), "{}", r.stderr);
    for n in needles {
        assert!(r.stderr.contains(n), "missing {n:?} in: {}", r.stderr);
    }
    assert!(
        artifacts(&dir.path().join("cache")).is_empty(),
        "cache not empty"
    );
    let tmp = dir.path().join("cache/tmp");
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "leftovers: {left:?}");
}

const ROW: &str = r#"{"prompt": "p", "chosen": "c", "rejected": "r"}"#;

#[test]
fn yaml_syntax_error() {
    expect_user_error(
        "stages:\n  a: {kind: ingest\n",
        &[],
        &["p.yaml", "YAML syntax error", "line"],
    );
}

#[test]
fn unknown_stage_kind() {
    expect_user_error(
        "stages:\n  a: {kind: injest}\n",
        &[],
        &[
            "p.yaml",
            "stage `a`",
            "unknown stage kind `injest`",
            "did you mean `ingest`",
        ],
    );
}

#[test]
fn misspelled_parameter() {
    expect_user_error(
        "stages:\n  a: {kind: ingest, format: preference, path: d.jsonl, test_fracton: 0.1}\n",
        &[("d.jsonl", ROW)],
        &[
            "p.yaml",
            "stage `a` (ingest)",
            "unknown field `test_fracton`",
            "did you mean `test_fraction`",
        ],
    );
}

#[test]
fn wrong_parameter_value() {
    expect_user_error(
        "stages:\n  a: {kind: ingest, format: csv, path: d.jsonl}\n",
        &[("d.jsonl", ROW)],
        &["p.yaml", "stage `a` (ingest)", "unknown variant `csv`"],
    );
}

#[test]
fn input_pointing_at_no_stage() {
    expect_user_error(
        "stages:\n  pairs: {kind: ingest, format: preference, path: d.jsonl}\n  t: {kind: tokenizer, inputs: {data: pair}, train: {vocab_size: 300}}\n",
        &[("d.jsonl", ROW)],
        &["p.yaml", "stage `t`", "`pair`", "did you mean `pairs`"],
    );
}

#[test]
fn cycle() {
    expect_user_error(
        "stages:\n  a: {kind: tokenize, inputs: {data: b, tokenizer: b}}\n  b: {kind: tokenizer, inputs: {data: a}, train: {}}\n",
        &[],
        &["p.yaml", "cycle", "a -> b", "b -> a"],
    );
}

#[test]
fn missing_data_file() {
    expect_user_error(
        "stages:\n  a: {kind: ingest, format: preference, path: nope.jsonl}\n",
        &[],
        &["p.yaml", "stage `a`", "nope.jsonl", "not found"],
    );
}

#[test]
fn unsupported_file_type() {
    expect_user_error(
        "stages:\n  a: {kind: ingest, format: preference, path: d.csv}\n",
        &[("d.csv", "prompt,chosen,rejected\n")],
        &["p.yaml", "stage `a`", "d.csv", "unsupported file type"],
    );
}

#[test]
fn malformed_json_line_names_its_line() {
    let text = format!("{ROW}\n{ROW}\n{{\"prompt\": \"p\", \"chosen\": \n{ROW}\n");
    expect_user_error(
        "stages:\n  a: {kind: ingest, format: preference, path: d.jsonl}\n",
        &[("d.jsonl", &text)],
        &[
            "p.yaml",
            "stage `a` (ingest)",
            "d.jsonl line 3",
            "malformed JSON",
        ],
    );
}

#[test]
fn row_missing_a_field_names_row_and_field() {
    let text = format!("{ROW}\n{{\"prompt\": \"p\", \"chosen\": \"c\"}}\n");
    expect_user_error(
        "stages:\n  a: {kind: ingest, format: preference, path: d.jsonl}\n",
        &[("d.jsonl", &text)],
        &[
            "p.yaml",
            "stage `a` (ingest)",
            "d.jsonl line 2",
            "missing field `rejected`",
        ],
    );
}

#[test]
fn wrong_role_and_missing_role() {
    expect_user_error(
        "stages:\n  a: {kind: ingest, format: preference, path: d.jsonl}\n  t: {kind: tokenize, inputs: {data: a, tokeniser: a}}\n",
        &[("d.jsonl", ROW)],
        &[
            "stage `t`",
            "unknown input role `tokeniser`",
            "did you mean `tokenizer`",
        ],
    );
    expect_user_error(
        "stages:\n  a: {kind: ingest, format: preference, path: d.jsonl}\n  t: {kind: tokenize, inputs: {data: a}}\n",
        &[("d.jsonl", ROW)],
        &["stage `t`", "missing required input `tokenizer`"],
    );
    expect_user_error(
        "stages:\n  a: {kind: ingest, format: preference, path: d.jsonl}\n  t: {kind: tokenize, inputs: {data: a, tokenizer: a}}\n",
        &[("d.jsonl", ROW)],
        &[
            "stage `t`",
            "input `tokenizer` must be a tokenizer or model or train stage, but `a` is a `ingest` stage",
        ],
    );
}

#[test]
fn cli_errors_exit_2() {
    let r = sepo(&["run"]);
    assert_eq!(r.code, 2);
    let r = sepo(&["run", "/nonexistent/p.yaml"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("/nonexistent/p.yaml"), "{}", r.stderr);
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(dir.path(), &small_yaml(""));
    let r = sepo(&["run", &p, "--set", "nostage.x=1"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("no stage `nostage`"), "{}", r.stderr);
    let r = sepo(&["run", &p, "--stage", "tokenz"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("did you mean `tokens`"), "{}", r.stderr);
}
