//! `score`: the oracle's implicit token rewards `s_t = log pi_oracle(y_t|x,y<t) - log pi_ref(y_t|x,y<t)`
//! for every chosen and rejected response token (EOS included), and their sums.

use anyhow::Result;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{
    BuildContext, Role, RunContext, Stage, StageKind, params_schema, parse_config, to_params,
};
use crate::artifacts::model::check_same_vocabulary;
use crate::artifacts::{Scores, Tokens};
use crate::data::parquet as pq;
use crate::logprobs::ensure;
use crate::model::Precision;

pub static KIND: StageKind = StageKind {
    kind: "score",
    version: "1",
    roles: &[
        Role {
            name: "oracle",
            required: true,
            many: false,
            kinds: &["model", "train"],
        },
        Role {
            name: "reference",
            required: true,
            many: false,
            kinds: &["model", "train"],
        },
        Role {
            name: "data",
            required: true,
            many: false,
            kinds: &["tokenize"],
        },
    ],
    uses_device: true,
    build,
    params_schema: params_schema::<ScoreConfig>,
};

/// `score`: the oracle's implicit reward of every response token, `log pi_oracle - log pi_ref`
/// (EOS included), and their sums.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScoreConfig {
    /// Precision of both models' forwards: `f32`, or mixed `bf16`/`f16` (see `train`'s
    /// `precision`). Log-probs are cached per precision.
    // Left out of the canonical parameters at f32, so that adding it moved no hash.
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    #[schemars(extend("default" = "f32"))]
    pub precision: Precision,
}

struct Score {
    cfg: ScoreConfig,
}

fn build(params: &Value, _ctx: &BuildContext) -> Result<Box<dyn Stage>> {
    Ok(Box::new(Score {
        cfg: parse_config(params)?,
    }))
}

impl Stage for Score {
    fn params(&self) -> Value {
        to_params(&self.cfg)
    }

    fn run(&self, ctx: &RunContext) -> Result<Value> {
        let (oracle, reference, data) = (
            ctx.input("oracle")?,
            ctx.input("reference")?,
            ctx.input("data")?,
        );
        check_same_vocabulary(oracle, reference)?;
        crate::artifacts::model::check_tokenizer_matches(ctx, oracle, data)?;
        let p = self.cfg.precision;
        // The log-probs below load their models on it; here for the note.
        super::compute_device(ctx, p)?;
        let lo = ensure(ctx, oracle, data, "oracle", p)?;
        let lr = ensure(ctx, reference, data, "reference", p)?;
        let diff = |a: &[Vec<f32>], b: &[Vec<f32>]| -> Vec<Vec<f32>> {
            a.iter()
                .zip(b)
                .map(|(x, y)| x.iter().zip(y).map(|(p, q)| p - q).collect())
                .collect()
        };
        let cs = diff(&lo.chosen, &lr.chosen);
        let rs = diff(&lo.rejected, &lr.rejected);
        let chosen_reward: Vec<f32> = cs.iter().map(|v| v.iter().sum()).collect();
        let rejected_reward: Vec<f32> = rs.iter().map(|v| v.iter().sum()).collect();
        let mut df = Tokens::open(data)?.frame()?;
        df.with_column(pq::list("chosen_scores", &cs))?;
        df.with_column(pq::list("rejected_scores", &rs))?;
        df.with_column(pq::f32s("chosen_reward", chosen_reward.clone()))?;
        df.with_column(pq::f32s("rejected_reward", rejected_reward.clone()))?;
        Scores::write(&mut df, ctx.out)?;
        let n = chosen_reward.len().max(1) as f64;
        let acc = chosen_reward
            .iter()
            .zip(&rejected_reward)
            .filter(|(c, r)| c > r)
            .count() as f64
            / n;
        ctx.progress.log(format!(
            "         {}: oracle prefers the chosen answer on {:.1}% of pairs",
            ctx.stage,
            100.0 * acc
        ));
        Ok(json!({
            "pairs": chosen_reward.len(),
            "reward_accuracy": acc,
            "mean_chosen_reward": chosen_reward.iter().map(|x| *x as f64).sum::<f64>() / n,
            "mean_rejected_reward": rejected_reward.iter().map(|x| *x as f64).sum::<f64>() / n,
        }))
    }
}
