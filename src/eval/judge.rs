//! The judge of `evaluate`: a reward model or an implicit-reward model scoring answers, and the
//! rule that it must never be (or share training rows with) the oracle that chose the key tokens.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;
use serde_json::Value;

use crate::artifacts::{Artifact, ModelDir, TokenRow, Tokens};
use crate::model::CausalLm;
use crate::model::reward::{RewardModel, is_reward_model};
use crate::pipeline::stage::RunContext;
use crate::user_bail;

/// Refuses a judge that is (or shares rows with) an oracle that chose key tokens: such a
/// judge grades the policy on the very signal it was trained to follow.
pub fn refuse_oracle_judge(
    ctx: &RunContext,
    judge: &Artifact,
    data: &Artifact,
    policies: &[Artifact],
) -> Result<()> {
    let mut oracles: BTreeMap<String, Artifact> = BTreeMap::new();
    let mut selects: Vec<Artifact> = vec![data.clone()];
    for p in policies {
        selects.extend(ctx.upstream(p, "data")?);
    }
    for s in selects.iter().filter(|s| s.kind == "select") {
        for sc in ctx.upstream(s, "scores")? {
            for o in ctx.upstream(&sc, "oracle")? {
                if o.hash == judge.hash {
                    user_bail!(
                        "the judge `{}` is the oracle that chose the key tokens (through `{}`): \
                         it would grade the policy on the signal it was trained on. Judge with a \
                         reward model or an implicit-reward model trained on other rows",
                        judge.stage,
                        s.stage
                    );
                }
                oracles.insert(o.hash.clone(), o);
            }
        }
    }
    // A judge trained by sepo must not have seen the oracle's training rows either.
    let Some(judge_rows) = trained_ids(ctx, judge)? else {
        return Ok(());
    };
    for o in oracles.values() {
        let Some(oracle_rows) = trained_ids(ctx, o)? else {
            continue;
        };
        let shared = judge_rows.intersection(&oracle_rows).count();
        if shared > 0 {
            let seed = o
                .manifest
                .params
                .get("seed")
                .cloned()
                .unwrap_or(Value::Null);
            let fraction = o
                .manifest
                .params
                .get("data_fraction")
                .cloned()
                .unwrap_or(Value::Null);
            user_bail!(
                "the judge `{}` was trained on {shared} of the {} pairs the oracle `{}` was trained on: \
                 a judge must not share the oracle's rows. Train it on the others: \
                 `data_fraction: {fraction}, data_complement: true, seed: {seed}` (the oracle's \
                 fraction and seed) on the same data",
                judge.stage,
                oracle_rows.len(),
                o.stage
            );
        }
    }
    Ok(())
}

/// The ids of the pairs a `train` artifact was trained on (its data's train split, narrowed by
/// its `data_fraction`, `data_complement` and `seed`); `None` for a model that sepo did not train.
pub fn trained_ids(ctx: &RunContext, a: &Artifact) -> Result<Option<BTreeSet<String>>> {
    if a.kind != "train" {
        return Ok(None);
    }
    let Some(data) = ctx.upstream_one(a, "data")? else {
        return Ok(None);
    };
    let p = &a.manifest.params;
    let fraction = p
        .get("data_fraction")
        .and_then(Value::as_f64)
        .unwrap_or(1.0);
    let complement = p
        .get("data_complement")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let seed = p.get("seed").and_then(Value::as_u64).unwrap_or(0);
    let rows = Tokens::open(&data)?.rows()?;
    let train: Vec<&TokenRow> = rows.iter().filter(|r| r.split == "train").collect();
    let picked = crate::train::rows::pick_rows(train.len(), fraction, complement, seed);
    Ok(Some(picked.iter().map(|&i| train[i].id.clone()).collect()))
}

/// A judge: scores a (prompt, answer) pair; higher is better.
pub enum Judge {
    /// A reward model (`*ForSequenceClassification`): its score of prompt + answer, read where
    /// transformers reads it.
    Reward {
        model: Box<RewardModel>,
        device: burn::tensor::Device,
    },
    /// An implicit-reward model: `log pi_judge(answer) - log pi_judge_ref(answer)`, summed.
    // Models are boxed: a judge is one value per stage, and the variants differ a lot in size.
    Implicit {
        model: Box<CausalLm>,
        reference: Box<CausalLm>,
        device: burn::tensor::Device,
    },
}

impl Judge {
    pub fn load(
        ctx: &RunContext,
        judge: &Artifact,
        device: &burn::tensor::Device,
        precision: crate::model::Precision,
    ) -> Result<Judge> {
        let dir = ModelDir::of(judge);
        if is_reward_model(dir.path())? {
            return Ok(Judge::Reward {
                model: Box::new(RewardModel::load(dir.path(), device)?.with_precision(precision)),
                device: device.clone(),
            });
        }
        let Some(jref) = ctx.upstream_one(judge, "reference")? else {
            user_bail!(
                "judge `{}`: a judge is a reward model (a `*ForSequenceClassification` folder, or a \
                 `train` stage with `objective: reward`) or an implicit-reward model (a DPO-trained \
                 `train` stage with a `reference` input: its rewards are log pi - log pi_ref); \
                 `{}` is neither",
                judge.stage,
                judge.stage
            );
        };
        Ok(Judge::Implicit {
            model: Box::new(ModelDir::of(judge).load(device)?.with_precision(precision)),
            reference: Box::new(ModelDir::of(&jref).load(device)?.with_precision(precision)),
            device: device.clone(),
        })
    }

    pub fn score(&self, seqs: &[(Vec<u32>, Vec<u32>)]) -> Result<Vec<f32>> {
        match self {
            Judge::Reward { model, device } => {
                let seqs: Vec<Vec<u32>> = seqs
                    .iter()
                    .map(|(p, a)| p.iter().chain(a).copied().collect())
                    .collect();
                model.rewards(&seqs, device)
            }
            Judge::Implicit {
                model,
                reference,
                device,
            } => {
                let a = model.response_logprobs(seqs, device)?;
                let b = reference.response_logprobs(seqs, device)?;
                Ok(a.iter()
                    .zip(&b)
                    .map(|(x, y)| x.iter().sum::<f32>() - y.iter().sum::<f32>())
                    .collect())
            }
        }
    }
}
