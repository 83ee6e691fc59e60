//! The training objectives, each written once, differentiable, on burn tensors.
//!
//! Conventions shared by every function here:
//! - A batch holds `B` pairs (or `B` sequences for [`sft`]). Sequence-level inputs are `Tensor<1>`
//!   of shape `[B]`; token-level inputs are `Tensor<2>` of shape `[B, T]`, right-padded, with a
//!   float mask of the same shape (1.0 = counted, 0.0 = ignored), or, where a function says so
//!   ([`sepo`], [`masked_sum`]), real-valued token weights `>= 0` (0.0 on padding).
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

use burn::tensor::{
    Tensor,
    activation::{log_sigmoid, relu},
};

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
/// `mask` may hold real-valued token weights `w_t >= 0` as well as 0/1: the result is then the
/// weighted sum `sum_t w_t logp_t`. Positions where `mask` is 0 are zeroed with `mask_fill` first,
/// so a padding position holding a non-finite value (`-inf` from an underflowed softmax) cannot
/// turn the row into NaN.
pub fn masked_sum(token_logps: Tensor<2>, mask: Tensor<2>) -> Tensor<1> {
    let [b, _t] = token_logps.dims();
    let off = mask.clone().equal_elem(0.0);
    token_logps
        .mask_fill(off, 0.0)
        .mul(mask)
        .sum_dim(1)
        .reshape([b])
}

/// Number of counted tokens per row, `sum_t mask`: `[B, T] -> [B]` (with real-valued token
/// weights: their sum per row).
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
///
/// **Weighted DPO** ("wdpo": TIS-DPO's and critical-token DPO's form) needs no function of its
/// own: it is this loss applied to per-token *weighted* sums, the same weights `w_t >= 0` (one
/// set per response) on the policy and on the reference side:
///
/// ```text
/// pc = sum_t w_t logp_t (policy, chosen)      rc = sum_t w_t logp_ref_t (reference, chosen)
/// pr, rr likewise with the rejected response's weights
/// ```
/// i.e. `dpo(masked_sum(policy_c, w_c), masked_sum(policy_r, w_r), masked_sum(ref_c, w_c),
/// masked_sum(ref_r, w_r), beta, ls)`; the rewards are then `beta * (pc - rc)` on those weighted
/// sums. 0/1 weights give DPO restricted to the selected tokens; all ones give plain DPO.
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

/// IPO on **summed** log-probs, as OpenRLHF computes it (`DPOLoss(beta, label_smoothing,
/// ipo=True)`):
///
/// ```text
/// logits = (pc - pr) - (rc - rr)
/// loss_i = (logits - 1/(2*beta))^2
/// ```
/// Rewards: `chosen = beta * (pc - rc)`, `rejected = beta * (pr - rr)`. Verified against
/// OpenRLHF's source (`openrlhf/models/loss.py`, class `DPOLoss`, at commit `09f5ace`):
/// `logits = pi_logratios - ref_logratios` with `pi_logratios = policy_chosen_logps -
/// policy_rejected_logps`; `if self.ipo: losses = (logits - 1 / (2 * self.beta)) ** 2`, then
/// `losses.mean()`; `chosen_rewards = self.beta * (policy_chosen_logps -
/// reference_chosen_logps).detach()` (rejected likewise). Its `DPOTrainer.concatenated_forward`
/// (`openrlhf/trainer/dpo_trainer.py`, at commit `0310e76`) passes `all_logps_sum`
/// (`_get_batch_logps(..., average_log_prob=False)`), so the log-probs are sums over the response tokens, unlike TRL's
/// [`ipo`], which averages them first. `label_smoothing` plays no part in OpenRLHF's IPO branch.
/// The target margin `1/(2*beta)` is then in units of a whole response's log-prob, so the two
/// differ for the same `beta` unless every response has one token.
pub fn ipo_sum(pc: Tensor<1>, pr: Tensor<1>, rc: Tensor<1>, rr: Tensor<1>, beta: f64) -> PairLoss {
    let chosen_logratios = pc - rc;
    let rejected_logratios = pr - rr;
    let logits = chosen_logratios.clone() - rejected_logratios.clone();
    let losses = logits.sub_scalar(1.0 / (2.0 * beta)).square();
    PairLoss {
        loss: losses.mean(),
        chosen_reward: chosen_logratios.detach().mul_scalar(beta),
        rejected_reward: rejected_logratios.detach().mul_scalar(beta),
    }
}

/// RRHF (Yuan et al. 2023, "RRHF: Rank Responses to Align Language Models with Human Feedback
/// without tears") for one chosen / rejected pair per row, length penalty 1:
///
/// ```text
/// p_c    = pc / nc,  p_r = pr / nr              (mean token log-prob; counts clamped to >= 1)
/// rank_i = max(0, p_r - p_c)                    (the hinge over the misordered pair)
/// sft_i  = -p_c                                 (the chosen answer's mean token NLL)
/// loss_i = rank_weight * rank_i + sft_i
/// ```
/// This is the original code (GanjinZero/RRHF `train.py`, `RRHFTrainer`) for two candidates of
/// which the chosen one scores higher: `get_score` is `sum logp / length ** length_penalty`;
/// `rrhf_loss` sums `-(s_j - s_i)` over the pairs with `rw_j > rw_i` and `s_j < s_i`, which for
/// a pair is `p_r - p_c` when `p_c < p_r`, else nothing (a tie adds nothing, and the hinge's
/// gradient there is 0 here too); `loss = rrhf_weight * rrhf_loss + sft_loss`. Rows are averaged
/// over the batch (the original trains one prompt per device step).
///
/// One deliberate difference: the original's `sft_loss = -logit_label[best].mean()` averages over
/// the whole padded label length (prompt and padding positions count as zeros), so its value
/// depends on how the batch was padded; here the mean is over the chosen response's own `nc`
/// tokens. Rewards: `p_c` and `p_r` (RRHF's scores).
pub fn rrhf(
    pc: Tensor<1>,
    pr: Tensor<1>,
    nc: Tensor<1>,
    nr: Tensor<1>,
    rank_weight: f64,
) -> PairLoss {
    let p_c = pc.div(nc.clamp_min(1.0));
    let p_r = pr.div(nr.clamp_min(1.0));
    // burn's relu backward is 0 where the output is <= 0, like the original's strict `diff < 0`.
    let rank = relu(p_r.clone() - p_c.clone());
    let losses = rank.mul_scalar(rank_weight) - p_c.clone();
    PairLoss {
        loss: losses.mean(),
        chosen_reward: p_c.detach(),
        rejected_reward: p_r.detach(),
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

/// SePO (SPEC.md), reference-free, on the key tokens only, or on every token with a weight:
///
/// ```text
/// u(y, w) = gamma * sum_t w_t logp_t / D,   D = sum_t w_t if that is > 0, else 1
/// loss_i  = -logsigmoid(u(y_w, w_w) - u(y_l, w_l) - margin)
/// ```
/// `token_logps_*` are the policy's per-token log-probs `[B, T]` (any padding), `mask_*` the
/// token weights of the same shape: 0/1 key-token masks (then `D` is the key-token count and `u`
/// their mean), or real-valued weights `w_t >= 0` (`select`'s `mode: weights`; then `u` is the
/// weighted mean, whatever the weights sum to, also in (0, 1)). Padding must weigh 0. A row whose
/// weights on a side are all 0 (a `select` ratio of 0, a threshold no token passes) gets `u = 0`
/// there (`D = 1`): that side contributes nothing, and its tokens get zero gradient. Rewards:
/// `u_w` and `u_l`.
pub fn sepo(
    token_logps_chosen: Tensor<2>,
    mask_chosen: Tensor<2>,
    token_logps_rejected: Tensor<2>,
    mask_rejected: Tensor<2>,
    gamma: f64,
    margin: f64,
) -> PairLoss {
    let u = |logps: Tensor<2>, weights: Tensor<2>| {
        let total = masked_count(weights.clone());
        let empty = total.clone().lower_equal_elem(0.0);
        let denom = total.mask_fill(empty, 1.0);
        masked_sum(logps, weights).div(denom).mul_scalar(gamma)
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
