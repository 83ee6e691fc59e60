//! Hugging Face causal language models in burn: llama, mistral, qwen2 and gpt_neox (Pythia).
//!
//! [`CausalLm`] is a burn [`Module`] whose parameters are [`burn::module::Param`] tensors, so
//! it trains with burn's autodiff and optimizers when loaded on an autodiff device. It loads
//! and saves Hugging Face folders (config.json + safetensors), and computes logits, per-token
//! log-probabilities and continuations.

pub mod arch;
pub mod attention;
pub mod config;
pub mod fresh;
pub mod generate;
pub mod layout;
pub mod log_softmax;
pub mod matmul;
pub mod precision;
pub mod reward;
pub mod rms_norm;
pub mod rope;
pub mod safetensors_io;
pub mod size;
pub mod swiglu;
pub mod transformer;
pub mod weights;

#[cfg(test)]
pub(crate) mod tests;

use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};

pub use arch::Architecture;
pub use config::{ModelConfig, TokenIds};
pub use generate::{GenerateOptions, Sampler};
pub use layout::{Layout, VarPath};
pub use log_softmax::gather_logprobs;
pub use precision::Precision;
pub use reward::{RewardModel, ScoreBatch, is_reward_model};
pub use rope::RopeScaling;
pub use safetensors_io::HostTensor;
pub use transformer::{Decoder, KvCache};
pub use weights::InitSampler;

/// The Hugging Face model configuration file of a model folder.
pub const CONFIG_FILE: &str = "config.json";

/// Most padded tokens one internal batch of [`CausalLm::response_logprobs`] holds.
const LOGPROB_BATCH_TOKENS: usize = 16 * 1024;

/// A causal language model.
#[derive(Module, Debug)]
pub struct CausalLm {
    /// The network.
    pub decoder: Decoder,
    /// Its configuration.
    #[module(skip)]
    config: ModelConfig,
}

impl CausalLm {
    /// Loads a Hugging Face model folder (`config.json` and `model.safetensors` or shards with
    /// `model.safetensors.index.json`, chosen by [`safetensors_io::WeightSource::find`]) onto
    /// `device`. Weights may be f32, f16 or bf16; they are
    /// computed with in f32.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config = ModelConfig::from_hf_file(&dir.join(CONFIG_FILE))?;
        reward::refuse_reward_folder(dir, &config)?;
        let mut files = safetensors_io::WeightFiles::open(dir)?;
        let decoder = weights::load(&config, &mut files, device)
            .with_context(|| format!("loading model {}", dir.display()))?;
        Ok(CausalLm { decoder, config })
    }

    /// A fresh model with weights drawn from `N(0, initializer_range)` by a generator seeded
    /// with `seed` (norms one, biases zero; the default sampler, ziggurat); the same seed gives
    /// the same weights on every backend.
    pub fn init(config: &ModelConfig, device: &Device, seed: u64) -> Result<Self> {
        Self::init_with(config, device, seed, InitSampler::default())
    }

    /// [`CausalLm::init`] drawing with `sampler`.
    pub fn init_with(
        config: &ModelConfig,
        device: &Device,
        seed: u64,
        sampler: InitSampler,
    ) -> Result<Self> {
        let config = fresh_config(config)?;
        let decoder = weights::init(&config, device, seed, sampler)?;
        Ok(CausalLm { decoder, config })
    }

    /// Writes the folder [`CausalLm::init_with`] (the ziggurat sampler) and then
    /// [`CausalLm::save_as`] write, the same bytes, without building the model: each tensor is
    /// drawn while the one before is written ([`fresh`]). Returns the config written.
    pub fn save_fresh(
        config: &ModelConfig,
        seed: u64,
        dir: &Path,
        dtype: Precision,
    ) -> Result<ModelConfig> {
        let config = fresh_config(config)?;
        let json = config::with_dtype(config.to_hf_json(), dtype);
        write_folder_with(dir, &json, |path| {
            fresh::write_drawn(&config, seed, path, dtype)
        })?;
        Ok(config)
    }

    /// Writes `config.json` and `model.safetensors` (f32, Hugging Face names, sorted, metadata
    /// `{"format":"pt"}`) into `dir`, creating it. Equal weights give equal bytes.
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.save_as(dir, Precision::F32)
    }

    /// [`CausalLm::save`] with the weights stored as `dtype` (bf16/f16 rounded to nearest even,
    /// as `model.to(torch.bfloat16)` does) and config.json's `dtype`/`torch_dtype` saying so, as
    /// Hugging Face folders of these models ship.
    pub fn save_as(&self, dir: &Path, dtype: Precision) -> Result<()> {
        let weights = weights::export_weights(&self.config, &self.decoder);
        let config = config::with_dtype(self.config.to_hf_json(), dtype);
        write_folder_with(dir, &config, |path| weights.write_as(path, dtype))
    }

    /// The model computing its matrix products in `precision` (parameters stay f32); see
    /// [`precision`].
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.decoder.set_precision(precision);
        self
    }

    /// The weights as Hugging Face tensors (names and layouts of transformers), in f32.
    pub fn hf_tensors(&self) -> Vec<(String, HostTensor)> {
        weights::export(&self.config, &self.decoder)
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    /// Most positions (prompt and continuation) the model was trained for:
    /// `max_position_embeddings`.
    pub fn context_length(&self) -> usize {
        self.config.max_position_embeddings
    }

    /// The device the parameters live on.
    pub fn device(&self) -> Device {
        self.decoder.embed.val().device()
    }

    /// Logits `[batch, seq, vocab]`. Batches are right-padded: causal masking makes the logits
    /// of real tokens independent of the padding after them.
    pub fn forward(&self, input_ids: Tensor<2, Int>) -> Tensor<3> {
        let hidden = self.decoder.forward_hidden(input_ids, None);
        self.decoder.logits(hidden)
    }

    /// `log p(targets[b, t] | input_ids[b, ..=t])` for every position, `[batch, seq]`:
    /// log-softmax over the vocabulary (f32, max-subtracted) gathered at the targets.
    /// Differentiable. Targets must be valid ids (use any id, e.g. 0, at padded positions and
    /// mask those out).
    pub fn token_logprobs(&self, input_ids: Tensor<2, Int>, targets: Tensor<2, Int>) -> Tensor<2> {
        self.token_logprobs_after(input_ids, targets, None)
    }

    /// [`CausalLm::token_logprobs`] with the inputs continuing `cache` (extended by them).
    fn token_logprobs_after(
        &self,
        input_ids: Tensor<2, Int>,
        targets: Tensor<2, Int>,
        cache: Option<&mut KvCache>,
    ) -> Tensor<2> {
        let hidden = self.decoder.forward_hidden(input_ids, cache);
        gather_logprobs(self.decoder.logits(hidden), targets)
    }

    /// Like [`CausalLm::token_logprobs`] but only at some positions, which saves the output
    /// projection (the costliest layer of small models) everywhere else: `rows` indexes the
    /// flattened `[batch * seq]` positions of `input_ids` (`b * seq + t`), `targets` holds the
    /// token whose log-prob is wanted at each of them. Returns `[rows.len()]`. Differentiable.
    pub fn selected_logprobs(
        &self,
        input_ids: Tensor<2, Int>,
        rows: Tensor<1, Int>,
        targets: Tensor<1, Int>,
    ) -> Tensor<1> {
        let [batch, seq] = input_ids.dims();
        let hidden = self.decoder.forward_hidden(input_ids, None);
        let h = self.config.hidden_size;
        let picked = hidden.reshape([batch * seq, h]).select(0, rows);
        let n = picked.dims()[0];
        let logits = self.decoder.logits(picked.reshape([1, n, h]));
        gather_logprobs(logits, targets.reshape([1, n])).reshape([n])
    }

    /// For each `(prompt_ids, response_ids)`, the log-probability of each response token (the
    /// first one predicted from the last prompt position). Batched with right padding, no
    /// gradient. The prompt must not be empty.
    pub fn response_logprobs(
        &self,
        pairs: &[(Vec<u32>, Vec<u32>)],
        device: &Device,
    ) -> Result<Vec<Vec<f32>>> {
        let model = self.valid();
        let device = device.clone().without_autodiff();
        let vocab = self.config.vocab_size;
        for (i, (p, r)) in pairs.iter().enumerate() {
            check_scorable(p, &[r], vocab).map_err(|e| anyhow::anyhow!("pair {i}: {e}"))?;
        }
        let mut out = Vec::with_capacity(pairs.len());
        let mut start = 0;
        while start < pairs.len() {
            // Grow the chunk while the padded batch stays within budget.
            let mut end = start;
            let mut max_len = 0;
            while end < pairs.len() {
                let len = pairs[end].0.len() + pairs[end].1.len() - 1;
                let new_max = max_len.max(len);
                if end > start && new_max * (end + 1 - start) > LOGPROB_BATCH_TOKENS {
                    break;
                }
                max_len = new_max;
                end += 1;
            }
            let max_len = max_len.max(1);
            let chunk = &pairs[start..end];
            let rows = chunk.len();
            let mut inputs = vec![0i64; rows * max_len];
            let mut picked = Vec::new();
            let mut targets = Vec::new();
            for (b, (p, r)) in chunk.iter().enumerate() {
                let seq: Vec<u32> = p.iter().chain(r.iter()).copied().collect();
                for t in 0..seq.len() - 1 {
                    inputs[b * max_len + t] = seq[t] as i64;
                }
                for (j, &tok) in r.iter().enumerate() {
                    picked.push((b * max_len + p.len() - 1 + j) as i64);
                    targets.push(tok as i64);
                }
            }
            if picked.is_empty() {
                out.extend(chunk.iter().map(|_| Vec::new()));
                start = end;
                continue;
            }
            let n = picked.len();
            let inputs =
                Tensor::<2, Int>::from_data(TensorData::new(inputs, [rows, max_len]), &device);
            let picked = Tensor::<1, Int>::from_data(TensorData::new(picked, [n]), &device);
            let targets = Tensor::<1, Int>::from_data(TensorData::new(targets, [n]), &device);
            let lp = model
                .selected_logprobs(inputs, picked, targets)
                .try_into_vec_as::<f32>()
                .map_err(|e| anyhow::anyhow!("reading log-probs back: {e:?}"))?;
            let mut at = 0;
            for (_, r) in chunk {
                out.push(lp[at..at + r.len()].to_vec());
                at += r.len();
            }
            start = end;
        }
        Ok(out)
    }

    /// Whether [`CausalLm::shared_prompt_logprobs`] runs its forwards through the fused
    /// attention layer on `device` (flex, f32, rotary, no sliding window, a head width the
    /// kernel has): only there does running a prompt once save more than the cache costs (the
    /// composed layer's copies ate the saving: same time, 2026-11-28).
    pub fn shares_prompts(&self, device: &Device) -> bool {
        self.decoder.spec.window.is_none() && self.decoder.fuses_attention(device, true)
    }

    /// The log-probs of each of `responses` after `prompt`, the values
    /// [`CausalLm::response_logprobs`] gives each `(prompt, response)`, with the prompt run
    /// once: all but its last token into a key/value cache, then each response (after the
    /// prompt's last token) continuing that cache. One response at a time: batched, the shorter
    /// one's padding would cost more attention than the prompt saves. No gradient; the prompt
    /// must not be empty.
    pub fn shared_prompt_logprobs(
        &self,
        prompt: &[u32],
        responses: &[&[u32]],
        device: &Device,
    ) -> Result<Vec<Vec<f32>>> {
        let model = self.valid();
        let device = device.clone().without_autodiff();
        check_scorable(prompt, responses, self.config.vocab_size)?;
        let (&last, prefix) = prompt.split_last().expect("checked: a prompt");
        let ids = |t: Vec<i64>| {
            let n = t.len();
            Tensor::<2, Int>::from_data(TensorData::new(t, [1, n]), &device)
        };
        let mut cache = KvCache::new();
        if !prefix.is_empty() {
            let prefix = prefix.iter().map(|&t| t as i64).collect();
            model.decoder.forward_hidden(ids(prefix), Some(&mut cache));
        }
        let mut out = Vec::with_capacity(responses.len());
        for r in responses {
            if r.is_empty() {
                out.push(Vec::new());
                continue;
            }
            // The prompt's last token, then the response but its last token: position `j`
            // predicts response token `j`.
            let input = std::iter::once(last)
                .chain(r[..r.len() - 1].iter().copied())
                .map(|t| t as i64)
                .collect();
            let targets = ids(r.iter().map(|&t| t as i64).collect());
            let lp = model
                .token_logprobs_after(ids(input), targets, Some(&mut cache.clone()))
                .try_into_vec_as::<f32>()
                .map_err(|e| anyhow::anyhow!("reading log-probs back: {e:?}"))?;
            out.push(lp);
        }
        Ok(out)
    }

    /// Continues `prompt_ids` with a key/value cache: greedy when `temperature` is 0, else
    /// seeded temperature / top-p sampling. Returns the new tokens, ending with EOS when it
    /// stopped there, and never more than fit in the model's context
    /// ([`GenerateOptions::new_token_budget`]). Invalid options and a prompt that fills the
    /// context are errors.
    pub fn generate(&self, prompt_ids: &[u32], opts: &GenerateOptions) -> Result<Vec<u32>> {
        if prompt_ids.is_empty() {
            bail!("generate: empty prompt (give at least a BOS token)");
        }
        let budget = opts.new_token_budget(prompt_ids.len(), self.context_length())?;
        let vocab = self.config.vocab_size;
        if let Some(bad) = prompt_ids.iter().find(|&&t| t as usize >= vocab) {
            bail!("generate: token id {bad} is outside the vocabulary of {vocab}");
        }
        let model = self.valid();
        let device = model.device();
        let mut sampler = Sampler::new(opts);
        let mut cache = KvCache::new();
        let mut out = Vec::new();
        let mut next_input: Vec<i64> = prompt_ids.iter().map(|&t| t as i64).collect();
        while out.len() < budget {
            let n = next_input.len();
            let ids = Tensor::<2, Int>::from_data(
                TensorData::new(std::mem::take(&mut next_input), [1, n]),
                &device,
            );
            let hidden = model.decoder.forward_hidden(ids, Some(&mut cache));
            let last = hidden.slice_dim(1, n - 1..n);
            let logits = model
                .decoder
                .logits(last)
                .try_into_vec_as::<f32>()
                .map_err(|e| anyhow::anyhow!("reading logits back: {e:?}"))?;
            let token = sampler.pick(&logits);
            out.push(token);
            if opts.eos_token_id == Some(token) {
                break;
            }
            next_input = vec![token as i64];
        }
        Ok(out)
    }

    /// [`CausalLm::generate`] for several prompts at once: one left-padded batch with a shared
    /// key/value cache (each row positioned and masked as if alone, see
    /// [`Decoder::forward_hidden_padded`]), each row sampled by its own [`Sampler`] seeded as
    /// `generate` seeds it, so row `i` gets what `generate(&prompts[i], opts)` gets (up to float
    /// rounding of the batched kernels). Rows that reach EOS or their budget stop; the batch
    /// runs until every row has.
    pub fn generate_batch(
        &self,
        prompts: &[Vec<u32>],
        opts: &GenerateOptions,
    ) -> Result<Vec<Vec<u32>>> {
        let vocab = self.config.vocab_size;
        let mut budgets = Vec::with_capacity(prompts.len());
        for p in prompts {
            if p.is_empty() {
                bail!("generate: empty prompt (give at least a BOS token)");
            }
            if let Some(bad) = p.iter().find(|&&t| t as usize >= vocab) {
                bail!("generate: token id {bad} is outside the vocabulary of {vocab}");
            }
            budgets.push(opts.new_token_budget(p.len(), self.context_length())?);
        }
        if prompts.is_empty() {
            return Ok(Vec::new());
        }
        let model = self.valid();
        let device = model.device();
        let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let pads: Vec<usize> = prompts.iter().map(|p| width - p.len()).collect();
        let mut samplers: Vec<Sampler> = prompts.iter().map(|_| Sampler::new(opts)).collect();
        let mut cache = KvCache::new();
        let mut out: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
        let mut done: Vec<bool> = budgets.iter().map(|&b| b == 0).collect();
        // Padding is token 0 (any valid id: padding is never attended to).
        let mut input: Vec<i64> = prompts
            .iter()
            .zip(&pads)
            .flat_map(|(p, &pad)| std::iter::repeat_n(0i64, pad).chain(p.iter().map(|&t| t as i64)))
            .collect();
        let mut step_len = width;
        while done.iter().any(|d| !d) {
            let rows = prompts.len();
            let ids = Tensor::<2, Int>::from_data(
                TensorData::new(std::mem::take(&mut input), [rows, step_len]),
                &device,
            );
            let hidden = model
                .decoder
                .forward_hidden_padded(ids, Some(&mut cache), Some(&pads));
            let last = hidden.slice_dim(1, step_len - 1..step_len);
            let logits = model
                .decoder
                .logits(last)
                .try_into_vec_as::<f32>()
                .map_err(|e| anyhow::anyhow!("reading logits back: {e:?}"))?;
            for b in 0..rows {
                let token = if done[b] {
                    // A finished row is fed its last token again; its outputs are ignored.
                    out[b].last().copied().unwrap_or(0)
                } else {
                    let t = samplers[b].pick(&logits[b * vocab..(b + 1) * vocab]);
                    out[b].push(t);
                    if opts.eos_token_id == Some(t) || out[b].len() >= budgets[b] {
                        done[b] = true;
                    }
                    t
                };
                input.push(token as i64);
            }
            step_len = 1;
        }
        Ok(out)
    }

    /// Number of parameters.
    pub fn param_count(&self) -> usize {
        self.num_params()
    }
}

/// Why the log-probs of `answers` after `prompt` cannot be computed by a model of `vocab`
/// tokens: an empty prompt, or an id outside the vocabulary.
fn check_scorable(prompt: &[u32], answers: &[&[u32]], vocab: usize) -> Result<()> {
    if prompt.is_empty() {
        bail!("empty prompt (the first response token needs a context)");
    }
    let ids = prompt.iter().chain(answers.iter().copied().flatten());
    if let Some(bad) = ids.into_iter().find(|&&t| t as usize >= vocab) {
        bail!("token id {bad} is outside the vocabulary of {vocab}");
    }
    Ok(())
}

/// The config of a fresh model of `config`: validated, and owing nothing to any source
/// config.json.
fn fresh_config(config: &ModelConfig) -> Result<ModelConfig> {
    let mut config = config.clone();
    config.validate()?;
    config.source.clear();
    Ok(config)
}

/// Writes a model folder: `model.safetensors` (as `dtype`, sorted, metadata `{"format":"pt"}`)
/// and `config.json` (pretty, newline-terminated), creating `dir`.
fn write_folder(
    dir: &Path,
    tensors: &[(String, HostTensor)],
    config: &serde_json::Value,
    dtype: Precision,
) -> Result<()> {
    let refs = safetensors_io::as_refs(tensors);
    let config = config::with_dtype(config.clone(), dtype);
    write_folder_with(dir, &config, |path| {
        safetensors_io::write_as(path, &refs, dtype)
    })
}

/// [`write_folder`], the weights written by `write_weights`. They are hashed as they are
/// written, and the hash is handed to the artifact store
/// ([`crate::pipeline::store::record_written`]), so that the stage writing them does not read
/// them back to describe its output.
fn write_folder_with(
    dir: &Path,
    config: &serde_json::Value,
    write_weights: impl FnOnce(&Path) -> Result<safetensors_io::Written>,
) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create model folder {}", dir.display()))?;
    let path = dir.join("model.safetensors");
    let written = write_weights(&path)?;
    crate::pipeline::store::record_written(&path, written.size, written.blake3);
    let mut cfg = serde_json::to_string_pretty(config)?;
    cfg.push('\n');
    let path = dir.join(CONFIG_FILE);
    std::fs::write(&path, cfg).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
