//! Per-response log-probs of a model on a tokenized data set, cached in the store as an
//! artifact of their own (`<cache>/logprobs/<hash>/logprobs.parquet`, hash of the model's and the
//! data's hashes). The reference model's log-probs are computed once and reused by the oracle's
//! DPO, every DPO/IPO baseline and the score stage, whatever their learning rates. Not a stage
//! kind: no pipeline declares it; the `train` and `score` stages derive it through the store.
//! Log-probs computed under mixed precision are cached apart from the f32 ones (the precision is
//! part of the key when it is not f32, so the f32 keys are what they always were).

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::json;

use crate::artifacts::{Artifact, ModelDir, TokenRow, Tokens};
use crate::data::parquet as pq;
use crate::model::Precision;
use crate::pipeline::stage::{HASH_HEX_LEN, RunContext};

const VERSION: &str = "1";
/// The file a log-probs artifact holds.
const FILE: &str = "logprobs.parquet";

/// Log-probs of every response token (EOS included), row-aligned with the data.
pub struct Logprobs {
    pub ids: Vec<String>,
    pub chosen: Vec<Vec<f32>>,
    pub rejected: Vec<Vec<f32>>,
}

impl Logprobs {
    pub fn chosen_sums(&self) -> Vec<f32> {
        self.chosen.iter().map(|v| v.iter().sum()).collect()
    }
    pub fn rejected_sums(&self) -> Vec<f32> {
        self.rejected.iter().map(|v| v.iter().sum()).collect()
    }
}

/// Log-probs of `model` (a model or train artifact) on `data` with matrix products in
/// `precision`, computed once per pair of hashes and precision.
pub fn ensure(
    ctx: &RunContext,
    model: &Artifact,
    data: &Artifact,
    role: &str,
    precision: Precision,
) -> Result<Logprobs> {
    ensure_rows(ctx, model, data, role, None, precision)
}

/// Log-probs of `model` on the `test` rows of `data` only (in file order), for evaluation: when
/// the log-probs of every row are already cached (the reference's usually are) they are read from
/// there; else only the test rows are computed, and cached on their own.
pub fn ensure_test(
    ctx: &RunContext,
    model: &Artifact,
    data: &Artifact,
    role: &str,
    precision: Precision,
) -> Result<Logprobs> {
    if ctx
        .store
        .is_fresh("logprobs", &key_hash(model, data, None, precision))
    {
        let all = ensure_rows(ctx, model, data, role, None, precision)?;
        let rows = Tokens::open(data)?.rows()?;
        let keep: Vec<usize> = (0..rows.len())
            .filter(|&i| rows[i].split == "test")
            .collect();
        return Ok(Logprobs {
            ids: keep.iter().map(|&i| all.ids[i].clone()).collect(),
            chosen: keep.iter().map(|&i| all.chosen[i].clone()).collect(),
            rejected: keep.iter().map(|&i| all.rejected[i].clone()).collect(),
        });
    }
    ensure_rows(ctx, model, data, role, Some("test"), precision)
}

fn key_hash(
    model: &Artifact,
    data: &Artifact,
    split: Option<&str>,
    precision: Precision,
) -> String {
    let mut key = match split {
        None => format!("logprobs:{VERSION}:{}:{}", model.hash, data.hash),
        Some(s) => format!("logprobs:{VERSION}:{}:{}:{s}", model.hash, data.hash),
    };
    if !precision.is_f32() {
        key.push_str(&format!(":precision={precision}"));
    }
    blake3::hash(key.as_bytes()).to_hex()[..HASH_HEX_LEN].to_string()
}

fn ensure_rows(
    ctx: &RunContext,
    model: &Artifact,
    data: &Artifact,
    role: &str,
    split: Option<&str>,
    precision: Precision,
) -> Result<Logprobs> {
    let hash = key_hash(model, data, split, precision);
    // Only hashes in `inputs`: gc keeps a derived artifact while every input hash is kept.
    let inputs = json!({"model": model.hash, "data": data.hash});
    let was_fresh = ctx.store.is_fresh("logprobs", &hash);
    let dir = ctx.store.derived("logprobs", &hash, inputs, |out| {
        let mut rows = Tokens::open(data)?.rows()?;
        if let Some(s) = split {
            rows.retain(|r| r.split == s);
        }
        let device = crate::device::parse_device(ctx.device).map_err(|e| crate::error::user(e.to_string()))?;
        let lm = ModelDir::of(model).load(&device)?.with_precision(precision);
        let t0 = std::time::Instant::now();
        let lp = compute(&lm, &rows, &device, ctx, role)?;
        let tokens: usize = lp.chosen.iter().chain(&lp.rejected).map(Vec::len).sum();
        let secs = t0.elapsed().as_secs_f64();
        ctx.progress.log(format!(
            "         {}: {role} log-probs of `{}`{} on {} pairs: {tokens} tokens in {secs:.1}s ({:.0} tokens/s)",
            ctx.stage,
            model.stage,
            if precision.is_f32() { String::new() } else { format!(" ({precision})") },
            rows.len(),
            tokens as f64 / secs.max(1e-9)
        ));
        write(&lp, &out.join(FILE))?;
        Ok(json!({"pairs": rows.len(), "split": split.unwrap_or("all"), "precision": precision.name(), "tokens": tokens, "tokens_per_s": tokens as f64 / secs.max(1e-9)}))
    })?;
    if was_fresh {
        ctx.progress.log(format!(
            "         {}: reusing cached {role} log-probs of `{}`",
            ctx.stage, model.stage
        ));
    }
    read(&dir.join(FILE))
}

/// Forward passes over every chosen and rejected response: on flex with the fused attention
/// layer, a pair at a time with its prompt run once (`shared_prompts`); elsewhere in
/// length-sorted batches.
pub fn compute(
    lm: &crate::model::CausalLm,
    rows: &[TokenRow],
    device: &burn::tensor::Device,
    ctx: &RunContext,
    role: &str,
) -> Result<Logprobs> {
    let bar = ctx.progress.bar(
        &format!("{} {role}", ctx.stage),
        (rows.len() * 2) as u64,
        "responses",
    );
    let (chosen, rejected) = if lm.shares_prompts(device) {
        shared_prompts(lm, rows, device, &bar)?
    } else {
        batched(lm, rows, device, &bar)?
    };
    bar.finish();
    Ok(Logprobs {
        ids: rows.iter().map(|r| r.id.clone()).collect(),
        chosen,
        rejected,
    })
}

/// Chosen and rejected log-probs per row.
type Answers = (Vec<Vec<f32>>, Vec<Vec<f32>>);

/// [`compute`] in length-sorted batches of chosen and rejected sequences.
fn batched(
    lm: &crate::model::CausalLm,
    rows: &[TokenRow],
    device: &burn::tensor::Device,
    bar: &crate::progress::Bar,
) -> Result<Answers> {
    let mut seqs: Vec<(usize, bool, usize)> = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        seqs.push((i, true, r.prompt_ids.len() + r.chosen_ids.len()));
        seqs.push((i, false, r.prompt_ids.len() + r.rejected_ids.len()));
    }
    // Sorting by length keeps padding small; results go back to their rows.
    seqs.sort_by_key(|s| s.2);
    let mut chosen = vec![Vec::new(); rows.len()];
    let mut rejected = vec![Vec::new(); rows.len()];
    // Two batches side by side on flex: a small model's operations keep one core busy each
    // better than both cores on one batch (each batch's log-probs are the same either way).
    // The longest batches first, so that the two workers finish together: attention's cost
    // grows with the square of the length.
    let chunks: Vec<&[(usize, bool, usize)]> = seqs.chunks(64).rev().collect();
    let done = crate::device::side_by_side(device, &chunks, |chunk| {
        let pairs: Vec<(Vec<u32>, Vec<u32>)> = chunk
            .iter()
            .map(|&(i, c, _)| {
                let r = &rows[i];
                (
                    r.prompt_ids.clone(),
                    if c {
                        r.chosen_ids.clone()
                    } else {
                        r.rejected_ids.clone()
                    },
                )
            })
            .collect();
        let lp = lm.response_logprobs(&pairs, device)?;
        bar.inc(chunk.len() as u64);
        Ok(lp)
    })?;
    for (chunk, lp) in chunks.iter().zip(done) {
        for (&(i, c, _), v) in chunk.iter().zip(lp) {
            if c {
                chosen[i] = v;
            } else {
                rejected[i] = v;
            }
        }
    }
    Ok((chosen, rejected))
}

fn write(lp: &Logprobs, path: &Path) -> Result<()> {
    let mut df = pq::frame(vec![
        pq::utf8("id", lp.ids.clone()),
        pq::list("chosen_logps", &lp.chosen),
        pq::list("rejected_logps", &lp.rejected),
    ])?;
    pq::write(&mut df, path)
}

fn read(path: &Path) -> Result<Logprobs> {
    let df = pq::read(path)?;
    let r = pq::Reader {
        df: &df,
        file: path,
    };
    Ok(Logprobs {
        ids: r.strings("id")?,
        chosen: r.f32_lists("chosen_logps")?,
        rejected: r.f32_lists("rejected_logps")?,
    })
}

/// [`compute`] one pair at a time, each prompt run once for both answers
/// ([`crate::model::CausalLm::shared_prompt_logprobs`]): the score benchmark's rows hold
/// 10% fewer attention pairs and 18% fewer tokens through the linear layers that way. Two pairs
/// side by side, the longest first so that both workers finish together.
fn shared_prompts(
    lm: &crate::model::CausalLm,
    rows: &[TokenRow],
    device: &burn::tensor::Device,
    bar: &crate::progress::Bar,
) -> Result<Answers> {
    let mut order: Vec<usize> = (0..rows.len()).collect();
    let work = |r: &TokenRow| r.prompt_ids.len() + r.chosen_ids.len() + r.rejected_ids.len();
    order.sort_by_key(|&i| std::cmp::Reverse(work(&rows[i])));
    let done = crate::device::side_by_side(device, &order, |&i| {
        let r = &rows[i];
        let answers = [r.chosen_ids.as_slice(), r.rejected_ids.as_slice()];
        let lp = lm
            .shared_prompt_logprobs(&r.prompt_ids, &answers, device)
            .with_context(|| format!("pair {i}"))?;
        bar.inc(2);
        Ok(lp)
    })?;
    let mut chosen = vec![Vec::new(); rows.len()];
    let mut rejected = vec![Vec::new(); rows.len()];
    for (&i, lp) in order.iter().zip(done) {
        let [c, r]: [Vec<f32>; 2] = lp.try_into().expect("two answers");
        chosen[i] = c;
        rejected[i] = r;
    }
    Ok((chosen, rejected))
}
