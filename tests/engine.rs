//! End-to-end tests of the engine: incremental reruns, hashing invariants, concurrency, crashes,
//! gc and verify, all through the real binary.

mod common;

use common::*;

#[test]
fn run_then_noop_rerun_then_partial_rerun() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(dir.path(), &small_yaml(""));
    let r = sepo(&["run", &p]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(status(&p).iter().all(|s| s.1 == "fresh"));

    // A no-op rerun executes nothing.
    let r = sepo(&["run", &p, "--dry-run"]);
    assert_eq!(r.code, 0);
    assert!(
        r.stdout.lines().all(|l| l.starts_with("fresh")),
        "{}",
        r.stdout
    );
    let r = sepo(&["run", &p]);
    assert!(r.stderr.contains("0 stage(s) run"), "{}", r.stderr);

    // One parameter changed: exactly that stage (and downstream) is stale.
    let before = status(&p);
    let r = sepo(&["run", &p, "--set", "tokens.max_len=64", "--dry-run"]);
    let plan: Vec<(&str, &str)> = r
        .stdout
        .lines()
        .map(|l| {
            (
                l.split_whitespace().next().unwrap(),
                l.split_whitespace().nth(1).unwrap(),
            )
        })
        .collect();
    assert_eq!(
        plan,
        [("fresh", "pairs"), ("fresh", "tok"), ("run", "tokens")]
    );
    let r = sepo(&["run", &p, "--set", "pairs.test_fraction=0.2", "--dry-run"]);
    assert!(
        r.stdout.contains("run    pairs")
            && r.stdout.contains("fresh  tok")
            && r.stdout.contains("run    tokens"),
        "{}",
        r.stdout
    );
    assert_eq!(before, status(&p));

    // --from forces a stage and its downstream; --stage limits targets to upstream.
    let r = sepo(&["run", &p, "--from", "tok", "--dry-run"]);
    assert!(
        r.stdout.contains("fresh  pairs")
            && r.stdout.contains("run    tok")
            && r.stdout.contains("run    tokens"),
        "{}",
        r.stdout
    );
    let r = sepo(&["run", &p, "--stage", "pairs", "--force", "--dry-run"]);
    assert_eq!(r.stdout.lines().count(), 1, "{}", r.stdout);
}

#[test]
fn renaming_reordering_and_explicit_defaults_change_no_hash() {
    let dir = tempfile::tempdir().unwrap();
    let base = status(&pipeline(dir.path(), &small_yaml("")));
    let hashes = |v: &[(String, String, String)]| v.iter().map(|s| s.2.clone()).collect::<Vec<_>>();

    // Explicit defaults.
    let explicit =
        small_yaml("").replace("test_fraction: 0.1}", "test_fraction: 0.1, limit: null}");
    assert_eq!(
        hashes(&base),
        hashes(&status(&pipeline(dir.path(), &explicit)))
    );

    // Renamed stage and reordered keys.
    let renamed = format!(
        "stages:\n  tok2: {{path: {}, kind: tokenizer}}\n  data: {{test_fraction: 0.1, path: {}, format: ultrafeedback, kind: ingest}}\n  t: {{max_len: 128, template: none, inputs: {{tokenizer: tok2, data: data}}, kind: tokenize}}\n",
        data("data/tokenizers/gpt2/tokenizer.json"),
        data("data/ultrafeedback/h4_schema_200.jsonl"),
    );
    let mut a = hashes(&base);
    let mut b = hashes(&status(&pipeline(dir.path(), &renamed)));
    a.sort();
    b.sort();
    assert_eq!(a, b);
}

#[test]
fn two_processes_on_one_cache_do_not_corrupt_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(dir.path(), &small_yaml(""));
    let bin = env!("CARGO_BIN_EXE_sepo");
    let children: Vec<_> = (0..3)
        .map(|_| {
            std::process::Command::new(bin)
                .args(["run", &p, "-q"])
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    let r = sepo(&["verify", &p]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert_eq!(artifacts(&dir.path().join("cache")).len(), 3);
    // No leftovers in tmp.
    let tmp = dir.path().join("cache/tmp");
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_crash_before_commit_leaves_nothing_that_reads_as_fresh() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(dir.path(), &small_yaml(""));
    let r = sepo_env(
        &["run", &p, "-q"],
        &[("SEPO_TEST_HOOK", "abort-before-commit:tokens")],
    );
    assert_ne!(r.code, 0);
    let st = status(&p);
    assert_eq!(
        st.iter().map(|s| s.1.as_str()).collect::<Vec<_>>(),
        ["fresh", "fresh", "stale"]
    );
    assert!(
        !artifacts(&dir.path().join("cache"))
            .iter()
            .any(|a| a.starts_with("tokenize/"))
    );
    let r = sepo(&["run", &p, "-q"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(sepo(&["verify", &p]).code, 0);
}

#[test]
fn kill_9_at_random_moments_never_leaves_a_false_artifact() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(dir.path(), &small_yaml(""));
    let bin = env!("CARGO_BIN_EXE_sepo");
    for delay_ms in [5u64, 30, 60, 120, 250] {
        let mut child = std::process::Command::new(bin)
            .args(["run", &p, "-q", "--force"])
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        // Whatever exists must verify: an artifact is either complete or absent.
        let r = sepo(&["verify", &p]);
        assert!(
            !r.stdout.contains("CHANGED"),
            "after {delay_ms} ms: {}",
            r.stdout
        );
    }
    assert_eq!(sepo(&["run", &p, "-q"]).code, 0);
    assert_eq!(sepo(&["verify", &p]).code, 0);
}

#[test]
fn gc_verify_show_and_dag() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(dir.path(), &small_yaml(""));
    assert_eq!(sepo(&["run", &p, "-q"]).code, 0);
    assert_eq!(
        sepo(&["run", &p, "-q", "--set", "tokens.max_len=64"]).code,
        0
    );
    let cache = dir.path().join("cache");
    assert_eq!(artifacts(&cache).len(), 4);
    let r = sepo(&["gc", &p, "--dry-run"]);
    assert_eq!(r.stdout.lines().count(), 1, "{}", r.stdout);
    assert_eq!(artifacts(&cache).len(), 4);
    let r = sepo(&["gc", &p]);
    assert_eq!(r.code, 0);
    assert_eq!(artifacts(&cache).len(), 3);

    // show --path, show (schema and rows), show --json.
    let r = sepo(&["show", &p, "tokens", "--path"]);
    let path = r.stdout.trim().to_string();
    assert!(std::path::Path::new(&path).join("tokens.parquet").is_file());
    let r = sepo(&["show", &p, "pairs", "--rows", "2"]);
    assert!(
        r.stdout.contains("200 rows") || r.stdout.contains("rows)"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("prompt: list[struct[2]]") || r.stdout.contains("prompt:"),
        "{}",
        r.stdout
    );
    let r = sepo(&["show", &p, "tokens", "--json", "--rows", "3"]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["head"].as_array().unwrap().len(), 3);
    assert_eq!(v["schema"]["prompt_ids"], "list[u32]");

    // Tamper with an artifact: verify names it and fails.
    let f = std::path::Path::new(&path).join("tokens.parquet");
    let mut bytes = std::fs::read(&f).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&f, bytes).unwrap();
    let r = sepo(&["verify", &p]);
    assert_eq!(r.code, 1);
    assert!(
        r.stdout.contains("tokens")
            && r.stdout.contains("CHANGED")
            && r.stdout.contains("tokens.parquet"),
        "{}",
        r.stdout
    );

    for (fmt, needle) in [
        ("text", "tokens (tokenize"),
        ("mermaid", "pairs -->|data| tokens"),
        ("dot", "\"pairs\" -> \"tokens\""),
    ] {
        let r = sepo(&["dag", &p, "--format", fmt]);
        assert!(r.stdout.contains(needle), "{fmt}: {}", r.stdout);
    }
}
