//! `select`: SePO's key tokens. Per response with N scored tokens, `n = max(1, floor(ratio * N))`;
//! the chosen answer keeps its n highest-scored tokens, the rejected answer its n lowest; ties go
//! to the earlier position.

use anyhow::Result;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{
    BuildContext, Role, RunContext, Stage, StageKind, params_schema, parse_config, to_params,
};
use crate::artifacts::{Scores, Selection};
use crate::data::parquet as pq;
use crate::user_bail;

pub static KIND: StageKind = StageKind {
    kind: "select",
    version: "1",
    roles: &[Role {
        name: "scores",
        required: true,
        many: false,
        kinds: &["score"],
    }],
    uses_device: false,
    build,
    params_schema: params_schema::<SelectConfig>,
};

/// `select`: SePO's key tokens. A response with N scored tokens keeps
/// `n = max(1, floor(ratio * N))` of them: the chosen answer its n highest-scored, the rejected
/// answer its n lowest; ties go to the earlier position.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SelectConfig {
    /// Share of each chosen response's tokens kept (its highest-scored), in (0, 1].
    #[serde(default = "default_ratio")]
    #[schemars(range(max = 1), extend("exclusiveMinimum" = 0))]
    pub chosen_ratio: f64,
    /// Share of each rejected response's tokens kept (its lowest-scored), in (0, 1].
    #[serde(default = "default_ratio")]
    #[schemars(range(max = 1), extend("exclusiveMinimum" = 0))]
    pub rejected_ratio: f64,
}

fn default_ratio() -> f64 {
    0.3
}

struct Select {
    cfg: SelectConfig,
}

fn build(params: &Value, _ctx: &BuildContext) -> Result<Box<dyn Stage>> {
    let cfg: SelectConfig = parse_config(params)?;
    for (k, v) in [
        ("chosen_ratio", cfg.chosen_ratio),
        ("rejected_ratio", cfg.rejected_ratio),
    ] {
        if !(v > 0.0 && v <= 1.0) {
            user_bail!("`{k}` must be in (0, 1], got {v}");
        }
    }
    Ok(Box::new(Select { cfg }))
}

/// The key-token mask of one response: its `n = max(1, floor(ratio * N))` highest (or lowest)
/// scores, ties broken by earlier position. An empty response has an empty mask.
pub fn key_tokens(scores: &[f32], ratio: f64, highest: bool) -> Vec<bool> {
    let n_all = scores.len();
    if n_all == 0 {
        return Vec::new();
    }
    let n = ((ratio * n_all as f64).floor() as usize).clamp(1, n_all);
    let mut order: Vec<usize> = (0..n_all).collect();
    // A stable sort keeps earlier positions first among equal scores.
    if highest {
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    } else {
        order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    }
    let mut mask = vec![false; n_all];
    for &i in &order[..n] {
        mask[i] = true;
    }
    mask
}

impl Stage for Select {
    fn params(&self) -> Value {
        to_params(&self.cfg)
    }

    fn run(&self, ctx: &RunContext) -> Result<Value> {
        let scores = Scores::open(ctx.input("scores")?)?;
        let chosen = scores.chosen()?;
        let rejected = scores.rejected()?;
        let mut df = scores.into_frame();
        let cm: Vec<Vec<bool>> = chosen
            .iter()
            .map(|s| key_tokens(s, self.cfg.chosen_ratio, true))
            .collect();
        let rm: Vec<Vec<bool>> = rejected
            .iter()
            .map(|s| key_tokens(s, self.cfg.rejected_ratio, false))
            .collect();
        let count = |m: &[Vec<bool>]| {
            m.iter()
                .map(|v| v.iter().filter(|b| **b).count())
                .sum::<usize>()
        };
        let total = |m: &[Vec<bool>]| m.iter().map(Vec::len).sum::<usize>();
        let (kc, tc, kr, tr) = (count(&cm), total(&cm), count(&rm), total(&rm));
        df.with_column(pq::list("chosen_mask", &cm))?;
        df.with_column(pq::list("rejected_mask", &rm))?;
        Selection::write(&mut df, ctx.out)?;
        ctx.progress.log(format!(
            "         {}: kept {kc}/{tc} chosen and {kr}/{tr} rejected tokens ({:.1}%)",
            ctx.stage,
            100.0 * (kc + kr) as f64 / (tc + tr).max(1) as f64
        ));
        Ok(json!({
            "pairs": cm.len(),
            "chosen_kept": kc, "chosen_tokens": tc,
            "rejected_kept": kr, "rejected_tokens": tr,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn spec_examples() {
        let s = [0.5, -1.0, 2.0, 0.5, 3.0, -2.0, 0.0, 1.0, 0.5, -0.5];
        // N = 10, ratio 0.3 -> n = 3: the three highest are 3.0 (4), 2.0 (2), 1.0 (7).
        let m = key_tokens(&s, 0.3, true);
        assert_eq!(
            m.iter()
                .enumerate()
                .filter(|x| *x.1)
                .map(|x| x.0)
                .collect::<Vec<_>>(),
            [2, 4, 7]
        );
        let m = key_tokens(&s, 0.3, false);
        assert_eq!(
            m.iter()
                .enumerate()
                .filter(|x| *x.1)
                .map(|x| x.0)
                .collect::<Vec<_>>(),
            [1, 5, 9]
        );
        // Ties: earlier positions first.
        let t = [1.0, 1.0, 1.0, 1.0];
        assert_eq!(key_tokens(&t, 0.5, true), [true, true, false, false]);
        assert_eq!(key_tokens(&t, 0.5, false), [true, true, false, false]);
        // At least one token, even for short responses.
        assert_eq!(key_tokens(&[0.1, 0.2], 0.3, true), [false, true]);
        assert!(key_tokens(&[], 0.3, true).is_empty());
    }

    proptest! {
        #[test]
        fn count_and_threshold(scores in prop::collection::vec(-5.0f32..5.0, 1..200), ratio in 0.01f64..1.0) {
            let m = key_tokens(&scores, ratio, true);
            let n = ((ratio * scores.len() as f64).floor() as usize).max(1);
            prop_assert_eq!(m.iter().filter(|b| **b).count(), n);
            let min_kept = scores.iter().zip(&m).filter(|x| *x.1).map(|x| *x.0).fold(f32::INFINITY, f32::min);
            let max_dropped = scores.iter().zip(&m).filter(|x| !*x.1).map(|x| *x.0).fold(f32::NEG_INFINITY, f32::max);
            prop_assert!(min_kept >= max_dropped);
        }
    }
}
