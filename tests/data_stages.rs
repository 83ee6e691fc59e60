//! ingest, tokenizer and tokenize on real rows: every format and file type, read back with the
//! same Parquet reader users have (Polars).

mod common;

use common::*;
use sepo::data::parquet as pq;
use sepo::stages::ingest::read_pairs;
use sepo::stages::tokenize::read_tokens;

fn run_ok(p: &str) {
    let r = sepo(&["run", p, "-q"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

fn artifact(p: &str, stage: &str) -> std::path::PathBuf {
    let r = sepo(&["show", p, stage, "--path"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    std::path::PathBuf::from(r.stdout.trim())
}

fn manifest(p: &str, stage: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(artifact(p, stage).join("manifest.json")).unwrap())
        .unwrap()
}

fn ingest_yaml(format: &str, path: &str) -> String {
    format!(
        "stages:\n  pairs: {{kind: ingest, format: {format}, path: {path}, test_fraction: 0.2}}\n"
    )
}

#[test]
fn ultrafeedback_h4_message_lists_without_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(
        dir.path(),
        &ingest_yaml(
            "ultrafeedback",
            &data("data/ultrafeedback/h4_train_prefs_500.jsonl"),
        ),
    );
    run_ok(&p);
    let pairs = read_pairs(&artifact(&p, "pairs").join("pairs.parquet")).unwrap();
    // 500 rows: one has identical answers, two an empty answer (SOURCES.md).
    assert_eq!(pairs.len(), 497);
    assert_eq!(
        manifest(&p, "pairs")["stats"]["dropped"],
        serde_json::json!({"identical_responses": 1, "empty_response": 2})
    );
    let first = &pairs[0];
    assert_eq!(first.prompt.len(), 1);
    assert_eq!(first.prompt[0].0, "user");
    assert!(
        first.prompt[0]
            .1
            .starts_with("Write a 1,000-word op-ed piece")
    );
    assert!(first.chosen.starts_with("Title: The Noxious Alliance"));
    assert_eq!(first.score_chosen, None);
    assert_eq!(first.id.len(), 16, "content id");
    let test = pairs.iter().filter(|p| p.split == "test").count();
    assert!((60..140).contains(&test), "{test} test rows of 497 at 0.2");
}

#[test]
fn ultrafeedback_h4_full_schema_keeps_ids_and_scores() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(
        dir.path(),
        &ingest_yaml(
            "ultrafeedback",
            &data("data/ultrafeedback/h4_schema_200.jsonl"),
        ),
    );
    run_ok(&p);
    let pairs = read_pairs(&artifact(&p, "pairs").join("pairs.parquet")).unwrap();
    let raw: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(repo().join("data/ultrafeedback/h4_schema_200.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(pairs[0].id, raw["prompt_id"].as_str().unwrap());
    assert_eq!(pairs[0].score_chosen, raw["score_chosen"].as_f64());
    assert_eq!(pairs[0].prompt[0].1, raw["prompt"].as_str().unwrap());
    assert!(
        pairs
            .iter()
            .all(|p| p.score_chosen.is_some() && p.score_rejected.is_some())
    );
}

#[test]
fn trl_lib_strings_as_ultrafeedback_and_as_preference() {
    let dir = tempfile::tempdir().unwrap();
    let path = data("data/ultrafeedback/trl_lib_eval_200.jsonl");
    let p = pipeline(dir.path(), &ingest_yaml("ultrafeedback", &path));
    run_ok(&p);
    let uf = read_pairs(&artifact(&p, "pairs").join("pairs.parquet")).unwrap();
    assert!(
        uf.iter().all(|p| p.score_chosen.is_some()),
        "scores come from `metadata`"
    );
    let p2 = pipeline(dir.path(), &ingest_yaml("preference", &path));
    run_ok(&p2);
    let pref = read_pairs(&artifact(&p2, "pairs").join("pairs.parquet")).unwrap();
    assert_eq!(uf.len(), pref.len());
    assert_eq!(uf[0].chosen, pref[0].chosen);
    assert_eq!(uf[0].id, pref[0].id);
}

#[test]
fn hh_rlhf_gzip_with_glob() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(
        dir.path(),
        &ingest_yaml("hh-rlhf", &data("data/hh-rlhf/*.jsonl.gz")),
    );
    run_ok(&p);
    let pairs = read_pairs(&artifact(&p, "pairs").join("pairs.parquet")).unwrap();
    let stats = &manifest(&p, "pairs")["stats"];
    assert_eq!(stats["rows_read"], 2354);
    // SOURCES.md: 2 rows of helpful-base test have chosen == rejected, 4 an empty answer.
    assert_eq!(stats["dropped"]["identical_responses"], 2);
    assert_eq!(stats["dropped"]["empty_response"], 4);
    let dropped: u64 = stats["dropped"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(pairs.len() as u64, 2354 - dropped);
    assert_eq!(pairs[0].prompt[0].0, "user");
    assert!(pairs[0].prompt[0].1.starts_with("Do you know why turkeys"));
    assert!(pairs.iter().all(|p| p.prompt.last().unwrap().0 == "user"));
    assert!(
        pairs.iter().any(|p| p.prompt.len() >= 3),
        "multi-turn prompts"
    );
}

#[test]
fn parquet_and_json_inputs_match_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    // Write the H4 layout (message lists) as Parquet and as a JSON array.
    let text =
        std::fs::read_to_string(repo().join("data/ultrafeedback/h4_schema_200.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = text
        .lines()
        .take(20)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    std::fs::write(
        dir.path().join("rows.json"),
        serde_json::to_string(&rows).unwrap(),
    )
    .unwrap();
    let msgs = |key: &str| -> Vec<Vec<(String, String)>> {
        rows.iter()
            .map(|r| {
                r[key]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| {
                        (
                            m["role"].as_str().unwrap().to_string(),
                            m["content"].as_str().unwrap().to_string(),
                        )
                    })
                    .collect()
            })
            .collect()
    };
    let mut df = pq::frame(vec![
        pq::utf8(
            "prompt_id",
            rows.iter()
                .map(|r| r["prompt_id"].as_str().unwrap().to_string())
                .collect(),
        ),
        pq::messages("chosen", &msgs("chosen")).unwrap(),
        pq::messages("rejected", &msgs("rejected")).unwrap(),
        pq::opt_f64(
            "score_chosen",
            rows.iter().map(|r| r["score_chosen"].as_f64()).collect(),
        ),
        pq::opt_f64(
            "score_rejected",
            rows.iter().map(|r| r["score_rejected"].as_f64()).collect(),
        ),
    ])
    .unwrap();
    pq::write(&mut df, &dir.path().join("rows.parquet")).unwrap();
    let head: String = text.lines().take(20).collect::<Vec<_>>().join("\n");
    std::fs::write(dir.path().join("rows.jsonl"), head).unwrap();
    let mut results = Vec::new();
    for f in ["rows.jsonl", "rows.json", "rows.parquet"] {
        let p = pipeline(dir.path(), &ingest_yaml("ultrafeedback", f));
        run_ok(&p);
        let mut pairs = read_pairs(&artifact(&p, "pairs").join("pairs.parquet")).unwrap();
        for x in &mut pairs {
            x.source.clear();
        }
        results.push(pairs);
    }
    assert_eq!(results[0].len(), 20);
    assert_eq!(results[0], results[1]);
    assert_eq!(results[0], results[2]);
}

#[test]
fn adding_rows_never_moves_old_rows_between_splits() {
    let dir = tempfile::tempdir().unwrap();
    let text =
        std::fs::read_to_string(repo().join("data/ultrafeedback/h4_schema_200.jsonl")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    std::fs::write(dir.path().join("a.jsonl"), lines[..100].join("\n")).unwrap();
    let p = pipeline(dir.path(), &ingest_yaml("ultrafeedback", "a.jsonl"));
    run_ok(&p);
    let small = read_pairs(&artifact(&p, "pairs").join("pairs.parquet")).unwrap();
    std::fs::write(dir.path().join("a.jsonl"), lines.join("\n")).unwrap();
    run_ok(&p);
    let big = read_pairs(&artifact(&p, "pairs").join("pairs.parquet")).unwrap();
    assert!(big.len() > small.len());
    for s in &small {
        let b = big.iter().find(|b| b.id == s.id).unwrap();
        assert_eq!(b.split, s.split, "{}", s.id);
    }
}

#[test]
fn tokenize_round_trips_and_marks_truncation() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(dir.path(), &small_yaml(""));
    run_ok(&p);
    let pairs = read_pairs(&artifact(&p, "pairs").join("pairs.parquet")).unwrap();
    let rows = read_tokens(&artifact(&p, "tokens").join("tokens.parquet")).unwrap();
    assert_eq!(pairs.len(), rows.len());
    let tok = tokenizers::Tokenizer::from_file(repo().join("data/tokenizers/gpt2/tokenizer.json"))
        .unwrap();
    let eos = tok.token_to_id("<|endoftext|>").unwrap();
    let mut untruncated = 0;
    for (pair, row) in pairs.iter().zip(&rows) {
        assert_eq!(pair.id, row.id);
        assert!(row.prompt_ids.len() + row.chosen_ids.len().max(row.rejected_ids.len()) <= 128);
        if !row.truncated {
            untruncated += 1;
            // GPT-2's byte-level BPE is lossless: decoding gives back the exact text.
            assert_eq!(*row.chosen_ids.last().unwrap(), eos);
            assert_eq!(
                tok.decode(&row.chosen_ids[..row.chosen_ids.len() - 1], false)
                    .unwrap(),
                pair.chosen
            );
            assert_eq!(
                tok.decode(&row.rejected_ids[..row.rejected_ids.len() - 1], false)
                    .unwrap(),
                pair.rejected
            );
            assert_eq!(
                tok.decode(&row.prompt_ids, false).unwrap(),
                pair.prompt[0].1
            );
        } else {
            // A truncated response keeps its start.
            let text = tok.decode(&row.chosen_ids, true).unwrap();
            assert!(
                pair.chosen.starts_with(text.trim_end_matches('\u{fffd}')),
                "{text}"
            );
        }
    }
    assert!(
        untruncated > 10 && untruncated < rows.len(),
        "{untruncated}"
    );
    let stats = &manifest(&p, "tokens")["stats"];
    assert_eq!(
        stats["truncated"].as_u64().unwrap() as usize,
        rows.len() - untruncated
    );
    assert_eq!(stats["eos_token"], "<|endoftext|>");
}

#[test]
fn chatml_and_hf_templates_and_trained_bpe() {
    let dir = tempfile::tempdir().unwrap();
    // Llama-2's tokenizer with a Zephyr-style HF chat template beside it.
    let tdir = dir.path().join("tok");
    std::fs::create_dir_all(&tdir).unwrap();
    std::fs::copy(
        repo().join("data/tokenizers/llama2/tokenizer.json"),
        tdir.join("tokenizer.json"),
    )
    .unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("data/tokenizers/llama2/tokenizer_config.json"))
            .unwrap(),
    )
    .unwrap();
    cfg["chat_template"] = "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'].strip() }}</s>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}".into();
    std::fs::write(tdir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let yaml = format!(
        "stages:\n  pairs: {{kind: ingest, format: hh-rlhf, path: {}, limit: 50}}\n  llama: {{kind: tokenizer, path: tok/tokenizer.json}}\n  hf: {{kind: tokenize, inputs: {{data: pairs, tokenizer: llama}}, template: hf, max_len: 256}}\n  bpe: {{kind: tokenizer, inputs: {{data: pairs}}, train: {{vocab_size: 400}}}}\n  chatml: {{kind: tokenize, inputs: {{data: pairs, tokenizer: bpe}}, template: chatml, max_len: 4096}}\n",
        data("data/hh-rlhf/helpful-base-test.jsonl.gz")
    );
    let p = pipeline(dir.path(), &yaml);
    run_ok(&p);
    let pairs = read_pairs(&artifact(&p, "pairs").join("pairs.parquet")).unwrap();
    assert_eq!(pairs.len(), 50);

    let hf = read_tokens(&artifact(&p, "hf").join("tokens.parquet")).unwrap();
    let llama = tokenizers::Tokenizer::from_file(tdir.join("tokenizer.json")).unwrap();
    // The template writes BOS itself; the post-processor must not add a second one.
    assert_eq!(hf[0].prompt_ids[0], 1);
    assert_ne!(hf[0].prompt_ids[1], 1);
    assert_eq!(*hf[0].chosen_ids.last().unwrap(), 2);
    let text = llama.decode(&hf[0].prompt_ids, false).unwrap();
    assert!(
        text.contains("<|user|>") && text.ends_with("<|assistant|>\n"),
        "{text:?}"
    );

    let bpe_dir = artifact(&p, "bpe");
    let bpe = tokenizers::Tokenizer::from_file(bpe_dir.join("tokenizer.json")).unwrap();
    assert_eq!(bpe.get_vocab_size(true), 400);
    let chat = read_tokens(&artifact(&p, "chatml").join("tokens.parquet")).unwrap();
    let im_start = bpe.token_to_id("<|im_start|>").unwrap();
    assert_eq!(chat[0].prompt_ids[0], im_start);
    // Byte-level BPE trained here round-trips text exactly.
    for (pair, row) in pairs.iter().zip(&chat).filter(|(_, r)| !r.truncated) {
        assert_eq!(
            bpe.decode(&row.chosen_ids[..row.chosen_ids.len() - 1], false)
                .unwrap(),
            pair.chosen
        );
    }
    // Training is deterministic: a forced rebuild writes the same bytes.
    let before = std::fs::read(bpe_dir.join("tokenizer.json")).unwrap();
    assert_eq!(
        sepo(&["run", &p, "-q", "--stage", "bpe", "--force"]).code,
        0
    );
    assert_eq!(
        before,
        std::fs::read(artifact(&p, "bpe").join("tokenizer.json")).unwrap()
    );
}
