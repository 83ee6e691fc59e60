//! Reward models: transformers' `LlamaForSequenceClassification`, `MistralForSequenceClassification`,
//! `Qwen2ForSequenceClassification` and `GPTNeoXForSequenceClassification` with one label. The
//! same [`Decoder`] as a causal LM (weights `model.*` or `gpt_neox.*`), no LM head, and a bias-free
//! `score` projection `[1, hidden]` read at one position per sequence: the rightmost token that is
//! not `pad_token_id` (transformers' `last_non_pad_token`), or the last token when the config has
//! no pad id.
//!
//! Loading, saving and fresh initialization go through the one layout walk of `weights.rs` (a
//! [`super::layout::Head::Score`] head), so a reward folder is read and written by the same table
//! as its family's causal LM.

use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde_json::{Map, Value, json};

use super::transformer::{Decoder, Linear};
use super::{CONFIG_FILE, CausalLm, HostTensor, ModelConfig, TokenIds, safetensors_io, weights};
use crate::error::user;
use crate::user_bail;

/// The suffix of the transformers classes that carry a score head instead of an LM head.
const SEQUENCE_CLASSIFICATION: &str = "ForSequenceClassification";

/// Most padded tokens one internal batch of [`RewardModel::rewards`] holds.
const REWARD_BATCH_TOKENS: usize = 16 * 1024;

/// transformers' `PretrainedConfig` default when a config.json says neither `num_labels` nor
/// `id2label`.
const DEFAULT_NUM_LABELS: usize = 2;

/// Whether the folder's config.json names a `*ForSequenceClassification` class in
/// `architectures` (what `AutoModelForSequenceClassification` checkpoints say).
pub fn is_reward_model(dir: &Path) -> Result<bool> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read model config {}", path.display()))?;
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    Ok(names_reward_class(v.get("architectures")))
}

/// Whether a config's `architectures` names a `*ForSequenceClassification` class.
fn names_reward_class(architectures: Option<&Value>) -> bool {
    architectures.and_then(Value::as_array).is_some_and(|a| {
        a.iter()
            .filter_map(Value::as_str)
            .any(|c| c.ends_with(SEQUENCE_CLASSIFICATION))
    })
}

/// The number of labels transformers gives a config: `num_labels` when spelled (it wins over
/// `id2label`, with a warning), else the size of `id2label`, else its default of 2.
fn num_labels(source: &Map<String, Value>) -> usize {
    if let Some(n) = source.get("num_labels").and_then(Value::as_u64) {
        return n as usize;
    }
    match source.get("id2label") {
        Some(Value::Object(m)) => m.len(),
        _ => DEFAULT_NUM_LABELS,
    }
}

/// A reward model: the decoder and a one-label score head.
#[derive(Module, Debug)]
pub struct RewardModel {
    /// The network (its `lm_head` is always `None`: a reward model has no LM head).
    pub decoder: Decoder,
    /// The score `[hidden, 1]` (the decoder's `[in, out]` layout), no bias.
    pub score: Linear,
    /// Its configuration; `pad_token_id` decides where sequences are scored.
    #[module(skip)]
    config: ModelConfig,
}

/// A right-padded batch of sequences and, for each, the flat position (`b * seq + t`) its
/// reward is read at.
#[derive(Debug, Clone)]
pub struct ScoreBatch {
    /// `[batch, seq]` token ids (0 after each sequence's end).
    pub ids: Tensor<2, Int>,
    /// `[batch]` flat positions.
    pub at: Tensor<1, Int>,
    /// Real (non-padding) tokens in the batch.
    pub tokens: usize,
}

impl RewardModel {
    /// Loads a Hugging Face `*ForSequenceClassification` folder (config.json, `model.safetensors`
    /// or shards, as [`CausalLm::load`]) onto `device`. A config whose `num_labels` is not 1 is
    /// refused (a user error naming the file): sepo's rewards are one scalar.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let path = dir.join(CONFIG_FILE);
        let config = ModelConfig::from_hf_file(&path)?;
        let labels = num_labels(&config.source);
        if labels != 1 {
            user_bail!(
                "{}: num_labels is {labels}; a reward model has one score (num_labels 1, or one \
                 entry in id2label)",
                path.display()
            );
        }
        let mut files = safetensors_io::WeightFiles::open(dir)?;
        let (decoder, score) = weights::load_reward(&config, 1, &mut files, device)
            .with_context(|| format!("loading reward model {}", dir.display()))?;
        Ok(RewardModel {
            decoder,
            score,
            config,
        })
    }

    /// A reward model on `lm`'s decoder (its LM head dropped) with a fresh score drawn as
    /// transformers' `_init_weights` draws a linear, `N(0, initializer_range)`, seeded by
    /// `seed`, the same on every backend.
    ///
    /// The pad id: the LM's `pad_token_id`, else its (first) `eos_token_id`, else `end_token`
    /// (its tokenizer's), the usual set-up of TRL's RewardTrainer with a tokenizer that has no
    /// pad token (`pad_token = eos_token`).
    /// transformers needs one to score a batch, and it decides where a sequence is read: with
    /// pad == EOS, a trailing EOS (every `tokenize` response ends with one) is skipped and the
    /// score is read at the last response token before it. sepo applies the same rule when it
    /// trains and scores, so the saved folder gives the same rewards in transformers.
    pub fn from_causal_lm(lm: CausalLm, seed: u64, end_token: Option<u32>) -> Result<Self> {
        let CausalLm {
            mut decoder,
            mut config,
        } = lm;
        // The config's pad id, else its EOS, else the tokenizer's end token (a fresh model from
        // `config:` names none in its config.json).
        let pad = config
            .pad_token_id
            .as_ref()
            .or(config.eos_token_id.as_ref())
            .and_then(TokenIds::first)
            .or(end_token);
        let Some(pad) = pad else {
            user_bail!(
                "the model's config has neither `pad_token_id` nor `eos_token_id`, and its \
                 tokenizer names no end token: a reward model needs a pad id (transformers reads \
                 the score at the last token that is not one)"
            );
        };
        config.pad_token_id = Some(TokenIds::One(pad));
        let device = decoder.embed.val().device();
        decoder.lm_head = None;
        let score = weights::init_score(&config, 1, &device, seed);
        Ok(RewardModel {
            decoder,
            score,
            config,
        })
    }

    /// Writes `config.json` (the family's `*ForSequenceClassification` class, one label as
    /// `id2label`/`label2id`, `pad_token_id`) and `model.safetensors` (f32, `model.*` or
    /// `gpt_neox.*` and `score.weight`, no LM head) into `dir`, creating it:
    /// `AutoModelForSequenceClassification.from_pretrained` loads it. Equal weights give equal
    /// bytes.
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.save_as(dir, super::Precision::F32)
    }

    /// [`RewardModel::save`] with the weights stored as `dtype` (see [`CausalLm::save_as`]).
    pub fn save_as(&self, dir: &Path, dtype: super::Precision) -> Result<()> {
        let mut cfg = self.config.to_hf_json();
        let obj = cfg.as_object_mut().expect("to_hf_json gives an object");
        // `num_labels` would win over `id2label` in transformers; one key says it.
        obj.remove("num_labels");
        obj.insert(
            "architectures".into(),
            json!([self.config.architecture.reward_class()]),
        );
        obj.insert("id2label".into(), json!({"0": "LABEL_0"}));
        obj.insert("label2id".into(), json!({"LABEL_0": 0}));
        super::write_folder(dir, &self.hf_tensors(), &cfg, dtype)
    }

    /// The weights as Hugging Face tensors (names and layouts of transformers), in f32.
    pub fn hf_tensors(&self) -> Vec<(String, HostTensor)> {
        weights::export_reward(&self.config, &self.decoder, &self.score)
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The id whose trailing run is skipped when a sequence is scored, if any.
    pub fn pad_token_id(&self) -> Option<u32> {
        self.config.pad_token_id.as_ref().and_then(TokenIds::first)
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    /// Number of parameters.
    pub fn param_count(&self) -> usize {
        self.num_params()
    }

    /// Where `seq`'s reward is read (transformers' `last_non_pad_token`): the rightmost token
    /// that is not the pad id (0 when every token is, as its argmax gives), or the last token
    /// when there is no pad id. `seq` must not be empty.
    pub fn score_position(&self, seq: &[u32]) -> usize {
        match self.pad_token_id() {
            Some(pad) => seq.iter().rposition(|&t| t != pad).unwrap_or(0),
            None => seq.len() - 1,
        }
    }

    /// Right-pads `seqs` into one batch on `device` and finds where each is scored. Errors
    /// name the sequence: empty, or a token outside the vocabulary.
    pub fn batch(&self, seqs: &[&[u32]], device: &Device) -> Result<ScoreBatch> {
        let vocab = self.vocab_size();
        for (i, s) in seqs.iter().enumerate() {
            if s.is_empty() {
                bail!("sequence {i} is empty: there is no token to read a reward at");
            }
            if let Some(bad) = s.iter().find(|&&t| t as usize >= vocab) {
                bail!("sequence {i}: token id {bad} is outside the vocabulary of {vocab}");
            }
        }
        let rows = seqs.len();
        let width = seqs.iter().map(|s| s.len()).max().unwrap_or(1);
        let mut ids = vec![0i64; rows * width];
        let mut at = Vec::with_capacity(rows);
        for (b, s) in seqs.iter().enumerate() {
            for (t, &tok) in s.iter().enumerate() {
                ids[b * width + t] = tok as i64;
            }
            at.push((b * width + self.score_position(s)) as i64);
        }
        Ok(ScoreBatch {
            ids: Tensor::<2, Int>::from_data(TensorData::new(ids, [rows, width]), device),
            at: Tensor::<1, Int>::from_data(TensorData::new(at, [rows]), device),
            tokens: seqs.iter().map(|s| s.len()).sum(),
        })
    }

    /// The model computing its matrix products in `precision` (parameters stay f32).
    pub fn with_precision(mut self, precision: super::Precision) -> Self {
        self.decoder.set_precision(precision);
        self
    }

    /// The rewards of a batch, `[batch]`, differentiable (the training forward). Causal
    /// attention keeps every real position independent of the padding after it, so no
    /// attention mask is needed.
    pub fn forward(&self, batch: ScoreBatch) -> Tensor<1> {
        let [rows, width] = batch.ids.dims();
        let hidden = self.decoder.forward_hidden(batch.ids, None);
        let h = hidden.dims()[2];
        let picked = hidden.reshape([rows * width, h]).select(0, batch.at);
        let dt = self.decoder.precision().compute_dtype();
        // Under mixed precision the head runs in the low precision too (autocast's linear);
        // rewards come back in f32.
        super::transformer::to_f32(self.score.forward_as(picked, dt).reshape([rows]))
    }

    /// The reward of each sequence, without gradient, in batches of right-padded sequences.
    pub fn rewards(&self, seqs: &[Vec<u32>], device: &Device) -> Result<Vec<f32>> {
        let model = self.valid();
        let device = device.clone().without_autodiff();
        let mut out = Vec::with_capacity(seqs.len());
        let mut start = 0;
        while start < seqs.len() {
            // Grow the chunk while the padded batch stays within budget.
            let (mut end, mut width) = (start, 0);
            while end < seqs.len() {
                let w = width.max(seqs[end].len());
                if end > start && w * (end + 1 - start) > REWARD_BATCH_TOKENS {
                    break;
                }
                (width, end) = (w, end + 1);
            }
            let chunk: Vec<&[u32]> = seqs[start..end].iter().map(Vec::as_slice).collect();
            let batch = model
                .batch(&chunk, &device)
                .with_context(|| format!("scoring sequences {start}..{end}"))?;
            let r = model
                .forward(batch)
                .try_into_vec_as::<f32>()
                .map_err(|e| anyhow::anyhow!("reading rewards back: {e:?}"))?;
            out.extend(r);
            start = end;
        }
        Ok(out)
    }
}

/// Refuses a reward folder where a causal LM is wanted, saying what it is (loading it as one
/// would only complain about `score.weight`).
pub(super) fn refuse_reward_folder(dir: &Path, config: &ModelConfig) -> Result<()> {
    if names_reward_class(config.source.get("architectures")) {
        return Err(user(format!(
            "{} is a reward model (`{}`): it scores sequences and has no language-model head",
            dir.display(),
            config.architecture.reward_class()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn num_labels_follows_transformers() {
        let m = |v: Value| v.as_object().unwrap().clone();
        assert_eq!(num_labels(&m(json!({}))), 2);
        assert_eq!(num_labels(&m(json!({"id2label": {"0": "LABEL_0"}}))), 1);
        let both = json!({"id2label": {"0": "a", "1": "b", "2": "c"}, "num_labels": 1});
        assert_eq!(num_labels(&m(both)), 1);
    }

    #[test]
    fn reward_classes_are_recognized() {
        assert!(names_reward_class(Some(&json!([
            "GPTNeoXForSequenceClassification"
        ]))));
        assert!(!names_reward_class(Some(&json!(["LlamaForCausalLM"]))));
        assert!(!names_reward_class(None));
    }
}
