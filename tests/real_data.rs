//! `ingest` on real data as it comes: odd rows are dropped and counted (and fail the stage only
//! past `max_drop_fraction`), user Parquet with columns of types sepo cannot read, text stored as
//! bytes, and repeated ids. Fixtures: tests/fixtures/ingest/ (see its README).

mod common;

use common::*;
use sepo::data::parquet as pq;
use sepo::stages::ingest::read_pairs;

fn fixture(name: &str) -> String {
    data(&format!("tests/fixtures/ingest/{name}"))
}

fn ingest_yaml(format: &str, path: &str, extra: &str) -> String {
    format!("stages:\n  pairs: {{kind: ingest, format: {format}, path: {path}{extra}}}\n")
}

fn artifact(p: &str) -> std::path::PathBuf {
    let r = sepo(&["show", p, "pairs", "--path"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    std::path::PathBuf::from(r.stdout.trim())
}

fn stats(p: &str) -> serde_json::Value {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(artifact(p).join("manifest.json")).unwrap()).unwrap();
    m["stats"].clone()
}

/// Runs the pipeline, expects exit 2 with every needle in stderr and nothing in the cache.
fn expect_user_error(dir: &std::path::Path, yaml: &str, needles: &[&str]) -> String {
    let p = pipeline(dir, yaml);
    let r = sepo(&["run", &p, "-q"]);
    assert_eq!(r.code, 2, "expected exit 2, got {}: {}", r.code, r.stderr);
    for n in needles {
        assert!(r.stderr.contains(n), "missing {n:?} in: {}", r.stderr);
    }
    assert!(artifacts(&dir.join("cache")).is_empty(), "cache not empty");
    r.stderr
}

#[test]
fn hh_rlhf_rows_that_end_with_the_human_are_dropped_not_fatal() {
    // 40 real helpful-base rows; line 10 stops after the Human's turn (as helpful-online rows
    // do), line 20 has no Assistant turn, line 30 a null `rejected`.
    let dir = tempfile::tempdir().unwrap();
    let path = fixture("hh_helpful_odd_40.jsonl");
    let p = pipeline(
        dir.path(),
        &ingest_yaml("hh-rlhf", &path, ", max_drop_fraction: 0.1"),
    );
    let r = sepo(&["run", &p]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains(
            "40 rows read, 37 pairs (37 train, 0 test), dropped 3 (7.5%): 1 last_turn_not_assistant, 1 missing_rejected, 1 no_assistant_turn"
        ),
        "{}",
        r.stderr
    );
    let s = stats(&p);
    assert_eq!(s["rows_read"], 40);
    assert_eq!(s["pairs"], 37);
    assert_eq!(
        s["dropped"],
        serde_json::json!({"last_turn_not_assistant": 1, "no_assistant_turn": 1, "missing_rejected": 1})
    );
    let first = s["dropped_first"]["last_turn_not_assistant"]
        .as_str()
        .unwrap();
    assert!(
        first.ends_with(
            "hh_helpful_odd_40.jsonl line 10: `chosen` ends with a `user` turn, not an assistant answer"
        ),
        "{first}"
    );
    let pairs = read_pairs(&artifact(&p).join("pairs.parquet")).unwrap();
    assert_eq!(pairs.len(), 37);
    assert!(pairs.iter().all(|p| p.prompt.last().unwrap().0 == "user"));
}

#[test]
fn too_many_odd_rows_fail_with_the_share_and_the_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let path = fixture("hh_helpful_odd_40.jsonl");
    expect_user_error(
        dir.path(),
        &ingest_yaml("hh-rlhf", &path, ""),
        &[
            "stage `pairs` (ingest)",
            "3 of 40 rows",
            "(7.5%)",
            "more than `max_drop_fraction` 0.05",
            "1 last_turn_not_assistant (first: ",
            "hh_helpful_odd_40.jsonl line 10: `chosen` ends with a `user` turn",
            "1 no_assistant_turn (first: ",
            "line 20: `chosen` has no assistant turn",
            "1 missing_rejected (first: ",
            "line 30: missing field `rejected` (format hh-rlhf)",
        ],
    );
}

#[test]
fn real_hh_rlhf_test_split_drops_its_odd_rows_by_reason() {
    // Anthropic's helpful-base test split as published: SOURCES.md lists its odd rows.
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(
        dir.path(),
        &ingest_yaml(
            "hh-rlhf",
            &data("data/hh-rlhf/helpful-base-test.jsonl.gz"),
            "",
        ),
    );
    assert_eq!(sepo(&["run", &p, "-q"]).code, 0);
    let s = stats(&p);
    assert_eq!(s["rows_read"], 2354);
    assert_eq!(
        s["dropped"],
        serde_json::json!({"prompt_mismatch": 9, "empty_response": 4, "identical_responses": 2})
    );
    assert_eq!(s["pairs"], 2354 - 15);
    assert!(
        s["dropped_first"]["empty_response"]
            .as_str()
            .unwrap()
            .ends_with("helpful-base-test.jsonl.gz line 121: the `rejected` response is empty")
    );
}

#[test]
fn odd_ultrafeedback_rows_from_real_rows_are_counted() {
    // The first 100 real H4 rows (row 51 has an empty answer), with two rows made odd the ways
    // exported chats are: the conversation stops at the user, and a `tool` message.
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(repo().join("data/ultrafeedback/h4_train_prefs_500.jsonl"))
        .unwrap();
    let mut rows: Vec<serde_json::Value> = text
        .lines()
        .take(100)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    rows[9]["chosen"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"role": "user", "content": "Thanks! And?"}));
    rows[19]["rejected"][1]["role"] = "tool".into();
    let lines: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
    std::fs::write(dir.path().join("uf.jsonl"), lines.join("\n")).unwrap();
    let p = pipeline(dir.path(), &ingest_yaml("ultrafeedback", "uf.jsonl", ""));
    let r = sepo(&["run", &p, "-q"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let s = stats(&p);
    assert_eq!(
        s["dropped"],
        serde_json::json!({"last_turn_not_assistant": 1, "unknown_role": 1, "empty_response": 1})
    );
    assert_eq!(s["pairs"], 97);
}

#[test]
fn no_usable_rows_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let rows = "{\"prompt\": \"p\", \"chosen\": \"\", \"rejected\": \"r\"}\n\
                {\"prompt\": \"q\", \"chosen\": \"c\", \"rejected\": \"c\"}\n";
    std::fs::write(dir.path().join("d.jsonl"), rows).unwrap();
    expect_user_error(
        dir.path(),
        &ingest_yaml("preference", "d.jsonl", ", max_drop_fraction: 1"),
        &[
            "no usable rows in d.jsonl: all 2 rows were dropped",
            "1 empty_response (first: ",
            "d.jsonl line 1: the `chosen` response is empty",
            "1 identical_responses (first: ",
            "d.jsonl line 2",
        ],
    );
    std::fs::write(dir.path().join("e.jsonl"), "\n").unwrap();
    expect_user_error(
        dir.path(),
        &ingest_yaml("preference", "e.jsonl", ""),
        &["no usable rows in e.jsonl: it holds no rows"],
    );
}

#[test]
fn a_field_missing_from_every_row_is_a_wrong_format_error() {
    let dir = tempfile::tempdir().unwrap();
    // HH-RLHF transcripts read as `preference`: no row has a `prompt`, however many rows may drop.
    expect_user_error(
        dir.path(),
        &ingest_yaml(
            "preference",
            &fixture("hh_helpful_odd_40.jsonl"),
            ", max_drop_fraction: 1",
        ),
        &[
            "hh_helpful_odd_40.jsonl: no row has `prompt` (format preference needs `prompt`, `chosen`, `rejected`)",
            "its first row has: chosen, rejected",
            "Is `format` right?",
        ],
    );
    // The same for a Parquet file: the message lists its columns.
    let mut df = pq::frame(vec![
        pq::utf8("prompt", vec!["p".into(); 3]),
        pq::utf8("chosen", vec!["c".into(); 3]),
        pq::utf8("answer_b", vec!["r".into(); 3]),
    ])
    .unwrap();
    pq::write(&mut df, &dir.path().join("d.parquet")).unwrap();
    expect_user_error(
        dir.path(),
        &ingest_yaml("preference", "d.parquet", ""),
        &[
            "d.parquet: no row has `rejected`",
            "its columns are: prompt, chosen, answer_b",
        ],
    );
    // Message lists read as HH-RLHF transcripts: every row has the wrong type.
    expect_user_error(
        dir.path(),
        &ingest_yaml(
            "hh-rlhf",
            &data("data/ultrafeedback/h4_schema_200.jsonl"),
            "",
        ),
        &[
            "all 200 rows were dropped: 200 wrong_type_chosen",
            "h4_schema_200.jsonl line 1: `chosen` must be a string, found a list",
            "Is `format` (hh-rlhf) right?",
        ],
    );
}

/// The same 4 real H4 rows as JSON Lines, for comparing what Parquet files give.
fn h4_rows_jsonl(dir: &std::path::Path) -> Vec<sepo::stages::ingest::Pair> {
    let text =
        std::fs::read_to_string(repo().join("data/ultrafeedback/h4_schema_200.jsonl")).unwrap();
    let head: Vec<&str> = text.lines().take(4).collect();
    let sub = dir.join("jsonl");
    std::fs::create_dir_all(&sub).unwrap();
    std::fs::write(sub.join("rows.jsonl"), head.join("\n")).unwrap();
    let p = pipeline(&sub, &ingest_yaml("ultrafeedback", "rows.jsonl", ""));
    assert_eq!(sepo(&["run", &p, "-q"]).code, 0);
    let mut pairs = read_pairs(&artifact(&p).join("pairs.parquet")).unwrap();
    for x in &mut pairs {
        x.source.clear();
    }
    pairs
}

#[test]
fn parquet_columns_that_are_not_used_never_matter() {
    // Real H4 rows plus columns of int8, int16, date, timestamp, decimal, float16, fixed-size
    // list, time, duration, list<date>, struct<timestamp, ..>, categorical, enum, map, uuid,
    // binary and null, as Polars and as pyarrow write them.
    let dir = tempfile::tempdir().unwrap();
    let want = h4_rows_jsonl(dir.path());
    assert_eq!(want.len(), 4);
    for name in [
        "h4_odd_columns.polars.parquet",
        "h4_odd_columns.pyarrow.parquet",
    ] {
        let sub = dir.path().join(name);
        std::fs::create_dir_all(&sub).unwrap();
        let p = pipeline(&sub, &ingest_yaml("ultrafeedback", &fixture(name), ""));
        let r = sepo(&["run", &p, "-q"]);
        assert_eq!(r.code, 0, "{name}: {}", r.stderr);
        let mut got = read_pairs(&artifact(&p).join("pairs.parquet")).unwrap();
        for x in &mut got {
            x.source.clear();
        }
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn a_used_parquet_column_of_an_unreadable_type_names_file_column_and_type() {
    let dir = tempfile::tempdir().unwrap();
    let path = fixture("decimal_scores.polars.parquet");
    expect_user_error(
        dir.path(),
        &ingest_yaml("preference", &path, ""),
        &[
            "stage `pairs` (ingest)",
            "decimal_scores.polars.parquet: column `score_chosen` has type decimal(4, 1), which sepo cannot read",
        ],
    );
}

/// Each odd column of the fixtures, read as if a format used it: a clear error naming the file,
/// the column and its type, or its values, and never a panic.
#[test]
fn every_odd_column_type_reads_or_is_refused_by_name() {
    use sepo::data::rows::for_each_row_in;
    let read = |file: &str, col: &str| -> Result<Vec<serde_json::Value>, String> {
        let path = std::path::PathBuf::from(fixture(file));
        let caught = std::panic::catch_unwind(|| {
            let mut out = Vec::new();
            for_each_row_in(&path, Some(&[col][..]), |_, row| {
                out.push(row[col].clone());
                Ok(())
            })
            .map(|()| out)
            .map_err(|e| {
                assert!(sepo::error::is_user_error(&e), "{e:#}");
                format!("{e:#}")
            })
        });
        caught.unwrap_or_else(|_| panic!("{file}: reading column `{col}` panicked"))
    };
    let refused = [
        ("n_i8", "int8"),
        ("n_i16", "int16"),
        ("day", "date32"),
        ("price", "decimal(10, 2)"),
        ("half", "float16"),
        ("vec3", "fixed_size_list<int32>[3]"),
        ("took", "duration[ms]"),
    ];
    for file in [
        "h4_odd_columns.polars.parquet",
        "h4_odd_columns.pyarrow.parquet",
    ] {
        for (col, ty) in refused {
            let err = read(file, col).expect_err(col);
            let want = format!("{file}: column `{col}` has type {ty}, which sepo cannot read");
            assert!(err.contains(&want), "{err}\nwanted: {want}");
        }
        for (col, ty) in [("at", "timestamp["), ("clock", "time[")] {
            let err = read(file, col).expect_err(col);
            assert!(
                err.contains(&format!("column `{col}` has type {ty}")),
                "{err}"
            );
        }
        // Categoricals (pandas' `category`) read as their text.
        assert_eq!(
            read(file, "cat").unwrap(),
            serde_json::json!(["x", "y", "x", null])
                .as_array()
                .unwrap()
                .clone()
        );
        // Bytes are text when they are UTF-8; otherwise the row is named.
        let err = read(file, "blob").unwrap_err();
        assert!(
            err.contains(&format!(
                "{file} row 2: column `blob` holds bytes that are not UTF-8 text"
            )),
            "{err}"
        );
    }
    let polars_file = "h4_odd_columns.polars.parquet";
    let err = read(polars_file, "meta").unwrap_err();
    assert!(
        err.contains(
            "column `meta` has type struct<made: timestamp[us], by: string> (timestamp[us] at `meta.made`)"
        ),
        "{err}"
    );
    let err = read(polars_file, "dates").unwrap_err();
    assert!(
        err.contains("column `dates` has type list<date32>"),
        "{err}"
    );
    assert_eq!(
        read(polars_file, "kind").unwrap(),
        serde_json::json!(["a", "b", "a", "b"])
            .as_array()
            .unwrap()
            .clone()
    );
    assert_eq!(
        read(polars_file, "nothing").unwrap(),
        vec![serde_json::Value::Null; 4]
    );
}

#[test]
fn parquet_text_stored_as_bytes_is_text() {
    use polars::prelude::Column;
    let dir = tempfile::tempdir().unwrap();
    let binary = |name: &str, v: Vec<&[u8]>| Column::new(name.into(), v);
    let prompt: Vec<&[u8]> = vec![
        "Why is the sky blue?".as_bytes(),
        "Caf\u{e9} au lait?".as_bytes(),
    ];
    let chosen: Vec<&[u8]> = vec![
        "Rayleigh scattering.".as_bytes(),
        "Oui, \u{2615}.".as_bytes(),
    ];
    let rejected: Vec<&[u8]> = vec!["Because.".as_bytes(), "No.".as_bytes()];
    let mut df = pq::frame(vec![
        binary("prompt", prompt),
        binary("chosen", chosen),
        binary("rejected", rejected.clone()),
    ])
    .unwrap();
    pq::write(&mut df, &dir.path().join("b.parquet")).unwrap();
    let p = pipeline(dir.path(), &ingest_yaml("preference", "b.parquet", ""));
    let r = sepo(&["run", &p, "-q"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let pairs = read_pairs(&artifact(&p).join("pairs.parquet")).unwrap();
    assert_eq!(pairs[1].prompt[0].1, "Caf\u{e9} au lait?");
    assert_eq!(pairs[1].chosen, "Oui, \u{2615}.");
    assert_eq!(pairs[0].rejected, "Because.");

    let prompt: Vec<&[u8]> = vec![&b"p1"[..], &b"p2"[..]];
    let chosen: Vec<&[u8]> = vec![&b"c1"[..], &b"\xc3\x28 broken"[..]];
    let mut df = pq::frame(vec![
        binary("prompt", prompt),
        binary("chosen", chosen),
        binary("rejected", rejected),
    ])
    .unwrap();
    let bad = dir.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    pq::write(&mut df, &bad.join("bad.parquet")).unwrap();
    let stderr = expect_user_error(
        &bad,
        &ingest_yaml("preference", "bad.parquet", ""),
        &["bad.parquet row 2: column `chosen` holds bytes that are not UTF-8 text"],
    );
    assert!(!stderr.contains("b\""), "{stderr}");
}

#[test]
fn repeated_ids_are_renamed_to_ids_no_row_has() {
    let dir = tempfile::tempdir().unwrap();
    let rows: Vec<String> = ["a", "a", "a#2", "a"]
        .iter()
        .enumerate()
        .map(|(i, id)| {
            serde_json::json!({"id": id, "prompt": format!("p{i}"), "chosen": "c", "rejected": "r"})
                .to_string()
        })
        .collect();
    std::fs::write(dir.path().join("d.jsonl"), rows.join("\n")).unwrap();
    let p = pipeline(dir.path(), &ingest_yaml("preference", "d.jsonl", ""));
    assert_eq!(sepo(&["run", &p, "-q"]).code, 0);
    let ids: Vec<String> = read_pairs(&artifact(&p).join("pairs.parquet"))
        .unwrap()
        .into_iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(ids, ["a", "a#3", "a#2", "a#4"]);
}
