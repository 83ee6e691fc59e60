//! Helpers for the end-to-end tests: run the real `sepo` binary on pipelines written to a temp dir.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A repo file's absolute path, for YAML written elsewhere.
pub fn data(rel: &str) -> String {
    repo().join(rel).display().to_string()
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn sepo(args: &[&str]) -> Run {
    sepo_env(args, &[])
}

pub fn sepo_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sepo"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out: Output = cmd.output().expect("sepo runs");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A built stage's artifact folder (`sepo show P S --path`).
pub fn artifact_dir(p: &str, stage: &str) -> PathBuf {
    let r = sepo(&["show", p, stage, "--path"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    PathBuf::from(r.stdout.trim())
}

/// The head of the pipelines that test `select` and `train` on real model outputs: the eval
/// fixture's eight pairs tokenized for the tiny test models, tiny-llama and tiny-mistral as model
/// stages, and tiny-llama's token scores against tiny-mistral (`scores`). Tests append stages.
pub fn tiny_scored_head() -> String {
    let hf = |m: &str| data(&format!("tests/fixtures/hf/{m}"));
    format!(
        "seed: 5
stages:
  pairs: {{kind: ingest, format: preference, path: {pairs}}}
  tok: {{kind: tokenizer, path: {tok}}}
  tokens: {{kind: tokenize, inputs: {{data: pairs, tokenizer: tok}}, template: none, max_len: 4096}}
  llama: {{kind: model, from: {llama}}}
  mistral: {{kind: model, from: {mistral}}}
  scores: {{kind: score, inputs: {{oracle: llama, reference: mistral, data: tokens}}}}
",
        pairs = data("tests/fixtures/eval/pairs.jsonl"),
        tok = hf("tiny-llama/tokenizer.json"),
        llama = hf("tiny-llama"),
        mistral = hf("tiny-mistral"),
    )
}

/// Writes `yaml` as `dir/p.yaml` and returns its path.
pub fn pipeline(dir: &Path, yaml: &str) -> String {
    let p = dir.join("p.yaml");
    std::fs::write(&p, yaml).unwrap();
    p.display().to_string()
}

/// The small pipeline most tests use: ingest, tokenizer, tokenize on real UltraFeedback rows.
pub fn small_yaml(extra_tokenize: &str) -> String {
    format!(
        "name: small\nstages:\n  pairs: {{kind: ingest, format: ultrafeedback, path: {}, test_fraction: 0.1}}\n  tok: {{kind: tokenizer, path: {}}}\n  tokens: {{kind: tokenize, inputs: {{data: pairs, tokenizer: tok}}, template: none, max_len: 128{extra_tokenize}}}\n",
        data("data/ultrafeedback/h4_schema_200.jsonl"),
        data("data/tokenizers/gpt2/tokenizer.json"),
    )
}

/// `sepo status P.yaml --json EXTRA...`, one JSON object per stage.
pub fn status_json(p: &str, extra: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec!["status", p, "--json"];
    args.extend_from_slice(extra);
    let r = sepo(&args);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    v.as_array().unwrap().clone()
}

/// `sepo status --json` as (stage, state, hash) triples.
pub fn status(p: &str) -> Vec<(String, String, String)> {
    status_json(p, &[])
        .iter()
        .map(|s| {
            (
                s["stage"].as_str().unwrap().to_string(),
                s["state"].as_str().unwrap().to_string(),
                s["hash"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Every artifact folder in a cache (kind/hash), ignoring tmp and state.
pub fn artifacts(cache: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(kinds) = std::fs::read_dir(cache) else {
        return out;
    };
    for k in kinds.flatten() {
        let name = k.file_name().to_string_lossy().into_owned();
        if name == "tmp" || name.starts_with('.') {
            continue;
        }
        for h in std::fs::read_dir(k.path()).unwrap().flatten() {
            out.push(format!("{name}/{}", h.file_name().to_string_lossy()));
        }
    }
    out.sort();
    out
}

/// Each tensor of a safetensors file: (dtype, shape, raw bytes), by name.
pub fn raw_tensors(
    path: &std::path::Path,
) -> std::collections::BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let dtype = format!("{:?}", v.dtype());
            (name, (dtype, v.shape().to_vec(), v.data().to_vec()))
        })
        .collect()
}
