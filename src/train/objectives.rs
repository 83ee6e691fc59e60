//! The training objectives, each written once, differentiable, on burn tensors.
//!
//! Conventions shared by every function here:
//! - A batch holds `B` pairs (or `B` sequences for [`sft`]). Sequence-level inputs are `Tensor<1>`
//!   of shape `[B]`; token-level inputs are `Tensor<2>` of shape `[B, T]`, right-padded, with a
//!   float mask of the same shape (1.0 = counted, 0.0 = ignored).
//! - `pc`, `pr` are the **policy** log-probabilities of the chosen / rejected response summed over
//!   its tokens; `rc`, `rr` the same under the **reference** model (these carry no gradient: pass
//!   them detached or computed on a non-autodiff model); `nc`, `nr` the response token counts (as
//!   floats).
//! - The returned `loss` is the **mean over the batch**, shape `[1]`. With gradient accumulation,
//!   divide it by the number of micro-batches before `backward()` (what transformers does).
//! - The log-sigmoid is burn's `activation::log_sigmoid`, which is the numerically stable
//!   softplus form (`-log(1 + e^-x)` for `x >= 0`, `x - log(1 + e^x)` for `x < 0`; finite for any
//!   finite input, and its backward is `sigmoid(-x)`, 0.5 at `x = 0`). Hand-rolled
//!   `min(x,0) - log1p(e^-|x|)` would give the wrong gradient at exactly `x = 0`, which is where
//!   DPO starts when the policy is initialised from the reference.
//! - Rewards are per pair, **detached**, and only meant for logging (see [`PairMetrics`]).

use burn::tensor::{Tensor, activation::log_sigmoid};

/// A pairwise objective's result.
///
/// `loss` is the batch mean (shape `[1]`, differentiable); `chosen_reward` / `rejected_reward`
/// are per pair (shape `[B]`) and detached. What "reward" means depends on the objective and is
/// written on each function.
#[derive(Debug, Clone)]
pub struct PairLoss {
    pub loss: Tensor<1>,
    pub chosen_reward: Tensor<1>,
    pub rejected_reward: Tensor<1>,
}

/// Host-side numbers for one step's log, from a [`PairLoss`] (TRL's `rewards/*` metrics).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairMetrics {
    /// The batch-mean loss.
    pub loss: f64,
    /// mean(chosen_reward)
    pub reward_chosen: f64,
    /// mean(rejected_reward)
    pub reward_rejected: f64,
    /// mean(chosen_reward - rejected_reward)
    pub reward_margin: f64,
    /// mean(chosen_reward > rejected_reward) (strictly greater, as TRL)
    pub reward_accuracy: f64,
}

impl PairLoss {
    /// Reads the loss and the rewards back to the host (this waits for the device) and reduces them.
    pub fn metrics(&self) -> PairMetrics {
        let loss = to_f64(&self.loss);
        let c = to_f64_vec(&self.chosen_reward);
        let r = to_f64_vec(&self.rejected_reward);
        assert_eq!(
            c.len(),
            r.len(),
            "chosen and rejected rewards differ in length"
        );
        let n = c.len().max(1) as f64;
        let sum_c: f64 = c.iter().sum();
        let sum_r: f64 = r.iter().sum();
        let margin: f64 = c.iter().zip(&r).map(|(a, b)| a - b).sum();
        let wins = c.iter().zip(&r).filter(|(a, b)| a > b).count() as f64;
        PairMetrics {
            loss,
            reward_chosen: sum_c / n,
            reward_rejected: sum_r / n,
            reward_margin: margin / n,
            reward_accuracy: wins / n,
        }
    }
}

/// Sum of `token_logps * mask` over each row: `[B, T] -> [B]`.
///
/// Positions where `mask` is 0 are zeroed with `mask_fill` first, so a padding position holding a
/// non-finite value (`-inf` from an underflowed softmax) cannot turn the row into NaN.
pub fn masked_sum(token_logps: Tensor<2>, mask: Tensor<2>) -> Tensor<1> {
    let [b, _t] = token_logps.dims();
    let off = mask.clone().equal_elem(0.0);
    token_logps
        .mask_fill(off, 0.0)
        .mul(mask)
        .sum_dim(1)
        .reshape([b])
}

/// Number of counted tokens per row, `sum_t mask`: `[B, T] -> [B]`.
pub fn masked_count(mask: Tensor<2>) -> Tensor<1> {
    let [b, _t] = mask.dims();
    mask.sum_dim(1).reshape([b])
}

/// DPO, sigmoid loss with conservative label smoothing (cDPO, TRL <= 0.2x `loss_type="sigmoid"`).
///
/// ```text
/// logits  = (pc - rc) - (pr - rr)
/// loss_i  = -(1 - ls) * logsigmoid(beta * logits) - ls * logsigmoid(-beta * logits)
/// ```
/// With `label_smoothing = 0` this is plain DPO (and TRL 1.x's "sigmoid", which dropped label
/// smoothing). Rewards (TRL): `chosen = beta * (pc - rc)`, `rejected = beta * (pr - rr)`.
pub fn dpo(
    pc: Tensor<1>,
    pr: Tensor<1>,
    rc: Tensor<1>,
    rr: Tensor<1>,
    beta: f64,
    label_smoothing: f64,
) -> PairLoss {
    let chosen_logratios = pc - rc;
    let rejected_logratios = pr - rr;
    let logits = chosen_logratios.clone() - rejected_logratios.clone();
    let scaled = logits.mul_scalar(beta);
    let losses = if label_smoothing == 0.0 {
        log_sigmoid(scaled).neg()
    } else {
        log_sigmoid(scaled.clone()).mul_scalar(-(1.0 - label_smoothing))
            - log_sigmoid(scaled.neg()).mul_scalar(label_smoothing)
    };
    PairLoss {
        loss: losses.mean(),
        chosen_reward: chosen_logratios.detach().mul_scalar(beta),
        rejected_reward: rejected_logratios.detach().mul_scalar(beta),
    }
}

/// IPO (TRL `loss_type="ipo"`), on **per-token averaged** log-probs.
///
/// ```text
/// logits = (pc/nc - pr/nr) - (rc/nc - rr/nr)
/// loss_i = (logits - 1/(2*beta))^2
/// ```
/// Token counts below 1 are clamped to 1 (TRL 1.x). Rewards (TRL, which averages the log-probs
/// before computing them for IPO): `chosen = beta * (pc - rc) / nc`,
/// `rejected = beta * (pr - rr) / nr`.
pub fn ipo(
    pc: Tensor<1>,
    pr: Tensor<1>,
    rc: Tensor<1>,
    rr: Tensor<1>,
    nc: Tensor<1>,
    nr: Tensor<1>,
    beta: f64,
) -> PairLoss {
    let nc = nc.clamp_min(1.0);
    let nr = nr.clamp_min(1.0);
    let pc = pc.div(nc.clone());
    let pr = pr.div(nr.clone());
    let rc = rc.div(nc);
    let rr = rr.div(nr);
    let logits = (pc.clone() - pr.clone()) - (rc.clone() - rr.clone());
    let losses = logits.sub_scalar(1.0 / (2.0 * beta)).square();
    PairLoss {
        loss: losses.mean(),
        chosen_reward: (pc.detach() - rc.detach()).mul_scalar(beta),
        rejected_reward: (pr.detach() - rr.detach()).mul_scalar(beta),
    }
}

/// SimPO (TRL CPOTrainer `loss_type="simpo"`, `cpo_alpha = 0`, no label smoothing).
/// Reference-free, on per-token averaged log-probs:
///
/// ```text
/// loss_i = -logsigmoid(beta * (pc/nc - pr/nr) - margin)
/// ```
/// `margin` is SimPO's gamma (TRL's `simpo_gamma`: TRL writes `beta * (logits - gamma/beta)`, the
/// same value). Token counts below 1 are clamped to 1. Rewards (TRL CPO):
/// `chosen = beta * pc/nc`, `rejected = beta * pr/nr`.
pub fn simpo(
    pc: Tensor<1>,
    pr: Tensor<1>,
    nc: Tensor<1>,
    nr: Tensor<1>,
    beta: f64,
    margin: f64,
) -> PairLoss {
    let avg_c = pc.div(nc.clamp_min(1.0));
    let avg_r = pr.div(nr.clamp_min(1.0));
    let z = (avg_c.clone() - avg_r.clone())
        .mul_scalar(beta)
        .sub_scalar(margin);
    PairLoss {
        loss: log_sigmoid(z).neg().mean(),
        chosen_reward: avg_c.detach().mul_scalar(beta),
        rejected_reward: avg_r.detach().mul_scalar(beta),
    }
}

/// SePO (SPEC.md), reference-free, on the key tokens only:
///
/// ```text
/// u(y, m) = gamma * sum_t m_t logp_t / sum_t m_t
/// loss_i  = -logsigmoid(u(y_w, m_w) - u(y_l, m_l) - margin)
/// ```
/// `token_logps_*` are the policy's per-token log-probs `[B, T]` (any padding), `mask_*` the key-token
/// masks as 0/1 floats of the same shape (0 on padding). A row with no key token on a side (a
/// `select` ratio of 0, a threshold no token passes) gets `u = 0` there (the count is clamped to
/// 1): that side contributes nothing, and its tokens get zero gradient. Rewards: `u_w` and `u_l`.
pub fn sepo(
    token_logps_chosen: Tensor<2>,
    mask_chosen: Tensor<2>,
    token_logps_rejected: Tensor<2>,
    mask_rejected: Tensor<2>,
    gamma: f64,
    margin: f64,
) -> PairLoss {
    let u = |logps: Tensor<2>, mask: Tensor<2>| {
        let count = masked_count(mask.clone()).clamp_min(1.0);
        masked_sum(logps, mask).div(count).mul_scalar(gamma)
    };
    let u_w = u(token_logps_chosen, mask_chosen);
    let u_l = u(token_logps_rejected, mask_rejected);
    let z = (u_w.clone() - u_l.clone()).sub_scalar(margin);
    PairLoss {
        loss: log_sigmoid(z).neg().mean(),
        chosen_reward: u_w.detach(),
        rejected_reward: u_l.detach(),
    }
}

/// Bradley-Terry reward-model loss (TRL's `RewardTrainer`, no margin column):
///
/// ```text
/// loss_i = -logsigmoid(r_chosen - r_rejected)
/// ```
/// `chosen` and `rejected` are the reward model's scores `[B]`. Rewards: the scores themselves.
pub fn bradley_terry(chosen: Tensor<1>, rejected: Tensor<1>) -> PairLoss {
    let z = chosen.clone() - rejected.clone();
    PairLoss {
        loss: log_sigmoid(z).neg().mean(),
        chosen_reward: chosen.detach(),
        rejected_reward: rejected.detach(),
    }
}

/// SFT: **token-weighted** mean negative log-likelihood over every counted token of the batch,
/// `sum(-logp * mask) / sum(mask)` (what transformers' causal-LM loss gives for one batch; not the
/// per-sequence mean averaged over sequences). Shape `[1]`. An all-zero mask gives 0, not NaN.
pub fn sft(token_logps: Tensor<2>, mask: Tensor<2>) -> Tensor<1> {
    let total = masked_sum(token_logps, mask.clone()).sum();
    let count = mask.sum().clamp_min(1.0);
    total.neg().div(count)
}

fn to_f64_vec(t: &Tensor<1>) -> Vec<f64> {
    t.to_data()
        .convert::<f64>()
        .try_to_vec::<f64>()
        .expect("a float tensor converts to f64")
}

fn to_f64(t: &Tensor<1>) -> f64 {
    to_f64_vec(t)[0]
}

#[cfg(test)]
mod tests;
