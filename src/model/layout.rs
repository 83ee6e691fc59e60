//! Where a checkpoint keeps each weight of the decoder: a family's [`WeightTable`] of module
//! names, resolved against a config into a [`Layout`] of Hugging Face tensor names and shapes.
//! Names are built with [`VarPath`] prefixes in candle's `vb.pp(..)` style. The one load /
//! export / init path in [`super::weights`] walks a `Layout`, so it is the same for every
//! family.

use std::fmt;

use super::config::ModelConfig;

/// A dotted tensor-name prefix built a step at a time, as candle's `VarBuilder::pp`:
/// `VarPath::root().pp("model").pp("layers").pp(3).pp("self_attn").pp("q_proj")` is
/// `model.layers.3.self_attn.q_proj`, and its [`VarPath::weight`] is
/// `model.layers.3.self_attn.q_proj.weight`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VarPath(String);

impl VarPath {
    /// The empty prefix (top-level names such as `lm_head`).
    pub fn root() -> Self {
        VarPath(String::new())
    }

    /// The prefix one step further down.
    pub fn pp(&self, step: impl fmt::Display) -> Self {
        if self.0.is_empty() {
            VarPath(step.to_string())
        } else {
            VarPath(format!("{}.{step}", self.0))
        }
    }

    /// The tensor `leaf` under this prefix.
    pub fn name(&self, leaf: &str) -> String {
        self.pp(leaf).0
    }

    /// `<prefix>.weight`.
    pub fn weight(&self) -> String {
        self.name("weight")
    }

    /// `<prefix>.bias`.
    pub fn bias(&self) -> String {
        self.name("bias")
    }
}

impl fmt::Display for VarPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A family's module names, each one `pp` step below its parent. Shapes are not written here:
/// they follow from the config ([`Layout::new`]).
#[derive(Debug, Clone, Copy)]
pub struct WeightTable {
    /// The module holding embeddings, layers and final norm (`model`, `gpt_neox`).
    pub body: &'static str,
    /// Token embeddings `[vocab, hidden]`, under `body`.
    pub embed: &'static str,
    /// The list of blocks, under `body`; block `i` is `<body>.<layers>.<i>`.
    pub layers: &'static str,
    /// The norm before attention, under a block.
    pub ln1: &'static str,
    /// The norm before the MLP, under a block.
    pub ln2: &'static str,
    /// The attention module, under a block.
    pub attention: &'static str,
    /// The q/k/v projections, under `attention`.
    pub qkv: QkvNames,
    /// The attention output projection, under `attention`.
    pub attn_out: &'static str,
    /// The MLP module, under a block.
    pub mlp: &'static str,
    /// The MLP input projections, under `mlp`.
    pub mlp_in: MlpNames,
    /// The MLP output projection, under `mlp`.
    pub mlp_out: &'static str,
    /// The final norm, under `body`.
    pub final_norm: &'static str,
    /// The output projection `[vocab, hidden]`, at the top level.
    pub lm_head: &'static str,
    /// A reward model's (`*ForSequenceClassification`) score projection `[num_labels, hidden]`,
    /// no bias, at the top level, in place of `lm_head`.
    pub score: &'static str,
    /// Suffixes of buffers checkpoints may carry that are recomputed, not loaded.
    pub ignorable: &'static [&'static str],
}

/// How the q/k/v projections are stored.
#[derive(Debug, Clone, Copy)]
pub enum QkvNames {
    /// Three linears `q`, `k`, `v` (`[heads * head_dim | kv * head_dim | kv * head_dim]` rows).
    Separate([&'static str; 3]),
    /// One linear whose output rows are laid out per head as `[q_h | k_h | v_h]` (gpt_neox).
    PerHead(&'static str),
}

/// How the MLP input is stored.
#[derive(Debug, Clone, Copy)]
pub enum MlpNames {
    /// `act(gate(x)) * up(x)`: two linears, fused by the decoder as `[gate | up]`.
    Gated {
        /// The gate projection.
        gate: &'static str,
        /// The up projection.
        up: &'static str,
    },
    /// `act(proj(x))`: one linear.
    Plain(&'static str),
}

/// One Hugging Face linear that is part of a decoder projection: `weight` `[out, in]` and, when
/// the layer has one, `bias` `[out]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    /// `....weight`
    pub weight: String,
    /// `....bias`, when the layer has one.
    pub bias: Option<String>,
    /// Output features.
    pub out: usize,
}

impl Part {
    /// The linear at `path`, with `out` output rows.
    pub fn new(path: &VarPath, out: usize, bias: bool) -> Self {
        Part {
            weight: path.weight(),
            bias: bias.then(|| path.bias()),
            out,
        }
    }
}

/// A decoder linear `[in, out]` as Hugging Face stores it: `parts` stacked along the output
/// rows, then (when `perm` is given) reordered so that decoder row `r` is stored row `perm[r]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearLayout {
    /// The stored linears, in stacking order.
    pub parts: Vec<Part>,
    /// Input features.
    pub in_dim: usize,
    /// Decoder row `r` is stacked row `perm[r]`.
    pub perm: Option<Vec<usize>>,
}

impl LinearLayout {
    /// Total output features.
    pub fn out_dim(&self) -> usize {
        self.parts.iter().map(|p| p.out).sum()
    }

    /// Whether the decoder linear has a bias (every part has one).
    pub fn has_bias(&self) -> bool {
        self.parts.iter().all(|p| p.bias.is_some())
    }
}

/// A norm: `weight` `[dim]`, and `bias` `[dim]` for LayerNorm.
#[derive(Debug, Clone, PartialEq)]
pub struct NormLayout {
    /// `....weight`
    pub weight: String,
    /// `....bias` (LayerNorm only).
    pub bias: Option<String>,
    /// Width.
    pub dim: usize,
    /// Epsilon.
    pub eps: f64,
    /// RMSNorm rather than LayerNorm.
    pub rms: bool,
}

/// The tensors of one block.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockLayout {
    /// Norm before attention.
    pub ln1: NormLayout,
    /// Norm before the MLP.
    pub ln2: NormLayout,
    /// q/k/v, fused by the decoder as `[q heads | k heads | v heads]`.
    pub qkv: LinearLayout,
    /// Attention output.
    pub o: LinearLayout,
    /// MLP input (`[gate | up]` when gated).
    pub mlp_in: LinearLayout,
    /// MLP output.
    pub mlp_out: LinearLayout,
}

/// What sits on the final norm: a causal LM's output projection or a reward model's score.
#[derive(Debug, Clone, PartialEq)]
pub enum Head {
    /// Output projection, stored `[vocab, hidden]` (the decoder keeps `[hidden, vocab]`); not
    /// read when the embeddings are tied (some exports keep a copy of the tied matrix).
    LmHead {
        /// `lm_head.weight` (`embed_out.weight`).
        name: String,
        /// `tie_word_embeddings`.
        tied: bool,
    },
    /// transformers' `*ForSequenceClassification` head: `score.weight` `[num_labels, hidden]`,
    /// no bias; the model has no LM head at all (transformers saves none).
    Score {
        /// `score.weight`.
        name: String,
        /// Output rows.
        num_labels: usize,
    },
}

/// Every tensor of a model's checkpoint, with its shape, for one config.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// Token embeddings, stored `[vocab, hidden]` as the decoder keeps them.
    pub embed: String,
    /// Blocks.
    pub blocks: Vec<BlockLayout>,
    /// Final norm.
    pub final_norm: NormLayout,
    /// The head.
    pub head: Head,
    /// `[vocab, hidden]`.
    pub vocab_hidden: [usize; 2],
    ignorable: &'static [&'static str],
}

impl Layout {
    /// The layout of a config's family at its sizes. The config must be valid
    /// ([`ModelConfig::validate`]): sizes are not checked again here.
    pub fn new(c: &ModelConfig) -> Self {
        let family = c.architecture.family();
        let t = &family.weights;
        let (h, nh, kv, hd) = (
            c.hidden_size,
            c.num_attention_heads,
            c.num_kv_heads(),
            c.head_dim(),
        );
        let (inter, mlp_bias) = (c.intermediate_size(), c.mlp_has_bias());
        let norm = |path: VarPath| NormLayout {
            weight: path.weight(),
            bias: (!family.rms_norm).then(|| path.bias()),
            dim: h,
            eps: c.norm_eps(),
            rms: family.rms_norm,
        };
        let linear = |parts: Vec<Part>, in_dim: usize| LinearLayout {
            parts,
            in_dim,
            perm: None,
        };
        let body = VarPath::root().pp(t.body);
        let blocks = (0..c.num_hidden_layers)
            .map(|i| {
                let layer = body.pp(t.layers).pp(i);
                let attn = layer.pp(t.attention);
                let mlp = layer.pp(t.mlp);
                let qb = c.qkv_bias();
                let qkv = match t.qkv {
                    QkvNames::Separate([q, k, v]) => linear(
                        vec![
                            Part::new(&attn.pp(q), nh * hd, qb),
                            Part::new(&attn.pp(k), kv * hd, qb),
                            Part::new(&attn.pp(v), kv * hd, qb),
                        ],
                        h,
                    ),
                    QkvNames::PerHead(name) => LinearLayout {
                        perm: Some(per_head_qkv_perm(nh, hd)),
                        ..linear(vec![Part::new(&attn.pp(name), 3 * nh * hd, qb)], h)
                    },
                };
                let mlp_in = match t.mlp_in {
                    MlpNames::Gated { gate, up } => vec![
                        Part::new(&mlp.pp(gate), inter, mlp_bias),
                        Part::new(&mlp.pp(up), inter, mlp_bias),
                    ],
                    MlpNames::Plain(name) => vec![Part::new(&mlp.pp(name), inter, mlp_bias)],
                };
                BlockLayout {
                    ln1: norm(layer.pp(t.ln1)),
                    ln2: norm(layer.pp(t.ln2)),
                    qkv,
                    o: linear(
                        vec![Part::new(&attn.pp(t.attn_out), h, c.o_bias())],
                        nh * hd,
                    ),
                    mlp_in: linear(mlp_in, h),
                    mlp_out: linear(vec![Part::new(&mlp.pp(t.mlp_out), h, mlp_bias)], inter),
                }
            })
            .collect();
        Layout {
            embed: body.pp(t.embed).weight(),
            blocks,
            final_norm: norm(body.pp(t.final_norm)),
            head: Head::LmHead {
                name: VarPath::root().pp(t.lm_head).weight(),
                tied: c.tie_word_embeddings,
            },
            vocab_hidden: [c.vocab_size, h],
            ignorable: t.ignorable,
        }
    }

    /// The layout of the family's reward model (`*ForSequenceClassification`): the same body,
    /// with a `score` head of `num_labels` rows in place of the LM head.
    pub fn reward(c: &ModelConfig, num_labels: usize) -> Self {
        let score = c.architecture.family().weights.score;
        Layout {
            head: Head::Score {
                name: VarPath::root().pp(score).weight(),
                num_labels,
            },
            ..Layout::new(c)
        }
    }

    /// Whether a checkpoint may carry `name` without it being read (a recomputed buffer).
    pub fn ignorable(&self, name: &str) -> bool {
        self.ignorable.iter().any(|s| name.ends_with(s))
    }

    /// Every tensor a checkpoint of this layout holds, with its Hugging Face shape, in the
    /// order they are read and written (the tied `lm_head` left out).
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = vec![(self.embed.clone(), self.vocab_hidden.to_vec())];
        let norm = |n: &NormLayout, out: &mut Vec<(String, Vec<usize>)>| {
            out.push((n.weight.clone(), vec![n.dim]));
            out.extend(n.bias.iter().map(|b| (b.clone(), vec![n.dim])));
        };
        for b in &self.blocks {
            norm(&b.ln1, &mut out);
            norm(&b.ln2, &mut out);
            for lin in [&b.qkv, &b.o, &b.mlp_in, &b.mlp_out] {
                for p in &lin.parts {
                    out.push((p.weight.clone(), vec![p.out, lin.in_dim]));
                    out.extend(p.bias.iter().map(|b| (b.clone(), vec![p.out])));
                }
            }
        }
        norm(&self.final_norm, &mut out);
        match &self.head {
            Head::LmHead { name, tied: false } => {
                out.push((name.clone(), self.vocab_hidden.to_vec()))
            }
            Head::LmHead { tied: true, .. } => {}
            Head::Score { name, num_labels } => {
                out.push((name.clone(), vec![*num_labels, self.vocab_hidden[1]]))
            }
        }
        out
    }
}

/// Row `r` of the decoder's `[q heads | k heads | v heads]` projection is row `perm[r]` of a
/// projection stored per head as `[q_h | k_h | v_h]`.
pub fn per_head_qkv_perm(heads: usize, head_dim: usize) -> Vec<usize> {
    let mut perm = Vec::with_capacity(3 * heads * head_dim);
    for c in 0..3 {
        for h in 0..heads {
            for d in 0..head_dim {
                perm.push(h * 3 * head_dim + c * head_dim + d);
            }
        }
    }
    perm
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Architecture;

    fn config(arch: Architecture) -> ModelConfig {
        ModelConfig {
            architecture: arch,
            vocab_size: 10,
            hidden_size: 8,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: (arch != Architecture::GptNeox).then_some(1),
            intermediate_size: Some(12),
            ..ModelConfig::default()
        }
    }

    #[test]
    fn var_path_builds_dotted_names() {
        let attn = VarPath::root()
            .pp("model")
            .pp("layers")
            .pp(3)
            .pp("self_attn");
        assert_eq!(attn.to_string(), "model.layers.3.self_attn");
        assert_eq!(
            attn.pp("q_proj").weight(),
            "model.layers.3.self_attn.q_proj.weight"
        );
        assert_eq!(
            attn.pp("q_proj").bias(),
            "model.layers.3.self_attn.q_proj.bias"
        );
        assert_eq!(VarPath::root().pp("lm_head").weight(), "lm_head.weight");
    }

    #[test]
    fn families_agree_with_their_names() {
        for (arch, name) in Architecture::ALL.into_iter().zip(Architecture::NAMES) {
            assert_eq!(arch.model_type(), name);
            assert_eq!(Architecture::from_name(name), Some(arch));
        }
        assert_eq!(
            Architecture::from_name("gpt-neox"),
            Some(Architecture::GptNeox)
        );
        assert_eq!(Architecture::from_name("bert"), None);
    }

    #[test]
    fn tables_give_transformers_names_and_shapes() {
        let first_layer = |arch| -> Vec<(String, Vec<usize>)> {
            let layout = Layout::new(&config(arch));
            let all = layout.tensors();
            all.into_iter().filter(|(n, _)| n.contains(".0.")).collect()
        };
        let owned = |v: &[(&str, &[usize])]| -> Vec<(String, Vec<usize>)> {
            v.iter().map(|(n, s)| (n.to_string(), s.to_vec())).collect()
        };
        assert_eq!(
            first_layer(Architecture::Qwen2),
            owned(&[
                ("model.layers.0.input_layernorm.weight", &[8]),
                ("model.layers.0.post_attention_layernorm.weight", &[8]),
                ("model.layers.0.self_attn.q_proj.weight", &[8, 8]),
                ("model.layers.0.self_attn.q_proj.bias", &[8]),
                ("model.layers.0.self_attn.k_proj.weight", &[4, 8]),
                ("model.layers.0.self_attn.k_proj.bias", &[4]),
                ("model.layers.0.self_attn.v_proj.weight", &[4, 8]),
                ("model.layers.0.self_attn.v_proj.bias", &[4]),
                ("model.layers.0.self_attn.o_proj.weight", &[8, 8]),
                ("model.layers.0.mlp.gate_proj.weight", &[12, 8]),
                ("model.layers.0.mlp.up_proj.weight", &[12, 8]),
                ("model.layers.0.mlp.down_proj.weight", &[8, 12]),
            ])
        );
        let p = "gpt_neox.layers.0";
        assert_eq!(
            first_layer(Architecture::GptNeox),
            owned(&[
                (&format!("{p}.input_layernorm.weight"), &[8]),
                (&format!("{p}.input_layernorm.bias"), &[8]),
                (&format!("{p}.post_attention_layernorm.weight"), &[8]),
                (&format!("{p}.post_attention_layernorm.bias"), &[8]),
                (&format!("{p}.attention.query_key_value.weight"), &[24, 8]),
                (&format!("{p}.attention.query_key_value.bias"), &[24]),
                (&format!("{p}.attention.dense.weight"), &[8, 8]),
                (&format!("{p}.attention.dense.bias"), &[8]),
                (&format!("{p}.mlp.dense_h_to_4h.weight"), &[12, 8]),
                (&format!("{p}.mlp.dense_h_to_4h.bias"), &[12]),
                (&format!("{p}.mlp.dense_4h_to_h.weight"), &[8, 12]),
                (&format!("{p}.mlp.dense_4h_to_h.bias"), &[8]),
            ])
        );
        let neox = Layout::new(&config(Architecture::GptNeox));
        assert_eq!(neox.embed, "gpt_neox.embed_in.weight");
        assert_eq!(neox.final_norm.weight, "gpt_neox.final_layer_norm.weight");
        assert_eq!(
            neox.head,
            Head::LmHead {
                name: "embed_out.weight".into(),
                tied: false
            }
        );
        let reward = Layout::reward(&config(Architecture::GptNeox), 1);
        let last = reward.tensors().pop().unwrap();
        assert_eq!(last, ("score.weight".to_string(), vec![1, 8]));
        assert!(neox.ignorable("gpt_neox.layers.1.attention.masked_bias"));
        assert!(!neox.ignorable("gpt_neox.layers.1.attention.dense.bias"));
    }

    #[test]
    fn every_table_holds_the_parameter_count() {
        for arch in Architecture::ALL {
            for tied in [false, true] {
                for bias in [false, true] {
                    let c = ModelConfig {
                        tie_word_embeddings: tied,
                        attention_bias: Some(bias),
                        mlp_bias: bias,
                        ..config(arch)
                    };
                    let total: usize = Layout::new(&c)
                        .tensors()
                        .iter()
                        .map(|(_, s)| s.iter().product::<usize>())
                        .sum();
                    assert_eq!(total, c.num_params(), "{arch:?} tied {tied} bias {bias}");
                }
            }
        }
    }
}
