//! `sepo compare` end to end: real training over a seed matrix, a real `evaluate` stage, and the
//! table checked against the report files themselves.

mod common;

use std::collections::BTreeMap;

use common::*;
use sepo::artifacts::Report;
use serde_json::Value;

/// SFT over seeds and two learning rates, DPO over seeds, one evaluation of them all (log-prob
/// metrics only: no generation, so it stays fast); `later` is an evaluation not yet built.
fn yaml() -> String {
    format!(
        "name: cmp\nstages:\n  pairs: {{kind: ingest, format: ultrafeedback, path: {}, test_fraction: 0.2, limit: 60}}\n  base: {{kind: model, from: {}}}\n  tokens: {{kind: tokenize, inputs: {{data: pairs, tokenizer: base}}, template: none, max_len: 64}}\n  policy: {{kind: train, objective: sft, inputs: {{model: base, data: tokens}}, batch_size: 8, matrix: {{seed: [1, 2], lr: [0.001, 0.01]}}}}\n  dpo: {{kind: train, objective: dpo, inputs: {{model: base, reference: base, data: tokens}}, batch_size: 8, matrix: {{seed: [1, 2]}}}}\n  report: {{kind: evaluate, inputs: {{policies: [policy, dpo], reference: base, data: tokens}}, generate: false}}\n  later: {{kind: evaluate, inputs: {{policies: [dpo], reference: base, data: tokens}}, generate: false, beta: 0.2}}\n",
        data("data/ultrafeedback/h4_schema_200.jsonl"),
        data("models/stories260K"),
    )
}

#[test]
fn compare_averages_each_method_over_its_seeds() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(dir.path(), &yaml());
    let r = sepo(&["compare", &p]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("run `sepo run"), "{}", r.stderr);

    let r = sepo(&["run", &p, "--stage", "report", "-q"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = sepo(&["compare", &p, "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("stage `later` (evaluate) is not built"),
        "{}",
        r.stderr
    );
    let table: Vec<Value> = serde_json::from_str(&r.stdout).unwrap();

    // The same figures, straight from the report file: each stage's value per metric.
    let r = sepo(&["show", &p, "report", "--path"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let dir_ = std::path::PathBuf::from(r.stdout.trim());
    let rows = Report::read(&dir_.join(Report::FILE)).unwrap();
    let mut by_stage: BTreeMap<(String, String), f64> = BTreeMap::new();
    for row in &rows {
        by_stage.insert((row.policy.clone(), row.metric.clone()), row.value);
    }
    let seeds_of = |method: &str| -> Vec<String> {
        match method {
            "policy@lr=0.001" => vec!["policy@seed=1,lr=0.001", "policy@seed=2,lr=0.001"],
            "policy@lr=0.01" => vec!["policy@seed=1,lr=0.01", "policy@seed=2,lr=0.01"],
            "dpo" => vec!["dpo@seed=1", "dpo@seed=2"],
            "base" => vec!["base"],
            other => panic!("unexpected method {other}"),
        }
        .into_iter()
        .map(String::from)
        .collect()
    };
    let mut methods: Vec<&str> = table
        .iter()
        .map(|e| e["method"].as_str().unwrap())
        .collect();
    methods.dedup();
    assert_eq!(
        methods,
        ["base", "policy@lr=0.001", "policy@lr=0.01", "dpo"],
        "{table:?}"
    );
    for e in &table {
        let method = e["method"].as_str().unwrap();
        let metric = e["metric"].as_str().unwrap().to_string();
        let values: Vec<f64> = seeds_of(method)
            .into_iter()
            .map(|s| by_stage[&(s, metric.clone())])
            .collect();
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        assert_eq!(e["n_seeds"], values.len(), "{e}");
        assert!(
            (e["mean"].as_f64().unwrap() - mean).abs() < 1e-12,
            "{e}: {values:?}"
        );
        if values.len() == 2 {
            let std = (values[0] - values[1]).abs() / 2f64.sqrt();
            assert!((e["std"].as_f64().unwrap() - std).abs() < 1e-12, "{e}");
        } else {
            assert_eq!(e["std"], Value::Null);
        }
        // Policies differ in objective and learning rate (DPO's is the default); the seed is
        // what is averaged over, never a parameter that differs.
        if e["role"] == "policy" {
            let params = e["params"].as_object().unwrap();
            let keys: Vec<&str> = params.keys().map(String::as_str).collect();
            assert_eq!(keys, ["lr", "objective"], "{e}");
        }
    }

    let r = sepo(&["compare", &p, "--format", "md", "-q"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.is_empty(), "{}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 2 + 4, "{}", r.stdout);
    assert!(
        lines[0].starts_with("| method")
            && lines[0].contains("| lr")
            && lines[0].contains("| seeds"),
        "{}",
        r.stdout
    );
    assert!(
        lines[4].starts_with("| policy@lr=0.01 ") && lines[4].contains(" ± "),
        "{}",
        r.stdout
    );
}
