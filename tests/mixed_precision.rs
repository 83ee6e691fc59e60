//! `precision: bf16` on `train`, `score` and `evaluate`, end to end on the tiny test models: the
//! runs complete, the numbers move by bf16 rounding and no more, the saved weights stay f32, the
//! low-precision log-probs are cached apart from the f32 ones, and `precision: f32` is the same
//! stage as leaving it out. The numerics themselves are checked against transformers under
//! `torch.autocast` in `src/model/precision.rs`.

mod common;

use std::path::Path;

use common::{artifact_dir, data, pipeline, sepo};

fn column_f64(dir: &Path, file: &str, col: &str) -> Vec<f64> {
    let df = sepo::data::parquet::read(&dir.join(file)).unwrap();
    let c = df.column(col).unwrap();
    let c = c.cast(&polars::prelude::DataType::Float64).unwrap();
    c.f64().unwrap().into_no_null_iter().collect()
}

fn reader_of<T>(path: &Path, f: impl Fn(&sepo::data::parquet::Reader) -> T) -> T {
    let df = sepo::data::parquet::read(path).unwrap();
    f(&sepo::data::parquet::Reader {
        df: &df,
        file: path,
    })
}

fn token_scores(dir: &Path) -> Vec<f64> {
    reader_of(&dir.join("scores.parquet"), |rd| {
        let mut out = Vec::new();
        for col in ["chosen_scores", "rejected_scores"] {
            for row in rd.f32_lists(col).unwrap() {
                out.extend(row.into_iter().map(f64::from));
            }
        }
        out
    })
}

#[test]
fn bf16_train_score_and_evaluate() {
    let y = format!(
        "{head}  scores16: {{kind: score, inputs: {{oracle: llama, reference: mistral, data: tokens}}, precision: bf16}}
  dpo: {{kind: train, objective: dpo, inputs: {{model: llama, reference: mistral, data: tokens}}, lr: 1e-2, batch_size: 2}}
  dpo_f32: {{kind: train, objective: dpo, inputs: {{model: llama, reference: mistral, data: tokens}}, lr: 1e-2, batch_size: 2, precision: f32}}
  dpo16: {{kind: train, objective: dpo, inputs: {{model: llama, reference: mistral, data: tokens}}, lr: 1e-2, batch_size: 2, precision: bf16}}
  rm: {{kind: model, from: {rm}}}
  eval16: {{kind: evaluate, inputs: {{policies: [dpo16], reference: mistral, data: tokens, judge: rm}}, max_new_tokens: 4, precision: bf16}}
",
        head = common::tiny_scored_head(),
        rm = data("tests/fixtures/hf/tiny-llama-rm"),
    );
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(dir.path(), &y);
    let r = sepo(&["run", &p]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("precision bf16 on"),
        "a CPU run says what bf16 buys there: {}",
        r.stderr
    );

    // `precision: f32` is the default spelled out: the same stage, one artifact.
    assert_eq!(artifact_dir(&p, "dpo"), artifact_dir(&p, "dpo_f32"));

    // Scores: bf16 rounding moves them (so it happened), by a few hundredths at most.
    let (s32, s16) = (
        token_scores(&artifact_dir(&p, "scores")),
        token_scores(&artifact_dir(&p, "scores16")),
    );
    assert_eq!(s32.len(), s16.len());
    let d: Vec<f64> = s32.iter().zip(&s16).map(|(a, b)| (a - b).abs()).collect();
    let (max, mean) = (
        d.iter().copied().fold(0.0, f64::max),
        d.iter().sum::<f64>() / d.len() as f64,
    );
    eprintln!(
        "scores bf16 vs f32: max {max:.4} mean {mean:.4} over {} tokens",
        d.len()
    );
    assert!(mean > 1e-4, "bf16 scores equal the f32 ones: no rounding");
    assert!(
        max < 0.25 && mean < 0.05,
        "bf16 scores too far: max {max}, mean {mean}"
    );

    // Training: same first-step loss up to rounding; master weights saved in f32.
    let (a, b) = (artifact_dir(&p, "dpo"), artifact_dir(&p, "dpo16"));
    let (l32, l16) = (
        column_f64(&a, "metrics.parquet", "loss"),
        column_f64(&b, "metrics.parquet", "loss"),
    );
    eprintln!("dpo losses f32 {l32:?} bf16 {l16:?}");
    assert_eq!(l32.len(), l16.len());
    assert!(l16.iter().all(|l| l.is_finite()));
    assert!(
        l32[0] != l16[0],
        "bf16 first loss equals f32's: no rounding"
    );
    assert!(
        (l32[0] - l16[0]).abs() < 0.02,
        "first loss {} vs {}",
        l16[0],
        l32[0]
    );
    let dtypes: Vec<String> = common::raw_tensors(&b.join("model/model.safetensors"))
        .into_values()
        .map(|(dtype, _, _)| dtype)
        .collect();
    assert!(
        !dtypes.is_empty() && dtypes.iter().all(|d| d == "F32"),
        "{dtypes:?}"
    );

    // The bf16 evaluate ran its log-prob metrics, answers and judge.
    let report = artifact_dir(&p, "eval16");
    let metrics = reader_of(&report.join("report.parquet"), |rd| {
        rd.strings("metric").unwrap()
    });
    for m in [
        "reward_accuracy",
        "win_rate_vs_reference",
        "response_length_mean",
    ] {
        assert!(metrics.iter().any(|x| x == m), "{m} missing: {metrics:?}");
    }

    // A precision that does not exist is refused before anything runs.
    let bad = pipeline(
        dir.path(),
        &y.replace("precision: bf16}\n  rm", "precision: fp8}\n  rm"),
    );
    let r = sepo(&["run", &bad]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("dpo16") && r.stderr.contains("fp8"),
        "{}",
        r.stderr
    );
}
