//! `train`: SFT, DPO, IPO, SimPO or SePO from a model artifact, or a Bradley-Terry reward model
//! (`reward`). Writes `model/` (a Hugging Face folder), `metrics.parquet` and `loss.svg`.
//! Resumes from `<cache>/tmp/<hash>/ckpt/` when `checkpoint_every` is set and a previous run was
//! killed.

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
use crate::logprobs::ensure;
use crate::model::{CausalLm, Precision, RewardModel};
use crate::train::trainer::{self, Example, Objective, StepMetrics, TrainSpec};
use crate::user_bail;

pub static KIND: StageKind = StageKind {
    kind: "train",
    // 2: the loss plot is `loss.svg` (plotters), not `loss.png`; manifests record loss_tokens.
    version: "2",
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

/// `train`: SFT, DPO, IPO, SimPO or SePO from a model artifact, or a reward model, with AdamW,
/// linear warm-up then cosine decay of the learning rate, and global-norm gradient clipping.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// sft: next-token loss on the chosen responses; dpo, ipo: preference losses against the
    /// `reference` input; simpo: reference-free, length-normalized; sepo: reference-free, on the
    /// key tokens of a `select` stage given as `data`; reward: a Bradley-Terry reward model (TRL's
    /// RewardTrainer, loss -log sigmoid(r_chosen - r_rejected)) saved as a transformers
    /// `*ForSequenceClassification` folder: a seeded score head on a language model `model`, or
    /// more training of a reward model.
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
    /// IPO on per-token averaged log-probs (true, TRL's form) or on their sums (false,
    /// OpenRLHF's, which the paper's IPO numbers used); `ipo` only.
    // Left out of the canonical parameters at its default, so that adding it moved no hash.
    #[serde(default = "d_true", skip_serializing_if = "is_true")]
    #[schemars(extend("default" = true))]
    pub ipo_average: bool,
    /// RRHF's weight on its ranking term (default 1); `rrhf` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = null))]
    pub rrhf_weight: Option<f64>,
    /// cDPO label smoothing: the assumed share of flipped preference labels, in [0, 0.5).
    #[serde(default)]
    #[schemars(range(min = 0), extend("exclusiveMaximum" = 0.5))]
    pub label_smoothing: f64,
    /// Train on a seeded random subset of this fraction of the train split, in (0, 1].
    #[serde(default = "d_fraction")]
    #[schemars(range(max = 1), extend("exclusiveMinimum" = 0))]
    pub data_fraction: f64,
    /// Train on exactly the train rows that `data_fraction` with the same seed leaves out (a
    /// judge that never sees the oracle's rows); needs `data_fraction` < 1.
    // Left out of the canonical parameters when false, so that adding it moved no stage hash.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    #[schemars(extend("default" = false))]
    pub data_complement: bool,
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
    /// Activation (gradient) checkpointing: burn's balanced strategy keeps fewer activations for
    /// the backward pass and recomputes the rest, trading compute for peak memory. The numbers
    /// are the same either way.
    // Left out of the canonical parameters when false, so that adding it moved no hash.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    #[schemars(extend("default" = false))]
    pub gradient_checkpointing: bool,
    /// Precision of the matrix products: `f32`, or mixed `bf16`/`f16` (what `torch.autocast`
    /// gives: f32 master weights and AdamW state, f32 norms, softmax and loss; the reference's
    /// log-probs are computed in the same precision). Fast on CUDA; on CPU it only rounds like
    /// the hardware formats would. The saved weights are f32 either way.
    // Left out of the canonical parameters at f32, so that adding it moved no hash.
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    #[schemars(extend("default" = "f32"))]
    pub precision: Precision,
    /// How `model/model.safetensors` stores the trained weights: `f32` (default), or `bf16`/`f16`
    /// (rounded to nearest even, config.json's `dtype` saying so), as Hugging Face folders of these
    /// models ship: half the bytes to write, hash and read. Loading computes in f32 either way.
    // Left out of the canonical parameters at f32, so that adding it moved no hash.
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    #[schemars(extend("default" = "f32"))]
    pub dtype: Precision,
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
fn is_true(b: &bool) -> bool {
    *b
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
    if cfg.data_complement && cfg.data_fraction >= 1.0 {
        user_bail!(
            "`data_complement: true` trains on the rows `data_fraction` leaves out, and \
             `data_fraction: 1` leaves none: lower `data_fraction`"
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
            Objective::Dpo | Objective::Ipo | Objective::Simpo | Objective::Wdpo
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
        (o, Some(k)) if o.needs_selection() && k != "select" => {
            user_bail!(
                "objective `{obj}` trains on key tokens: `inputs.data` must be a select stage, not a `{k}` stage"
            )
        }
        _ => {}
    }
    if !cfg.ipo_average && cfg.objective != Objective::Ipo {
        user_bail!("`ipo_average` applies to objective `ipo` only, not `{obj}`");
    }
    match (cfg.objective, cfg.rrhf_weight) {
        (Objective::Rrhf, _) => {
            let w = *cfg.rrhf_weight.get_or_insert(1.0);
            if !(w >= 0.0 && w.is_finite()) {
                user_bail!("`rrhf_weight` must be a non-negative number, got {w}");
            }
        }
        (_, Some(_)) => user_bail!("`rrhf_weight` applies to objective `rrhf` only, not `{obj}`"),
        (_, None) => {}
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
            ipo_average: c.ipo_average,
            rrhf_weight: c.rrhf_weight.unwrap_or(1.0),
            shuffle: c.shuffle,
            group_by_length: c.group_by_length,
            seed: c.seed.unwrap_or(0),
            checkpoint_every: c.checkpoint_every,
        }
    }
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
        // Per-token weights of `sepo` and `wdpo`: the key-token mask as 0/1, times the weights
        // of `mode: weights`.
        let weights = if spec.objective.needs_selection() {
            let Some((mc, mr)) = tokens.masks()? else {
                user_bail!(
                    "objective `{}` needs key-token masks: {} has no `chosen_mask`",
                    spec.objective.name(),
                    path.display()
                );
            };
            let (wc, wr) = tokens.weights()?.unwrap_or_else(|| {
                let ones = |m: &[Vec<bool>]| m.iter().map(|v| vec![1.0; v.len()]).collect();
                (ones(&mc), ones(&mr))
            });
            let times = |m: &[Vec<bool>], w: Vec<Vec<f32>>| -> Vec<Vec<f32>> {
                m.iter()
                    .zip(w)
                    .map(|(m, w)| {
                        m.iter()
                            .zip(w)
                            .map(|(&on, w)| if on { w } else { 0.0 })
                            .collect()
                    })
                    .collect()
            };
            Some((times(&mc, wc), times(&mr, wr)))
        } else {
            None
        };
        crate::artifacts::model::check_tokenizer_matches(ctx, model_in, data)?;
        let (ref_c, ref_r) = match ctx.input_opt("reference") {
            Some(reference) => {
                check_same_vocabulary(model_in, reference)?;
                let lp = ensure(ctx, reference, data, "reference", self.cfg.precision)?;
                match (&weights, spec.objective) {
                    // `wdpo` compares weighted sums: the reference's are weighted alike.
                    (Some((wc, wr)), Objective::Wdpo) => {
                        let dot = |lp: &[Vec<f32>], w: &[Vec<f32>]| -> Vec<f32> {
                            lp.iter()
                                .zip(w)
                                .map(|(l, w)| l.iter().zip(w).map(|(l, w)| l * w).sum())
                                .collect()
                        };
                        (dot(&lp.chosen, wc), dot(&lp.rejected, wr))
                    }
                    _ => (lp.chosen_sums(), lp.rejected_sums()),
                }
            }
            None => (vec![0.0; rows.len()], vec![0.0; rows.len()]),
        };
        let train_idx: Vec<usize> = (0..rows.len())
            .filter(|&i| rows[i].split == "train")
            .collect();
        if train_idx.is_empty() {
            user_bail!("{} has no train rows", path.display());
        }
        let c = &self.cfg;
        let keep = crate::train::rows::pick_rows(
            train_idx.len(),
            c.data_fraction,
            c.data_complement,
            spec.seed,
        );
        if keep.is_empty() {
            user_bail!(
                "{}: `data_complement` leaves none of its {} train rows (`data_fraction` {} keeps them all)",
                path.display(),
                train_idx.len(),
                c.data_fraction
            );
        }
        let examples: Vec<Example> = keep
            .iter()
            .map(|&k| {
                let i = train_idx[k];
                let r = &rows[i];
                Example {
                    prompt: r.prompt_ids.clone(),
                    chosen: r.chosen_ids.clone(),
                    rejected: r.rejected_ids.clone(),
                    chosen_weights: weights.as_ref().map(|w| w.0[i].clone()),
                    rejected_weights: weights.as_ref().map(|w| w.1[i].clone()),
                    ref_chosen: ref_c[i],
                    ref_rejected: ref_r[i],
                }
            })
            .collect();
        if let Some(e) = examples.iter().find(|e| e.prompt.is_empty()) {
            let _ = e;
            user_bail!("{}: a row has an empty prompt", path.display());
        }
        let precision = self.cfg.precision;
        let device = super::compute_device(ctx, precision)?;
        let train_device = if self.cfg.gradient_checkpointing {
            device.clone().autodiff().gradient_checkpointing()
        } else {
            device.clone().autodiff()
        };
        let model_dir = ModelDir::of(model_in);
        let model = match spec.objective {
            Objective::Reward if model_dir.is_reward_model()? => Trainee::Reward(
                model_dir
                    .load_reward(&train_device)?
                    .with_precision(precision),
            ),
            Objective::Reward => {
                let end_token = if model_dir.has_tokenizer() {
                    model_dir.tokenizer()?.eos()?.map(|(_, id)| id)
                } else {
                    None
                };
                Trainee::Reward(
                    RewardModel::from_causal_lm(
                        model_dir.load(&train_device)?,
                        spec.seed,
                        end_token,
                    )?
                    .with_precision(precision),
                )
            }
            _ => Trainee::Lm(model_dir.load(&train_device)?.with_precision(precision)),
        };
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
        let out = ModelDir::in_artifact(ctx.out);
        let metrics = match model {
            Trainee::Lm(model) => {
                let (model, metrics) = trainer::train(
                    model,
                    &examples,
                    &spec,
                    &ckpt,
                    &train_device,
                    ctx.progress,
                    ctx.stage,
                )?;
                out.save_as(&model, self.cfg.dtype)?;
                metrics
            }
            Trainee::Reward(model) => {
                let (model, metrics) = trainer::train(
                    model,
                    &examples,
                    &spec,
                    &ckpt,
                    &train_device,
                    ctx.progress,
                    ctx.stage,
                )?;
                model.save_as(out.path(), self.cfg.dtype)?;
                metrics
            }
        };
        ModelDir::of(model_in).copy_tokenizer_to(&out)?;
        write_metrics(&metrics, &ctx.out.join(METRICS_FILE))?;
        let losses = metrics.iter().map(|m| (m.step as f64, m.loss)).collect();
        let plot = crate::plot::loss_curves(
            &format!("{} ({})", ctx.stage, spec.objective.name()),
            &[("loss".to_string(), losses)],
        )?;
        std::fs::write(ctx.out.join(LOSS_PLOT), plot)?;
        let last = metrics.last().cloned().unwrap_or_default();
        let (loss_tokens, response_tokens) = loss_token_counts(&examples, spec.objective);
        Ok(json!({
            "pairs": examples.len(),
            "steps": metrics.len(),
            "loss_tokens": loss_tokens * spec.epochs as u64,
            "response_tokens": response_tokens * spec.epochs as u64,
            "final_loss": last.loss,
            "tokens": metrics.iter().map(|m| m.tokens).sum::<u64>(),
            "final_reward_accuracy": last.reward_accuracy,
        }))
    }
}

/// Over one epoch: the response tokens whose log-probs carry the loss (SFT: the chosen answers;
/// SePO and wdpo: the tokens of non-zero weight; the other pairwise objectives: both answers), and the response tokens the
/// objective sees (SFT: the chosen answers; else both). Their ratio is the share of tokens
/// trained on, which `evaluate` reports as the method's cost.
fn loss_token_counts(examples: &[Example], objective: Objective) -> (u64, u64) {
    let mut loss = 0u64;
    let mut seen = 0u64;
    for e in examples {
        let (c, r) = (e.chosen.len() as u64, e.rejected.len() as u64);
        match objective {
            Objective::Sft => {
                loss += c;
                seen += c;
            }
            Objective::Sepo | Objective::Wdpo => {
                let keys = |w: &Option<Vec<f32>>| {
                    w.as_ref()
                        .map_or(0, |w| w.iter().filter(|w| **w != 0.0).count() as u64)
                };
                loss += keys(&e.chosen_weights) + keys(&e.rejected_weights);
                seen += c + r;
            }
            _ => {
                loss += c + r;
                seen += c + r;
            }
        }
    }
    (loss, seen)
}

/// The model a train stage trains: a language model, or a reward model for `objective: reward`.
enum Trainee {
    Lm(CausalLm),
    Reward(RewardModel),
}

impl Trainee {
    fn vocab_size(&self) -> usize {
        match self {
            Trainee::Lm(m) => m.vocab_size(),
            Trainee::Reward(m) => m.vocab_size(),
        }
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
    // A reward model has rewards but no log-probs.
    if metrics.first().is_some_and(|m| m.logps_chosen.is_some()) {
        cols.push(col_o("logps_chosen", &|m| m.logps_chosen));
        cols.push(col_o("logps_rejected", &|m| m.logps_rejected));
    }
    if metrics.first().is_some_and(|m| m.reward_margin.is_some()) {
        cols.push(col_o("reward_chosen", &|m| m.reward_chosen));
        cols.push(col_o("reward_rejected", &|m| m.reward_rejected));
        cols.push(col_o("reward_margin", &|m| m.reward_margin));
        cols.push(col_o("reward_accuracy", &|m| m.reward_accuracy));
    }
    let mut df = pq::frame(cols)?;
    pq::write(&mut df, path)
}
