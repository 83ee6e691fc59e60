//! Key tokens carried across tokenizers (`select` with a `tokens` input, `crate::bridge`): the
//! oracle (tiny-llama, stories260K's 512-token vocabulary) scores the eval fixture's pairs; a
//! policy with GPT-2's tokenizer gets its own tokenize stage and trains SePO on the carried
//! masks. The property behind the rule is proptested in `src/bridge.rs` on GPT-2, Llama-2 and
//! Pythia; this checks the stage around it.

mod common;

use std::path::PathBuf;

use common::{artifact_dir, data, pipeline, sepo};
use sepo::data::parquet as pq;
use serde_json::Value;

fn yaml() -> String {
    format!(
        "{head}  keys: {{kind: select, inputs: {{scores: scores}}, chosen_ratio: 0.4, rejected_ratio: 0.2}}
  ptok: {{kind: tokenizer, path: {gpt2}}}
  ptokens: {{kind: tokenize, inputs: {{data: pairs, tokenizer: ptok}}, template: chatml, max_len: 4096}}
  pkeys: {{kind: select, inputs: {{scores: scores, tokens: ptokens}}, chosen_ratio: 0.4, rejected_ratio: 0.2}}
  pweights: {{kind: select, inputs: {{scores: scores, tokens: ptokens}}, mode: weights, span_overlap: 1.0}}
  pbase: {{kind: model, inputs: {{tokenizer: ptok}}, config: {{architecture: llama, hidden_size: 16, num_attention_heads: 2, num_hidden_layers: 1}}}}
  policy: {{kind: train, objective: sepo, inputs: {{model: pbase, data: pkeys}}, lr: 1e-3, batch_size: 4}}
  weighted: {{kind: train, objective: sepo, inputs: {{model: pbase, data: pweights}}, lr: 1e-3, batch_size: 4}}
  wrong: {{kind: train, objective: sepo, inputs: {{model: pbase, data: keys}}, lr: 1e-3}}
",
        head = common::tiny_scored_head(),
        gpt2 = data("data/tokenizers/gpt2/tokenizer.json"),
    )
}

fn read(p: &str, stage: &str, file: &str) -> (polars::prelude::DataFrame, PathBuf) {
    let f = artifact_dir(p, stage).join(file);
    (pq::read(&f).unwrap(), f)
}

#[test]
fn key_tokens_cross_to_a_policy_with_another_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(dir.path(), &yaml());
    let r = sepo(&[
        "run", &p, "--stage", "policy", "--stage", "weighted", "--stage", "keys",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);

    let (sel, sf) = read(&p, "pkeys", "selection.parquet");
    let (ptok, pf) = read(&p, "ptokens", "tokens.parquet");
    let (src, srcf) = read(&p, "keys", "selection.parquet");
    let rd = |df, file| pq::Reader { df, file };
    let (s, t, o) = (rd(&sel, &sf), rd(&ptok, &pf), rd(&src, &srcf));
    // The policy's rows, ids and prompts (its own chat template), not the oracle's.
    for col in ["id", "split"] {
        assert_eq!(s.strings(col).unwrap(), t.strings(col).unwrap(), "{col}");
    }
    for col in ["prompt_ids", "chosen_ids", "rejected_ids"] {
        assert_eq!(
            s.u32_lists(col).unwrap(),
            t.u32_lists(col).unwrap(),
            "{col}"
        );
    }
    assert_ne!(
        s.u32_lists("chosen_ids").unwrap(),
        o.u32_lists("chosen_ids").unwrap(),
        "GPT-2 and stories260K tokenize differently"
    );
    let (ids, masks, scores) = (
        s.u32_lists("chosen_ids").unwrap(),
        s.bool_lists("chosen_mask").unwrap(),
        s.f32_lists("chosen_scores").unwrap(),
    );
    for i in 0..ids.len() {
        assert_eq!(masks[i].len(), ids[i].len(), "row {i}");
        assert_eq!(scores[i].len(), ids[i].len(), "row {i}");
        assert!(
            masks[i].iter().any(|k| *k),
            "row {i}: the key characters reach a policy token"
        );
        // EOS follows EOS: both keep their appended end token here (nothing truncated).
        assert_eq!(
            *masks[i].last().unwrap(),
            *o.bool_lists("chosen_mask").unwrap()[i].last().unwrap(),
            "row {i}"
        );
    }
    // The scores' sums (the oracle's reward of each answer) survive the carry.
    for side in ["chosen_reward", "rejected_reward"] {
        let a: Vec<f32> = sel
            .column(side)
            .unwrap()
            .f32()
            .unwrap()
            .into_no_null_iter()
            .collect();
        let b: Vec<f32> = src
            .column(side)
            .unwrap()
            .f32()
            .unwrap()
            .into_no_null_iter()
            .collect();
        for (x, y) in a.iter().zip(&b) {
            assert!(
                (x - y).abs() <= 1e-3 * y.abs().max(1.0),
                "{side}: {x} vs {y}"
            );
        }
    }
    let m: Value = serde_json::from_slice(
        &std::fs::read(artifact_dir(&p, "pkeys").join("manifest.json")).unwrap(),
    )
    .unwrap();
    let b = &m["stats"]["bridge"];
    assert_eq!(b["from"], "tokens");
    assert_eq!(b["to"], "ptokens");
    assert_eq!(b["span_overlap"], 0.5);
    assert_eq!(b["dropped_pairs"], 0);
    // At a share of 0.5, each boundary moves by less than one policy token, so the key bytes
    // before and after stay close.
    let (before, after) = (
        b["key_bytes_before"].as_f64().unwrap(),
        b["key_bytes_after"].as_f64().unwrap(),
    );
    assert!(
        before > 0.0 && (after - before).abs() <= 0.5 * before,
        "{before} -> {after}"
    );

    // Weights cross too, as means over the characters.
    let (w, wf) = read(&p, "pweights", "selection.parquet");
    let wr = rd(&w, &wf);
    let cw = wr.f32_lists("chosen_weights").unwrap();
    assert_eq!(cw.len(), ids.len());
    for (i, row) in cw.iter().enumerate() {
        assert_eq!(row.len(), ids[i].len());
        assert!(row.iter().all(|x| x.is_finite() && *x >= 0.0 && *x <= 5.0));
    }
    for stage in ["policy", "weighted"] {
        let (metrics, _) = read(&p, stage, "metrics.parquet");
        let loss = metrics
            .column("loss")
            .unwrap()
            .f64()
            .unwrap()
            .get(0)
            .unwrap();
        assert!(loss.is_finite(), "{stage}: {loss}");
    }

    // The oracle's own masks are refused by the policy: its tokenizer is not the data's.
    let r = sepo(&["run", &p, "--stage", "wrong"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("tokenizer.json differs"), "{}", r.stderr);
}

#[test]
fn span_overlap_needs_a_share_and_a_tokens_input() {
    let dir = tempfile::tempdir().unwrap();
    for (from, to, says) in [
        (
            "mode: weights, span_overlap: 1.0",
            "mode: weights, span_overlap: 0",
            "(0, 1]",
        ),
        (
            "keys: {kind: select, inputs: {scores: scores}, chosen_ratio: 0.4",
            "keys: {kind: select, inputs: {scores: scores}, span_overlap: 0.5, chosen_ratio: 0.4",
            "`tokens` input",
        ),
        (
            "tokens: ptokens}, chosen_ratio",
            "tokens: scores}, chosen_ratio",
            "tokenize",
        ),
    ] {
        let y = yaml().replacen(from, to, 1);
        assert_ne!(y, yaml(), "{from}");
        let p = pipeline(dir.path(), &y);
        let r = sepo(&["status", &p]);
        assert_eq!(r.code, 2, "{to}: {}", r.stderr);
        assert!(r.stderr.contains(says), "{to}: {}", r.stderr);
    }
}
