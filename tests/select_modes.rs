//! The `select` stage's modes end to end, on the tiny test models (tiny-llama as the oracle,
//! tiny-mistral as the reference, the eval fixture's eight pairs): each mode's masks keep what it
//! says, and SePO on `mode: all` is SimPO with beta 1 and margin 0, through the trainer.

mod common;

use common::{artifact_dir, pipeline, sepo};
use sepo::data::parquet as pq;
use serde_json::Value;

/// Every mode (and the one-sided and `skip_first` variants) on the same scores, and the two
/// trainings to compare: one batch holding both train pairs, unshuffled, lr 0.
fn yaml() -> String {
    format!(
        "{}  top: {{kind: select, inputs: {{scores: scores}}, chosen_ratio: 0.4, rejected_ratio: 0.2}}
  random: {{kind: select, inputs: {{scores: scores}}, mode: random, chosen_ratio: 0.4, rejected_ratio: 0.2}}
  bottom: {{kind: select, inputs: {{scores: scores}}, mode: bottom, chosen_ratio: 0.4, rejected_ratio: 0.2}}
  all: {{kind: select, inputs: {{scores: scores}}, mode: all}}
  threshold: {{kind: select, inputs: {{scores: scores}}, mode: threshold, threshold: 0.0}}
  chosen_only: {{kind: select, inputs: {{scores: scores}}, rejected_ratio: 0}}
  skip: {{kind: select, inputs: {{scores: scores}}, skip_first: true, chosen_ratio: 0.4, rejected_ratio: 0.2}}
  sepo_all: {{kind: train, objective: sepo, inputs: {{model: llama, data: all}}, gamma: 1, margin: 0, lr: 0, batch_size: 8, shuffle: false, group_by_length: false}}
  sepo_top: {{kind: train, objective: sepo, inputs: {{model: llama, data: top}}, gamma: 1, margin: 0, lr: 0, batch_size: 8, shuffle: false, group_by_length: false}}
  simpo: {{kind: train, objective: simpo, inputs: {{model: llama, data: tokens}}, beta: 1, margin: 0, lr: 0, batch_size: 8, shuffle: false, group_by_length: false}}
  sepo_one_sided: {{kind: train, objective: sepo, inputs: {{model: llama, data: chosen_only}}, lr: 1e-3, batch_size: 1, shuffle: false}}
",
        common::tiny_scored_head(),
    )
}

type Lists<T> = Vec<Vec<T>>;

/// A select stage's scores and masks: (chosen scores, rejected scores, chosen masks, rejected
/// masks), read from its Parquet file.
fn selection(p: &str, stage: &str) -> (Lists<f32>, Lists<f32>, Lists<bool>, Lists<bool>) {
    let file = artifact_dir(p, stage).join("selection.parquet");
    let df = pq::read(&file).unwrap();
    let rd = pq::Reader {
        df: &df,
        file: &file,
    };
    (
        rd.f32_lists("chosen_scores").unwrap(),
        rd.f32_lists("rejected_scores").unwrap(),
        rd.bool_lists("chosen_mask").unwrap(),
        rd.bool_lists("rejected_mask").unwrap(),
    )
}

fn stats(p: &str, stage: &str) -> Value {
    let m: Value = serde_json::from_slice(
        &std::fs::read(artifact_dir(p, stage).join("manifest.json")).unwrap(),
    )
    .unwrap();
    m["stats"].clone()
}

fn kept(m: &[bool]) -> usize {
    m.iter().filter(|b| **b).count()
}

/// The `col` column of a train stage's metrics.parquet.
fn metric(p: &str, stage: &str, col: &str) -> Vec<f64> {
    let file = artifact_dir(p, stage).join("metrics.parquet");
    let df = pq::read(&file).unwrap();
    df.column(col)
        .unwrap()
        .f64()
        .unwrap()
        .into_no_null_iter()
        .collect()
}

#[test]
fn every_mode_runs_and_keeps_what_it_says() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(dir.path(), &yaml());
    let r = sepo(&["run", &p]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // The log line names the mode.
    assert!(r.stderr.contains("random selection kept"), "{}", r.stderr);

    let (sc, sr, top_c, top_r) = selection(&p, "top");
    let (_, _, rnd_c, rnd_r) = selection(&p, "random");
    let (_, _, bot_c, bot_r) = selection(&p, "bottom");
    let (_, _, all_c, all_r) = selection(&p, "all");
    let (_, _, thr_c, thr_r) = selection(&p, "threshold");
    let (_, _, one_c, one_r) = selection(&p, "chosen_only");
    let (_, _, skip_c, skip_r) = selection(&p, "skip");
    assert_eq!(sc.len(), 8);
    let mut random_differs = false;
    for i in 0..sc.len() {
        let n = |len: usize, ratio: f64| ((ratio * len as f64).floor() as usize).max(1);
        assert_eq!(kept(&top_c[i]), n(sc[i].len(), 0.4), "row {i}");
        assert_eq!(kept(&top_r[i]), n(sr[i].len(), 0.2), "row {i}");
        // The control keeps exactly as many tokens per response, not the same ones.
        assert_eq!(kept(&rnd_c[i]), kept(&top_c[i]), "row {i}");
        assert_eq!(kept(&rnd_r[i]), kept(&top_r[i]), "row {i}");
        random_differs |= rnd_c[i] != top_c[i] || rnd_r[i] != top_r[i];
        // bottom: as many, the chosen answer's lowest-scored (no kept token above a dropped
        // one) and the rejected answer's highest (the same on the negated scores).
        let below = |s: &[f32], m: &[bool]| {
            let kept_max = s
                .iter()
                .zip(m)
                .filter(|x| *x.1)
                .map(|x| *x.0)
                .fold(f32::NEG_INFINITY, f32::max);
            let dropped_min = s
                .iter()
                .zip(m)
                .filter(|x| !*x.1)
                .map(|x| *x.0)
                .fold(f32::INFINITY, f32::min);
            kept_max <= dropped_min
        };
        let neg = |s: &[f32]| s.iter().map(|x| -x).collect::<Vec<_>>();
        assert_eq!(kept(&bot_c[i]), kept(&top_c[i]), "row {i}");
        assert_eq!(kept(&bot_r[i]), kept(&top_r[i]), "row {i}");
        assert!(below(&sc[i], &bot_c[i]), "row {i}");
        assert!(below(&neg(&sr[i]), &bot_r[i]), "row {i}");
        assert!(all_c[i].iter().all(|b| *b) && all_r[i].iter().all(|b| *b));
        assert_eq!(all_c[i].len(), sc[i].len());
        let passes =
            |s: &[f32], keep: fn(f32) -> bool| s.iter().map(|x| keep(*x)).collect::<Vec<_>>();
        assert_eq!(thr_c[i], passes(&sc[i], |x| x >= 0.0), "row {i}");
        assert_eq!(thr_r[i], passes(&sr[i], |x| x <= 0.0), "row {i}");
        assert_eq!(one_c[i], top_c_default(&sc[i]), "row {i}");
        assert_eq!(kept(&one_r[i]), 0, "row {i}");
        assert!(!skip_c[i][0] && !skip_r[i][0], "row {i}");
        assert_eq!(kept(&skip_c[i]), n(sc[i].len() - 1, 0.4), "row {i}");
    }
    assert!(
        random_differs,
        "random chose exactly top's tokens everywhere"
    );

    assert_eq!(stats(&p, "top")["mode"], "top");
    assert_eq!(stats(&p, "threshold")["mode"], "threshold");
    assert_eq!(stats(&p, "chosen_only")["rejected_kept"], 0);

    // SePO on every token with gamma 1 and margin 0 is SimPO with beta 1 and margin 0.
    let sepo_loss = metric(&p, "sepo_all", "loss")[0];
    let simpo_loss = metric(&p, "simpo", "loss")[0];
    assert!(
        (sepo_loss - simpo_loss).abs() <= 1e-6,
        "sepo on `all` {sepo_loss} vs simpo {simpo_loss}"
    );
    // Not equal by accident: the averages differ (the loss is not ln 2), and SePO on `top`'s
    // key tokens gives another loss.
    assert!(
        (sepo_loss - std::f64::consts::LN_2).abs() > 1e-3,
        "{sepo_loss}"
    );
    let sepo_top = metric(&p, "sepo_top", "loss")[0];
    assert!(
        (sepo_top - simpo_loss).abs() > 1e-4,
        "{sepo_top} vs {simpo_loss}"
    );

    // Training on one side only gives finite losses and gradients.
    for col in ["loss", "grad_norm"] {
        let v = metric(&p, "sepo_one_sided", col);
        assert!(
            !v.is_empty() && v.iter().all(|x| x.is_finite()),
            "{col}: {v:?}"
        );
    }
    assert!(metric(&p, "sepo_one_sided", "grad_norm")[0] > 0.0);
}

/// `top` at the default ratio 0.3, as `chosen_only` keeps on its chosen side.
fn top_c_default(s: &[f32]) -> Vec<bool> {
    let n = ((0.3 * s.len() as f64).floor() as usize).max(1);
    let mut order: Vec<usize> = (0..s.len()).collect();
    order.sort_by(|&a, &b| s[b].total_cmp(&s[a]));
    let mut m = vec![false; s.len()];
    for &i in &order[..n] {
        m[i] = true;
    }
    m
}

#[test]
fn meaningless_configurations_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    for (select, says) in [
        ("mode: threshold", "needs `threshold`"),
        ("chosen_ratio: 0, rejected_ratio: 0", "both 0"),
        ("mode: top, seed: 3", "`mode: random` only"),
        ("mode: sideways", "unknown variant"),
        ("mode: weights, weight_clip: [2, 1]", "lo <= hi"),
        ("mode: all, mu: 2", "`mode: weights` only"),
        ("span_overlap: 0.5", "`tokens` input"),
    ] {
        let y = yaml().replace(
            "all: {kind: select, inputs: {scores: scores}, mode: all}",
            &format!("all: {{kind: select, inputs: {{scores: scores}}, {select}}}"),
        );
        assert_ne!(y, yaml(), "the replacement applies");
        let p = pipeline(dir.path(), &y);
        let r = sepo(&["status", &p]);
        assert_eq!(r.code, 2, "{select}: {}", r.stderr);
        assert!(r.stderr.contains(says), "{select}: {}", r.stderr);
    }
}
