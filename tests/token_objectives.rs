//! `mode: weights` and the objectives that read token weights (`sepo`, `wdpo`), plus `rrhf` and
//! `ipo_average: false`, through the `train` stage, on the tiny test models: tiny-llama is both
//! the oracle and (at lr 0) the policy, tiny-mistral the reference. At lr 0 the policy's token
//! log-ratios against the reference are exactly the score stage's scores, so the first step's
//! loss can be recomputed here from `selection.parquet` alone: the trainer's wiring (weights,
//! weighted reference sums, sums vs averages) is checked against the formulas, which
//! `src/train/objectives/tests.rs` checks against float64 PyTorch.

mod common;

use common::{artifact_dir, pipeline, sepo};
use sepo::data::parquet as pq;

fn yaml() -> String {
    let one_batch = "lr: 0, batch_size: 8, shuffle: false, group_by_length: false";
    format!(
        "{head}  all: {{kind: select, inputs: {{scores: scores}}, mode: all}}
  top: {{kind: select, inputs: {{scores: scores}}, chosen_ratio: 0.4, rejected_ratio: 0.2}}
  weights: {{kind: select, inputs: {{scores: scores}}, mode: weights, mu: 2, weight_clip: [0.25, 3]}}
  flat: {{kind: select, inputs: {{scores: scores}}, mode: weights, mu: 0}}
  dpo: {{kind: train, objective: dpo, inputs: {{model: llama, reference: mistral, data: tokens}}, beta: 0.5, {one_batch}}}
  wdpo_all: {{kind: train, objective: wdpo, inputs: {{model: llama, reference: mistral, data: all}}, beta: 0.5, {one_batch}}}
  wdpo_top: {{kind: train, objective: wdpo, inputs: {{model: llama, reference: mistral, data: top}}, beta: 0.5, {one_batch}}}
  wdpo_w: {{kind: train, objective: wdpo, inputs: {{model: llama, reference: mistral, data: weights}}, beta: 0.5, label_smoothing: 0.1, {one_batch}}}
  sepo_flat: {{kind: train, objective: sepo, inputs: {{model: llama, data: flat}}, {one_batch}}}
  sepo_all: {{kind: train, objective: sepo, inputs: {{model: llama, data: all}}, {one_batch}}}
  sepo_w: {{kind: train, objective: sepo, inputs: {{model: llama, data: weights}}, {one_batch}}}
  ipo_sum: {{kind: train, objective: ipo, ipo_average: false, inputs: {{model: llama, reference: mistral, data: tokens}}, beta: 0.5, {one_batch}}}
  ipo_avg: {{kind: train, objective: ipo, inputs: {{model: llama, reference: mistral, data: tokens}}, beta: 0.5, {one_batch}}}
  rrhf0: {{kind: train, objective: rrhf, rrhf_weight: 0, inputs: {{model: llama, data: tokens}}, {one_batch}}}
  rrhf1: {{kind: train, objective: rrhf, inputs: {{model: llama, data: tokens}}, {one_batch}}}
  simpo: {{kind: train, objective: simpo, inputs: {{model: llama, data: tokens}}, beta: 1, margin: 0, {one_batch}}}
",
        head = common::tiny_scored_head(),
    )
}

type Lists<T> = Vec<Vec<T>>;

/// A select stage's train rows: (scores, masks, weights) of the chosen and rejected answers.
struct Sel {
    sc: Lists<f32>,
    sr: Lists<f32>,
    mc: Lists<bool>,
    mr: Lists<bool>,
    w: Option<(Lists<f32>, Lists<f32>)>,
}

fn selection(p: &str, stage: &str) -> Sel {
    let file = artifact_dir(p, stage).join("selection.parquet");
    let df = pq::read(&file).unwrap();
    let rd = pq::Reader {
        df: &df,
        file: &file,
    };
    let train: Vec<bool> = rd
        .strings("split")
        .unwrap()
        .iter()
        .map(|s| s == "train")
        .collect();
    fn keep<T: Clone>(v: Lists<T>, train: &[bool]) -> Lists<T> {
        v.into_iter()
            .zip(train)
            .filter(|x| *x.1)
            .map(|x| x.0)
            .collect()
    }
    Sel {
        sc: keep(rd.f32_lists("chosen_scores").unwrap(), &train),
        sr: keep(rd.f32_lists("rejected_scores").unwrap(), &train),
        mc: keep(rd.bool_lists("chosen_mask").unwrap(), &train),
        mr: keep(rd.bool_lists("rejected_mask").unwrap(), &train),
        w: rd.has("chosen_weights").then(|| {
            (
                keep(rd.f32_lists("chosen_weights").unwrap(), &train),
                keep(rd.f32_lists("rejected_weights").unwrap(), &train),
            )
        }),
    }
}

/// The first step's value of a metrics column.
fn first(p: &str, stage: &str, col: &str) -> f64 {
    let file = artifact_dir(p, stage).join("metrics.parquet");
    let df = pq::read(&file).unwrap();
    df.column(col).unwrap().f64().unwrap().get(0).unwrap()
}

fn log_sigmoid(x: f64) -> f64 {
    -(1.0 + (-x).exp()).ln()
}

/// Per pair, sum_t w_t * s_t of one side, with `w` the mask times the weights (1 without).
fn weighted(scores: &Lists<f32>, mask: &Lists<bool>, w: Option<&Lists<f32>>) -> Vec<f64> {
    (0..scores.len())
        .map(|i| {
            (0..scores[i].len())
                .map(|t| {
                    let on = if mask[i][t] { 1.0 } else { 0.0 };
                    let wt = w.map_or(1.0, |w| f64::from(w[i][t]));
                    on * wt * f64::from(scores[i][t])
                })
                .sum()
        })
        .collect()
}

#[track_caller]
fn close(what: &str, got: f64, want: f64) {
    assert!(
        (got - want).abs() <= 1e-5 * want.abs().max(1.0),
        "{what}: got {got}, want {want}"
    );
}

#[test]
fn token_weighted_objectives_through_the_trainer() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(dir.path(), &yaml());
    let r = sepo(&["run", &p]);
    assert_eq!(r.code, 0, "{}", r.stderr);

    // mode: weights stores clamp(exp(mu s)) (chosen) and clamp(exp(-mu s)) (rejected) for
    // every token, and selects every token.
    let w = selection(&p, "weights");
    let (wc, wr) = w.w.as_ref().expect("weights columns");
    assert!(!w.sc.is_empty());
    for i in 0..w.sc.len() {
        assert!(w.mc[i].iter().all(|b| *b) && w.mr[i].iter().all(|b| *b));
        for (t, s) in w.sc[i].iter().enumerate() {
            let want = (2.0 * f64::from(*s)).exp().clamp(0.25, 3.0);
            close("chosen weight", f64::from(wc[i][t]), want);
        }
        for (t, s) in w.sr[i].iter().enumerate() {
            let want = (-2.0 * f64::from(*s)).exp().clamp(0.25, 3.0);
            close("rejected weight", f64::from(wr[i][t]), want);
        }
    }
    let mean = |v: Vec<f64>| v.iter().sum::<f64>() / v.len() as f64;

    // wdpo = DPO on weighted sums of the log-ratios (the scores, at lr 0): on `all` it is DPO.
    close(
        "wdpo on all vs dpo",
        first(&p, "wdpo_all", "loss"),
        first(&p, "dpo", "loss"),
    );
    let beta = 0.5;
    for (stage, sel, ls) in [("wdpo_top", "top", 0.0), ("wdpo_w", "weights", 0.1)] {
        let s = selection(&p, sel);
        let ws = s.w.as_ref();
        let c = weighted(&s.sc, &s.mc, ws.map(|w| &w.0));
        let r = weighted(&s.sr, &s.mr, ws.map(|w| &w.1));
        let want = mean(
            c.iter()
                .zip(&r)
                .map(|(c, r)| {
                    let z = beta * (c - r);
                    -(1.0 - ls) * log_sigmoid(z) - ls * log_sigmoid(-z)
                })
                .collect(),
        );
        close(stage, first(&p, stage, "loss"), want);
        close(
            &format!("{stage} reward_chosen"),
            first(&p, stage, "reward_chosen"),
            beta * mean(c.clone()),
        );
    }
    assert!(
        (first(&p, "wdpo_top", "loss") - first(&p, "dpo", "loss")).abs() > 1e-4,
        "key tokens only must change DPO's loss"
    );

    // SePO with weights: all weights 1 (mu 0) is SePO on every token; real weights change it.
    close(
        "sepo mu 0 vs all",
        first(&p, "sepo_flat", "loss"),
        first(&p, "sepo_all", "loss"),
    );
    assert!((first(&p, "sepo_w", "loss") - first(&p, "sepo_all", "loss")).abs() > 1e-5);

    // IPO on sums (OpenRLHF): logits are the summed log-ratios, i.e. the reward sums.
    let all = selection(&p, "all");
    let c = weighted(&all.sc, &all.mc, None);
    let r = weighted(&all.sr, &all.mr, None);
    let want = mean(
        c.iter()
            .zip(&r)
            .map(|(c, r)| (c - r - 1.0 / (2.0 * beta)).powi(2))
            .collect(),
    );
    close("ipo_average: false", first(&p, "ipo_sum", "loss"), want);
    assert!(
        (first(&p, "ipo_avg", "loss") - want).abs() > 1e-3,
        "the averaged IPO differs"
    );

    // RRHF: rewards are the mean token log-probs (SimPO's at beta 1); weight 0 leaves the
    // chosen answers' mean NLL; the hinge only adds.
    let simpo_c = first(&p, "simpo", "reward_chosen");
    close(
        "rrhf reward_chosen",
        first(&p, "rrhf1", "reward_chosen"),
        simpo_c,
    );
    close("rrhf0 loss", first(&p, "rrhf0", "loss"), -simpo_c);
    let gap = first(&p, "simpo", "reward_rejected") - simpo_c;
    let added = first(&p, "rrhf1", "loss") - first(&p, "rrhf0", "loss");
    assert!(
        added >= gap.max(0.0) - 1e-6,
        "hinge {added} vs mean gap {gap}"
    );
}

#[test]
fn weight_objectives_refuse_what_they_cannot_use() {
    let dir = tempfile::tempdir().unwrap();
    for (from, to, says) in [
        (
            "data: all}, beta: 0.5",
            "data: tokens}, beta: 0.5",
            "must be a select stage",
        ),
        (
            "objective: rrhf, rrhf_weight: 0",
            "objective: simpo, rrhf_weight: 0",
            "`rrhf` only",
        ),
        (
            "objective: ipo, ipo_average: false",
            "objective: dpo, ipo_average: false",
            "`ipo` only",
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

/// A model whose tokenizer has the data's vocabulary size but not its tokens (two ids swapped)
/// is refused by `train` and `score` before any work, naming both sides; the size check alone
/// would let it train on ids that mean other tokens.
#[test]
fn a_model_with_another_tokenizer_of_the_same_size_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other-llama");
    std::fs::create_dir(&other).unwrap();
    let src = common::repo().join("tests/fixtures/hf/tiny-llama");
    for f in ["config.json", "model.safetensors", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), other.join(f)).unwrap();
    }
    let tok = std::fs::read_to_string(src.join("tokenizer.json")).unwrap();
    let swapped = tok
        .replace("\"<0x61>\": 100", "\"<0x61>\": 999")
        .replace("\"<0x62>\": 101", "\"<0x61>\": 101")
        .replace("\"<0x61>\": 999", "\"<0x62>\": 100");
    assert_ne!(swapped, tok, "the swap applies");
    std::fs::write(other.join("tokenizer.json"), swapped).unwrap();
    let y = format!(
        "{}  other: {{kind: model, from: {}}}
  sft_other: {{kind: train, objective: sft, inputs: {{model: other, data: tokens}}, lr: 0}}
  scores_other: {{kind: score, inputs: {{oracle: other, reference: other, data: tokens}}}}
",
        yaml(),
        other.display()
    );
    let p = pipeline(dir.path(), &y);
    for stage in ["sft_other", "scores_other"] {
        let r = sepo(&["run", &p, "--stage", stage]);
        assert_eq!(r.code, 2, "{stage}: {}", r.stderr);
        assert!(
            r.stderr
                .contains("`other`'s tokenizer.json differs from the tokenizer `tok`"),
            "{stage}: {}",
            r.stderr
        );
    }
    // The same model folder with the data's own tokenizer trains.
    std::fs::copy(src.join("tokenizer.json"), other.join("tokenizer.json")).unwrap();
    let r = sepo(&["run", &p, "--stage", "sft_other"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}
