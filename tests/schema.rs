//! `sepo schema`: the checked-in schemas/pipeline.schema.json is its output, the shipped pipelines
//! validate against it, and it rejects what sepo rejects (a misspelled key, a wrong type). A
//! JSON Schema validator other than sepo's own code (boon, draft 2020-12) does the checking.

mod common;

use common::*;
use serde_json::{Value, json};

/// `sepo schema`'s output, as text and as compiled by boon.
fn generated() -> (String, boon::Schemas, boon::SchemaIndex) {
    let r = sepo(&["schema"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let schema: Value = serde_json::from_str(&r.stdout).expect("sepo schema prints JSON");
    let mut schemas = boon::Schemas::new();
    let mut compiler = boon::Compiler::new();
    let url = "file:///sepo/pipeline.schema.json";
    compiler.add_resource(url, schema).unwrap();
    // Compiling also checks the schema against the draft 2020-12 meta-schema.
    let index = compiler
        .compile(url, &mut schemas)
        .unwrap_or_else(|e| panic!("{e:#}"));
    (r.stdout, schemas, index)
}

fn yaml(text: &str) -> Value {
    serde_yaml::from_str(text).unwrap()
}

#[test]
fn checked_in_schema_is_sepo_schemas_output() {
    let (text, ..) = generated();
    let file = repo().join("schemas/pipeline.schema.json");
    let checked_in = std::fs::read_to_string(&file).unwrap();
    assert!(
        checked_in == text,
        "{} is not `sepo schema`'s output: regenerate it with `cargo run -q -- schema > schemas/pipeline.schema.json`",
        file.display()
    );
}

#[test]
fn shipped_pipelines_validate() {
    let (_, schemas, index) = generated();
    let mut seen = 0;
    for entry in std::fs::read_dir(repo().join("pipelines")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            let doc = yaml(&std::fs::read_to_string(&path).unwrap());
            if let Err(e) = schemas.validate(&doc, index) {
                panic!("{}: {e:#}", path.display());
            }
            seen += 1;
        }
    }
    assert!(seen >= 2, "no pipelines found");
}

/// A small pipeline with one stage of every kind (`sepo run --dry-run` accepts it, with `d.jsonl`).
fn every_kind() -> Value {
    yaml(concat!(
        "name: t\n",
        "device: cpu\n",
        "seed: 7\n",
        "stages:\n",
        "  pairs: {kind: ingest, format: preference, path: d.jsonl, limit: 10}\n",
        "  tok: {kind: tokenizer, inputs: {data: pairs}, train: {vocab_size: 300}}\n",
        "  tokens: {kind: tokenize, inputs: {data: pairs, tokenizer: tok}, max_len: 64}\n",
        "  base:\n",
        "    kind: model\n",
        "    inputs: {tokenizer: tok}\n",
        "    config: {architecture: llama, hidden_size: 16, hidden_act: silu,\n",
        "             rope_scaling: {rope_type: linear, factor: 2.0}}\n",
        "  ref: {kind: train, objective: sft, inputs: {model: base, data: tokens}}\n",
        "  oracle: {kind: train, objective: dpo, inputs: {model: ref, reference: ref, data: tokens}}\n",
        "  scores: {kind: score, inputs: {oracle: oracle, reference: ref, data: tokens}}\n",
        "  keys: {kind: select, inputs: {scores: scores}, chosen_ratio: 0.5}\n",
        "  policy: {kind: train, objective: sepo, inputs: {model: ref, data: keys}}\n",
    ))
}

/// Exit status of `sepo run --dry-run` on `doc` (written as YAML beside a small `d.jsonl`).
fn sepo_dry_run(doc: &Value) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let row = r#"{"prompt": "p", "chosen": "c", "rejected": "r"}"#;
    std::fs::write(dir.path().join("d.jsonl"), row).unwrap();
    let p = pipeline(dir.path(), &serde_yaml::to_string(doc).unwrap());
    sepo(&["run", &p, "--dry-run", "-q"])
}

#[test]
fn a_pipeline_of_every_kind_validates() {
    let (_, schemas, index) = generated();
    let doc = every_kind();
    let r = sepo_dry_run(&doc);
    assert_eq!(r.code, 0, "sepo refuses the pipeline: {}", r.stderr);
    if let Err(e) = schemas.validate(&doc, index) {
        panic!("{e:#}");
    }
}

/// An edit of a pipeline.
type Edit = fn(&mut Value);

/// Each edit of a valid pipeline makes the schema reject it, as `sepo run` does (exit 2).
#[test]
fn misspelled_keys_and_wrong_types_are_rejected() {
    let (_, schemas, index) = generated();
    let edits: [(&str, Edit); 14] = [
        ("misspelled parameter", |d| {
            d["stages"]["pairs"]["test_fracton"] = json!(0.1)
        }),
        ("misspelled model setting", |d| {
            d["stages"]["base"]["config"]["hiden_size"] = json!(8)
        }),
        ("misspelled BPE setting", |d| {
            d["stages"]["tok"]["train"]["vocab"] = json!(300)
        }),
        ("misspelled top-level key", |d| d["stagez"] = json!({})),
        ("unknown input role", |d| {
            d["stages"]["tokens"]["inputs"]["tokeniser"] = json!("tok")
        }),
        ("missing required input", |d| {
            d["stages"]["scores"]["inputs"]
                .as_object_mut()
                .unwrap()
                .remove("oracle");
        }),
        ("unknown kind", |d| {
            d["stages"]["pairs"]["kind"] = json!("injest")
        }),
        ("wrong type", |d| {
            d["stages"]["tokens"]["max_len"] = json!("long")
        }),
        ("wrong type (bool for a number)", |d| {
            d["stages"]["ref"]["lr"] = json!(true)
        }),
        ("unknown enum value", |d| {
            d["stages"]["ref"]["objective"] = json!("ppo")
        }),
        ("out of range", |d| {
            // 0 is allowed (a one-sided selection); above 1 is not.
            d["stages"]["keys"]["rejected_ratio"] = json!(1.5)
        }),
        ("unsupported activation", |d| {
            d["stages"]["base"]["config"]["hidden_act"] = json!("tanh")
        }),
        ("rope scaling without its factor", |d| {
            d["stages"]["base"]["config"]["rope_scaling"] = json!({"rope_type": "linear"})
        }),
        ("stage name with a space", |d| {
            let stages = d["stages"].as_object_mut().unwrap();
            let pairs = stages.remove("pairs").unwrap();
            stages.insert("my pairs".into(), pairs);
        }),
    ];
    for (what, edit) in edits {
        let mut doc = every_kind();
        edit(&mut doc);
        assert!(
            schemas.validate(&doc, index).is_err(),
            "{what}: the schema accepts {doc:#}"
        );
        let r = sepo_dry_run(&doc);
        assert_eq!(r.code, 2, "{what}: sepo exits {}: {}", r.code, r.stderr);
    }
}

/// The "did you mean" of an unknown key comes from the config type's fields (no hand-kept list).
#[test]
fn unknown_keys_suggest_a_field_of_the_config() {
    let dir = tempfile::tempdir().unwrap();
    for (stage, needles) in [
        (
            "{kind: train, objective: sft, inputs: {model: m, data: t}, group_by_lenght: true}",
            [
                "unknown field `group_by_lenght`",
                "did you mean `group_by_length`",
            ],
        ),
        (
            "{kind: model, config: {hiden_size: 8, vocab_size: 16}}",
            [
                "`config.hiden_size` is not a model setting",
                "did you mean `hidden_size`",
            ],
        ),
        (
            "{kind: model, config: {model_typ: llama, vocab_size: 16}}",
            [
                "`config.model_typ` is not a model setting",
                "did you mean `model_type`",
            ],
        ),
    ] {
        // small_yaml's `tokens` (a tokenize stage), a model `m`, and the stage under test.
        let yaml = format!(
            "{}  m: {{kind: model, config: {{vocab_size: 16}}}}\n  x: {stage}\n",
            small_yaml("")
        )
        .replace(
            "inputs: {model: m, data: t}",
            "inputs: {model: m, data: tokens}",
        );
        let p = pipeline(dir.path(), &yaml);
        let r = sepo(&["run", &p, "--dry-run", "-q"]);
        assert_eq!(r.code, 2, "{}", r.stderr);
        for n in needles {
            assert!(r.stderr.contains(n), "missing {n:?} in: {}", r.stderr);
        }
    }
}
