//! Reward models (transformers' `*ForSequenceClassification`) against transformers
//! (tests/fixtures/reward.json and hf/*-rm, from scripts/make_reward_fixtures.py), the `model`
//! stage on a reward folder, and the `reward` train objective (Bradley-Terry) end to end.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use sepo::data::parquet as pq;
use sepo::model::{CausalLm, RewardModel, is_reward_model};
use serde_json::Value;

/// SPEC.md's parity tolerance with transformers.
const TOL: f64 = 1e-4;

fn cpu() -> burn::tensor::Device {
    sepo::device::parse_device("cpu").unwrap()
}

fn fixture() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(repo().join("tests/fixtures/reward.json")).unwrap(),
    )
    .unwrap()
}

fn sequences(fx: &Value) -> Vec<Vec<u32>> {
    serde_json::from_value(fx["sequences"].clone()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[track_caller]
fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol, "{what}[{i}]: got {g}, want {w}");
    }
}

fn as_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// transformers' folders (pad == EOS, pad 0, no pad id) and the sepo-written one: where each
/// sequence is read, and the scores of one padded batch, match transformers' float64 scores.
#[test]
fn rewards_match_transformers() {
    let fx = fixture();
    let seqs = sequences(&fx);
    for (name, entry) in fx["models"].as_object().unwrap() {
        let dir = repo().join(entry["dir"].as_str().unwrap());
        assert!(is_reward_model(&dir).unwrap(), "{name}");
        let rm = RewardModel::load(&dir, &cpu()).unwrap();
        let pad = entry["pad_token_id"].as_u64().map(|p| p as u32);
        assert_eq!(rm.pad_token_id(), pad, "{name}");
        let positions: Vec<usize> = seqs.iter().map(|s| rm.score_position(s)).collect();
        let want: Vec<usize> = serde_json::from_value(entry["positions"].clone()).unwrap();
        assert_eq!(positions, want, "{name}: score positions");
        let batched = as_f64(&rm.rewards(&seqs, &cpu()).unwrap());
        assert_close(name, &batched, &floats(&entry["scores"]), TOL);
        // Padding never reaches a real position: one sequence at a time gives the same.
        for (i, s) in seqs.iter().enumerate() {
            let alone = rm.rewards(std::slice::from_ref(s), &cpu()).unwrap()[0] as f64;
            assert!(
                (alone - batched[i]).abs() < 1e-5,
                "{name}[{i}]: {alone} alone, {} batched",
                batched[i]
            );
        }
    }
}

/// `RewardModel::from_causal_lm` (seeded score head) then `save` writes the committed folder
/// byte for byte (transformers loaded that folder with no missing or unexpected weight and gave
/// the fixture's scores), and saving what was loaded gives the same bytes again.
#[test]
fn sepo_writes_the_committed_reward_folder() {
    let fx = fixture();
    let entry = &fx["models"]["sepo-rm"];
    let committed = repo().join(entry["dir"].as_str().unwrap());
    let lm = CausalLm::load(&repo().join(entry["from"].as_str().unwrap()), &cpu()).unwrap();
    let rm = RewardModel::from_causal_lm(lm, entry["seed"].as_u64().unwrap(), None).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let written = tmp.path().join("new");
    rm.save(&written).unwrap();
    let same = |a: &Path, b: &Path| {
        for f in ["config.json", "model.safetensors"] {
            assert!(
                std::fs::read(a.join(f)).unwrap() == std::fs::read(b.join(f)).unwrap(),
                "{f} differs between {} and {}",
                a.display(),
                b.display()
            );
        }
    };
    same(&written, &committed);
    let scores = as_f64(&rm.rewards(&sequences(&fx), &cpu()).unwrap());
    assert_close("sepo-rm", &scores, &floats(&entry["scores"]), TOL);
    let again = tmp.path().join("again");
    RewardModel::load(&committed, &cpu())
        .unwrap()
        .save(&again)
        .unwrap();
    same(&again, &committed);
}

/// Copies a fixture folder into `dest`.
fn copy_folder(src: &Path, dest: &Path) {
    std::fs::create_dir_all(dest).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dest.join(e.file_name())).unwrap();
    }
}

#[test]
fn a_reward_folder_is_no_language_model_and_has_one_label() {
    let rm_dir = repo().join("tests/fixtures/hf/tiny-llama-rm");
    let err = format!("{:#}", CausalLm::load(&rm_dir, &cpu()).unwrap_err());
    assert!(err.contains("is a reward model"), "{err}");
    assert!(!is_reward_model(&repo().join("tests/fixtures/hf/tiny-llama")).unwrap());

    let tmp = tempfile::tempdir().unwrap();
    let two = tmp.path().join("two-labels");
    copy_folder(&rm_dir, &two);
    let cfg_path = two.join("config.json");
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["id2label"] = serde_json::json!({"0": "bad", "1": "good"});
    cfg["label2id"] = serde_json::json!({"bad": 0, "good": 1});
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let err = RewardModel::load(&two, &cpu()).unwrap_err();
    assert!(sepo::error::is_user_error(&err));
    let msg = format!("{err:#}");
    assert!(
        msg.contains(&cfg_path.display().to_string()) && msg.contains("num_labels is 2"),
        "{msg}"
    );
}

fn artifact(p: &str, stage: &str, cache: &str) -> PathBuf {
    let r = sepo(&["show", p, stage, "--path", "--cache", cache]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    PathBuf::from(r.stdout.trim())
}

/// The fixture's 6 pairs, tokenized like sepo_core's pipeline, and tiny-llama as the base.
fn base_yaml(dir: &Path) -> String {
    let fx: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("tests/fixtures/pipeline_batch.json")).unwrap(),
    )
    .unwrap();
    let lines: Vec<String> = fx["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.to_string())
        .collect();
    std::fs::write(dir.join("pairs.jsonl"), lines.join("\n")).unwrap();
    format!(
        "seed: 5
stages:
  pairs: {{kind: ingest, format: preference, path: pairs.jsonl}}
  tok: {{kind: tokenizer, path: {tok}}}
  tokens: {{kind: tokenize, inputs: {{data: pairs, tokenizer: tok}}, template: none, max_len: 4096}}
  llama: {{kind: model, from: {llama}}}
",
        tok = data("tests/fixtures/hf/tiny-llama/tokenizer.json"),
        llama = data("tests/fixtures/hf/tiny-llama"),
    )
}

/// The `model` stage keeps a `*ForSequenceClassification` folder as a reward model (same
/// weights, its tokenizer), and `sepo export` hands it back as one.
#[test]
fn model_stage_takes_a_reward_folder() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache").display().to_string();
    let src = repo().join("tests/fixtures/hf/tiny-neox-rm");
    let yaml =
        base_yaml(dir.path()) + &format!("  judge: {{kind: model, from: {}}}\n", src.display());
    let p = pipeline(dir.path(), &yaml);
    let r = sepo(&["run", &p, "--stage", "judge", "--cache", &cache]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("reward model"), "{}", r.stderr);
    let model = artifact(&p, "judge", &cache).join("model");
    assert!(is_reward_model(&model).unwrap());
    assert!(model.join("tokenizer.json").is_file());
    let (a, b) = (
        RewardModel::load(&model, &cpu()).unwrap(),
        RewardModel::load(&src, &cpu()).unwrap(),
    );
    assert!(a.hf_tensors() == b.hf_tensors(), "the weights changed");
    assert_eq!(a.pad_token_id(), b.pad_token_id());
    let out = dir.path().join("exported");
    let r = sepo(&[
        "export",
        &p,
        "judge",
        &out.display().to_string(),
        "--cache",
        &cache,
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(is_reward_model(&out).unwrap());
    // A reward model is no language model to fine-tune.
    let p = pipeline(
        dir.path(),
        &(yaml + "  sft: {kind: train, objective: sft, inputs: {model: judge, data: tokens}}\n"),
    );
    let r = sepo(&["run", &p, "--stage", "sft", "-q", "--cache", &cache]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("is a reward model"), "{}", r.stderr);
}

/// `-log sigmoid(r_c - r_r)` averaged over the pairs, in f64.
fn bradley_terry(rc: &[f32], rr: &[f32]) -> f64 {
    let n = rc.len() as f64;
    rc.iter()
        .zip(rr)
        .map(|(&c, &r)| {
            let z = c as f64 - r as f64;
            (1.0 + (-z).exp()).ln()
        })
        .sum::<f64>()
        / n
}

/// The token rows of the pipeline's `tokens` stage as `(prompt + chosen, prompt + rejected)`.
fn token_pairs(p: &str, cache: &str) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let rows =
        sepo::stages::tokenize::read_tokens(&artifact(p, "tokens", cache).join("tokens.parquet"))
            .unwrap();
    let join = |a: &[u32], b: &[u32]| [a, b].concat();
    (
        rows.iter()
            .map(|r| join(&r.prompt_ids, &r.chosen_ids))
            .collect(),
        rows.iter()
            .map(|r| join(&r.prompt_ids, &r.rejected_ids))
            .collect(),
    )
}

/// A `reward` train stage from a causal LM: its first logged loss (the whole data set in one
/// batch) is Bradley-Terry on the rewards of the seeded initial model, the step's reward
/// metrics are those rewards', and it writes a reward folder. A second stage continues from
/// that reward model, and its first loss is Bradley-Terry on the trained model's rewards.
#[test]
fn reward_training_first_loss_is_bradley_terry() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache").display().to_string();
    let yaml = base_yaml(dir.path())
        + "  rm: {kind: train, objective: reward, inputs: {model: llama, data: tokens}, lr: 1e-3, warmup_ratio: 0, batch_size: 6, epochs: 2, seed: 3}
  rm2: {kind: train, objective: reward, inputs: {model: rm, data: tokens}, lr: 0, batch_size: 6}
";
    let p = pipeline(dir.path(), &yaml);
    let r = sepo(&["run", &p, "-q", "--cache", &cache]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let (chosen, rejected) = token_pairs(&p, &cache);
    assert_eq!(chosen.len(), 6);

    let lm = CausalLm::load(&repo().join("tests/fixtures/hf/tiny-llama"), &cpu()).unwrap();
    let initial = RewardModel::from_causal_lm(lm, 3, None).unwrap();
    let rc = initial.rewards(&chosen, &cpu()).unwrap();
    let rr = initial.rewards(&rejected, &cpu()).unwrap();
    let metrics = artifact(&p, "rm", &cache).join("metrics.parquet");
    let df = pq::read(&metrics).unwrap();
    let rd = pq::Reader {
        df: &df,
        file: &metrics,
    };
    let first = |col: &str| rd.opt_f64(col).unwrap()[0].unwrap();
    assert_eq!(df.height(), 2, "one step per epoch");
    let want = bradley_terry(&rc, &rr);
    assert!(
        (first("loss") - want).abs() <= TOL,
        "first loss {} vs Bradley-Terry {want}",
        first("loss")
    );
    let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
    let wins = rc.iter().zip(&rr).filter(|(c, r)| c > r).count() as f64 / 6.0;
    assert_close(
        "step 1 reward metrics",
        &[
            first("reward_chosen"),
            first("reward_rejected"),
            first("reward_margin"),
            first("reward_accuracy"),
        ],
        &[mean(&rc), mean(&rr), mean(&rc) - mean(&rr), wins],
        TOL,
    );
    assert!(!rd.has("logps_chosen"), "a reward model has no log-probs");
    // The step learned something: the second step's loss is lower.
    assert!(rd.opt_f64("loss").unwrap()[1].unwrap() < first("loss"));

    let trained_dir = artifact(&p, "rm", &cache).join("model");
    assert!(is_reward_model(&trained_dir).unwrap());
    let trained = RewardModel::load(&trained_dir, &cpu()).unwrap();
    assert_eq!(trained.pad_token_id(), Some(2), "tiny-llama's EOS");
    let tc = trained.rewards(&chosen, &cpu()).unwrap();
    let tr = trained.rewards(&rejected, &cpu()).unwrap();
    let metrics2 = artifact(&p, "rm2", &cache).join("metrics.parquet");
    let df2 = pq::read(&metrics2).unwrap();
    let loss2 = df2.column("loss").unwrap().f64().unwrap().get(0).unwrap();
    let want2 = bradley_terry(&tc, &tr);
    assert!(
        (loss2 - want2).abs() <= TOL,
        "continued: {loss2} vs {want2}"
    );
    assert!(want2 < want, "training lowered the loss on its data");
}

/// A killed `reward` run resumes from its checkpoint and ends with the same bytes.
#[test]
fn a_killed_reward_run_resumes_to_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = base_yaml(dir.path())
        + "  rm: {kind: train, objective: reward, inputs: {model: llama, data: tokens}, lr: 0.01, batch_size: 1, epochs: 2, checkpoint_every: 3}\n";
    let p = pipeline(dir.path(), &yaml);
    let c1 = dir.path().join("c1").display().to_string();
    let c2 = dir.path().join("c2").display().to_string();
    let r = sepo(&["run", &p, "--stage", "rm", "-q", "--cache", &c1]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = sepo_env(
        &["run", &p, "--stage", "rm", "--cache", &c2],
        &[("SEPO_TEST_HOOK", "abort-after-checkpoint:6")],
    );
    assert_ne!(r.code, 0, "the hook should have killed it");
    let r = sepo(&["run", &p, "--stage", "rm", "--cache", &c2]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("resuming from the checkpoint at step 6"),
        "{}",
        r.stderr
    );
    for f in ["model/model.safetensors", "model/config.json"] {
        let read = |c: &str| std::fs::read(artifact(&p, "rm", c).join(f)).unwrap();
        assert!(read(&c1) == read(&c2), "resumed {f} differs");
    }
    // The metrics are complete and equal, bit for bit (elapsed_s aside).
    let cols = |c: &str| {
        let path = artifact(&p, "rm", c).join("metrics.parquet");
        let df = pq::read(&path).unwrap();
        let rd = pq::Reader {
            df: &df,
            file: &path,
        };
        [
            "loss",
            "grad_norm",
            "lr",
            "tokens",
            "reward_margin",
            "reward_accuracy",
        ]
        .map(|k| rd.opt_f64(k).unwrap())
        .to_vec()
    };
    assert_eq!(cols(&c1), cols(&c2), "resumed metrics differ");
    assert_eq!(cols(&c2)[0].len(), 12);
}

/// `data_complement` trains on exactly the rows `data_fraction` (same seed) leaves out; with
/// `data_fraction: 1` it is an error; and writing its default changes no hash.
#[test]
fn data_complement_takes_the_rows_data_fraction_leaves_out() {
    use sepo::train::rows::pick_rows;
    for (n, fraction, seed) in [(10, 0.5, 42), (7, 0.3, 1), (1000, 0.25, 9)] {
        let kept = pick_rows(n, fraction, false, seed);
        let rest = pick_rows(n, fraction, true, seed);
        assert!(kept.iter().all(|i| rest.binary_search(i).is_err()));
        let mut all = [kept, rest].concat();
        all.sort_unstable();
        assert_eq!(all, (0..n).collect::<Vec<_>>());
    }

    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache").display().to_string();
    let yaml = base_yaml(dir.path())
        + "  oracle: {kind: train, objective: sft, inputs: {model: llama, data: tokens}, lr: 0, data_fraction: 0.5}
  judge: {kind: train, objective: reward, inputs: {model: llama, data: tokens}, lr: 0, data_fraction: 0.5, data_complement: true}
";
    let p = pipeline(dir.path(), &yaml);
    let r = sepo(&["run", &p, "-q", "--cache", &cache]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let pairs = |stage: &str| {
        let m: Value = serde_json::from_slice(
            &std::fs::read(artifact(&p, stage, &cache).join("manifest.json")).unwrap(),
        )
        .unwrap();
        m["stats"]["pairs"].as_u64().unwrap()
    };
    assert_eq!((pairs("oracle"), pairs("judge")), (3, 3));

    // `data_complement: false` spelled out hashes like leaving it out.
    let hash = |yaml: &str| {
        let p = pipeline(dir.path(), yaml);
        status_json(&p, &["--cache", &cache])
            .into_iter()
            .find(|s| s["stage"] == "oracle")
            .unwrap()["hash"]
            .clone()
    };
    let spelled = yaml.replace(
        "data_fraction: 0.5}",
        "data_fraction: 0.5, data_complement: false}",
    );
    assert_ne!(spelled, yaml);
    assert_eq!(hash(&yaml), hash(&spelled));

    let bad = yaml.replace("data_fraction: 0.5, data_complement", "data_complement");
    let p = pipeline(dir.path(), &bad);
    let r = sepo(&["run", &p, "-q", "--cache", &cache]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("data_complement"), "{}", r.stderr);
}
