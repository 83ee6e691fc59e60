//! `gradient_checkpointing: true` trades compute for memory and nothing else: the same pipeline
//! trained with and without it writes the same weights and the same metrics, byte for byte.

mod common;

use common::{artifact_dir, pipeline, sepo};

#[test]
fn checkpointing_changes_no_number() {
    let y = format!(
        "{}  plain: {{kind: train, objective: dpo, inputs: {{model: llama, reference: llama, data: tokens}}, lr: 1e-2, batch_size: 1, epochs: 2}}
  recomputed: {{kind: train, objective: dpo, inputs: {{model: llama, reference: llama, data: tokens}}, lr: 1e-2, batch_size: 1, epochs: 2, gradient_checkpointing: true}}
",
        common::tiny_scored_head()
    );
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(dir.path(), &y);
    let r = sepo(&["run", &p]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let (a, b) = (artifact_dir(&p, "plain"), artifact_dir(&p, "recomputed"));
    assert_ne!(
        a, b,
        "two artifacts: the option is part of the stage's hash"
    );
    let weights =
        |dir: &std::path::Path| std::fs::read(dir.join("model/model.safetensors")).unwrap();
    assert!(weights(&a) == weights(&b), "the weights differ");
    // metrics.parquet's elapsed_s differs run to run: the losses and gradient norms must not.
    let column = |dir: &std::path::Path, col: &str| -> Vec<f64> {
        let df = sepo::data::parquet::read(&dir.join("metrics.parquet")).unwrap();
        df.column(col)
            .unwrap()
            .f64()
            .unwrap()
            .into_no_null_iter()
            .collect()
    };
    for col in ["loss", "grad_norm", "reward_margin"] {
        assert_eq!(column(&a, col), column(&b, col), "{col}");
    }
    assert!(
        column(&a, "loss").len() >= 2,
        "several steps: the updates are compared too"
    );
}
