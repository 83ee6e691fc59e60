//! `matrix:` through the binary: a sweep over ingest and tokenize parameters runs, `status`,
//! `dag` and `run --dry-run` show the instances, an instance hashes like the same stage written
//! by hand, and changing one value reruns only that instance and what reads it.

mod common;

use std::collections::BTreeMap;

use common::*;
use sepo::stages::tokenize::read_tokens;

/// ingest swept over `test_fraction`, tokenize over `max_len`: tokenize inherits the ingest
/// sweep, so it has 2 x 2 instances. `by_hand` is one of them written out.
fn sweep_yaml(fractions: &str) -> String {
    format!(
        "name: sweep\nstages:\n  pairs: {{kind: ingest, format: ultrafeedback, path: {}, matrix: {{test_fraction: {fractions}}}}}\n  tok: {{kind: tokenizer, path: {}}}\n  tokens: {{kind: tokenize, inputs: {{data: pairs, tokenizer: tok}}, template: none, matrix: {{max_len: [32, 64]}}}}\n  by_hand: {{kind: tokenize, inputs: {{data: pairs@test_fraction=0.1, tokenizer: tok}}, template: none, max_len: 32}}\n",
        data("data/ultrafeedback/h4_schema_200.jsonl"),
        data("data/tokenizers/gpt2/tokenizer.json"),
    )
}

/// Stage name -> (state, hash), from `sepo status --json`.
fn states(p: &str, extra: &[&str]) -> BTreeMap<String, (String, String)> {
    status_json(p, extra)
        .iter()
        .map(|s| {
            let field = |k: &str| s[k].as_str().unwrap().to_string();
            (field("stage"), (field("state"), field("hash")))
        })
        .collect()
}

/// The stages a `sepo run` log says it ran.
fn ran(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("run "))
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect()
}

#[test]
fn a_matrix_runs_and_status_shows_its_instances() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(dir.path(), &sweep_yaml("[0.1, 0.2]"));
    let names = [
        "by_hand",
        "pairs@test_fraction=0.1",
        "pairs@test_fraction=0.2",
        "tok",
        "tokens@test_fraction=0.1,max_len=32",
        "tokens@test_fraction=0.1,max_len=64",
        "tokens@test_fraction=0.2,max_len=32",
        "tokens@test_fraction=0.2,max_len=64",
    ];
    let s = states(&p, &[]);
    assert_eq!(s.keys().collect::<Vec<_>>(), names);
    let r = sepo(&["dag", &p]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains(
            "tokens@test_fraction=0.2,max_len=64 (tokenize, stale) <- data=pairs@test_fraction=0.2 tokenizer=tok"
        ),
        "{}",
        r.stdout
    );
    let r = sepo(&["run", &p]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let mut done = ran(&r.stderr);
    done.sort();
    // `by_hand` is `tokens@test_fraction=0.1,max_len=32` by another name: one artifact, built once.
    assert_eq!(done.len(), 7, "{}", r.stderr);
    let s = states(&p, &[]);
    assert!(s.values().all(|(state, _)| state == "fresh"), "{s:?}");
    assert_eq!(s["by_hand"].1, s["tokens@test_fraction=0.1,max_len=32"].1);
    // Each instance has its own parameter values.
    for (name, max_len) in [
        ("tokens@test_fraction=0.2,max_len=32", 32),
        ("tokens@test_fraction=0.2,max_len=64", 64),
    ] {
        let r = sepo(&["show", &p, name, "--path"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let rows =
            read_tokens(&std::path::Path::new(r.stdout.trim()).join("tokens.parquet")).unwrap();
        let longest = rows
            .iter()
            .map(|t| t.prompt_ids.len() + t.chosen_ids.len().max(t.rejected_ids.len()))
            .max()
            .unwrap();
        assert!(longest <= max_len && longest > 32 / 2, "{name}: {longest}");
        let test = rows.iter().filter(|t| t.split == "test").count();
        assert!(test > 0 && test < rows.len(), "{name}: {test} test rows");
    }
    // A matrix stage's name stands for all its instances in --stage, never in `show`.
    let r = sepo(&[
        "run",
        &p,
        "--stage",
        "pairs",
        "--from",
        "pairs",
        "--dry-run",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", r.stdout);
    assert!(
        lines.iter().all(|l| l.starts_with("run    pairs@")),
        "{}",
        r.stdout
    );
    let r = sepo(&["show", &p, "tokens"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("`tokens` is a matrix stage") && r.stderr.contains("4 instances"),
        "{}",
        r.stderr
    );
}

#[test]
fn changing_one_value_reruns_that_instance_and_its_readers_only() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(dir.path(), &sweep_yaml("[0.1, 0.2]"));
    let r = sepo(&["run", &p, "-q"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let before = states(&p, &[]);
    pipeline(dir.path(), &sweep_yaml("[0.1, 0.3]"));
    let after = states(&p, &[]);
    let stale: Vec<&String> = after
        .iter()
        .filter(|(_, (state, _))| state == "stale")
        .map(|(name, _)| name)
        .collect();
    assert_eq!(
        stale,
        [
            "pairs@test_fraction=0.3",
            "tokens@test_fraction=0.3,max_len=32",
            "tokens@test_fraction=0.3,max_len=64"
        ]
    );
    // The instances that kept their values kept their hashes.
    for (name, (_, hash)) in &after {
        if let Some((_, old)) = before.get(name) {
            assert_eq!(hash, old, "{name}");
        }
    }
    let r = sepo(&["run", &p]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let mut done = ran(&r.stderr);
    done.sort();
    assert_eq!(done.iter().collect::<Vec<_>>(), stale);
    // Through --set: one instance (its readers follow), or every instance of a stage.
    let r = sepo(&[
        "run",
        &p,
        "--dry-run",
        "--set",
        "tokens@test_fraction=0.1,max_len=64.template=chatml",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let runs: Vec<&str> = r.stdout.lines().filter(|l| l.starts_with("run")).collect();
    assert_eq!(runs.len(), 1, "{}", r.stdout);
    assert!(runs[0].contains("tokens@test_fraction=0.1,max_len=64"));
    let s = states(&p, &["--set", "pairs.max_drop_fraction=0.5"]);
    let stale = s.values().filter(|(state, _)| state == "stale").count();
    // Both ingest instances, the four tokenize instances and `by_hand`.
    assert_eq!(stale, 7, "{s:?}");
    let s = states(&p, &["--set", "pairs.matrix.test_fraction=[0.1]"]);
    assert_eq!(s.len(), 5, "{s:?}");
    assert!(s.values().all(|(state, _)| state == "fresh"), "{s:?}");
}

#[test]
fn matrix_mistakes_are_input_errors_naming_file_and_stage() {
    let dir = tempfile::tempdir().unwrap();
    for (matrix, expect) in [
        ("{test_fracton: [0.1]}", "did you mean `test_fraction`"),
        ("{test_fraction: []}", "empty list"),
        ("{test_fraction: 0.1}", "must be a list"),
        ("{test_fraction: [0.1, 0.2, 0.1]}", "lists `0.1` twice"),
    ] {
        let yaml = format!(
            "stages:\n  pairs: {{kind: ingest, format: ultrafeedback, path: {}, matrix: {matrix}}}\n",
            data("data/ultrafeedback/h4_schema_200.jsonl")
        );
        let p = pipeline(dir.path(), &yaml);
        let r = sepo(&["status", &p]);
        assert_eq!(r.code, 2, "{matrix}: {}", r.stderr);
        assert!(
            r.stderr.contains("p.yaml") && r.stderr.contains("stage `pairs`"),
            "{matrix}: {}",
            r.stderr
        );
        assert!(r.stderr.contains(expect), "{matrix}: {}", r.stderr);
    }
    // `small_yaml` writes max_len itself.
    let p = pipeline(dir.path(), &small_yaml(", matrix: {max_len: [32]}"));
    let r = sepo(&["dag", &p]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("both a parameter and a matrix key"),
        "{}",
        r.stderr
    );
}

#[test]
fn compare_needs_an_evaluate_stage() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(dir.path(), &small_yaml(""));
    let r = sepo(&["compare", &p]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("no `evaluate` stage"), "{}", r.stderr);
    assert!(r.stdout.is_empty());
}

/// `sepo schema` accepts `matrix` on every stage kind, a required parameter given only in the
/// matrix, and rejects a matrix key that is no parameter or an empty list (checked by boon, a
/// JSON Schema validator other than sepo's code).
#[test]
fn the_schema_accepts_a_matrix_on_every_stage() {
    let r = sepo(&["schema"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let schema: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let kinds = schema["$defs"]["stage"]["properties"]["kind"]["enum"]
        .as_array()
        .unwrap();
    assert!(kinds.len() >= 7);
    for k in kinds {
        let props = &schema["$defs"][k.as_str().unwrap()]["properties"];
        assert!(props["matrix"].is_object(), "{k}: {props}");
    }
    let mut schemas = boon::Schemas::new();
    let mut compiler = boon::Compiler::new();
    let url = "file:///sepo/pipeline.schema.json";
    compiler.add_resource(url, schema).unwrap();
    let index = compiler.compile(url, &mut schemas).unwrap();
    let valid = |yaml: &str| {
        let doc: serde_json::Value = serde_yaml::from_str(yaml).unwrap();
        schemas.validate(&doc, index).is_ok()
    };
    assert!(valid(&sweep_yaml("[0.1, 0.2]")));
    let train = "stages:\n  t: {kind: train, inputs: {model: m, data: d}, matrix: {objective: [dpo, ipo], seed: [1, 2]}}\n";
    assert!(valid(train));
    assert!(!valid(
        &train.replace("matrix: {objective: [dpo, ipo], ", "matrix: {")
    ));
    assert!(!valid(&train.replace("seed: [1, 2]", "sed: [1, 2]")));
    assert!(!valid(&train.replace("seed: [1, 2]", "seed: []")));
    assert!(!valid(&train.replace("seed: [1, 2]", "seed: 1")));
    assert!(!valid(&train.replace("seed: [1, 2]", "seed: [1, 1]")));
}

/// Long instance names widen the name column of `status` and `run --dry-run`: every line's kind
/// starts at the same column.
#[test]
fn long_instance_names_keep_the_columns_aligned() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(
        dir.path(),
        &small_yaml("")
            .replace("max_len: 128", "matrix: {max_len: [32, 64]}")
            .replace("tokens:", "tokens_with_a_long_name:"),
    );
    for args in [
        vec!["status", p.as_str()],
        vec!["run", p.as_str(), "--dry-run"],
    ] {
        let r = sepo(&args);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let columns: Vec<usize> = r
            .stdout
            .lines()
            .map(|l| {
                ["ingest", "tokenizer", "tokenize"]
                    .iter()
                    .filter_map(|k| l.find(&format!(" {k} ")))
                    .min()
                    .unwrap_or_else(|| panic!("no kind in {l:?}"))
            })
            .collect();
        assert_eq!(columns.len(), 4, "{}", r.stdout);
        assert!(columns.iter().all(|&c| c == columns[0]), "{}", r.stdout);
    }
}
