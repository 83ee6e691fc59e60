//! `score`: the oracle's implicit token rewards `s_t = log pi_oracle(y_t|x,y<t) - log pi_ref(y_t|x,y<t)`
//! for every chosen and rejected response token (EOS included), and their sums.

use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{Artifact, BuildContext, Role, RunContext, Stage, StageKind, parse_config, to_params};
use crate::data::parquet as pq;
use crate::logprobs::{data_file, ensure};
use crate::user_bail;

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
};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreConfig {}

struct Score {
    cfg: ScoreConfig,
}

fn build(params: &Value, _ctx: &BuildContext) -> Result<Box<dyn Stage>> {
    Ok(Box::new(Score {
        cfg: parse_config(params, &[])?,
    }))
}

/// Refuses two models whose token ids mean different things.
pub fn check_same_vocabulary(a: &Artifact, b: &Artifact) -> Result<()> {
    let vocab = |x: &Artifact| -> Result<(usize, String)> {
        let cfg: Value = serde_json::from_slice(&std::fs::read(x.dir.join("model/config.json"))?)?;
        let n = cfg["vocab_size"].as_u64().unwrap_or(0) as usize;
        let tok = crate::pipeline::stage::hash_file(&x.dir.join("model/tokenizer.json"))
            .unwrap_or_default();
        Ok((n, tok))
    };
    let ((na, ta), (nb, tb)) = (vocab(a)?, vocab(b)?);
    if na != nb || ta != tb {
        user_bail!(
            "`{}` and `{}` have different vocabularies ({na} vs {nb} tokens{}): their log-probs cannot be compared",
            a.stage,
            b.stage,
            if ta != tb {
                ", different tokenizer.json"
            } else {
                ""
            }
        );
    }
    Ok(())
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
        let lo = ensure(ctx, oracle, data, "oracle")?;
        let lr = ensure(ctx, reference, data, "reference")?;
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
        let path = data_file(data);
        let mut df = pq::read(&path)?;
        df.with_column(pq::list("chosen_scores", &cs))?;
        df.with_column(pq::list("rejected_scores", &rs))?;
        df.with_column(pq::f32s("chosen_reward", chosen_reward.clone()))?;
        df.with_column(pq::f32s("rejected_reward", rejected_reward.clone()))?;
        pq::write(&mut df, &ctx.out.join("scores.parquet"))?;
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
