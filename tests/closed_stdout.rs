//! A reader that closes stdout early (`sepo status P.yaml | head -1`) ends sepo quietly with
//! status 0, as ripgrep does: the reader has what it wanted, so no "Broken pipe" error, no panic.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::*;

/// Enough stages that `dag` and `status` write far more than a pipe holds (64 KiB on Linux):
/// sepo is still writing when the reader goes away, so the write after that fails for sure.
const STAGES: usize = 5_000;

fn big_pipeline(dir: &std::path::Path) -> String {
    let rows = dir.join("d.jsonl");
    std::fs::write(
        &rows,
        "{\"prompt\": \"p\", \"chosen\": \"c\", \"rejected\": \"r\"}\n",
    )
    .unwrap();
    let mut y = format!(
        "name: big\nstages:\n  pairs: {{kind: ingest, format: preference, path: {}}}\n  tok: {{kind: tokenizer, path: {}}}\n",
        rows.display(),
        data("data/tokenizers/gpt2/tokenizer.json")
    );
    for i in 0..STAGES {
        y.push_str(&format!(
            "  t{i}: {{kind: tokenize, inputs: {{data: pairs, tokenizer: tok}}, max_len: {}}}\n",
            16 + i
        ));
    }
    pipeline(dir, &y)
}

#[test]
fn a_reader_that_stops_early_ends_sepo_quietly_with_status_0() {
    let dir = tempfile::tempdir().unwrap();
    let p = big_pipeline(dir.path());
    let whole = sepo(&["dag", &p]);
    assert_eq!(whole.code, 0, "{}", whole.stderr);
    assert!(
        whole.stdout.len() > 3 * 65536,
        "{} bytes",
        whole.stdout.len()
    );
    for args in [
        vec!["dag", p.as_str()],
        vec!["dag", p.as_str(), "--format", "dot"],
        vec!["status", p.as_str()],
        vec!["status", p.as_str(), "--json"],
        vec!["run", p.as_str(), "--dry-run"],
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sepo"))
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Read the first line, then close the pipe, as `| head -1` does.
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!first.is_empty(), "{args:?}: no output");
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
}

/// `sepo run P.yaml 2>&1 | head -2`: once the reader of the logs is gone, the run still finishes
/// its stages (log lines are dropped, never fatal) and exits 0.
#[test]
fn a_closed_stderr_never_ends_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(dir.path(), &small_yaml(""));
    let mut child = Command::new(env!("CARGO_BIN_EXE_sepo"))
        .args(["run", &p])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    // The reader is dropped here: every later log line hits a closed pipe.
    let exit = child.wait().unwrap();
    assert!(exit.success(), "{exit:?} after {first:?}");
    assert!(status(&p).iter().all(|s| s.1 == "fresh"));
}
