//! The training loop: batches, forward passes through [`CausalLm::selected_logprobs`] (logits
//! only at response positions) or a [`RewardModel`]'s scores, the objective, global-norm
//! clipping, AdamW with warm-up + cosine, metrics, and checkpoints from which a killed run
//! resumes to the same bytes.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use super::objectives::{self, PairLoss};
use super::optim::{AdamW, AdamWConfig, ParamGrads, load_module, save_module};
use super::phases::Phases;
use super::schedule::lr_at;
use crate::model::{CausalLm, RewardModel};
use crate::progress::Progress;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    Sft,
    Dpo,
    Ipo,
    Simpo,
    Sepo,
    /// A Bradley-Terry reward model (TRL's RewardTrainer): a score head on the decoder.
    Reward,
    /// DPO on per-token weighted sums of both answers (TIS-DPO's, critical-token DPO's form),
    /// weights from a `select` stage.
    Wdpo,
    /// RRHF: a ranking hinge on length-normalized log-probs plus the chosen answer's NLL.
    Rrhf,
}

impl Objective {
    pub fn is_pairwise(self) -> bool {
        self != Objective::Sft
    }
    pub fn needs_reference(self) -> bool {
        matches!(self, Objective::Dpo | Objective::Ipo | Objective::Wdpo)
    }
    /// Trains on a `select` stage's key tokens or weights.
    pub fn needs_selection(self) -> bool {
        matches!(self, Objective::Sepo | Objective::Wdpo)
    }
    pub fn name(self) -> &'static str {
        match self {
            Objective::Sft => "sft",
            Objective::Dpo => "dpo",
            Objective::Ipo => "ipo",
            Objective::Simpo => "simpo",
            Objective::Sepo => "sepo",
            Objective::Reward => "reward",
            Objective::Wdpo => "wdpo",
            Objective::Rrhf => "rrhf",
        }
    }
}

/// Hyper-parameters of one run (the `train` stage's parameters minus what picks the inputs).
#[derive(Debug, Clone)]
pub struct TrainSpec {
    pub objective: Objective,
    pub lr: f64,
    pub epochs: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub beta: f64,
    pub gamma: f64,
    pub margin: f64,
    pub label_smoothing: f64,
    /// IPO on per-token averaged log-probs (TRL) rather than sums (OpenRLHF).
    pub ipo_average: bool,
    /// RRHF's weight on its ranking term.
    pub rrhf_weight: f64,
    pub shuffle: bool,
    pub group_by_length: bool,
    pub seed: u64,
    pub checkpoint_every: usize,
}

/// One training pair (for SFT only `prompt` and `chosen` are used).
#[derive(Debug, Clone)]
pub struct Example {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    /// Per-token weights of the responses for `sepo` and `wdpo`: a `select` stage's key-token
    /// mask as 0/1, times its weights under `mode: weights`.
    pub chosen_weights: Option<Vec<f32>>,
    pub rejected_weights: Option<Vec<f32>>,
    /// Reference log-probs, summed over each response (DPO, IPO); for `wdpo`, the sums weighted
    /// by the token weights above.
    pub ref_chosen: f32,
    pub ref_rejected: f32,
}

/// One row of `metrics.parquet`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: u64,
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: u64,
    pub elapsed_s: f64,
    pub logps_chosen: Option<f64>,
    pub logps_rejected: Option<f64>,
    pub reward_chosen: Option<f64>,
    pub reward_rejected: Option<f64>,
    pub reward_margin: Option<f64>,
    pub reward_accuracy: Option<f64>,
}

/// The micro-batches of one epoch: a seeded shuffle, then (if asked) pairs of similar length
/// grouped within windows of 50 batches to cut padding, the batches themselves shuffled again.
pub fn epoch_batches(lengths: &[usize], spec: &TrainSpec, epoch: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(
        spec.seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64),
    );
    if spec.shuffle {
        order.shuffle(&mut rng);
    }
    let bs = spec.batch_size;
    if spec.group_by_length {
        for window in order.chunks_mut(bs * 50) {
            window.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        }
    }
    let mut batches: Vec<Vec<usize>> = order.chunks(bs).map(<[usize]>::to_vec).collect();
    if spec.group_by_length && spec.shuffle {
        batches.shuffle(&mut rng);
    }
    batches
}

/// What a checkpoint holds besides weights and optimizer state.
#[derive(Debug, Serialize, Deserialize)]
struct CkptState {
    step: u64,
    elapsed_s: f64,
    metrics: Vec<StepMetrics>,
}

/// A model the loop can train: its loss on one micro-batch under the run's objective.
pub trait Trainable: Module + Sized {
    /// One micro-batch's loss and metrics. For SFT the loss is already divided by the step's
    /// response tokens (`step_tokens`), so summing micro-batches gives the step's token-weighted
    /// mean.
    fn micro_loss(
        &self,
        batch: &[&Example],
        spec: &TrainSpec,
        device: &Device,
        step_tokens: usize,
    ) -> Result<MicroOut>;
}

impl Trainable for CausalLm {
    fn micro_loss(
        &self,
        batch: &[&Example],
        spec: &TrainSpec,
        device: &Device,
        step_tokens: usize,
    ) -> Result<MicroOut> {
        forward_loss(self, batch, spec, device, step_tokens)
    }
}

impl Trainable for RewardModel {
    /// Bradley-Terry on the scores of `prompt + chosen` and `prompt + rejected`, both sides in
    /// one right-padded forward.
    fn micro_loss(
        &self,
        batch: &[&Example],
        spec: &TrainSpec,
        device: &Device,
        _: usize,
    ) -> Result<MicroOut> {
        if spec.objective != Objective::Reward {
            anyhow::bail!(
                "a reward model trains with objective `reward`, not `{}`",
                spec.objective.name()
            );
        }
        let join = |p: &[u32], r: &[u32]| -> Vec<u32> { p.iter().chain(r).copied().collect() };
        let seqs: Vec<Vec<u32>> = batch
            .iter()
            .map(|e| join(&e.prompt, &e.chosen))
            .chain(batch.iter().map(|e| join(&e.prompt, &e.rejected)))
            .collect();
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let scored = self.batch(&refs, device)?;
        let tokens = scored.tokens;
        let b = batch.len();
        let r = self.forward(scored);
        let pl = objectives::bradley_terry(r.clone().slice(0..b), r.slice(b..2 * b));
        Ok(MicroOut {
            loss: pl.loss.clone(),
            pair: Some(pl),
            logps: None,
            tokens,
        })
    }
}

/// Trains `model` (on an autodiff device) and returns it with one metrics row per optimizer step.
pub fn train<M: Trainable>(
    mut model: M,
    examples: &[Example],
    spec: &TrainSpec,
    ckpt_dir: &Path,
    device: &Device,
    progress: &Progress,
    label: &str,
) -> Result<(M, Vec<StepMetrics>)> {
    let lengths: Vec<usize> = examples
        .iter()
        .map(|e| e.prompt.len() + e.chosen.len().max(e.rejected.len()))
        .collect();
    let micro_per_epoch = examples.len().div_ceil(spec.batch_size);
    let steps_per_epoch = micro_per_epoch.div_ceil(spec.grad_accum);
    let total_steps = (steps_per_epoch * spec.epochs) as u64;
    let mut opt = AdamWConfig::default()
        .with_weight_decay(spec.weight_decay)
        .init();
    let mut metrics: Vec<StepMetrics> = Vec::new();
    let mut start_step = 0u64;
    let mut elapsed_before = 0.0;
    let state_path = ckpt_dir.join("state.json");
    let optim_path = ckpt_dir.join("optim.safetensors");
    if state_path.is_file() && !optim_path.is_file() {
        // A checkpoint an older sepo wrote (its optimizer state had another format): the only
        // safe resume is none.
        progress.log(format!(
            "         {label}: ignoring the checkpoint in {} (written by an older sepo); starting over",
            ckpt_dir.display()
        ));
    } else if state_path.is_file() {
        let state: CkptState = read_state(&std::fs::read(&state_path)?)
            .with_context(|| format!("{}: unreadable checkpoint", state_path.display()))?;
        model = load_module(model, ckpt_dir.join("model.bpk"))?;
        opt = AdamW::load(&optim_path, device)?;
        start_step = state.step;
        elapsed_before = state.elapsed_s;
        metrics = state.metrics;
        progress.log(format!(
            "         {label}: resuming from the checkpoint at step {start_step}/{total_steps} ({})",
            ckpt_dir.display()
        ));
    }
    let bar = progress.bar(label, total_steps, "steps");
    bar.inc(start_step);
    let t0 = Instant::now();
    let mut phases = Phases::from_env(device);
    let mut step = 0u64;
    'epochs: for epoch in 0..spec.epochs {
        let batches = epoch_batches(&lengths, spec, epoch);
        for group in batches.chunks(spec.grad_accum) {
            step += 1;
            if step <= start_step {
                continue;
            }
            let lr = lr_at(step - 1, total_steps, spec.lr, spec.warmup_ratio);
            let group_pairs: usize = group.iter().map(Vec::len).sum();
            let group_tokens: usize = group
                .iter()
                .flatten()
                .map(|&i| examples[i].chosen.len())
                .sum();
            let mut grads = ParamGrads::new();
            let mut m = StepMetrics {
                step,
                lr,
                ..Default::default()
            };
            let mut pair_sums = PairSums::default();
            phases.start();
            for micro in group {
                let batch: Vec<&Example> = micro.iter().map(|&i| &examples[i]).collect();
                let weight = if spec.objective.is_pairwise() {
                    batch.len() as f64 / group_pairs as f64
                } else {
                    1.0
                };
                let out = model.micro_loss(&batch, spec, device, group_tokens)?;
                m.tokens += out.tokens as u64;
                let loss = out.loss.mul_scalar(weight);
                m.loss += scalar(&loss);
                if let Some(pl) = &out.pair {
                    pair_sums.add(out.logps, &pl.metrics(), weight);
                }
                phases.mark(0);
                grads.accumulate(&model, &mut loss.backward());
                phases.mark(1);
            }
            if spec.objective.is_pairwise() {
                pair_sums.write_to(&mut m);
            }
            m.grad_norm = grads.clip_total_norm(if spec.max_grad_norm > 0.0 {
                spec.max_grad_norm
            } else {
                0.0
            });
            phases.mark(2);
            model = opt.step(lr, model, grads);
            phases.mark(3);
            m.epoch = step as f64 / steps_per_epoch as f64;
            m.elapsed_s = elapsed_before + t0.elapsed().as_secs_f64();
            bar.inc(1);
            bar.set_message(format!(
                "loss {:.4} {:.0} tok/s",
                m.loss,
                m.tokens as f64 * (step - start_step) as f64
                    / t0.elapsed().as_secs_f64().max(1e-9)
                    / (step - start_step) as f64
            ));
            metrics.push(m);
            if spec.checkpoint_every > 0
                && step.is_multiple_of(spec.checkpoint_every as u64)
                && step < total_steps
            {
                checkpoint(&model, &opt, &metrics, step, ckpt_dir)?;
                crate::testhook::abort_at("abort-after-checkpoint", &step.to_string());
            }
            if step >= total_steps {
                break 'epochs;
            }
        }
    }
    let secs = bar.finish();
    if let Some(summary) = phases.summary() {
        // On stderr even when quiet: asked for by the environment, read by bench/gpu.sh.
        eprintln!("         {label}: {summary}");
    }
    let tokens: u64 = metrics
        .iter()
        .skip(start_step as usize)
        .map(|m| m.tokens)
        .sum();
    progress.log(format!(
        "         {label}: {} steps, {tokens} tokens in {secs:.1}s ({:.0} tokens/s), final loss {:.4}",
        total_steps - start_step,
        tokens as f64 / secs.max(1e-9),
        metrics.last().map_or(f64::NAN, |m| m.loss)
    ));
    Ok((model, metrics))
}

fn checkpoint<M: Module>(
    model: &M,
    opt: &AdamW,
    metrics: &[StepMetrics],
    step: u64,
    dir: &Path,
) -> Result<()> {
    let parent = dir.parent().expect("ckpt has a parent");
    let tmp = parent.join("ckpt.partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    save_module(model, tmp.join("model.bpk"))?;
    opt.save(tmp.join("optim.safetensors"))?;
    let elapsed = metrics.last().map_or(0.0, |m| m.elapsed_s);
    let state = CkptState {
        step,
        elapsed_s: elapsed,
        metrics: metrics.to_vec(),
    };
    crate::util::write_atomic(&tmp.join("state.json"), &write_state(&state)?)?;
    for f in std::fs::read_dir(&tmp)? {
        std::fs::File::open(f?.path())?.sync_all()?;
    }
    // Swap in the new checkpoint; at every moment one complete checkpoint (or none) is `ckpt/`.
    let old = parent.join("ckpt.old");
    if dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old)?;
        }
        std::fs::rename(dir, &old)?;
    }
    std::fs::rename(&tmp, dir)?;
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    Ok(())
}

/// The checkpoint's state as JSON with every float kept as its bit pattern (`{"f64": bits}`):
/// serde_json, built without its `float_roundtrip` feature, may parse a float one ulp off, and
/// a resumed run must log the metrics an uninterrupted one logs.
fn write_state(state: &CkptState) -> Result<Vec<u8>> {
    fn exact(v: serde_json::Value) -> serde_json::Value {
        use serde_json::Value;
        match v {
            Value::Number(n) if n.is_f64() => {
                serde_json::json!({"f64": n.as_f64().expect("an f64").to_bits()})
            }
            Value::Array(a) => Value::Array(a.into_iter().map(exact).collect()),
            Value::Object(o) => Value::Object(o.into_iter().map(|(k, v)| (k, exact(v))).collect()),
            other => other,
        }
    }
    Ok(serde_json::to_vec(&exact(serde_json::to_value(state)?))?)
}

/// Reads what [`write_state`] wrote (plain floats, as older checkpoints have, read as they are).
fn read_state(bytes: &[u8]) -> Result<CkptState> {
    fn float(v: serde_json::Value) -> serde_json::Value {
        use serde_json::Value;
        match v {
            Value::Object(o) if o.len() == 1 && o.get("f64").is_some_and(Value::is_u64) => {
                let bits = o["f64"].as_u64().expect("checked");
                serde_json::json!(f64::from_bits(bits))
            }
            Value::Array(a) => Value::Array(a.into_iter().map(float).collect()),
            Value::Object(o) => Value::Object(o.into_iter().map(|(k, v)| (k, float(v))).collect()),
            other => other,
        }
    }
    Ok(serde_json::from_value(float(serde_json::from_slice(
        bytes,
    )?))?)
}

fn scalar(t: &Tensor<1>) -> f64 {
    t.to_data()
        .convert::<f64>()
        .try_to_vec::<f64>()
        .map(|v| v[0])
        .unwrap_or(f64::NAN)
}

/// A step's pairwise metrics: sums over its micro-batches, each weighted by its share of the
/// step's pairs, so they are the step's means.
#[derive(Default)]
struct PairSums {
    /// `None` when the objective has no log-probs (a reward model).
    logps: Option<(f64, f64)>,
    reward_chosen: f64,
    reward_rejected: f64,
    reward_margin: f64,
    reward_accuracy: f64,
}

impl PairSums {
    /// Adds a micro-batch: its mean log-probs of the chosen and rejected responses (when the
    /// model has them), and its objective's metrics.
    fn add(&mut self, logps: Option<(f64, f64)>, pm: &objectives::PairMetrics, weight: f64) {
        if let Some((c, r)) = logps {
            let (sc, sr) = self.logps.get_or_insert((0.0, 0.0));
            *sc += c * weight;
            *sr += r * weight;
        }
        self.reward_chosen += pm.reward_chosen * weight;
        self.reward_rejected += pm.reward_rejected * weight;
        self.reward_margin += pm.reward_margin * weight;
        self.reward_accuracy += pm.reward_accuracy * weight;
    }

    fn write_to(&self, m: &mut StepMetrics) {
        m.logps_chosen = self.logps.map(|l| l.0);
        m.logps_rejected = self.logps.map(|l| l.1);
        m.reward_chosen = Some(self.reward_chosen);
        m.reward_rejected = Some(self.reward_rejected);
        m.reward_margin = Some(self.reward_margin);
        m.reward_accuracy = Some(self.reward_accuracy);
    }
}

/// One micro-batch's forward: what [`Trainable::micro_loss`] gives the loop.
pub struct MicroOut {
    /// The loss to differentiate, `[1]`.
    pub loss: Tensor<1>,
    /// A pairwise objective's result, for the metrics.
    pub pair: Option<PairLoss>,
    /// Mean summed log-probs of the chosen and rejected responses (language models only).
    pub logps: Option<(f64, f64)>,
    /// Non-padding tokens the forward processed.
    pub tokens: usize,
}

/// One micro-batch: sequences `prompt + response` right-padded, log-probs at response positions
/// only, and the objective. For SFT the loss is already divided by the step's response tokens
/// (`step_tokens`), so summing micro-batches gives the step's token-weighted mean.
fn forward_loss(
    model: &CausalLm,
    batch: &[&Example],
    spec: &TrainSpec,
    device: &Device,
    step_tokens: usize,
) -> Result<MicroOut> {
    if spec.objective == Objective::Reward {
        anyhow::bail!("objective `reward` trains a reward model, not a language model");
    }
    let pairwise = spec.objective.is_pairwise();
    let mut seqs: Vec<(&[u32], &[u32])> = batch
        .iter()
        .map(|e| (e.prompt.as_slice(), e.chosen.as_slice()))
        .collect();
    if pairwise {
        seqs.extend(
            batch
                .iter()
                .map(|e| (e.prompt.as_slice(), e.rejected.as_slice())),
        );
    }
    let rows = seqs.len();
    let width = seqs
        .iter()
        .map(|(p, r)| p.len() + r.len() - 1)
        .max()
        .unwrap_or(1)
        .max(1);
    let mut inputs = vec![0i64; rows * width];
    let mut picked: Vec<i64> = Vec::new();
    let mut targets: Vec<i64> = Vec::new();
    let mut owner: Vec<usize> = Vec::new();
    let mut tokens = 0;
    for (b, (p, r)) in seqs.iter().enumerate() {
        let full: Vec<u32> = p.iter().chain(r.iter()).copied().collect();
        tokens += full.len() - 1;
        for t in 0..full.len() - 1 {
            inputs[b * width + t] = full[t] as i64;
        }
        for (j, &tok) in r.iter().enumerate() {
            picked.push((b * width + p.len() - 1 + j) as i64);
            targets.push(tok as i64);
            owner.push(b);
        }
    }
    let n = picked.len();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(inputs, [rows, width]), device);
    let picked = Tensor::<1, Int>::from_data(TensorData::new(picked, [n]), device);
    let targets = Tensor::<1, Int>::from_data(TensorData::new(targets, [n]), device);
    let lp = model.selected_logprobs(ids, picked, targets);
    // Row r of a [rows, n] matrix holds the weight (0/1 for membership) of each picked position
    // that belongs to sequence r, 0 elsewhere; the objectives' masked sums then aggregate per
    // sequence.
    let mask_of = |f: &dyn Fn(usize, usize) -> f32, nrows: usize, offset: usize| -> Tensor<2> {
        let mut m = vec![0f32; nrows * n];
        let mut pos_in_row = vec![0usize; rows];
        for (i, &o) in owner.iter().enumerate() {
            let j = pos_in_row[o];
            pos_in_row[o] += 1;
            if o >= offset && o < offset + nrows {
                m[(o - offset) * n + i] = f(o - offset, j);
            }
        }
        Tensor::<2>::from_data(TensorData::new(m, [nrows, n]), device)
    };
    if !pairwise {
        let all = Tensor::<2>::ones([1, n], device);
        let loss = objectives::sft(lp.reshape([1, n]), all)
            .mul_scalar(n as f64 / step_tokens.max(1) as f64);
        return Ok(MicroOut {
            loss,
            pair: None,
            logps: None,
            tokens,
        });
    }
    let b = batch.len();
    let lp_rows = lp.reshape([1, n]).repeat_dim(0, b);
    let member_c = mask_of(&|_, _| 1.0, b, 0);
    let member_r = mask_of(&|_, _| 1.0, b, b);
    let pc = objectives::masked_sum(lp_rows.clone(), member_c.clone());
    let pr = objectives::masked_sum(lp_rows.clone(), member_r.clone());
    let host = |v: Vec<f32>| Tensor::<1>::from_data(TensorData::new(v, [b]), device);
    let nc = host(batch.iter().map(|e| e.chosen.len() as f32).collect());
    let nr = host(batch.iter().map(|e| e.rejected.len() as f32).collect());
    let rc = host(batch.iter().map(|e| e.ref_chosen).collect());
    let rr = host(batch.iter().map(|e| e.ref_rejected).collect());
    let mean_pc = scalar(&pc.clone().mean());
    let mean_pr = scalar(&pr.clone().mean());
    let pl = match spec.objective {
        Objective::Dpo => objectives::dpo(pc, pr, rc, rr, spec.beta, spec.label_smoothing),
        Objective::Ipo if spec.ipo_average => objectives::ipo(pc, pr, rc, rr, nc, nr, spec.beta),
        Objective::Ipo => objectives::ipo_sum(pc, pr, rc, rr, spec.beta),
        Objective::Simpo => objectives::simpo(pc, pr, nc, nr, spec.beta, spec.margin),
        Objective::Rrhf => objectives::rrhf(pc, pr, nc, nr, spec.rrhf_weight),
        Objective::Sepo | Objective::Wdpo => {
            let weight = |w: &Option<Vec<f32>>, j: usize| {
                w.as_ref().and_then(|w| w.get(j).copied()).unwrap_or(0.0)
            };
            let wc = mask_of(&|row, j| weight(&batch[row].chosen_weights, j), b, 0);
            let wr = mask_of(&|row, j| weight(&batch[row].rejected_weights, j), b, b);
            if spec.objective == Objective::Sepo {
                objectives::sepo(lp_rows.clone(), wc, lp_rows, wr, spec.gamma, spec.margin)
            } else {
                // The reference's weighted sums were computed on the host (`ref_chosen`).
                let wpc = objectives::masked_sum(lp_rows.clone(), wc);
                let wpr = objectives::masked_sum(lp_rows, wr);
                objectives::dpo(wpc, wpr, rc, rr, spec.beta, spec.label_smoothing)
            }
        }
        Objective::Sft => unreachable!("handled above"),
        Objective::Reward => unreachable!("checked above"),
    };
    Ok(MicroOut {
        loss: pl.loss.clone(),
        pair: Some(pl),
        logps: Some((mean_pc, mean_pr)),
        tokens,
    })
}
