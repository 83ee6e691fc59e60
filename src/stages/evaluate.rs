//! `evaluate`: whether the training worked, on the `test` split only. Per policy and for the
//! reference: held-out preference metrics as TRL logs them (and on key tokens when the data is a
//! `select` stage), greedy (or sampled) answers to the test prompts with their lengths, judged
//! win rates against the reference's answer and the data's chosen answer, and what training cost.
//! Writes `report.parquet`, `report.md`, `report.html` and `generations/<model>.json`.

use std::collections::BTreeMap;

use anyhow::Result;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{
    BuildContext, Role, RunContext, Stage, StageKind, params_schema, parse_config, to_params,
};
use crate::artifacts::model::check_same_vocabulary;
use crate::artifacts::{
    Artifact, ModelDir, Pairs, Report, ReportRow, TokenRow, Tokens, tokenizer_of,
};
use crate::data::parquet as pq;
use crate::eval::cost::cost;
use crate::eval::figures::{figures, key_view};
use crate::eval::judge::{Judge, refuse_oracle_judge};
use crate::eval::metrics::{PairLogps, preference};
use crate::eval::report::{self, row};
use crate::eval::stats::{mean_se, median};
use crate::eval::winrate::{Duel, WinRate, win_rate};
use crate::logprobs::ensure_test;
use crate::model::{CausalLm, GenerateOptions, Precision};
use crate::user_bail;

pub static KIND: StageKind = StageKind {
    kind: "evaluate",
    version: "1",
    roles: &[
        Role {
            name: "policies",
            required: true,
            many: true,
            kinds: &["train", "model"],
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
            kinds: &["tokenize", "select"],
        },
        Role {
            name: "judge",
            required: false,
            many: false,
            kinds: &["model", "train"],
        },
    ],
    uses_device: true,
    build,
    params_schema: params_schema::<EvaluateConfig>,
};

/// `evaluate`: held-out metrics, generations and judged win rates of each policy and of the
/// reference, on the `test` split of `data`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EvaluateConfig {
    /// Scale of the implicit rewards `beta * (log pi - log pi_ref)` (TRL's DPO `beta`).
    #[serde(default = "d_beta")]
    #[schemars(extend("exclusiveMinimum" = 0))]
    pub beta: f64,
    /// Answer the test prompts (needed for win rates); off: log-prob metrics only.
    #[serde(default = "d_true")]
    pub generate: bool,
    /// Most tokens per answer (also bounded by the model's context length).
    #[serde(default = "d_max_new")]
    #[schemars(range(min = 1))]
    pub max_new_tokens: usize,
    /// Sampling temperature, 0 (the default) for greedy decoding.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub temperature: f32,
    /// Nucleus sampling, in (0, 1].
    #[serde(default = "d_top_p")]
    #[schemars(range(max = 1), extend("exclusiveMinimum" = 0))]
    pub top_p: f32,
    /// Answer at most this many test prompts (the first ones in file order; default: all).
    #[serde(default)]
    pub max_prompts: Option<usize>,
    /// Seed of sampling (default: the pipeline's seed).
    #[serde(default)]
    pub seed: Option<u64>,
    /// More prompts to answer, beside the test split (a JSON array or JSON lines of AlpacaEval
    /// items `{"instruction": ...}` or strings): their answers go into `generations/` (for
    /// judges run elsewhere), not into the report's figures.
    // Left out of the canonical parameters when absent, so that adding it moved no stage hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = null))]
    pub prompts: Option<String>,
    /// Precision of every forward (log-probs, answers, judge): `f32`, or mixed `bf16`/`f16`
    /// (see `train`'s `precision`). Log-probs are cached per precision.
    // Left out of the canonical parameters at f32, so that adding it moved no hash.
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    #[schemars(extend("default" = "f32"))]
    pub precision: Precision,
}

fn d_beta() -> f64 {
    0.1
}
fn d_true() -> bool {
    true
}
fn d_max_new() -> usize {
    64
}
fn d_top_p() -> f32 {
    1.0
}

/// Prompts answered together (one left-padded batch sharing a key/value cache).
const GENERATE_BATCH: usize = 16;

struct Evaluate {
    cfg: EvaluateConfig,
    /// The pipeline file's folder: `prompts` is relative to it.
    base: std::path::PathBuf,
}

fn build(params: &Value, ctx: &BuildContext) -> Result<Box<dyn Stage>> {
    let mut cfg: EvaluateConfig = parse_config(params)?;
    cfg.seed = Some(cfg.seed.unwrap_or(ctx.pipeline_seed));
    if !(cfg.beta > 0.0 && cfg.beta.is_finite()) {
        user_bail!("`beta` must be a positive number, got {}", cfg.beta);
    }
    if cfg.max_new_tokens == 0 {
        user_bail!("`max_new_tokens` must be at least 1");
    }
    if cfg.max_prompts == Some(0) {
        user_bail!("`max_prompts` must be at least 1 (leave it out for every test prompt)");
    }
    options(&cfg).validate()?;
    if ctx.roles.iter().any(|r| r == "judge") && !cfg.generate {
        user_bail!("a `judge` compares answers: it needs `generate: true`");
    }
    if cfg.prompts.is_some() && !cfg.generate {
        user_bail!("`prompts` are answered: they need `generate: true`");
    }
    Ok(Box::new(Evaluate {
        cfg,
        base: ctx.base_dir.to_path_buf(),
    }))
}

fn options(cfg: &EvaluateConfig) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: cfg.max_new_tokens,
        temperature: cfg.temperature,
        top_p: cfg.top_p,
        seed: cfg.seed.unwrap_or(0),
        eos_token_id: None,
    }
}

/// A model under evaluation: a policy or the reference.
struct Entry<'a> {
    art: &'a Artifact,
    role: &'static str,
}

/// One answer to a test prompt.
#[derive(Clone)]
struct Answer {
    ids: Vec<u32>,
    text: String,
}

impl Stage for Evaluate {
    fn params(&self) -> Value {
        to_params(&self.cfg)
    }

    fn external_files(&self) -> Result<Vec<std::path::PathBuf>> {
        Ok(self
            .cfg
            .prompts
            .iter()
            .map(|p| super::resolve(&self.base, p))
            .collect())
    }

    fn run(&self, ctx: &RunContext) -> Result<Value> {
        let data = ctx.input("data")?;
        let reference = ctx.input("reference")?;
        let policies = ctx.inputs.get("policies").cloned().unwrap_or_default();
        let judge = ctx.input_opt("judge");
        let tokens = Tokens::open(data)?;
        let all_rows = tokens.rows()?;
        let test: Vec<usize> = (0..all_rows.len())
            .filter(|&i| all_rows[i].split == "test")
            .collect();
        if test.is_empty() {
            user_bail!(
                "{} has no test rows: `evaluate` only ever uses held-out pairs (set `test_fraction` on the ingest stage)",
                tokens.path().display()
            );
        }
        let rows: Vec<&TokenRow> = test.iter().map(|&i| &all_rows[i]).collect();
        let masks = tokens.masks()?.map(|(c, r)| {
            (
                test.iter().map(|&i| c[i].clone()).collect::<Vec<_>>(),
                test.iter().map(|&i| r[i].clone()).collect::<Vec<_>>(),
            )
        });
        // Every model reads the data's token ids: the vocabulary size alone does not prove they
        // mean the same tokens (checked once, on the reference; the others must equal it).
        crate::artifacts::model::check_tokenizer_matches(ctx, reference, data)?;
        let mut entries = vec![Entry {
            art: reference,
            role: "reference",
        }];
        for p in &policies {
            check_same_vocabulary(p, reference)?;
            entries.push(Entry {
                art: p,
                role: "policy",
            });
        }
        if let Some(j) = judge {
            check_same_vocabulary(j, reference)?;
            refuse_oracle_judge(ctx, j, data, &policies)?;
        }
        let mut report: Vec<ReportRow> = Vec::new();

        // 1. Held-out preference metrics (log-probs cached in the store like training's).
        let precision = self.cfg.precision;
        let device = super::compute_device(ctx, precision)?;
        let ref_lp = ensure_test(ctx, reference, data, "reference", precision)?;
        for e in &entries {
            let lp = if e.role == "reference" {
                None
            } else {
                Some(ensure_test(ctx, e.art, data, "policy", precision)?)
            };
            let lp = lp.as_ref().unwrap_or(&ref_lp);
            let pairs: Vec<PairLogps> = (0..rows.len())
                .map(|i| PairLogps {
                    chosen: &lp.chosen[i],
                    rejected: &lp.rejected[i],
                    ref_chosen: &ref_lp.chosen[i],
                    ref_rejected: &ref_lp.rejected[i],
                    chosen_mask: masks.as_ref().map(|m| m.0[i].as_slice()),
                    rejected_mask: masks.as_ref().map(|m| m.1[i].as_slice()),
                })
                .collect();
            let mut figs = preference(&e.art.stage, e.role, &pairs, self.cfg.beta);
            if e.role == "reference" {
                // Against itself the implicit rewards are 0 by construction: only the
                // reference-free figures say something about it.
                figs.retain(|r| {
                    r.metric.ends_with("logp_margin") || r.metric.ends_with("logp_accuracy")
                });
            }
            report.extend(figs);
        }
        report.extend(oracle_test_accuracy(ctx, data, &test)?);

        // 2. Generations, 3. judged win rates.
        let mut generations: BTreeMap<String, Vec<Answer>> = BTreeMap::new();
        let n_prompts = self.cfg.max_prompts.unwrap_or(rows.len()).min(rows.len());
        let prompts: Vec<&TokenRow> = rows[..n_prompts].to_vec();
        if self.cfg.generate {
            // The artifacts behind the token data, looked up once: the tokenize stage (template
            // and tokenizer for `prompts`) and the ingest stage (the instructions' text).
            let tokenize = crate::artifacts::model::tokenize_behind(ctx, data)?;
            let ingest = match &tokenize {
                Some(t) => ctx.upstream_one(t, "data")?.filter(|a| a.kind == "ingest"),
                None => None,
            };
            let instructions = instructions(ingest.as_ref(), &prompts)?;
            // AlpacaEval's `dataset` field: the ingest stage's name.
            let dataset = ingest.as_ref().map_or(&data.stage, |i| &i.stage).clone();
            let extra = match &self.cfg.prompts {
                Some(p) => {
                    let path = super::resolve(&self.base, p);
                    Some(self.extra_prompts(ctx, tokenize.as_ref(), data, &path)?)
                }
                None => None,
            };
            let gen_dir = ctx.out.join(Report::GENERATIONS);
            std::fs::create_dir_all(&gen_dir)?;
            // Every model's answers (and to the extra prompts), computed side by side.
            let answered = crate::device::side_by_side(&device, &entries, |e| {
                let answers = self.answer(ctx, e.art, &prompts, &device)?;
                let more = match &extra {
                    Some((_, _, rows)) => {
                        let refs: Vec<&TokenRow> = rows.iter().collect();
                        Some(self.answer(ctx, e.art, &refs, &device)?)
                    }
                    None => None,
                };
                Ok((answers, more))
            })?;
            for (e, (answers, more)) in entries.iter().zip(answered) {
                let lens: Vec<f64> = answers.iter().map(|a| a.ids.len() as f64).collect();
                let (mean, se, n) = mean_se(&lens);
                report.push(row(
                    &e.art.stage,
                    e.role,
                    "response_length_mean",
                    mean,
                    se,
                    n,
                ));
                report.push(row(
                    &e.art.stage,
                    e.role,
                    "response_length_median",
                    median(&lens),
                    None,
                    n,
                ));
                let mut items: Vec<Value> = answers
                    .iter()
                    .zip(&instructions)
                    .map(|(a, inst)| {
                        json!({"instruction": inst, "output": a.text, "generator": e.art.stage, "dataset": dataset})
                    })
                    .collect();
                if let (Some((name, texts, _)), Some(more)) = (&extra, &more) {
                    for (a, inst) in more.iter().zip(texts) {
                        items.push(json!({"instruction": inst, "output": a.text, "generator": e.art.stage, "dataset": name}));
                    }
                }
                let file = gen_dir.join(format!("{}.json", file_name(&e.art.stage)));
                let mut text = serde_json::to_string_pretty(&items)?;
                text.push('\n');
                std::fs::write(&file, text)?;
                generations.insert(e.art.stage.clone(), answers);
            }
            if let Some(j) = judge {
                report.extend(self.judge(ctx, j, &entries, &prompts, &generations, &device)?);
            }
        }

        // 4. Cost.
        for p in &policies {
            report.extend(cost(p)?);
        }

        Report::write(&report, ctx.out)?;
        let title = format!("sepo evaluation: {}", ctx.stage);
        let markdown = report::markdown(&title, &report);
        std::fs::write(ctx.out.join(Report::MARKDOWN), &markdown)?;
        let lengths: BTreeMap<String, Vec<usize>> = generations
            .iter()
            .map(|(m, a)| (m.clone(), a.iter().map(|x| x.ids.len()).collect()))
            .collect();
        let figures = figures(&report, &lengths, &policies)?;
        let sections = key_view(data, reference)?;
        let page = report::html(&title, &report, &figures, &sections)?;
        std::fs::write(ctx.out.join(Report::HTML), page)?;
        for line in markdown.lines().skip(2).take(entries.len() + 2) {
            ctx.progress.log(format!("         {line}"));
        }
        Ok(json!({
            "test_pairs": rows.len(),
            "prompts_answered": if self.cfg.generate { n_prompts } else { 0 },
            "models": entries.len(),
            "judge": judge.map(|j| j.stage.clone()),
        }))
    }
}

/// A stage name as a file name: characters other than letters, digits and `._@=,-` become `_`.
fn file_name(stage: &str) -> String {
    stage
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._@=,-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The oracle's accuracy on the test split alone, when `data` is a `select` stage: the `score`
/// stage's own figure mixes in the rows the oracle was trained on.
fn oracle_test_accuracy(
    ctx: &RunContext,
    data: &Artifact,
    test: &[usize],
) -> Result<Vec<ReportRow>> {
    if data.kind != "select" {
        return Ok(Vec::new());
    }
    let path = Tokens::open(data)?.path().to_path_buf();
    let df = pq::read(&path)?;
    let r = pq::Reader {
        df: &df,
        file: &path,
    };
    let (c, rj) = (r.opt_f64("chosen_reward")?, r.opt_f64("rejected_reward")?);
    let acc: Vec<f64> = test
        .iter()
        .map(|&i| match (c[i], rj[i]) {
            (Some(a), Some(b)) => f64::from(a > b),
            _ => f64::NAN,
        })
        .collect();
    let (value, se, n) = mean_se(&acc);
    let name = match ctx.upstream_one(data, "scores")? {
        Some(s) => ctx
            .upstream_one(&s, "oracle")?
            .map_or("oracle".into(), |o| o.stage),
        None => "oracle".into(),
    };
    // The paper's Figure 1: how concentrated the oracle's reward gap is (the share of a pair's
    // tokens that carries 80% of its chosen-minus-rejected reward), over the test pairs.
    let (cs, rs) = (
        r.f32_lists("chosen_scores")?,
        r.f32_lists("rejected_scores")?,
    );
    let pick = |v: &[Vec<f32>]| test.iter().map(|&i| v[i].clone()).collect::<Vec<_>>();
    let f1 = crate::keyview::figure1_share(&pick(&cs), &pick(&rs), 0.8);
    Ok(vec![
        row(&name, "oracle", "oracle_test_accuracy", value, se, n),
        row(
            &name,
            "oracle",
            "gap_share_80_mean",
            f1.mean,
            None,
            f1.pairs_used,
        ),
        row(
            &name,
            "oracle",
            "gap_share_80_median",
            f1.median,
            None,
            f1.pairs_used,
        ),
    ])
}

/// The instruction of each prompt, as AlpacaEval wants it: the last user message of the pair in
/// the `ingest` artifact behind the token data (matched by id); the pair's id when there is none.
fn instructions(ingest: Option<&Artifact>, prompts: &[&TokenRow]) -> Result<Vec<String>> {
    let pairs = match ingest {
        Some(a) => Pairs::open(a)?,
        None => Vec::new(),
    };
    let by_id: BTreeMap<&str, &crate::artifacts::Pair> =
        pairs.iter().map(|p| (p.id.as_str(), p)).collect();
    Ok(prompts
        .iter()
        .map(|r| {
            by_id
                .get(r.id.as_str())
                .and_then(|p| p.prompt.iter().rev().find(|(role, _)| role == "user"))
                .map(|(_, text)| text.clone())
                .unwrap_or_else(|| r.id.clone())
        })
        .collect())
}

impl Evaluate {
    /// The `prompts` file: its name (AlpacaEval's `dataset`), its instructions, and each as a
    /// prompt-only token row encoded as the data's `tokenize` stage encodes prompts.
    fn extra_prompts(
        &self,
        ctx: &RunContext,
        tokenize: Option<&Artifact>,
        data: &Artifact,
        path: &std::path::Path,
    ) -> Result<(String, Vec<String>, Vec<TokenRow>)> {
        let texts = crate::eval::prompts::read(path)?;
        let Some(tokenize) = tokenize else {
            user_bail!("`prompts`: no tokenize stage found behind `{}`", data.stage);
        };
        let template = serde_json::from_value(tokenize.manifest.params["template"].clone())
            .map_err(|e| anyhow::anyhow!("{}: template: {e}", tokenize.stage))?;
        let Some(tok) = ctx.upstream_one(tokenize, "tokenizer")? else {
            user_bail!("`prompts`: `{}` has no tokenizer input", tokenize.stage);
        };
        let ids = crate::eval::prompts::encode(&texts, template, &tokenizer_of(&tok)?)?;
        let rows = ids
            .into_iter()
            .enumerate()
            .map(|(i, prompt_ids)| TokenRow {
                id: format!("prompt-{}", i + 1),
                split: "prompts".into(),
                prompt_ids,
                chosen_ids: Vec::new(),
                rejected_ids: Vec::new(),
                truncated: false,
            })
            .collect();
        let name = path
            .file_name()
            .map_or_else(|| "prompts".into(), |n| n.to_string_lossy().into_owned());
        Ok((name, texts, rows))
    }

    /// The model's answers to the prompts (decoded without special tokens).
    fn answer(
        &self,
        ctx: &RunContext,
        model: &Artifact,
        prompts: &[&TokenRow],
        device: &burn::tensor::Device,
    ) -> Result<Vec<Answer>> {
        let dir = ModelDir::of(model);
        let lm: CausalLm = dir.load(device)?.with_precision(self.cfg.precision);
        let tok = tokenizer_of(model)?;
        let mut opts = options(&self.cfg);
        opts.eos_token_id = tok.eos()?.map(|(_, id)| id);
        let bar = ctx.progress.bar(
            &format!("{} answers of {}", ctx.stage, model.stage),
            prompts.len() as u64,
            "prompts",
        );
        // Batches of prompts of similar length (little padding), answered together; a prompt
        // that fills the context leaves no room: it gets an empty answer rather than an abort.
        let mut order: Vec<usize> = (0..prompts.len())
            .filter(|&i| prompts[i].prompt_ids.len() < lm.context_length())
            .collect();
        order.sort_by_key(|&i| prompts[i].prompt_ids.len());
        let mut ids: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
        for chunk in order.chunks(GENERATE_BATCH) {
            let batch: Vec<Vec<u32>> = chunk
                .iter()
                .map(|&i| prompts[i].prompt_ids.clone())
                .collect();
            for (&i, answer) in chunk.iter().zip(lm.generate_batch(&batch, &opts)?) {
                ids[i] = answer;
            }
            bar.inc(chunk.len() as u64);
        }
        let mut out = Vec::with_capacity(prompts.len());
        for ids in ids {
            let text = tok
                .tokenizer()
                .decode(&ids, true)
                .map_err(|e| anyhow::anyhow!("decoding an answer of `{}`: {e}", model.stage))?;
            out.push(Answer { ids, text });
        }
        bar.finish();
        Ok(out)
    }

    /// Win rates of every model's answers against the reference's and against the data's chosen
    /// answers, as scored by `judge`.
    fn judge(
        &self,
        ctx: &RunContext,
        judge: &Artifact,
        entries: &[Entry],
        prompts: &[&TokenRow],
        generations: &BTreeMap<String, Vec<Answer>>,
        device: &burn::tensor::Device,
    ) -> Result<Vec<ReportRow>> {
        let scorer = Judge::load(ctx, judge, device, self.cfg.precision)?;
        let seqs = |answers: &mut dyn Iterator<Item = &Vec<u32>>| -> Vec<(Vec<u32>, Vec<u32>)> {
            prompts
                .iter()
                .zip(answers)
                .map(|(p, a)| (p.prompt_ids.clone(), a.clone()))
                .collect()
        };
        let chosen_ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.chosen_ids.clone()).collect();
        let rejected_ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.rejected_ids.clone()).collect();
        // The answers of every model (the reference's first), after the data's chosen and
        // rejected answers: every set of answers the judge scores, scored side by side.
        let answer_ids: Vec<Vec<Vec<u32>>> = entries
            .iter()
            .map(|e| {
                generations[&e.art.stage]
                    .iter()
                    .map(|a| a.ids.clone())
                    .collect()
            })
            .collect();
        let sets: Vec<&Vec<Vec<u32>>> = [&chosen_ids, &rejected_ids]
            .into_iter()
            .chain(&answer_ids)
            .collect();
        let mut scored =
            crate::device::side_by_side(device, &sets, |ids| scorer.score(&seqs(&mut ids.iter())))?
                .into_iter();
        let (chosen_scores, rejected_scores) = (
            scored.next().expect("scored"),
            scored.next().expect("scored"),
        );
        let answer_scores: Vec<Vec<f32>> = scored.collect();
        // How far to trust the judge: its own accuracy on the same held-out pairs.
        let acc: Vec<f64> = chosen_scores
            .iter()
            .zip(&rejected_scores)
            .map(|(c, r)| f64::from(c > r))
            .collect();
        let (a, a_se, a_n) = mean_se(&acc);
        let mut out = vec![row(
            &judge.stage,
            "judge",
            "judge_test_accuracy",
            a,
            a_se,
            a_n,
        )];
        let (ref_ids, ref_scores) = (&answer_ids[0], &answer_scores[0]);
        for ((e, ids), scores) in entries.iter().zip(&answer_ids).zip(&answer_scores) {
            let (js, _, jn) = mean_se(&scores.iter().map(|&x| x as f64).collect::<Vec<_>>());
            out.push(row(&e.art.stage, e.role, "judge_score_mean", js, None, jn));
            let mut versus = vec![("chosen", &chosen_ids, &chosen_scores)];
            if e.role != "reference" {
                versus.insert(0, ("reference", ref_ids, ref_scores));
            }
            for (name, opp_ids, opp_scores) in versus {
                let duels: Vec<Duel> = (0..ids.len())
                    .map(|i| Duel {
                        score: scores[i] as f64,
                        opponent_score: opp_scores[i] as f64,
                        len: ids[i].len(),
                        opponent_len: opp_ids[i].len(),
                        same: ids[i] == opp_ids[i],
                    })
                    .collect();
                let w: WinRate = win_rate(&duels);
                let n = duels.len();
                let m = |k: &str| format!("{k}_vs_{name}");
                let stage = e.art.stage.as_str();
                out.push(row(stage, e.role, &m("win_rate"), w.rate, w.stderr, n));
                out.push(row(
                    stage,
                    e.role,
                    &m("lc_win_rate"),
                    w.lc_rate,
                    w.lc_stderr,
                    n,
                ));
                out.push(row(stage, e.role, &m("wins"), w.wins as f64, None, n));
                out.push(row(stage, e.role, &m("losses"), w.losses as f64, None, n));
                out.push(row(stage, e.role, &m("ties"), w.ties as f64, None, n));
            }
        }
        Ok(out)
    }
}
