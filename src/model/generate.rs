//! Decoding: greedy, temperature and nucleus (top-p) sampling, seeded; and text in, text out
//! for a model folder ([`generate_text`]).

use std::path::Path;

use anyhow::Result;
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::error::user;
use crate::progress::Progress;
use crate::user_bail;

/// How to continue a prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Most tokens to add; generation also stops where the model's context
    /// (`max_position_embeddings`) is full, see [`GenerateOptions::new_token_budget`].
    pub max_new_tokens: usize,
    /// Softmax temperature, finite and at least 0; 0 means greedy (argmax).
    pub temperature: f32,
    /// Nucleus sampling, in (0, 1]: keep the most likely tokens whose probabilities add up to
    /// `top_p` (1 keeps all).
    pub top_p: f32,
    /// Seed of the sampler.
    pub seed: u64,
    /// Stop after emitting this token.
    pub eos_token_id: Option<u32>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 128,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            eos_token_id: None,
        }
    }
}

impl GenerateOptions {
    /// Checks the sampling settings: `temperature` finite and at least 0, `top_p` in (0, 1].
    /// NaN would silently turn into greedy decoding or an empty nucleus, so it is an error.
    /// Errors are the caller's input (exit status 2).
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(user(format!(
                "temperature must be a finite number at least 0 (0 is greedy), got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(user(format!(
                "top_p must be in (0, 1] (1 keeps every token), got {}",
                self.top_p
            )));
        }
        Ok(())
    }

    /// How many tokens may be added to a prompt of `prompt_len` tokens for a model whose
    /// context holds `context` positions: `max_new_tokens`, bounded so that prompt and
    /// continuation fit in the context (as transformers' `max_length`). A prompt that leaves no
    /// room for a single new token is an error (exit status 2).
    pub fn new_token_budget(&self, prompt_len: usize, context: usize) -> Result<usize> {
        self.validate()?;
        if prompt_len >= context {
            return Err(user(format!(
                "the prompt is {prompt_len} tokens but the model's context length \
                 (max_position_embeddings) is {context}: no room for a new token"
            )));
        }
        Ok(self.max_new_tokens.min(context - prompt_len))
    }
}

/// Picks tokens from logits according to [`GenerateOptions`].
pub struct Sampler {
    rng: StdRng,
    temperature: f32,
    top_p: f32,
}

impl Sampler {
    /// A sampler seeded from the options.
    pub fn new(opts: &GenerateOptions) -> Self {
        Sampler {
            rng: StdRng::seed_from_u64(opts.seed),
            temperature: opts.temperature,
            top_p: opts.top_p,
        }
    }

    /// The next token given one row of logits.
    pub fn pick(&mut self, logits: &[f32]) -> u32 {
        if self.temperature <= 0.0 || !self.temperature.is_finite() {
            return argmax(logits);
        }
        let t = self.temperature as f64;
        let max = logits
            .iter()
            .copied()
            .filter(|v| !v.is_nan())
            .fold(f32::NEG_INFINITY, f32::max) as f64;
        let mut probs: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| {
                let l = if l.is_nan() {
                    f64::NEG_INFINITY
                } else {
                    l as f64
                };
                (i as u32, ((l - max) / t).exp())
            })
            .collect();
        let total: f64 = probs.iter().map(|p| p.1).sum();
        if total.is_nan() || total <= 0.0 {
            return argmax(logits);
        }
        for p in &mut probs {
            p.1 /= total;
        }
        if self.top_p < 1.0 {
            // Most likely first; ties by lower id, so the cut is deterministic.
            probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let mut cum = 0.0;
            let mut keep = 0;
            for p in &probs {
                if keep > 0 && cum >= self.top_p as f64 {
                    break;
                }
                cum += p.1;
                keep += 1;
            }
            probs.truncate(keep);
        }
        let mass: f64 = probs.iter().map(|p| p.1).sum();
        let mut u = self.rng.random::<f64>() * mass;
        for &(id, p) in &probs {
            if u < p {
                return id;
            }
            u -= p;
        }
        probs.last().map_or(0, |p| p.0)
    }
}

/// Index of the largest logit (the first one on ties; NaN never wins).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best as u32
}

/// `--temperature` and `--top-p` as the command line names them, checked before anything is
/// loaded ([`GenerateOptions::validate`] holds the same bounds for every caller).
pub fn check_sampling_flags(temperature: f32, top_p: f32) -> Result<()> {
    if !temperature.is_finite() || temperature < 0.0 {
        user_bail!(
            "--temperature must be a finite number at least 0 (0, the default, is greedy), got {temperature}"
        );
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        user_bail!("--top-p must be in (0, 1] (1, the default, keeps every token), got {top_p}");
    }
    Ok(())
}

/// Continues `prompt` with the model folder `dir` (config.json, weights, tokenizer.json) on
/// `device`. `opts.max_new_tokens` is lowered to what fits in the model's context
/// (`max_position_embeddings`), with a note on `progress`; a prompt that fills the context alone
/// is an input error. Generation stops at the end-of-sequence token the `tokenize` stage appends
/// ([`crate::tokenizer::eos_token`]), else at config.json's `eos_token_id`.
pub fn generate_text(
    dir: &Path,
    device: &str,
    prompt: &str,
    mut opts: GenerateOptions,
    progress: &Progress,
) -> Result<String> {
    use super::CausalLm;
    if !dir.join(super::CONFIG_FILE).is_file() {
        user_bail!("{}: not a model folder (no config.json)", dir.display());
    }
    opts.validate()?;
    let device = crate::device::parse_device(device).map_err(|e| user(e.to_string()))?;
    let hf = crate::tokenizer::HfTokenizer::open_dir(dir)?;
    let tok = hf.tokenizer();
    let model = CausalLm::load(dir, &device).map_err(|e| user(format!("{e:#}")))?;
    // A folder from elsewhere may name no end token in tokenizer_config.json, or one its
    // vocabulary lacks: then config.json's `eos_token_id`, as transformers' generate does.
    let eos = hf
        .eos()
        .ok()
        .flatten()
        .map(|(_, id)| id)
        .or_else(|| model.config().eos_token_id.as_ref().and_then(|t| t.first()));
    let enc = tok
        .encode(prompt, true)
        .map_err(|e| anyhow::anyhow!("encoding the prompt: {e}"))?;
    let ids = enc.get_ids().to_vec();
    if ids.is_empty() {
        user_bail!(
            "the prompt encodes to no tokens and the tokenizer adds no BOS: give a --prompt"
        );
    }
    opts.eos_token_id = eos;
    let context = model.context_length();
    let budget = opts.new_token_budget(ids.len(), context)?;
    if budget < opts.max_new_tokens {
        progress.log(format!(
            "note: --max-new-tokens {} lowered to {budget}: the prompt's {} tokens and the \
             continuation must fit in the model's context of {context} (max_position_embeddings)",
            opts.max_new_tokens,
            ids.len()
        ));
    }
    let out = model.generate(&ids, &opts)?;
    let new: Vec<u32> = out.into_iter().filter(|t| Some(*t) != eos).collect();
    let mut all = ids.clone();
    all.extend(&new);
    // Decoding prompt and continuation together keeps SentencePiece's spaces right.
    let full = tok
        .decode(&all, true)
        .map_err(|e| anyhow::anyhow!("decoding: {e}"))?;
    let head = tok
        .decode(&ids, true)
        .map_err(|e| anyhow::anyhow!("decoding: {e}"))?;
    Ok(full
        .strip_prefix(&head)
        .map(|rest| format!("{prompt}{rest}"))
        .unwrap_or(full))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_bounded() {
        let ok = GenerateOptions::default();
        assert!(ok.validate().is_ok());
        for (t, p) in [
            (f32::NAN, 1.0),
            (-0.5, 1.0),
            (f32::INFINITY, 1.0),
            (1.0, f32::NAN),
            (1.0, 0.0),
            (1.0, 1.5),
            (1.0, -0.1),
        ] {
            let o = GenerateOptions {
                temperature: t,
                top_p: p,
                ..ok.clone()
            };
            let err = o.validate().unwrap_err();
            assert!(crate::error::is_user_error(&err), "{t} {p}");
        }
        assert_eq!(ok.new_token_budget(10, 512).unwrap(), 128);
        assert_eq!(ok.new_token_budget(500, 512).unwrap(), 12);
        assert!(ok.new_token_budget(512, 512).is_err());
        assert!(ok.new_token_budget(600, 512).is_err());
    }

    #[test]
    fn greedy_and_seeded_sampling() {
        let logits = [0.1f32, 2.0, 2.0, -1.0];
        assert_eq!(argmax(&logits), 1);
        let opts = GenerateOptions {
            temperature: 1.0,
            top_p: 0.9,
            seed: 7,
            ..Default::default()
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(&opts);
            (0..50).map(|_| s.pick(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(&opts);
            (0..50).map(|_| s.pick(&logits)).collect()
        };
        assert_eq!(a, b);
        // top_p 0.5 keeps only the two equally likely best tokens' first one.
        let mut s = Sampler::new(&GenerateOptions {
            temperature: 1.0,
            top_p: 0.3,
            ..opts
        });
        assert!((0..20).all(|_| s.pick(&logits) == 1));
    }
}
