//! `select`: SePO's key tokens. `mode` picks the rule per response (see [`SelectMode`]); the
//! ranked and random modes keep `n = max(1, floor(ratio * N))` of a response's N eligible tokens
//! (ties go to the earlier position), a ratio of 0 turns a side off, and `skip_first` makes the
//! first response token ineligible. Non-finite scores are refused, never ranked.

use anyhow::Result;
use rand::{Rng, SeedableRng, rngs::StdRng};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{
    BuildContext, Role, RunContext, Stage, StageKind, params_schema, parse_config, to_params,
};
use std::collections::HashMap;

use polars::prelude::DataFrame;

use crate::artifacts::model::tokenize_behind;
use crate::artifacts::{Artifact, Pairs, Scores, Selection, Tokens, tokenizer_of};
use crate::bridge;
use crate::data::parquet as pq;
use crate::error::user;
use crate::tokenizer::HfTokenizer;
use crate::user_bail;

pub static KIND: StageKind = StageKind {
    kind: "select",
    // Still 1: every parameter added since is left out of the canonical form at its default, and
    // the default (`top`) writes the same masks as before.
    version: "1",
    roles: &[
        Role {
            name: "scores",
            required: true,
            many: false,
            kinds: &["score"],
        },
        // The policy's own tokenization of the same pairs, when its tokenizer is not the
        // oracle's: the masks are carried across by character spans (`crate::bridge`).
        Role {
            name: "tokens",
            required: false,
            many: false,
            kinds: &["tokenize"],
        },
    ],
    uses_device: false,
    build,
    params_schema: params_schema::<SelectConfig>,
};

/// How a response's key tokens are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SelectMode {
    /// SePO's rule: the chosen answer's n highest-scored tokens, the rejected answer's n lowest.
    #[default]
    Top,
    /// n tokens per response drawn uniformly at random (seeded), as many as `top` keeps: the
    /// paper's control.
    Random,
    /// Every token: SePO's loss on whole responses.
    All,
    /// The inverse of `top`: the chosen answer's n lowest-scored tokens, the rejected answer's n
    /// highest (the ablation that shows the scores matter).
    Bottom,
    /// Chosen tokens scored >= `threshold`, rejected tokens scored <= -`threshold`.
    Threshold,
    /// No hard choice: every token, each with a weight from its score (TIS-DPO's clipped
    /// exponential), written as `chosen_weights` / `rejected_weights`.
    Weights,
    /// Another name for `bottom` (the paper's wording); it hashes as `bottom`.
    Reverse,
}

impl SelectMode {
    fn is_top(&self) -> bool {
        *self == SelectMode::Top
    }

    fn name(self) -> &'static str {
        match self {
            SelectMode::Top => "top",
            SelectMode::Random => "random",
            SelectMode::All => "all",
            SelectMode::Bottom => "bottom",
            SelectMode::Threshold => "threshold",
            SelectMode::Weights => "weights",
            SelectMode::Reverse => "reverse",
        }
    }
}

/// `select`: SePO's key tokens. `mode: top` (the default): a response with N scored tokens keeps
/// `n = max(1, floor(ratio * N))` of them, the chosen answer its n highest-scored, the rejected
/// answer its n lowest; ties go to the earlier position. A ratio of 0 keeps no token on that side.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SelectConfig {
    /// top: the chosen answer's highest-scored tokens and the rejected answer's lowest; random:
    /// as many tokens as `top`, drawn uniformly (seeded); all: every token; bottom (or reverse):
    /// the inverse of `top`; threshold: chosen tokens scored >= `threshold`, rejected tokens
    /// scored <= -`threshold`; weights: every token with a weight, chosen clamp(exp(mu * s), lo,
    /// hi), rejected clamp(exp(-mu * s), lo, hi).
    // The parameters below `rejected_ratio` are left out of the canonical form at their
    // defaults, so that adding them moved no stage hash.
    #[serde(default, skip_serializing_if = "SelectMode::is_top")]
    #[schemars(extend("default" = "top"))]
    pub mode: SelectMode,
    /// Share of each chosen response's tokens kept by `top`, `bottom` and `random`, in [0, 1];
    /// 0 keeps no chosen token in any mode (a one-sided ablation).
    #[serde(default = "default_ratio")]
    #[schemars(range(min = 0, max = 1))]
    pub chosen_ratio: f64,
    /// Share of each rejected response's tokens kept by `top`, `bottom` and `random`, in [0, 1];
    /// 0 keeps no rejected token in any mode. The two ratios cannot both be 0.
    #[serde(default = "default_ratio")]
    #[schemars(range(min = 0, max = 1))]
    pub rejected_ratio: f64,
    /// The score bound of `mode: threshold` (required there, refused in the other modes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = null))]
    pub threshold: Option<f64>,
    /// Never select a response's first token, and count n from the N - 1 after it (the official
    /// implementation's score slice starts one position late).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    #[schemars(extend("default" = false))]
    pub skip_first: bool,
    /// Seed of `mode: random` (default: the pipeline's seed; refused in the other modes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = null))]
    pub seed: Option<u64>,
    /// `mode: weights`: the scale of the score in the exponent (default 1; refused in the other
    /// modes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = null))]
    pub mu: Option<f64>,
    /// `mode: weights`: the weights' clip bounds `[lo, hi]`, 0 <= lo <= hi, hi > 0 (default
    /// [0, 5]; refused in the other modes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = null))]
    pub weight_clip: Option<[f64; 2]>,
    /// With a `tokens` input: the share of a policy token's characters that must be key
    /// characters for it to be a key token, in (0, 1] (default 0.5; refused without `tokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = null))]
    pub span_overlap: Option<f64>,
}

/// `mode: weights`'s defaults: TIS-DPO's form `exp(mu * s)` with mu 1, clipped to [0, 5] so
/// that one extreme score cannot dominate a response.
const DEFAULT_MU: f64 = 1.0;
const DEFAULT_CLIP: [f64; 2] = [0.0, 5.0];
/// A policy token is key when at least half of its characters are key characters: each
/// boundary then errs by less than one token either way.
const DEFAULT_SPAN_OVERLAP: f64 = 0.5;

fn default_ratio() -> f64 {
    0.3
}

struct Select {
    cfg: SelectConfig,
}

fn build(params: &Value, ctx: &BuildContext) -> Result<Box<dyn Stage>> {
    Ok(Box::new(Select {
        cfg: configure(
            params,
            ctx.pipeline_seed,
            ctx.roles.iter().any(|r| r == "tokens"),
        )?,
    }))
}

/// The checked config, `seed` resolved for `mode: random`, `mu` and `weight_clip` for `mode:
/// weights`, `span_overlap` with a `tokens` input.
fn configure(params: &Value, pipeline_seed: u64, has_tokens: bool) -> Result<SelectConfig> {
    let mut cfg: SelectConfig = parse_config(params)?;
    if has_tokens {
        let share = *cfg.span_overlap.get_or_insert(DEFAULT_SPAN_OVERLAP);
        if !(share > 0.0 && share <= 1.0) {
            user_bail!("`span_overlap` must be in (0, 1], got {share}");
        }
    } else if cfg.span_overlap.is_some() {
        user_bail!(
            "`span_overlap` applies only with a `tokens` input (`inputs: {{tokens: <tokenize stage>}}`)"
        );
    }
    for (k, v) in [
        ("chosen_ratio", cfg.chosen_ratio),
        ("rejected_ratio", cfg.rejected_ratio),
    ] {
        if !(0.0..=1.0).contains(&v) {
            user_bail!("`{k}` must be in [0, 1], got {v}");
        }
    }
    if cfg.chosen_ratio == 0.0 && cfg.rejected_ratio == 0.0 {
        user_bail!("`chosen_ratio` and `rejected_ratio` are both 0: no token would be selected");
    }
    if cfg.mode == SelectMode::Reverse {
        // One artifact for one choice: `reverse` is `bottom` in the canonical form and the hash.
        cfg.mode = SelectMode::Bottom;
    }
    let mode = cfg.mode.name();
    match (cfg.mode, cfg.threshold) {
        (SelectMode::Threshold, None) => user_bail!("`mode: threshold` needs `threshold`"),
        (SelectMode::Threshold, Some(t)) if !t.is_finite() => {
            user_bail!("`threshold` must be a finite number, got {t}")
        }
        (SelectMode::Threshold, Some(_)) | (_, None) => {}
        (_, Some(_)) => user_bail!("`threshold` applies to `mode: threshold` only, not `{mode}`"),
    }
    if cfg.mode == SelectMode::Weights {
        let mu = *cfg.mu.get_or_insert(DEFAULT_MU);
        let [lo, hi] = *cfg.weight_clip.get_or_insert(DEFAULT_CLIP);
        if !mu.is_finite() {
            user_bail!("`mu` must be a finite number, got {mu}");
        }
        if !(lo.is_finite() && hi.is_finite() && 0.0 <= lo && lo <= hi && hi > 0.0) {
            user_bail!(
                "`weight_clip` must be [lo, hi] with 0 <= lo <= hi and hi > 0, got [{lo}, {hi}]"
            );
        }
    } else {
        for (k, set) in [
            ("mu", cfg.mu.is_some()),
            ("weight_clip", cfg.weight_clip.is_some()),
        ] {
            if set {
                user_bail!("`{k}` applies to `mode: weights` only, not `{mode}`");
            }
        }
    }
    if cfg.mode == SelectMode::Random {
        // Resolved here, as `train` does, so the canonical form (and the hash) names the seed used.
        cfg.seed = Some(cfg.seed.unwrap_or(pipeline_seed));
    } else if cfg.seed.is_some() {
        user_bail!("`seed` applies to `mode: random` only, not `{mode}`");
    }
    Ok(cfg)
}

/// How many of `eligible` tokens the ranked and random modes keep at `ratio`: none at ratio 0 or
/// with no eligible token, else `max(1, floor(ratio * eligible))`.
pub fn keep_count(ratio: f64, eligible: usize) -> usize {
    if ratio == 0.0 || eligible == 0 {
        return 0;
    }
    ((ratio * eligible as f64).floor() as usize).clamp(1, eligible)
}

/// `mode: weights`'s weight of each token of one response: TIS-DPO's clipped exponential of its
/// score, `clamp(exp(mu * s), lo, hi)` for a chosen answer and `clamp(exp(-mu * s), lo, hi)` for
/// a rejected one, so the tokens the oracle finds most telling (high in the chosen, low in the
/// rejected answer) weigh most. Computed in f64.
pub fn token_weights(scores: &[f32], mu: f64, clip: [f64; 2], chosen: bool) -> Vec<f32> {
    let sign = if chosen { 1.0 } else { -1.0 };
    scores
        .iter()
        .map(|&s| (sign * mu * f64::from(s)).exp().clamp(clip[0], clip[1]) as f32)
        .collect()
}

/// The rule one response's mask follows (a [`SelectMode`] resolved for one side).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    /// The `keep_count` highest scores (`true`) or lowest (`false`), ties to the earlier position.
    Rank { highest: bool },
    /// `keep_count` positions drawn uniformly without replacement, from this seed.
    Random { seed: u64 },
    /// Every eligible position.
    All,
    /// The positions scored >= this bound.
    AtLeast(f64),
    /// The positions scored <= this bound.
    AtMost(f64),
}

/// The key-token mask of one response. Position 0 is ineligible with `skip_first`; ratio 0 gives
/// an all-false mask; an empty response an empty one. The scores must be finite (checked by the
/// stage before).
pub fn response_mask(scores: &[f32], rule: Rule, ratio: f64, skip_first: bool) -> Vec<bool> {
    let n_all = scores.len();
    let mut mask = vec![false; n_all];
    if ratio == 0.0 {
        return mask;
    }
    let first = usize::from(skip_first).min(n_all);
    let n = keep_count(ratio, n_all - first);
    match rule {
        Rule::Rank { highest } => {
            let mut order: Vec<usize> = (first..n_all).collect();
            // A stable sort keeps earlier positions first among equal scores.
            if highest {
                order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
            } else {
                order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
            }
            for &i in &order[..n] {
                mask[i] = true;
            }
        }
        Rule::Random { seed } => {
            // A partial Fisher-Yates shuffle: the first n slots end up a uniform n-subset.
            let mut rng = StdRng::seed_from_u64(seed);
            let mut pool: Vec<usize> = (first..n_all).collect();
            for k in 0..n {
                let j = rng.random_range(k..pool.len());
                pool.swap(k, j);
                mask[pool[k]] = true;
            }
        }
        Rule::All => mask[first..].fill(true),
        Rule::AtLeast(t) => {
            for i in first..n_all {
                mask[i] = f64::from(scores[i]) >= t;
            }
        }
        Rule::AtMost(t) => {
            for i in first..n_all {
                mask[i] = f64::from(scores[i]) <= t;
            }
        }
    }
    mask
}

/// The key-token mask of one response under `mode: top` (`highest` for a chosen answer): its
/// `n = max(1, floor(ratio * N))` highest (or lowest) scores, ties broken by earlier position.
pub fn key_tokens(scores: &[f32], ratio: f64, highest: bool) -> Vec<bool> {
    response_mask(scores, Rule::Rank { highest }, ratio, false)
}

/// The seed of one response's random draw: the stage's seed mixed with the pair's id and side, so
/// a pair's mask does not depend on the other rows (their order, or whether they are there).
pub fn response_seed(seed: u64, id: &str, chosen: bool) -> u64 {
    // FNV-1a over the id, then splitmix64's finalizer: fixed arithmetic, the same on every build
    // (unlike std's hashers, whose output may change between Rust releases).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let mut z = seed ^ h.rotate_left(1) ^ u64::from(chosen);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Select {
    /// The rule of one response under this stage's mode.
    fn rule(&self, id: &str, chosen: bool) -> Rule {
        let t = self.cfg.threshold.unwrap_or(0.0);
        match self.cfg.mode {
            SelectMode::Top => Rule::Rank { highest: chosen },
            SelectMode::Bottom => Rule::Rank { highest: !chosen },
            SelectMode::Random => Rule::Random {
                seed: response_seed(self.cfg.seed.unwrap_or(0), id, chosen),
            },
            SelectMode::All | SelectMode::Weights => Rule::All,
            SelectMode::Reverse => unreachable!("configure() makes `reverse` `bottom`"),
            SelectMode::Threshold if chosen => Rule::AtLeast(t),
            SelectMode::Threshold => Rule::AtMost(-t),
        }
    }

    /// Every response's mask of one side, after refusing a non-finite score (it would be ranked
    /// by its bit pattern, or pass or fail a threshold silently).
    fn side(&self, ids: &[String], scores: &[Vec<f32>], chosen: bool) -> Result<Vec<Vec<bool>>> {
        let (name, ratio) = if chosen {
            ("chosen", self.cfg.chosen_ratio)
        } else {
            ("rejected", self.cfg.rejected_ratio)
        };
        ids.iter()
            .zip(scores)
            .map(|(id, s)| {
                if let Some((i, x)) = s.iter().enumerate().find(|(_, x)| !x.is_finite()) {
                    user_bail!(
                        "pair `{id}`: the {name} response's score at token {i} is {x}; \
                         scores must be finite (check the score stage's models)"
                    );
                }
                Ok(response_mask(
                    s,
                    self.rule(id, chosen),
                    ratio,
                    self.cfg.skip_first,
                ))
            })
            .collect()
    }
}

impl Stage for Select {
    fn params(&self) -> Value {
        to_params(&self.cfg)
    }

    fn run(&self, ctx: &RunContext) -> Result<Value> {
        let scores = Scores::open(ctx.input("scores")?)?;
        let chosen = scores.chosen()?;
        let rejected = scores.rejected()?;
        let ids = scores.ids()?;
        let df = scores.into_frame();
        let cm = self.side(&ids, &chosen, true)?;
        let rm = self.side(&ids, &rejected, false)?;
        let weights = self.weights(&chosen, &cm, &rejected, &rm);
        let mut choice = Choice {
            chosen_scores: chosen,
            rejected_scores: rejected,
            chosen_mask: cm,
            rejected_mask: rm,
            weights,
        };
        let (mut df, bridged) = match ctx.input_opt("tokens") {
            None => (df, Value::Null),
            Some(tokens) => {
                let (df, stats) = self.bridge(ctx, tokens, &ids, &mut choice)?;
                (df, stats)
            }
        };
        let (cm, rm) = (&choice.chosen_mask, &choice.rejected_mask);
        let count = |m: &[Vec<bool>]| {
            m.iter()
                .map(|v| v.iter().filter(|b| **b).count())
                .sum::<usize>()
        };
        let total = |m: &[Vec<bool>]| m.iter().map(Vec::len).sum::<usize>();
        let (kc, tc, kr, tr) = (count(cm), total(cm), count(rm), total(rm));
        df.with_column(pq::list("chosen_mask", cm))?;
        df.with_column(pq::list("rejected_mask", rm))?;
        if let Some((cw, rw)) = &choice.weights {
            df.with_column(pq::list("chosen_weights", cw))?;
            df.with_column(pq::list("rejected_weights", rw))?;
        }
        Selection::write(&mut df, ctx.out)?;
        let mode = self.cfg.mode.name();
        ctx.progress.log(format!(
            "         {}: {mode} selection kept {kc}/{tc} chosen and {kr}/{tr} rejected tokens ({:.1}%)",
            ctx.stage,
            100.0 * (kc + kr) as f64 / (tc + tr).max(1) as f64
        ));
        let mut stats = json!({
            "pairs": cm.len(),
            "mode": mode,
            "chosen_kept": kc, "chosen_tokens": tc,
            "rejected_kept": kr, "rejected_tokens": tr,
        });
        if !bridged.is_null() {
            stats["bridge"] = bridged;
        }
        Ok(stats)
    }
}

/// One side's per-response lists: scores, masks and (under `mode: weights`) weights.
type PerResponse<T> = Vec<Vec<T>>;

/// What `select` decided, row-aligned with its output: the scores, the masks and the weights.
struct Choice {
    chosen_scores: PerResponse<f32>,
    rejected_scores: PerResponse<f32>,
    chosen_mask: PerResponse<bool>,
    rejected_mask: PerResponse<bool>,
    weights: Option<(PerResponse<f32>, PerResponse<f32>)>,
}

impl Select {
    /// `mode: weights`'s weights of both sides, 0 wherever the mask is off (a ratio of 0, or the
    /// first token under `skip_first`): what training multiplies in. `None` in the other modes.
    fn weights(
        &self,
        chosen: &[Vec<f32>],
        cm: &[Vec<bool>],
        rejected: &[Vec<f32>],
        rm: &[Vec<bool>],
    ) -> Option<(PerResponse<f32>, PerResponse<f32>)> {
        let (Some(mu), Some(clip)) = (self.cfg.mu, self.cfg.weight_clip) else {
            return None;
        };
        let side = |scores: &[Vec<f32>], masks: &[Vec<bool>], is_chosen: bool| {
            scores
                .iter()
                .zip(masks)
                .map(|(s, m)| {
                    token_weights(s, mu, clip, is_chosen)
                        .into_iter()
                        .zip(m)
                        .map(|(w, &on)| if on { w } else { 0.0 })
                        .collect()
                })
                .collect()
        };
        Some((side(chosen, cm, true), side(rejected, rm, false)))
    }

    /// Re-expresses `choice` (made on the oracle's tokens, rows `ids` of the scores) in the
    /// tokens of `tokens`, a tokenize stage of the same pairs with another tokenizer, by
    /// character spans (see [`crate::bridge`]). Returns the output frame (the `tokens` rows that
    /// the scores also have, in `tokens`' order, with the carried scores and their sums) and the
    /// manifest's `bridge` statistics; `choice` is replaced by the carried lists.
    fn bridge(
        &self,
        ctx: &RunContext,
        tokens: &Artifact,
        ids: &[String],
        choice: &mut Choice,
    ) -> Result<(DataFrame, Value)> {
        let share = self.cfg.span_overlap.unwrap_or(DEFAULT_SPAN_OVERLAP);
        let scores_art = ctx.input("scores")?;
        // A tokenize stage's tokenizer (with its end token) and the ingest stage it read.
        let side_of = |tokenize: &Artifact| -> Result<(HfTokenizer, u32, Artifact, String)> {
            let tok_art = ctx.upstream_one(tokenize, "tokenizer")?.ok_or_else(|| {
                user(format!("stage `{}` has no tokenizer input", tokenize.stage))
            })?;
            let hf = tokenizer_of(&tok_art)?;
            let Some((_, eos)) = hf.eos()? else {
                user_bail!("tokenizer `{}` names no eos_token", tok_art.stage);
            };
            let data = ctx
                .upstream_one(tokenize, "data")?
                .ok_or_else(|| user(format!("stage `{}` has no data input", tokenize.stage)))?;
            Ok((hf, eos, data, tok_art.stage))
        };
        let Some(src_tokenize) = tokenize_behind(ctx, scores_art)? else {
            user_bail!(
                "cannot find the tokenize stage behind `{}`: the masks cannot be carried to `{}`",
                scores_art.stage,
                tokens.stage
            );
        };
        let (src_tok, src_eos, src_data, src_name) = side_of(&src_tokenize)?;
        let (dst_tok, dst_eos, dst_data, dst_name) = side_of(tokens)?;
        let src_rows = Tokens::open(scores_art)?.rows()?;
        let dst_rows = Tokens::open(tokens)?.rows()?;
        let src_index: HashMap<&str, usize> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.as_str(), i))
            .collect();
        let text = |data: &Artifact| -> Result<HashMap<String, (String, String)>> {
            Ok(Pairs::open(data)?
                .into_iter()
                .map(|p| (p.id, (p.chosen, p.rejected)))
                .collect())
        };
        // Both tokenize stages usually read the same ingest stage: its text is read once then.
        let src_text = text(&src_data)?;
        let dst_text_own = (dst_data.hash != src_data.hash)
            .then(|| text(&dst_data))
            .transpose()?;
        let dst_text = dst_text_own.as_ref().unwrap_or(&src_text);
        let mut out = Choice {
            chosen_scores: Vec::new(),
            rejected_scores: Vec::new(),
            chosen_mask: Vec::new(),
            rejected_mask: Vec::new(),
            weights: choice.weights.as_ref().map(|_| (Vec::new(), Vec::new())),
        };
        let mut kept_rows = Vec::new();
        let mut dropped = 0usize;
        let (mut src_key_bytes, mut dst_key_bytes) = (0usize, 0usize);
        for row in &dst_rows {
            let Some(&i) = src_index.get(row.id.as_str()) else {
                dropped += 1;
                continue;
            };
            let id = &row.id;
            let (Some(st), Some(dt)) = (src_text.get(id), dst_text.get(id)) else {
                user_bail!(
                    "pair `{id}`: its text is missing from the ingest stage behind `{}` or `{}`",
                    src_tokenize.stage,
                    tokens.stage
                );
            };
            if st != dt {
                user_bail!(
                    "pair `{id}`: the responses behind `{}` and behind `{}` differ: key tokens can only be carried between tokenizations of the same text",
                    src_tokenize.stage,
                    tokens.stage
                );
            }
            for chosen in [true, false] {
                let (side, text, src_ids, dst_ids) = if chosen {
                    ("chosen", &st.0, &src_rows[i].chosen_ids, &row.chosen_ids)
                } else {
                    (
                        "rejected",
                        &st.1,
                        &src_rows[i].rejected_ids,
                        &row.rejected_ids,
                    )
                };
                let src_spans = bridge::response_spans(src_tok.tokenizer(), text, src_ids, src_eos)
                    .map_err(|e| {
                        user(format!(
                            "pair `{id}`, {side} response, tokenizer `{src_name}`: {e}"
                        ))
                    })?;
                let dst_spans = bridge::response_spans(dst_tok.tokenizer(), text, dst_ids, dst_eos)
                    .map_err(|e| {
                        user(format!(
                            "pair `{id}`, {side} response, tokenizer `{dst_name}`: {e}"
                        ))
                    })?;
                let (scores, mask, target) = if chosen {
                    (
                        &choice.chosen_scores[i],
                        &choice.chosen_mask[i],
                        (&mut out.chosen_scores, &mut out.chosen_mask),
                    )
                } else {
                    (
                        &choice.rejected_scores[i],
                        &choice.rejected_mask[i],
                        (&mut out.rejected_scores, &mut out.rejected_mask),
                    )
                };
                let carried = bridge::carry_mask(&src_spans, mask, &dst_spans, share);
                let key_bytes = |spans: &[bridge::Span], m: &[bool]| -> usize {
                    spans
                        .iter()
                        .zip(m)
                        .filter(|(_, k)| **k)
                        .filter_map(|(s, _)| s.map(|(a, b)| b - a))
                        .sum()
                };
                src_key_bytes += key_bytes(&src_spans, mask);
                dst_key_bytes += key_bytes(&dst_spans, &carried);
                target
                    .0
                    .push(bridge::carry_scores(&src_spans, scores, &dst_spans));
                target.1.push(carried);
                if let (Some((cw, rw)), Some((ocw, orw))) = (&choice.weights, &mut out.weights) {
                    let (w, o) = if chosen { (&cw[i], ocw) } else { (&rw[i], orw) };
                    o.push(bridge::carry_weights(&src_spans, w, &dst_spans));
                }
            }
            kept_rows.push(row.clone());
        }
        if kept_rows.is_empty() {
            user_bail!(
                "no pair of `{}` is among the scored pairs of `{}`: nothing to carry",
                tokens.stage,
                scores_art.stage
            );
        }
        if dropped > 0 {
            ctx.progress.log(format!(
                "         {}: {dropped} pairs of `{}` have no scores in `{}` and were left out",
                ctx.stage, tokens.stage, scores_art.stage
            ));
        }
        let mut df = crate::artifacts::tokens::to_frame(&kept_rows)?;
        let sums = |v: &[Vec<f32>]| -> Vec<f32> { v.iter().map(|s| s.iter().sum()).collect() };
        df.with_column(pq::list("chosen_scores", &out.chosen_scores))?;
        df.with_column(pq::list("rejected_scores", &out.rejected_scores))?;
        df.with_column(pq::f32s("chosen_reward", sums(&out.chosen_scores)))?;
        df.with_column(pq::f32s("rejected_reward", sums(&out.rejected_scores)))?;
        *choice = out;
        Ok((
            df,
            json!({
                "from": src_tokenize.stage, "from_tokenizer": src_name,
                "to": tokens.stage, "to_tokenizer": dst_name,
                "span_overlap": share,
                "dropped_pairs": dropped,
                "key_bytes_before": src_key_bytes,
                "key_bytes_after": dst_key_bytes,
            }),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn positions(m: &[bool]) -> Vec<usize> {
        m.iter().enumerate().filter(|x| *x.1).map(|x| x.0).collect()
    }

    fn kept(m: &[bool]) -> usize {
        m.iter().filter(|b| **b).count()
    }

    /// A stage with these parameters (pipeline seed 7), built as the engine builds it.
    fn stage(params: Value) -> Select {
        Select {
            cfg: configure(&params, 7, false).unwrap(),
        }
    }

    /// The chosen and rejected masks `stage` gives one pair.
    fn pair(s: &Select, id: &str, c: &[f32], r: &[f32]) -> (Vec<bool>, Vec<bool>) {
        let ids = [id.to_string()];
        let cm = s.side(&ids, &[c.to_vec()], true).unwrap();
        let rm = s.side(&ids, &[r.to_vec()], false).unwrap();
        (cm[0].clone(), rm[0].clone())
    }

    /// Scores on a coarse grid, so that ties are common.
    fn grid_scores() -> impl Strategy<Value = Vec<f32>> {
        prop::collection::vec((-12i32..12).prop_map(|x| x as f32 / 4.0), 0..60)
    }

    #[test]
    fn spec_examples() {
        let s = [0.5, -1.0, 2.0, 0.5, 3.0, -2.0, 0.0, 1.0, 0.5, -0.5];
        // N = 10, ratio 0.3 -> n = 3: the three highest are 3.0 (4), 2.0 (2), 1.0 (7).
        assert_eq!(positions(&key_tokens(&s, 0.3, true)), [2, 4, 7]);
        assert_eq!(positions(&key_tokens(&s, 0.3, false)), [1, 5, 9]);
        // Ties: earlier positions first.
        let t = [1.0, 1.0, 1.0, 1.0];
        assert_eq!(key_tokens(&t, 0.5, true), [true, true, false, false]);
        assert_eq!(key_tokens(&t, 0.5, false), [true, true, false, false]);
        // At least one token, even for short responses.
        assert_eq!(key_tokens(&[0.1, 0.2], 0.3, true), [false, true]);
        assert!(key_tokens(&[], 0.3, true).is_empty());
    }

    /// Today's pipelines keep their hashes: the new parameters vanish from the canonical form at
    /// their defaults, spelled or not.
    #[test]
    fn defaults_leave_the_canonical_form_as_before() {
        let want = json!({"chosen_ratio": 0.3, "rejected_ratio": 0.3});
        assert_eq!(to_params(&stage(json!({})).cfg), want);
        let spelled = json!({"mode": "top", "skip_first": false, "threshold": null, "seed": null});
        assert_eq!(to_params(&stage(spelled).cfg), want);
        // `random` names its seed (the pipeline's when left out), so changing it rebuilds.
        let random = to_params(&stage(json!({"mode": "random"})).cfg);
        assert_eq!(random["seed"], 7);
        assert_eq!(random["mode"], "random");
    }

    /// `reverse` is `bottom` by another name: the same canonical form, so the same artifact.
    #[test]
    fn reverse_is_bottom() {
        let reverse = to_params(&stage(json!({"mode": "reverse", "chosen_ratio": 0.2})).cfg);
        let bottom = to_params(&stage(json!({"mode": "bottom", "chosen_ratio": 0.2})).cfg);
        assert_eq!(reverse, bottom);
        assert_eq!(reverse["mode"], "bottom");
    }

    /// `mode: weights` names its resolved `mu` and clip in the canonical form (so changing a
    /// default later cannot silently reuse old artifacts), marks every token, and weighs each by
    /// the clipped exponential of its score.
    #[test]
    fn weights_mode_by_hand() {
        let cfg = to_params(&stage(json!({"mode": "weights"})).cfg);
        assert_eq!(cfg["mu"], 1.0);
        assert_eq!(cfg["weight_clip"], json!([0.0, 5.0]));
        let s = [0.0f32, 1.0, -1.0, 3.0];
        let w = token_weights(&s, 1.0, [0.0, 5.0], true);
        let want = [1.0, 1f64.exp(), (-1f64).exp(), 5.0];
        for (g, e) in w.iter().zip(want) {
            assert!((f64::from(*g) - e).abs() < 1e-6, "{w:?}");
        }
        // The rejected side mirrors the exponent: low scores weigh most.
        let r = token_weights(&s, 1.0, [0.0, 5.0], false);
        assert!(
            (f64::from(r[2]) - 1f64.exp()).abs() < 1e-6 && r[3] < 0.05,
            "{r:?}"
        );
        let (mc, mr) = pair(&stage(json!({"mode": "weights"})), "x", &s, &s);
        assert_eq!((kept(&mc), kept(&mr)), (4, 4));
    }

    /// The weight rule against `scripts/make_token_fixtures.py` (float64 torch from the formula),
    /// with scores that overflow the exponent and hit both clip bounds.
    #[test]
    fn weights_match_the_fixture() {
        let fx: Value =
            serde_json::from_str(include_str!("../../tests/fixtures/token_losses.json")).unwrap();
        let fx = &fx["tis_weights"];
        let floats = |v: &Value| -> Vec<f64> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        };
        let scores: Vec<f32> = floats(&fx["scores"]).iter().map(|&x| x as f32).collect();
        for case in fx["cases"].as_array().unwrap() {
            let (mu, lo, hi) = (
                case["mu"].as_f64().unwrap(),
                case["lo"].as_f64().unwrap(),
                case["hi"].as_f64().unwrap(),
            );
            for (chosen, key) in [(true, "chosen_weights"), (false, "rejected_weights")] {
                let got = token_weights(&scores, mu, [lo, hi], chosen);
                for (i, (g, w)) in got.iter().zip(floats(&case[key])).enumerate() {
                    // f32 output: relative 1e-6 of weights up to `hi`.
                    assert!(
                        (f64::from(*g) - w).abs() <= 1e-6 * w.abs().max(1.0),
                        "mu {mu} [{lo}, {hi}] {key}[{i}] (score {}): got {g}, want {w}",
                        scores[i]
                    );
                }
            }
        }
    }

    #[test]
    fn configurations_that_cannot_mean_anything_are_refused() {
        for (params, says) in [
            (json!({"chosen_ratio": 0, "rejected_ratio": 0}), "both 0"),
            (json!({"chosen_ratio": 1.5}), "[0, 1]"),
            (json!({"rejected_ratio": -0.1}), "[0, 1]"),
            (json!({"mode": "threshold"}), "needs `threshold`"),
            (json!({"threshold": 0.5}), "`mode: threshold` only"),
            (json!({"mode": "all", "threshold": 0.5}), "not `all`"),
            (json!({"mode": "top", "seed": 3}), "`mode: random` only"),
            (json!({"mode": "sideways"}), "unknown variant"),
            (json!({"mu": 2.0}), "`mode: weights` only"),
            (
                json!({"mode": "top", "weight_clip": [0, 1]}),
                "`mode: weights` only",
            ),
            (
                json!({"mode": "weights", "weight_clip": [2, 1]}),
                "lo <= hi",
            ),
            (
                json!({"mode": "weights", "weight_clip": [-1, 1]}),
                "0 <= lo",
            ),
            (json!({"mode": "weights", "weight_clip": [0, 0]}), "hi > 0"),
        ] {
            let err = configure(&params, 7, false).unwrap_err();
            assert!(crate::error::is_user_error(&err), "{params}: {err}");
            assert!(err.to_string().contains(says), "{params}: {err}");
        }
    }

    proptest! {
        #[test]
        fn count_and_threshold(scores in prop::collection::vec(-5.0f32..5.0, 1..200), ratio in 0.01f64..1.0) {
            let m = key_tokens(&scores, ratio, true);
            let n = ((ratio * scores.len() as f64).floor() as usize).max(1);
            prop_assert_eq!(kept(&m), n);
            let min_kept = scores.iter().zip(&m).filter(|x| *x.1).map(|x| *x.0).fold(f32::INFINITY, f32::min);
            let max_dropped = scores.iter().zip(&m).filter(|x| !*x.1).map(|x| *x.0).fold(f32::NEG_INFINITY, f32::max);
            prop_assert!(min_kept >= max_dropped);
        }

        /// The paper's control: `random` keeps exactly as many tokens as `top` in every response,
        /// on both sides, with any ratio (0 included) and with `skip_first`.
        #[test]
        fn random_keeps_tops_count(
            c in grid_scores(), r in grid_scores(),
            cr in prop_oneof![Just(0.0), 0.0f64..=1.0], rr in 0.01f64..=1.0,
            skip_first: bool, seed: u64, swap: bool,
        ) {
            let (cr, rr) = if swap { (rr, cr) } else { (cr, rr) };
            let params = |mode: &str| {
                let mut p = json!({"mode": mode, "chosen_ratio": cr, "rejected_ratio": rr, "skip_first": skip_first});
                if mode == "random" {
                    p["seed"] = json!(seed);
                }
                p
            };
            let (tc, tr) = pair(&stage(params("top")), "x", &c, &r);
            let (rc, rr_) = pair(&stage(params("random")), "x", &c, &r);
            prop_assert_eq!(kept(&rc), kept(&tc));
            prop_assert_eq!(kept(&rr_), kept(&tr));
            prop_assert_eq!((rc.len(), rr_.len()), (c.len(), r.len()));
        }

        /// `bottom` is `top` run on the negated scores, side by side.
        #[test]
        fn bottom_is_top_of_the_negated_scores(
            c in grid_scores(), r in grid_scores(), cr in 0.0f64..=1.0, rr in 0.01f64..=1.0,
            skip_first: bool,
        ) {
            let p = |mode: &str| json!({"mode": mode, "chosen_ratio": cr, "rejected_ratio": rr, "skip_first": skip_first});
            let neg = |s: &[f32]| s.iter().map(|x| -x).collect::<Vec<_>>();
            let bottom = pair(&stage(p("bottom")), "x", &c, &r);
            let top_of_negated = pair(&stage(p("top")), "x", &neg(&c), &neg(&r));
            prop_assert_eq!(bottom, top_of_negated);
        }

        /// `skip_first` never marks the first token and makes the choice the official slice
        /// makes: rank `scores[1..]` alone (n from its N - 1 tokens), then shift back by one.
        #[test]
        fn skip_first_is_the_official_slice(
            c in grid_scores(), r in grid_scores(), cr in 0.01f64..=1.0, rr in 0.01f64..=1.0,
            mode in prop_oneof![Just("top"), Just("bottom"), Just("random"), Just("all")],
        ) {
            let s = stage(json!({"mode": mode, "chosen_ratio": cr, "rejected_ratio": rr, "skip_first": true}));
            let (mc, mr) = pair(&s, "x", &c, &r);
            prop_assert!(!mc.first().copied().unwrap_or(false));
            prop_assert!(!mr.first().copied().unwrap_or(false));
            let official = |scores: &[f32], ratio: f64, highest: bool| -> Vec<bool> {
                if scores.is_empty() {
                    return Vec::new();
                }
                let mut m = vec![false];
                m.extend(key_tokens(&scores[1..], ratio, highest));
                m
            };
            match mode {
                "top" => {
                    prop_assert_eq!(&mc, &official(&c, cr, true));
                    prop_assert_eq!(&mr, &official(&r, rr, false));
                }
                "bottom" => {
                    prop_assert_eq!(&mc, &official(&c, cr, false));
                    prop_assert_eq!(&mr, &official(&r, rr, true));
                }
                "random" => {
                    prop_assert_eq!(kept(&mc), kept(&official(&c, cr, true)));
                    prop_assert_eq!(kept(&mr), kept(&official(&r, rr, false)));
                }
                _ => {
                    prop_assert_eq!(kept(&mc), c.len().saturating_sub(1));
                    prop_assert_eq!(kept(&mr), r.len().saturating_sub(1));
                }
            }
        }
    }

    #[test]
    fn skip_first_by_hand() {
        // The first token has the highest score but is never eligible; n = floor(0.5 * 4) = 2 of
        // the four after it.
        let s = [9.0, 1.0, 3.0, 2.0, 0.0];
        let top = stage(json!({"chosen_ratio": 0.5, "rejected_ratio": 0.5, "skip_first": true}));
        let (c, r) = pair(&top, "x", &s, &s);
        assert_eq!(positions(&c), [2, 3]);
        assert_eq!(positions(&r), [1, 4]);
        // Without it, n = floor(0.5 * 5) = 2 of all five.
        let plain = stage(json!({"chosen_ratio": 0.5, "rejected_ratio": 0.5}));
        assert_eq!(positions(&pair(&plain, "x", &s, &s).0), [0, 2]);
        // A one-token response has nothing after its first token: an empty choice.
        assert_eq!(pair(&top, "x", &[1.0], &[1.0]), (vec![false], vec![false]));
    }

    #[test]
    fn random_is_reproducible_per_seed_and_differs_across_seeds() {
        let scores: Vec<f32> = (0..100).map(|i| (i as f32).sin()).collect();
        let draw = |seed: u64, id: &str| {
            pair(
                &stage(json!({"mode": "random", "seed": seed})),
                id,
                &scores,
                &scores,
            )
        };
        assert_eq!(draw(1, "a"), draw(1, "a"));
        let (c, r) = draw(1, "a");
        assert_eq!((kept(&c), kept(&r)), (30, 30));
        // 30 of 100 positions: two seeds drawing the same subset is a 1 in 10^25 event.
        assert_ne!(draw(1, "a").0, draw(2, "a").0);
        // Each response draws on its own: other pairs, and the other side, differ.
        assert_ne!(draw(1, "a").0, draw(1, "b").0);
        assert_ne!(c, r);
        // And the draw is not the ranking in disguise.
        assert_ne!(c, key_tokens(&scores, 0.3, true));
        // Left out, the seed is the pipeline's.
        let default = stage(json!({"mode": "random"}));
        assert_eq!(pair(&default, "a", &scores, &scores), draw(7, "a"));
    }

    #[test]
    fn all_marks_every_token() {
        let s = [0.5, -1.0, 2.0];
        let all = stage(json!({"mode": "all"}));
        assert_eq!(pair(&all, "x", &s, &[]), (vec![true; 3], vec![]));
        let one_sided = stage(json!({"mode": "all", "rejected_ratio": 0}));
        assert_eq!(
            pair(&one_sided, "x", &s, &s),
            (vec![true; 3], vec![false; 3])
        );
        let skip = stage(json!({"mode": "all", "skip_first": true}));
        assert_eq!(pair(&skip, "x", &s, &s).0, [false, true, true]);
    }

    #[test]
    fn threshold_by_hand() {
        let s = [0.5, -1.0, 2.0, 0.49, -0.5, -0.51, 0.0];
        let t = stage(json!({"mode": "threshold", "threshold": 0.5}));
        let (c, r) = pair(&t, "x", &s, &s);
        // Chosen: >= 0.5, the bound itself included; rejected: <= -0.5.
        assert_eq!(positions(&c), [0, 2]);
        assert_eq!(positions(&r), [1, 4, 5]);
        // No token passing is an empty choice, not "at least one".
        assert_eq!(pair(&t, "x", &[0.1], &[0.1]), (vec![false], vec![false]));
        // A negative bound loosens both sides: chosen >= -1 is every token here, rejected <= 1
        // all but the 2.0.
        let loose = stage(json!({"mode": "threshold", "threshold": -1.0}));
        let (c, r) = pair(&loose, "x", &s, &s);
        assert_eq!(kept(&c), s.len());
        assert_eq!(positions(&r), [0, 1, 3, 4, 5, 6]);
    }

    #[test]
    fn ratio_zero_empties_its_side_in_every_mode() {
        let s = [0.5, -1.0, 2.0, 0.49];
        for mode in [
            "top",
            "random",
            "all",
            "bottom",
            "reverse",
            "threshold",
            "weights",
        ] {
            let mut p = json!({"mode": mode, "chosen_ratio": 0});
            if mode == "threshold" {
                p["threshold"] = json!(-10.0);
            }
            let (c, r) = pair(&stage(p), "x", &s, &s);
            assert_eq!(c, [false; 4], "{mode}");
            assert!(kept(&r) > 0, "{mode}: the other side still selects");
            let mut p = json!({"mode": mode, "rejected_ratio": 0});
            if mode == "threshold" {
                p["threshold"] = json!(-10.0);
            }
            let (c, r) = pair(&stage(p), "x", &s, &s);
            assert_eq!(r, [false; 4], "{mode}");
            assert!(kept(&c) > 0, "{mode}: the other side still selects");
        }
    }

    #[test]
    fn non_finite_scores_are_refused_naming_the_pair_and_side() {
        let s = stage(json!({}));
        let ids = ["p0".to_string(), "p1".to_string()];
        for (bad, shown) in [
            (f32::NAN, "NaN"),
            (f32::INFINITY, "inf"),
            (f32::NEG_INFINITY, "-inf"),
        ] {
            let scores = vec![vec![0.1, 0.2], vec![0.3, bad]];
            for chosen in [true, false] {
                let err = s.side(&ids, &scores, chosen).unwrap_err();
                let side = if chosen { "chosen" } else { "rejected" };
                assert!(crate::error::is_user_error(&err));
                let msg = err.to_string();
                assert!(
                    msg.contains("pair `p1`") && msg.contains(side) && msg.contains(shown),
                    "{msg}"
                );
            }
        }
        // Refused in every mode, not only the ranked ones: a threshold would let it pass or fail
        // silently.
        let all = stage(json!({"mode": "all"}));
        assert!(all.side(&ids, &[vec![0.0], vec![f32::NAN]], false).is_err());
    }
}
