//! Never lose a user's work: gc deletes only what is provably sepo's, keeps what other pipelines
//! sharing the cache point to, is crash-safe; a crashing stage ends the run; a damaged artifact
//! is never built on; links in the cache are never followed. All through the real binary.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

/// Runs sepo with a deadline: a hang is a test failure, not a stuck test suite.
fn sepo_within(args: &[&str], env: &[(&str, &str)], secs: u64) -> Run {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sepo"));
    cmd.args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let t0 = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if t0.elapsed() > Duration::from_secs(secs) {
            let _ = child.kill();
            panic!("sepo {args:?} did not finish within {secs} s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn yaml_with_cache(cache: &str, extra_tokenize: &str) -> String {
    small_yaml(extra_tokenize).replacen(
        "name: small\n",
        &format!("name: small\ncache: {cache}\n"),
        1,
    )
}

fn artifact_path(p: &str, stage: &str) -> PathBuf {
    let r = sepo(&["show", p, stage, "--path"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    PathBuf::from(r.stdout.trim())
}

/// Every file below `dir`, relative, sorted (links listed, not followed).
fn tree(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, d: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                walk(root, &p, out);
            } else {
                out.push(p.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[test]
fn gc_refuses_a_folder_that_is_not_a_sepo_cache_and_never_touches_user_files() {
    let dir = tempfile::tempdir().unwrap();
    // The user's own files, some shaped like sepo's layout.
    let user_files = [
        "notes/todo.txt",
        "src/main.rs",
        "tokenize/mine/keep.txt",
        "ingest/0123456789abcdef0123/manifest.json",
        "tmp/0123456789abcdef0123/data.bin",
    ];
    for f in user_files {
        let p = dir.path().join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, b"the user's own work").unwrap();
    }
    let p = pipeline(dir.path(), &yaml_with_cache(".", ""));

    // Never run here: not a sepo cache, so gc deletes nothing at all.
    let r = sepo(&["gc", &p]);
    assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("not a sepo cache"), "{}", r.stderr);
    for f in user_files {
        assert!(dir.path().join(f).is_file(), "{f} was deleted");
    }

    // After a run (which marks the folder) and a run with another max_len, gc deletes exactly
    // the stale sepo artifact and leaves every user file alone, saying what it did not touch.
    assert_eq!(sepo(&["run", &p, "-q"]).code, 0);
    let stale = artifact_path(&p, "tokens");
    assert_eq!(
        sepo(&["run", &p, "-q", "--set", "tokens.max_len=64"]).code,
        0
    );
    let r = sepo(&["gc", &p, "--set", "tokens.max_len=64"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!stale.exists());
    assert_eq!(r.stdout.lines().count(), 1, "{}", r.stdout);
    for f in user_files {
        assert!(dir.path().join(f).is_file(), "{f} was deleted");
    }
    assert!(r.stderr.contains("not touched"), "{}", r.stderr);
    assert!(status(&p).iter().any(|s| s.1 == "stale"));
}

#[test]
fn gc_never_deletes_through_a_symlinked_kind_folder() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let p = pipeline(dir.path(), &small_yaml(""));
    assert_eq!(sepo(&["run", &p, "-q"]).code, 0);
    let cache = dir.path().join("cache");
    // A real artifact copied outside the cache, reached through a link named like a kind.
    let tokens = artifact_path(&p, "tokens");
    let hash = tokens.file_name().unwrap().to_str().unwrap().to_string();
    let ext = outside.path().join(&hash);
    std::fs::create_dir_all(&ext).unwrap();
    for e in std::fs::read_dir(&tokens).unwrap().flatten() {
        std::fs::copy(e.path(), ext.join(e.file_name())).unwrap();
    }
    std::fs::write(outside.path().join("precious.txt"), b"keep me").unwrap();
    std::fs::remove_dir_all(cache.join("select")).ok();
    std::os::unix::fs::symlink(outside.path(), cache.join("select")).unwrap();
    // And a link in a real kind folder, named like an artifact.
    std::os::unix::fs::symlink(&ext, cache.join("tokenize").join("fedcba9876543210fedc")).unwrap();
    let before = tree(outside.path());
    for args in [vec!["gc", &p, "--dry-run"], vec!["gc", &p]] {
        let r = sepo(&args);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert!(r.stderr.contains("symbolic link"), "{}", r.stderr);
    }
    assert_eq!(tree(outside.path()), before);
    assert!(cache.join("tokenize").join("fedcba9876543210fedc").exists());
}

#[test]
fn gc_keeps_what_another_pipeline_sharing_the_cache_points_to() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.yaml");
    let b = dir.path().join("b.yaml");
    std::fs::write(&a, small_yaml("")).unwrap();
    std::fs::write(
        &b,
        small_yaml(", max_len: 64").replace("max_len: 128, ", ""),
    )
    .unwrap();
    let (a, b) = (a.display().to_string(), b.display().to_string());
    assert_eq!(sepo(&["run", &a, "-q"]).code, 0);
    assert_eq!(sepo(&["run", &b, "-q"]).code, 0);
    let b_tokens = artifact_path(&b, "tokens");
    let a_tokens = artifact_path(&a, "tokens");
    assert_ne!(a_tokens, b_tokens);

    for args in [vec!["gc", &a, "--dry-run"], vec!["gc", &a]] {
        let r = sepo(&args);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert_eq!(r.stdout, "", "nothing to delete: {}", r.stdout);
        assert!(
            r.stderr.contains("b.yaml"),
            "says why it keeps: {}",
            r.stderr
        );
    }
    assert!(b_tokens.is_dir() && a_tokens.is_dir());
    assert!(status(&b).iter().all(|s| s.1 == "fresh"));

    // Once b.yaml is gone, its artifacts are no one's: gc forgets it and collects them.
    std::fs::remove_file(&b).unwrap();
    let r = sepo(&["gc", &a]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("forgetting"), "{}", r.stderr);
    assert!(!b_tokens.exists());
    assert!(a_tokens.is_dir());
}

#[test]
fn gc_killed_mid_delete_leaves_no_false_artifact_and_the_next_gc_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(dir.path(), &small_yaml(""));
    assert_eq!(
        sepo(&["run", &p, "-q", "--set", "tokens.max_len=64"]).code,
        0
    );
    let r = sepo(&["show", &p, "tokens", "--path", "--set", "tokens.max_len=64"]);
    let old = PathBuf::from(r.stdout.trim());
    assert!(old.is_dir(), "{}", r.stderr);
    assert_eq!(sepo(&["run", &p, "-q"]).code, 0);
    let hash = old.file_name().unwrap().to_str().unwrap();
    let hook = format!("gc-after-rename:tokenize.{hash}");
    let r = sepo_env(&["gc", &p], &[("SEPO_TEST_HOOK", &hook)]);
    assert_ne!(r.code, 0, "the hook kills gc");
    // The artifact is gone as a whole: nothing reads as fresh that is not complete.
    assert!(!old.exists());
    let st = sepo(&["status", &p, "--json", "--set", "tokens.max_len=64"]);
    assert!(st.stdout.contains("\"stale\""), "{}", st.stdout);
    let r = sepo(&["verify", &p]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    // The next gc collects what the killed one left in tmp/.
    let r = sepo(&["gc", &p]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("interrupted gc"), "{}", r.stdout);
    let tmp = dir.path().join("cache/tmp");
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_panicking_stage_ends_the_run_with_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(dir.path(), &small_yaml(""));
    for jobs in ["1", "2"] {
        let r = sepo_within(
            &["run", &p, "-q", "--jobs", jobs],
            &[("SEPO_TEST_HOOK", "panic-in-stage:tokens")],
            120,
        );
        assert_eq!(r.code, 1, "{}", r.stderr);
        assert!(
            r.stderr.contains("stage `tokens`") && r.stderr.contains("crashed"),
            "{}",
            r.stderr
        );
        let st = status(&p);
        assert_eq!(
            st.iter().map(|s| s.1.as_str()).collect::<Vec<_>>(),
            ["fresh", "fresh", "stale"]
        );
        assert!(!dir.path().join("cache/tmp").join(&st[2].2).exists());
    }
    assert_eq!(sepo(&["run", &p, "-q"]).code, 0);
}

#[test]
fn run_refuses_to_build_on_a_damaged_input() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(dir.path(), &small_yaml(""));
    assert_eq!(sepo(&["run", &p, "-q", "--stage", "pairs"]).code, 0);
    let pairs = artifact_path(&p, "pairs").join("pairs.parquet");
    // One flipped bit in the middle of the file: same size, different content.
    let mut bytes = std::fs::read(&pairs).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&pairs, &bytes).unwrap();
    let r = sepo(&["run", &p, "-q"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("pairs.parquet")
            && r.stderr.contains("damaged")
            && r.stderr.contains("--from pairs"),
        "{}",
        r.stderr
    );
    assert!(status(&p).iter().any(|s| s.0 == "tokens" && s.1 == "stale"));
    // The suggested fix works.
    let r = sepo(&["run", &p, "-q", "--from", "pairs"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(sepo(&["verify", &p]).code, 0);
    // An intact input is not re-hashed on every read, but a changed one always is.
    let r = sepo(&["run", &p, "-q", "--from", "tokens"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

#[test]
fn a_damaged_or_edited_manifest_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(dir.path(), &small_yaml(""));
    assert_eq!(sepo(&["run", &p, "-q", "--stage", "pairs"]).code, 0);
    let manifest = artifact_path(&p, "pairs").join("manifest.json");
    let good = std::fs::read_to_string(&manifest).unwrap();

    std::fs::write(&manifest, b"").unwrap();
    let r = sepo(&["run", &p, "-q"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains(&manifest.display().to_string()) && r.stderr.contains("pairs"),
        "{}",
        r.stderr
    );
    let r = sepo(&["verify", &p]);
    assert_eq!(r.code, 1);
    assert!(r.stdout.contains("damaged manifest"), "{}", r.stdout);

    let v: serde_json::Value = serde_json::from_str(&good).unwrap();
    let edited = good.replace(v["hash"].as_str().unwrap(), "00000000000000000000");
    std::fs::write(&manifest, edited).unwrap();
    let r = sepo(&["run", &p, "-q"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("lives in"), "{}", r.stderr);
}

#[test]
fn verify_and_run_never_follow_a_link_in_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(dir.path(), &small_yaml(""));
    assert_eq!(sepo(&["run", &p, "-q"]).code, 0);
    let art = artifact_path(&p, "pairs");
    let f = art.join("pairs.parquet");
    std::fs::remove_file(&f).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &f).unwrap();
    std::os::unix::fs::symlink("/dev/zero", art.join("extra")).unwrap();
    let r = sepo_within(&["verify", &p], &[], 60);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(r.stdout.contains("symbolic link"), "{}", r.stdout);
    let r = sepo_within(&["run", &p, "-q", "--from", "tokens"], &[], 60);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("symbolic link"), "{}", r.stderr);
    let r = sepo_within(&["gc", &p], &[], 60);
    assert_eq!(r.code, 0, "{}", r.stderr);
}
