//! Planning scales with the pipeline: tens of thousands of stages plan in seconds (every name
//! lookup is O(1), the topological sort O((stages + edges) log stages)), and no error message
//! repeats a huge user value whole.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Stages in the big pipeline.
const N: usize = 20_000;
/// Generous: planning 20,000 stages takes well under a second in a release build; this also
/// holds for an unoptimized test build on a slow machine, while the old quadratic planner took
/// 48 s.
const LIMIT: Duration = Duration::from_secs(10);

/// One ingest and one tokenizer stage, then `N / 2` tokenize stages fanned out from them and a
/// model followed by a chain of `N / 2` train stages, declared last-first so that the
/// topological sort has to reorder all of them.
fn big_yaml(data_file: &str) -> String {
    let mut y = String::from("name: big\nstages:\n");
    y.push_str(&format!(
        "  pairs: {{kind: ingest, format: preference, path: {data_file}}}\n"
    ));
    y.push_str(&format!(
        "  tok: {{kind: tokenizer, path: {}}}\n",
        data("data/tokenizers/gpt2/tokenizer.json")
    ));
    for i in 0..N / 2 {
        y.push_str(&format!(
            "  t{i}: {{kind: tokenize, inputs: {{data: pairs, tokenizer: tok}}, max_len: {}}}\n",
            16 + i
        ));
    }
    for i in (1..N / 2).rev() {
        let up = if i == 1 {
            "m".to_string()
        } else {
            format!("c{}", i - 1)
        };
        y.push_str(&format!(
            "  c{i}: {{kind: train, objective: sft, inputs: {{model: {up}, data: t{}}}}}\n",
            i % 7
        ));
    }
    y.push_str(
        "  m: {kind: model, inputs: {tokenizer: tok}, config: {architecture: llama, hidden_size: 8, num_attention_heads: 2, num_hidden_layers: 1}}\n",
    );
    y
}

fn timed(args: &[&str]) -> (Run, Duration) {
    let t0 = Instant::now();
    let r = sepo(args);
    (r, t0.elapsed())
}

#[test]
fn twenty_thousand_stages_plan_in_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let rows = dir.path().join("d.jsonl");
    std::fs::write(
        &rows,
        "{\"prompt\": \"p\", \"chosen\": \"c\", \"rejected\": \"r\"}\n",
    )
    .unwrap();
    let p = pipeline(dir.path(), &big_yaml(&rows.display().to_string()));

    let (r, took) = timed(&["dag", &p]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // N / 2 tokenize stages, N / 2 - 1 train stages, pairs, tok and m.
    assert_eq!(r.stdout.lines().count(), N + 2);
    // Topological: the chain comes out in order, after the model it starts from.
    let pos = |name: &str| {
        r.stdout
            .lines()
            .position(|l| l.starts_with(&format!("{name} (")))
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    assert!(pos("tok") < pos("m") && pos("m") < pos("c1"));
    assert!(pos("c1") < pos("c2") && pos("c2") < pos(&format!("c{}", N / 2 - 1)));
    assert!(took < LIMIT, "sepo dag took {took:?}");

    let (r, took) = timed(&["run", &p, "--dry-run"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout.lines().count(), N + 2);
    assert!(r.stdout.lines().all(|l| l.starts_with("run")));
    assert!(took < LIMIT, "sepo run --dry-run took {took:?}");

    // --stage with the end of the chain selects the whole chain and what it reads.
    let last = format!("c{}", N / 2 - 1);
    let (r, took) = timed(&["run", &p, "--dry-run", "--stage", &last]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // The chain, the model, the tokenizer, the ingest and the 7 tokenize stages it trains on.
    assert_eq!(r.stdout.lines().count(), (N / 2 - 1) + 1 + 1 + 1 + 7);
    assert!(took < LIMIT, "sepo run --dry-run --stage took {took:?}");

    let (r, took) = timed(&["status", &p, "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(took < LIMIT, "sepo status took {took:?}");
}

#[test]
fn a_long_cycle_is_named_briefly() {
    let dir = tempfile::tempdir().unwrap();
    let mut y = String::from("stages:\n");
    for i in 0..N {
        y.push_str(&format!(
            "  s{i}: {{kind: select, inputs: {{scores: s{}}}}}\n",
            (i + 1) % N
        ));
    }
    let p = pipeline(dir.path(), &y);
    let (r, took) = timed(&["dag", &p]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("cycle"), "{}", r.stderr);
    assert!(r.stderr.len() < 2000, "{} bytes", r.stderr.len());
    assert!(took < LIMIT, "took {took:?}");
}

/// Runs sepo and checks it exits 2 with a short message that still says what was wrong.
fn short_error(args: &[&str], needles: &[&str]) {
    let r = sepo(args);
    assert_eq!(r.code, 2, "{}", &r.stderr[..r.stderr.len().min(500)]);
    assert!(
        r.stderr.len() < 2000,
        "{} bytes of stderr: {}…",
        r.stderr.len(),
        &r.stderr[..300]
    );
    for n in needles {
        assert!(r.stderr.contains(n), "missing {n:?} in {}", r.stderr);
    }
}

#[test]
fn errors_never_echo_a_megabyte_value() {
    let big = "a".repeat(1 << 20);
    let size = "(1048576 bytes)";
    // Linux caps one command-line argument at 128 KiB.
    let arg = "a".repeat(100_000);
    let arg_size = "(100000 bytes)";
    let dir = tempfile::tempdir().unwrap();
    let rows = dir.path().join("d.jsonl");
    std::fs::write(
        &rows,
        "{\"prompt\": \"p\", \"chosen\": \"c\", \"rejected\": \"r\"}\n",
    )
    .unwrap();
    let ingest = format!(
        "  pairs: {{kind: ingest, format: preference, path: {}}}\n",
        rows.display()
    );

    // An unknown stage kind.
    let p = pipeline(dir.path(), &format!("stages:\n  a: {{kind: {big}}}\n"));
    short_error(&["run", &p], &["unknown stage kind", size]);
    // A huge stage name (any YAML key; an explicit `?` key, as implicit ones stop at 1024
    // characters), with a bad kind and as a missing input.
    let p = pipeline(
        dir.path(),
        &format!("stages:\n  ? {big}\n  : {{kind: nope}}\n"),
    );
    short_error(&["run", &p], &["unknown stage kind `nope`", size]);
    let p = pipeline(
        dir.path(),
        &format!(
            "stages:\n{ingest}  t: {{kind: tokenize, inputs: {{data: pairs, tokenizer: {big}}}}}\n"
        ),
    );
    short_error(&["run", &p], &["which is not a stage", size]);
    // A bad parameter value (serde's "unknown variant" quotes it).
    let p = pipeline(
        dir.path(),
        &format!(
            "stages:\n  pairs: {{kind: ingest, format: {big}, path: {}}}\n",
            rows.display()
        ),
    );
    short_error(&["run", &p], &["unknown variant", size]);
    // --set on a stage that does not exist, and with a huge value.
    let p = pipeline(dir.path(), &format!("stages:\n{ingest}"));
    short_error(
        &["run", &p, "--set", &format!("{arg}.x=1")],
        &["--set", "has no stage", arg_size],
    );
    short_error(
        &["run", &p, "--set", &format!("pairs.format={arg}")],
        &["unknown variant", arg_size],
    );
    // --stage and show naming no stage; an unknown device for a stage that uses one.
    short_error(&["run", &p, "--stage", &arg], &["no stage", arg_size]);
    short_error(&["show", &p, &arg], &["no stage", arg_size]);
    let p = pipeline(
        dir.path(),
        &format!(
            "stages:\n  base: {{kind: model, from: {}}}\n",
            data("models/stories260K")
        ),
    );
    short_error(
        &["run", &p, "--device", &arg],
        &["unknown device", arg_size],
    );
}
