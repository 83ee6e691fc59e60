//! `train`: SFT, DPO, IPO, SimPO or SePO from a model artifact. Writes `model/` (a Hugging Face
//! folder), `metrics.parquet` and `loss.png`. Resumes from `<cache>/tmp/<hash>/ckpt/` when
//! `checkpoint_every` is set and a previous run was killed.

use anyhow::Result;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{
    BuildContext, Role, RunContext, Stage, StageKind, params_schema, parse_config, to_params,
};
use crate::artifacts::model::{LOSS_PLOT, METRICS_FILE, check_same_vocabulary};
use crate::artifacts::{ModelDir, Tokens};
use crate::data::parquet as pq;
use crate::error::user;
use crate::logprobs::ensure;
use crate::train::trainer::{self, Example, Objective, StepMetrics, TrainSpec};
use crate::user_bail;

pub static KIND: StageKind = StageKind {
    kind: "train",
    version: "1",
    roles: &[
        Role {
            name: "model",
            required: true,
            many: false,
            kinds: &["model", "train"],
        },
        Role {
            name: "reference",
            required: false,
            many: false,
            kinds: &["model", "train"],
        },
        Role {
            name: "data",
            required: true,
            many: false,
            kinds: &["tokenize", "select"],
        },
    ],
    uses_device: true,
    build,
    params_schema: params_schema::<TrainConfig>,
};

/// `train`: SFT, DPO, IPO, SimPO or SePO from a model artifact, with AdamW, linear warm-up
/// then cosine decay of the learning rate, and global-norm gradient clipping.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// sft: next-token loss on the chosen responses; dpo, ipo: preference losses against the
    /// `reference` input; simpo: reference-free, length-normalized; sepo: reference-free, on the
    /// key tokens of a `select` stage given as `data`.
    pub objective: Objective,
    /// Peak learning rate (reached after the warm-up), >= 0.
    #[serde(default = "d_lr")]
    #[schemars(range(min = 0))]
    pub lr: f64,
    /// Passes over the training data, at least 1.
    #[serde(default = "d_one")]
    #[schemars(range(min = 1))]
    pub epochs: usize,
    /// Pairs (or SFT examples) per micro-batch, at least 1.
    #[serde(default = "d_batch")]
    #[schemars(range(min = 1))]
    pub batch_size: usize,
    /// Micro-batches per optimizer step, at least 1.
    #[serde(default = "d_one")]
    #[schemars(range(min = 1))]
    pub grad_accum: usize,
    /// Share of the optimizer steps spent warming the learning rate up from 0, in [0, 1].
    #[serde(default = "d_warmup")]
    #[schemars(range(min = 0, max = 1))]
    pub warmup_ratio: f64,
    /// AdamW's decoupled weight decay.
    #[serde(default)]
    pub weight_decay: f64,
    /// Global gradient-norm clip (0: measure only).
    #[serde(default = "d_clip")]
    pub max_grad_norm: f64,
    /// DPO/IPO/SimPO beta (must be > 0 for them); IPO's tau.
    #[serde(default = "d_beta")]
    pub beta: f64,
    /// SePO's gamma: the scale of the key-token log-probability averages.
    #[serde(default = "d_gamma")]
    pub gamma: f64,
    /// SePO's margin, SimPO's gamma: subtracted inside the sigmoid.
    #[serde(default)]
    pub margin: f64,
    /// cDPO label smoothing: the assumed share of flipped preference labels, in [0, 0.5).
    #[serde(default)]
    #[schemars(range(min = 0), extend("exclusiveMaximum" = 0.5))]
    pub label_smoothing: f64,
    /// Train on a seeded random subset of this fraction of the train split, in (0, 1].
    #[serde(default = "d_fraction")]
    #[schemars(range(max = 1), extend("exclusiveMinimum" = 0))]
    pub data_fraction: f64,
    /// Shuffle the examples (seeded) every epoch.
    #[serde(default = "d_true")]
    pub shuffle: bool,
    /// Batch pairs of similar length (less padding).
    #[serde(default = "d_true")]
    pub group_by_length: bool,
    /// Seed of shuffling and `data_fraction`'s subset (default: the pipeline's seed).
    #[serde(default)]
    pub seed: Option<u64>,
    /// Keep a resumable checkpoint every N optimizer steps (0: none).
    #[serde(default)]
    pub checkpoint_every: usize,
}

fn d_lr() -> f64 {
    5e-4
}
fn d_one() -> usize {
    1
}
fn d_batch() -> usize {
    8
}
fn d_warmup() -> f64 {
    0.1
}
fn d_clip() -> f64 {
    1.0
}
fn d_beta() -> f64 {
    0.1
}
fn d_gamma() -> f64 {
    1.0
}
fn d_fraction() -> f64 {
    1.0
}
fn d_true() -> bool {
    true
}

struct Train {
    cfg: TrainConfig,
}

fn build(params: &Value, ctx: &BuildContext) -> Result<Box<dyn Stage>> {
    let mut cfg: TrainConfig = parse_config(params)?;
    cfg.seed = Some(cfg.seed.unwrap_or(ctx.pipeline_seed));
    let obj = cfg.objective.name();
    if cfg.batch_size == 0 {
        user_bail!("`batch_size` must be at least 1");
    }
    if cfg.grad_accum == 0 {
        user_bail!("`grad_accum` must be at least 1");
    }
    if cfg.epochs == 0 {
        user_bail!("`epochs` must be at least 1");
    }
    if !(cfg.data_fraction > 0.0 && cfg.data_fraction <= 1.0) {
        user_bail!(
            "`data_fraction` must be in (0, 1], got {}",
            cfg.data_fraction
        );
    }
    if !(cfg.lr >= 0.0 && cfg.lr.is_finite()) {
        user_bail!("`lr` must be a non-negative number, got {}", cfg.lr);
    }
    if !(0.0..=1.0).contains(&cfg.warmup_ratio) {
        user_bail!("`warmup_ratio` must be in [0, 1], got {}", cfg.warmup_ratio);
    }
    if !(0.0..0.5).contains(&cfg.label_smoothing) {
        user_bail!(
            "`label_smoothing` must be in [0, 0.5), got {}",
            cfg.label_smoothing
        );
    }
    if cfg.beta <= 0.0
        && matches!(
            cfg.objective,
            Objective::Dpo | Objective::Ipo | Objective::Simpo
        )
    {
        user_bail!("`beta` must be positive for {obj}, got {}", cfg.beta);
    }
    let has_ref = ctx.roles.iter().any(|r| r == "reference");
    if cfg.objective.needs_reference() && !has_ref {
        user_bail!("objective `{obj}` needs `inputs: {{reference: <model stage>}}`");
    }
    if !cfg.objective.needs_reference() && has_ref {
        user_bail!("objective `{obj}` uses no reference model: remove `inputs.reference`");
    }
    match (cfg.objective, ctx.role_kind("data")) {
        (Objective::Sepo, Some(k)) if k != "select" => {
            user_bail!(
                "objective `sepo` trains on key tokens: `inputs.data` must be a select stage, not a `{k}` stage"
            )
        }
        _ => {}
    }
    Ok(Box::new(Train { cfg }))
}

impl Train {
    fn spec(&self) -> TrainSpec {
        let c = &self.cfg;
        TrainSpec {
            objective: c.objective,
            lr: c.lr,
            epochs: c.epochs,
            batch_size: c.batch_size,
            grad_accum: c.grad_accum,
            warmup_ratio: c.warmup_ratio,
            weight_decay: c.weight_decay,
            max_grad_norm: c.max_grad_norm,
            beta: c.beta,
            gamma: c.gamma,
            margin: c.margin,
            label_smoothing: c.label_smoothing,
            shuffle: c.shuffle,
            group_by_length: c.group_by_length,
            seed: c.seed.unwrap_or(0),
            checkpoint_every: c.checkpoint_every,
        }
    }
}

/// The rows of the train split kept by `data_fraction` (a seeded subset, file order kept).
pub fn subset(n: usize, fraction: f64, seed: u64) -> Vec<usize> {
    use rand::SeedableRng;
    use rand::seq::SliceRandom;
    if fraction >= 1.0 {
        return (0..n).collect();
    }
    let k = ((fraction * n as f64).ceil() as usize).clamp(1, n.max(1));
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed ^ 0x5e90_da7a));
    idx.truncate(k);
    idx.sort_unstable();
    idx
}

impl Stage for Train {
    fn params(&self) -> Value {
        to_params(&self.cfg)
    }

    fn run(&self, ctx: &RunContext) -> Result<Value> {
        let spec = self.spec();
        let model_in = ctx.input("model")?;
        let data = ctx.input("data")?;
        let tokens = Tokens::open(data)?;
        let path = tokens.path();
        let rows = tokens.rows()?;
        let (masks_c, masks_r) = if spec.objective == Objective::Sepo {
            let Some((c, r)) = tokens.masks()? else {
                user_bail!(
                    "objective `sepo` needs key-token masks: {} has no `chosen_mask`",
                    path.display()
                );
            };
            (Some(c), Some(r))
        } else {
            (None, None)
        };
        let (ref_c, ref_r) = match ctx.input_opt("reference") {
            Some(reference) => {
                check_same_vocabulary(model_in, reference)?;
                let lp = ensure(ctx, reference, data, "reference")?;
                (lp.chosen_sums(), lp.rejected_sums())
            }
            None => (vec![0.0; rows.len()], vec![0.0; rows.len()]),
        };
        let train_idx: Vec<usize> = (0..rows.len())
            .filter(|&i| rows[i].split == "train")
            .collect();
        if train_idx.is_empty() {
            user_bail!("{} has no train rows", path.display());
        }
        let keep = subset(train_idx.len(), self.cfg.data_fraction, spec.seed);
        let examples: Vec<Example> = keep
            .iter()
            .map(|&k| {
                let i = train_idx[k];
                let r = &rows[i];
                Example {
                    prompt: r.prompt_ids.clone(),
                    chosen: r.chosen_ids.clone(),
                    rejected: r.rejected_ids.clone(),
                    chosen_mask: masks_c.as_ref().map(|m| m[i].clone()),
                    rejected_mask: masks_r.as_ref().map(|m| m[i].clone()),
                    ref_chosen: ref_c[i],
                    ref_rejected: ref_r[i],
                }
            })
            .collect();
        if let Some(e) = examples.iter().find(|e| e.prompt.is_empty()) {
            let _ = e;
            user_bail!("{}: a row has an empty prompt", path.display());
        }
        let device = crate::device::parse_device(ctx.device).map_err(|e| user(e.to_string()))?;
        let model = ModelDir::of(model_in).load(&device.clone().autodiff())?;
        let vocab = model.vocab_size();
        if let Some(bad) = examples
            .iter()
            .flat_map(|e| e.prompt.iter().chain(&e.chosen).chain(&e.rejected))
            .find(|&&t| t as usize >= vocab)
        {
            user_bail!(
                "token id {bad} in {} is outside the model's vocabulary of {vocab}: tokenize with the model's tokenizer",
                path.display()
            );
        }
        ctx.progress.log(format!(
            "         {}: {} on {} pairs, {} epoch(s), batch {}x{}, lr {}",
            ctx.stage,
            spec.objective.name(),
            examples.len(),
            spec.epochs,
            spec.batch_size,
            spec.grad_accum,
            spec.lr
        ));
        let ckpt = ctx.work.join("ckpt");
        let (model, metrics) = trainer::train(
            model,
            &examples,
            &spec,
            &ckpt,
            &device.clone().autodiff(),
            ctx.progress,
            ctx.stage,
        )?;
        let out = ModelDir::in_artifact(ctx.out);
        out.save(&model)?;
        ModelDir::of(model_in).copy_tokenizer_to(&out)?;
        write_metrics(&metrics, &ctx.out.join(METRICS_FILE))?;
        crate::train::plot::loss_png(
            &metrics,
            &format!("{} ({})", ctx.stage, spec.objective.name()),
            &ctx.out.join(LOSS_PLOT),
        )?;
        let last = metrics.last().cloned().unwrap_or_default();
        Ok(json!({
            "pairs": examples.len(),
            "steps": metrics.len(),
            "final_loss": last.loss,
            "tokens": metrics.iter().map(|m| m.tokens).sum::<u64>(),
            "final_reward_accuracy": last.reward_accuracy,
        }))
    }
}

pub fn write_metrics(metrics: &[StepMetrics], path: &std::path::Path) -> Result<()> {
    use polars::prelude::Column;
    let col_f = |name: &str, f: &dyn Fn(&StepMetrics) -> f64| {
        Column::new(name.into(), metrics.iter().map(f).collect::<Vec<f64>>())
    };
    let col_o = |name: &str, f: &dyn Fn(&StepMetrics) -> Option<f64>| {
        Column::new(
            name.into(),
            metrics.iter().map(f).collect::<Vec<Option<f64>>>(),
        )
    };
    let mut cols = vec![
        Column::new(
            "step".into(),
            metrics.iter().map(|m| m.step as i64).collect::<Vec<i64>>(),
        ),
        col_f("epoch", &|m| m.epoch),
        col_f("loss", &|m| m.loss),
        col_f("lr", &|m| m.lr),
        col_f("grad_norm", &|m| m.grad_norm),
        Column::new(
            "tokens".into(),
            metrics
                .iter()
                .map(|m| m.tokens as i64)
                .collect::<Vec<i64>>(),
        ),
        col_f("elapsed_s", &|m| m.elapsed_s),
    ];
    if metrics.first().is_some_and(|m| m.reward_margin.is_some()) {
        cols.push(col_o("logps_chosen", &|m| m.logps_chosen));
        cols.push(col_o("logps_rejected", &|m| m.logps_rejected));
        cols.push(col_o("reward_chosen", &|m| m.reward_chosen));
        cols.push(col_o("reward_rejected", &|m| m.reward_rejected));
        cols.push(col_o("reward_margin", &|m| m.reward_margin));
        cols.push(col_o("reward_accuracy", &|m| m.reward_accuracy));
    }
    let mut df = pq::frame(cols)?;
    pq::write(&mut df, path)
}
