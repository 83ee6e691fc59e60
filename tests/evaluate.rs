//! The `evaluate` stage end to end, against transformers: log-prob metrics, greedy answers and a
//! reward-model judge's win rates on the test split equal what scripts/make_eval_fixtures.py
//! computed with transformers and statsmodels (tests/fixtures/eval/e2e.json); and the
//! configurations it must refuse.

mod common;

use common::{data, pipeline, sepo};
use serde_json::Value;

fn fixture() -> Value {
    serde_json::from_str(&std::fs::read_to_string(data("tests/fixtures/eval/e2e.json")).unwrap())
        .unwrap()
}

/// The pipeline of the fixture: tiny-llama as the policy, tiny-mistral as the reference,
/// tiny-llama-rm as the judge, on the fixture's eight pairs (six in the test split).
fn yaml(extra: &str) -> String {
    let hf = |m: &str| data(&format!("tests/fixtures/hf/{m}"));
    format!(
        "stages:
  pairs: {{kind: ingest, format: preference, path: {pairs}}}
  tok: {{kind: tokenizer, path: {tok}}}
  tokens: {{kind: tokenize, inputs: {{data: pairs, tokenizer: tok}}, template: none, max_len: 4096}}
  llama: {{kind: model, from: {llama}}}
  mistral: {{kind: model, from: {mistral}}}
  rm: {{kind: model, from: {rm}}}
  report: {{kind: evaluate, inputs: {{policies: [llama], reference: mistral, data: tokens, judge: rm}}, max_new_tokens: 6}}
{extra}",
        pairs = data("tests/fixtures/eval/pairs.jsonl"),
        tok = hf("tiny-llama/tokenizer.json"),
        llama = hf("tiny-llama"),
        mistral = hf("tiny-mistral"),
        rm = hf("tiny-llama-rm"),
    )
}

fn path_of(p: &str, stage: &str) -> std::path::PathBuf {
    let r = sepo(&["show", p, stage, "--path"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    std::path::PathBuf::from(r.stdout.trim())
}

#[test]
fn report_matches_transformers_and_statsmodels() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(dir.path(), &yaml(""));
    let r = sepo(&["run", &p, "--quiet"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let f = fixture();

    // The token ids are the fixture's (so the figures below are on the same inputs).
    let rows = sepo::artifacts::tokens::read_tokens(&path_of(&p, "tokens").join("tokens.parquet"))
        .unwrap();
    for (got, want) in rows.iter().zip(f["rows"].as_array().unwrap()) {
        let ids = |k: &str| -> Vec<u32> {
            want[k]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        };
        assert_eq!(got.id, want["id"].as_str().unwrap());
        assert_eq!(got.split, want["split"].as_str().unwrap());
        assert_eq!(got.prompt_ids, ids("prompt_ids"), "{}", got.id);
        assert_eq!(got.chosen_ids, ids("chosen_ids"), "{}", got.id);
        assert_eq!(got.rejected_ids, ids("rejected_ids"), "{}", got.id);
    }

    let dir_report = path_of(&p, "report");
    let report = sepo::artifacts::Report::read(&dir_report.join("report.parquet")).unwrap();
    let expected = f["expected"].as_object().unwrap();
    let mut checked = 0;
    for (model, metrics) in expected {
        for (metric, e) in metrics.as_object().unwrap() {
            let got = report
                .iter()
                .find(|r| &r.policy == model && &r.metric == metric)
                .unwrap_or_else(|| panic!("report lacks {model} {metric}"));
            let want = e["value"].as_f64().unwrap();
            assert!(
                (got.value - want).abs() < 1e-4,
                "{model} {metric}: sepo {} transformers {want}",
                got.value
            );
            if let Some(se) = e["stderr"].as_f64() {
                let g = got.stderr.unwrap_or(f64::NAN);
                assert!(
                    (g - se).abs() < 1e-4,
                    "{model} {metric} stderr: {g} vs {se}"
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 25, "only {checked} figures compared");
    // Reference rows carry only the reference-free figures; the n is the test split.
    assert!(
        report
            .iter()
            .filter(|r| r.role == "reference")
            .all(|r| !r.metric.starts_with("reward_"))
    );
    assert!(
        report
            .iter()
            .filter(|r| r.metric == "reward_accuracy")
            .all(|r| r.n == 6)
    );

    // Generations in AlpacaEval's format, one file per model, the instruction being the prompt.
    for model in ["llama", "mistral"] {
        let text =
            std::fs::read_to_string(dir_report.join(format!("generations/{model}.json"))).unwrap();
        let items: Vec<Value> = serde_json::from_str(&text).unwrap();
        assert_eq!(items.len(), 6);
        assert_eq!(items[0]["instruction"], "Tell me about tea.");
        assert_eq!(items[0]["generator"], model);
        assert_eq!(items[0]["dataset"], "pairs");
        assert!(items.iter().all(|i| i["output"].is_string()));
    }
    let md = std::fs::read_to_string(dir_report.join("report.md")).unwrap();
    assert!(md.contains("| llama | policy |") && md.contains("| mistral | reference |"));
    let html = std::fs::read_to_string(dir_report.join("report.html")).unwrap();
    // Win rates against the reference and against chosen, and lengths (no train stage: no
    // loss curves).
    assert_eq!(html.matches("<svg").count(), 3);

    // Rerunning does nothing; a generation setting reruns only the evaluate stage.
    let r = sepo(&["run", &p]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("0 stage(s) run"), "{}", r.stderr);
    let r = sepo(&["run", &p, "--set", "report.max_new_tokens=4"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("1 stage(s) run"), "{}", r.stderr);
}

#[test]
fn refuses_the_oracle_as_judge_and_a_judge_that_saw_its_rows() {
    let dir = tempfile::tempdir().unwrap();
    // The oracle (llama) chose the keys the policy trains on: it cannot judge.
    let extra = "  scores: {kind: score, inputs: {oracle: llama, reference: mistral, data: tokens}}
  keys: {kind: select, inputs: {scores: scores}}
  policy: {kind: train, objective: sepo, inputs: {model: mistral, data: keys}, lr: 0, batch_size: 2}
  bad: {kind: evaluate, inputs: {policies: [policy], reference: mistral, data: keys, judge: llama}, max_new_tokens: 2}
";
    let p = pipeline(dir.path(), &yaml(extra));
    let r = sepo(&["run", &p, "--stage", "bad", "--quiet"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("the judge `llama` is the oracle that chose the key tokens"),
        "{}",
        r.stderr
    );

    // An implicit-reward judge trained on rows the oracle was trained on.
    let extra = "  oracle: {kind: train, objective: dpo, inputs: {model: llama, reference: mistral, data: tokens}, lr: 0, batch_size: 2, data_fraction: 0.5}
  scores: {kind: score, inputs: {oracle: oracle, reference: mistral, data: tokens}}
  keys: {kind: select, inputs: {scores: scores}}
  judge: {kind: train, objective: dpo, inputs: {model: llama, reference: mistral, data: tokens}, lr: 0, batch_size: 2}
  fair: {kind: train, objective: dpo, inputs: {model: llama, reference: mistral, data: tokens}, lr: 0, batch_size: 2, data_fraction: 0.5, data_complement: true}
  bad: {kind: evaluate, inputs: {policies: [llama], reference: mistral, data: keys, judge: judge}, max_new_tokens: 2}
  good: {kind: evaluate, inputs: {policies: [llama], reference: mistral, data: keys, judge: fair}, max_new_tokens: 2}
";
    let p = pipeline(dir.path(), &yaml(extra));
    let r = sepo(&["run", &p, "--stage", "bad", "--quiet"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("the judge `judge` was trained on 1 of the 1 pairs the oracle `oracle`"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("data_complement: true"), "{}", r.stderr);
    let r = sepo(&["run", &p, "--stage", "good", "--quiet"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let report =
        sepo::artifacts::Report::read(&path_of(&p, "good").join("report.parquet")).unwrap();
    let acc = report
        .iter()
        .find(|r| r.metric == "oracle_test_accuracy")
        .unwrap();
    assert_eq!(
        (acc.policy.as_str(), acc.role.as_str(), acc.n),
        ("oracle", "oracle", 6)
    );
    assert!(report.iter().any(|r| r.metric == "key_reward_accuracy"));
    assert!(report.iter().any(|r| r.metric == "win_rate_vs_reference"));
}

#[test]
fn refuses_data_without_a_test_split() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("d.jsonl"),
        "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n",
    )
    .unwrap();
    let yaml = yaml("").replace(&data("tests/fixtures/eval/pairs.jsonl"), "d.jsonl");
    let p = pipeline(dir.path(), &yaml);
    let r = sepo(&["run", &p, "--quiet"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("has no test rows"), "{}", r.stderr);
}

/// Changing the key-token ratio reruns the selection, the SePO policy trained on it and the
/// evaluation, nothing else (the oracle, its scores and the baselines stay).
#[test]
fn a_new_ratio_reruns_select_policy_and_evaluate_only() {
    let dir = tempfile::tempdir().unwrap();
    let extra = "  scores: {kind: score, inputs: {oracle: llama, reference: mistral, data: tokens}}
  keys: {kind: select, inputs: {scores: scores}, chosen_ratio: 0.3}
  policy: {kind: train, objective: sepo, inputs: {model: mistral, data: keys}, lr: 1e-3, batch_size: 2}
  dpo: {kind: train, objective: dpo, inputs: {model: mistral, reference: mistral, data: tokens}, lr: 1e-3, batch_size: 2}
  eval: {kind: evaluate, inputs: {policies: [policy, dpo], reference: mistral, data: keys, judge: rm}, max_new_tokens: 2}
";
    let p = pipeline(dir.path(), &yaml(extra));
    let r = sepo(&["run", &p, "--quiet"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = sepo(&["status", &p, "--set", "keys.chosen_ratio=0.5", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let stale: Vec<String> = serde_json::from_str::<Vec<Value>>(&r.stdout)
        .unwrap()
        .iter()
        .filter(|s| s["state"] == "stale")
        .map(|s| s["stage"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(stale, ["keys", "policy", "eval"]);
    let r = sepo(&["run", &p, "--set", "keys.chosen_ratio=0.5"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("3 stage(s) run"), "{}", r.stderr);
}

/// A prompt file's instructions are answered beside the test split, encoded as the data's
/// prompts are: the same instruction gets the same answer as its test pair's prompt.
#[test]
fn a_prompt_file_is_answered_like_the_test_prompts() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("more.jsonl"),
        "{\"instruction\": \"Tell me about tea.\"}\n\"Something new?\"\n",
    )
    .unwrap();
    let p = pipeline(
        dir.path(),
        &yaml("").replace(
            "max_new_tokens: 6}",
            "max_new_tokens: 6, prompts: more.jsonl}",
        ),
    );
    let r = sepo(&["run", &p, "--quiet"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let text =
        std::fs::read_to_string(path_of(&p, "report").join("generations/llama.json")).unwrap();
    let items: Vec<Value> = serde_json::from_str(&text).unwrap();
    assert_eq!(items.len(), 6 + 2);
    assert_eq!(items[6]["dataset"], "more.jsonl");
    assert_eq!(items[7]["instruction"], "Something new?");
    assert_eq!(items[6]["instruction"], items[0]["instruction"]);
    assert_eq!(items[6]["output"], items[0]["output"]);
    // The figures stay on the test split.
    let report =
        sepo::artifacts::Report::read(&path_of(&p, "report").join("report.parquet")).unwrap();
    assert!(
        report
            .iter()
            .filter(|r| r.metric == "response_length_mean")
            .all(|r| r.n == 6)
    );
    // The file is an input: editing it reruns the stage.
    std::fs::write(dir.path().join("more.jsonl"), "\"Other?\"\n").unwrap();
    let r = sepo(&["run", &p]);
    assert!(r.stderr.contains("1 stage(s) run"), "{}", r.stderr);
}
