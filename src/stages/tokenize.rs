//! `tokenize`: pairs to token ids. The prompt (rendered by the chat template) and each response
//! are encoded separately, so the prompt/response boundary never shifts with merges across it;
//! every response ends with EOS.

use anyhow::Result;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{
    BuildContext, Role, RunContext, Stage, StageKind, params_schema, parse_config, to_params,
};
pub use crate::artifacts::tokens::{TokenRow, read_tokens};
use crate::artifacts::{Pairs, Tokens, tokenizer_of};
use crate::error::user;
use crate::template::{Template, TemplateName};
use crate::tokenizer::TOKENIZER_CONFIG;
use crate::user_bail;

pub static KIND: StageKind = StageKind {
    kind: "tokenize",
    version: "1",
    roles: &[
        Role {
            name: "data",
            required: true,
            many: false,
            kinds: &["ingest"],
        },
        Role {
            name: "tokenizer",
            required: true,
            many: false,
            kinds: &["tokenizer", "model", "train"],
        },
    ],
    uses_device: false,
    build,
    params_schema: params_schema::<TokenizeConfig>,
};

/// `tokenize`: pairs to token ids; the prompt (rendered by `template`) and each response are
/// encoded separately, and every response ends with EOS.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenizeConfig {
    /// How the prompt's turns become text before encoding.
    #[serde(default = "default_template")]
    pub template: TemplateName,
    /// Longest prompt + response, in tokens (at least 4): responses are cut first (never below
    /// max_len / 2), then the start of the prompt.
    #[serde(default = "default_max_len")]
    #[schemars(range(min = 4))]
    pub max_len: usize,
}

fn default_template() -> TemplateName {
    TemplateName::Chatml
}
fn default_max_len() -> usize {
    512
}

struct Tokenize {
    cfg: TokenizeConfig,
}

fn build(params: &Value, _ctx: &BuildContext) -> Result<Box<dyn Stage>> {
    let cfg: TokenizeConfig = parse_config(params)?;
    if cfg.max_len < 4 {
        user_bail!("`max_len` must be at least 4, got {}", cfg.max_len);
    }
    Ok(Box::new(Tokenize { cfg }))
}

/// Fits prompt + each response into `max_len`: responses are cut first (to what the prompt
/// leaves, but never below half of `max_len`), then the start of the prompt, keeping the turns
/// nearest the answer. Returns whether anything was cut.
pub fn truncate(
    prompt: &mut Vec<u32>,
    chosen: &mut Vec<u32>,
    rejected: &mut Vec<u32>,
    max_len: usize,
) -> bool {
    let longest = chosen.len().max(rejected.len());
    if prompt.len() + longest <= max_len {
        return false;
    }
    let keep = max_len.saturating_sub(prompt.len()).max(max_len / 2);
    chosen.truncate(keep);
    rejected.truncate(keep);
    let room = max_len - chosen.len().max(rejected.len());
    if prompt.len() > room {
        prompt.drain(..prompt.len() - room);
    }
    true
}

impl Stage for Tokenize {
    fn params(&self) -> Value {
        to_params(&self.cfg)
    }

    fn run(&self, ctx: &RunContext) -> Result<Value> {
        let hf = tokenizer_of(ctx.input("tokenizer")?)?;
        let tok = hf.tokenizer();
        let (eos, eos_id) = hf.eos()?.ok_or_else(|| {
            user(format!(
                "{}: no `eos_token` in {TOKENIZER_CONFIG}",
                hf.json_path().display()
            ))
        })?;
        let template = Template::new(self.cfg.template, hf.config())?;
        let pairs = Pairs::open(ctx.input("data")?)?;
        let bar = ctx.progress.bar(ctx.stage, pairs.len() as u64, "rows");
        let mut rows: Vec<TokenRow> = Vec::with_capacity(pairs.len());
        let mut total_tokens = 0usize;
        // Batches keep the progress bar moving while encode_batch uses every core.
        for chunk in pairs.chunks(256) {
            let prompts: Vec<String> = chunk
                .iter()
                .map(|p| template.render(&p.prompt))
                .collect::<Result<_>>()?;
            let bos = hf.special_token("bos_token");
            // A template that already writes BOS must not get a second one from the post-processor.
            let with_specials: Vec<bool> = prompts
                .iter()
                .map(|p| {
                    !bos.as_deref()
                        .is_some_and(|b| !b.is_empty() && p.starts_with(b))
                })
                .collect();
            let mut prompt_ids = Vec::with_capacity(chunk.len());
            for (p, special) in prompts.iter().zip(&with_specials) {
                let enc = tok
                    .encode(p.as_str(), *special)
                    .map_err(|e| anyhow::anyhow!("encoding prompt: {e}"))?;
                prompt_ids.push(enc.get_ids().to_vec());
            }
            let responses: Vec<&str> = chunk
                .iter()
                .flat_map(|p| [p.chosen.as_str(), p.rejected.as_str()])
                .collect();
            let encs = tok
                .encode_batch(responses, false)
                .map_err(|e| anyhow::anyhow!("encoding responses: {e}"))?;
            for (i, (pair, mut prompt)) in chunk.iter().zip(prompt_ids).enumerate() {
                let mut chosen = encs[2 * i].get_ids().to_vec();
                let mut rejected = encs[2 * i + 1].get_ids().to_vec();
                chosen.push(eos_id);
                rejected.push(eos_id);
                let truncated = truncate(&mut prompt, &mut chosen, &mut rejected, self.cfg.max_len);
                total_tokens += prompt.len() + chosen.len() + rejected.len();
                rows.push(TokenRow {
                    id: pair.id.clone(),
                    split: pair.split.clone(),
                    prompt_ids: prompt,
                    chosen_ids: chosen,
                    rejected_ids: rejected,
                    truncated,
                });
            }
            bar.inc(chunk.len() as u64);
        }
        let secs = bar.finish();
        Tokens::write(&rows, ctx.out)?;
        let n_trunc = rows.iter().filter(|r| r.truncated).count();
        let mean = |f: &dyn Fn(&TokenRow) -> usize| {
            if rows.is_empty() {
                0.0
            } else {
                rows.iter().map(f).sum::<usize>() as f64 / rows.len() as f64
            }
        };
        ctx.progress.log(format!(
            "         {}: {} pairs, {} tokens ({:.0} tokens/s), {} truncated",
            ctx.stage,
            rows.len(),
            total_tokens,
            total_tokens as f64 / secs.max(1e-9),
            n_trunc
        ));
        Ok(json!({
            "pairs": rows.len(),
            "truncated": n_trunc,
            "tokens": total_tokens,
            "eos_token": eos,
            "eos_token_id": eos_id,
            "mean_prompt_len": mean(&|r| r.prompt_ids.len()),
            "mean_chosen_len": mean(&|r| r.chosen_ids.len()),
            "mean_rejected_len": mean(&|r| r.rejected_ids.len()),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn truncation_fits_and_keeps_prompt_end(p in 1usize..300, c in 1usize..300, r in 1usize..300, max in 4usize..256) {
            let mut prompt: Vec<u32> = (0..p as u32).collect();
            let mut chosen: Vec<u32> = (1000..1000 + c as u32).collect();
            let mut rejected: Vec<u32> = (2000..2000 + r as u32).collect();
            let cut = truncate(&mut prompt, &mut chosen, &mut rejected, max);
            prop_assert!(prompt.len() + chosen.len().max(rejected.len()) <= max);
            prop_assert_eq!(cut, p + c.max(r) > max);
            prop_assert!(!prompt.is_empty() && !chosen.is_empty() && !rejected.is_empty());
            // What is kept of the prompt is its end; of a response, its start.
            prop_assert_eq!(*prompt.last().unwrap(), p as u32 - 1);
            prop_assert_eq!(chosen[0], 1000);
        }
    }
}
