//! GPT-NeoX (Pythia): LayerNorm, partial rotary (`rotary_pct`), parallel or sequential
//! residual, GELU MLP, and the fused `query_key_value` projection whose output rows Hugging
//! Face lays out per head as `[q_h | k_h | v_h]` for each head `h`.

use anyhow::Result;
use burn::tensor::Device;

use super::config::ModelConfig;
use super::safetensors_io::{HostTensor, WeightFiles};
use super::transformer::{Block, Decoder, Spec, host, param2};
use super::weights::{Init, Part, read_linear, read_norm, write_linear, write_norm};

/// Row `r` of the decoder's `[q heads | k heads | v heads]` projection is row `perm[r]` of
/// Hugging Face's per-head interleaved `query_key_value`.
pub fn qkv_perm(heads: usize, head_dim: usize) -> Vec<usize> {
    let hidden = heads * head_dim;
    let mut perm = Vec::with_capacity(3 * hidden);
    for c in 0..3 {
        for h in 0..heads {
            for d in 0..head_dim {
                perm.push(h * 3 * head_dim + c * head_dim + d);
            }
        }
    }
    perm
}

struct Names {
    qkv: [Part; 1],
    dense: [Part; 1],
    up: [Part; 1],
    down: [Part; 1],
    prefix: String,
}

fn names(c: &ModelConfig, i: usize) -> Names {
    let p = format!("gpt_neox.layers.{i}");
    let h = c.hidden_size;
    let nh = c.num_attention_heads;
    let hd = c.head_dim();
    Names {
        qkv: [Part::new(
            &format!("{p}.attention.query_key_value"),
            3 * nh * hd,
            c.qkv_bias(),
        )],
        dense: [Part::new(&format!("{p}.attention.dense"), h, c.o_bias())],
        up: [Part::new(
            &format!("{p}.mlp.dense_h_to_4h"),
            c.intermediate_size(),
            true,
        )],
        down: [Part::new(&format!("{p}.mlp.dense_4h_to_h"), h, true)],
        prefix: p,
    }
}

/// Buffers older Pythia checkpoints carry (causal mask, rotary cache): recomputed, not loaded.
pub fn ignorable(name: &str) -> bool {
    name.ends_with(".attention.bias")
        || name.ends_with(".attention.masked_bias")
        || name.ends_with(".rotary_emb.inv_freq")
}

/// Loads a decoder from Hugging Face tensors.
pub fn load(c: &ModelConfig, files: &mut WeightFiles, device: &Device) -> Result<Decoder> {
    let spec = Spec::from_config(c)?;
    let (h, v) = (c.hidden_size, c.vocab_size);
    let perm = qkv_perm(c.num_attention_heads, c.head_dim());
    let eps = c.layer_norm_eps;
    let embed = param2(files.take("gpt_neox.embed_in.weight", &[v, h])?, device);
    let mut blocks = Vec::with_capacity(c.num_hidden_layers);
    for i in 0..c.num_hidden_layers {
        let n = names(c, i);
        let p = &n.prefix;
        blocks.push(Block {
            ln1: read_norm(
                files,
                &format!("{p}.input_layernorm"),
                h,
                eps,
                false,
                device,
            )?,
            ln2: read_norm(
                files,
                &format!("{p}.post_attention_layernorm"),
                h,
                eps,
                false,
                device,
            )?,
            qkv: read_linear(files, &n.qkv, h, Some(&perm), device)?,
            o: read_linear(
                files,
                &n.dense,
                c.num_attention_heads * c.head_dim(),
                None,
                device,
            )?,
            mlp_in: read_linear(files, &n.up, h, None, device)?,
            mlp_out: read_linear(files, &n.down, c.intermediate_size(), None, device)?,
        });
    }
    let final_norm = read_norm(files, "gpt_neox.final_layer_norm", h, eps, false, device)?;
    let lm_head = if c.tie_word_embeddings {
        files.skip("embed_out.weight");
        None
    } else {
        Some(param2(
            files.take("embed_out.weight", &[v, h])?.transpose2(),
            device,
        ))
    };
    files.finish(ignorable)?;
    Ok(Decoder {
        embed,
        blocks,
        final_norm,
        lm_head,
        spec,
    })
}

/// The Hugging Face tensors of a decoder.
pub fn export(c: &ModelConfig, d: &Decoder) -> Vec<(String, HostTensor)> {
    let perm = qkv_perm(c.num_attention_heads, c.head_dim());
    let mut out = Vec::new();
    out.push(("gpt_neox.embed_in.weight".to_string(), host(&d.embed)));
    for (i, b) in d.blocks.iter().enumerate() {
        let n = names(c, i);
        let p = &n.prefix;
        write_norm(&b.ln1, &format!("{p}.input_layernorm"), &mut out);
        write_norm(&b.ln2, &format!("{p}.post_attention_layernorm"), &mut out);
        write_linear(&b.qkv, &n.qkv, Some(&perm), &mut out);
        write_linear(&b.o, &n.dense, None, &mut out);
        write_linear(&b.mlp_in, &n.up, None, &mut out);
        write_linear(&b.mlp_out, &n.down, None, &mut out);
    }
    write_norm(&d.final_norm, "gpt_neox.final_layer_norm", &mut out);
    if let Some(w) = &d.lm_head {
        out.push(("embed_out.weight".to_string(), host(w).transpose2()));
    }
    out
}

/// A fresh decoder.
pub fn init(c: &ModelConfig, device: &Device, seed: u64) -> Result<Decoder> {
    let spec = Spec::from_config(c)?;
    let mut r = Init::new(seed, c.initializer_range);
    let (h, v, nh, hd, inter) = (
        c.hidden_size,
        c.vocab_size,
        c.num_attention_heads,
        c.head_dim(),
        c.intermediate_size(),
    );
    let eps = c.layer_norm_eps;
    let embed = param2(r.normal(vec![v, h]), device);
    let blocks = (0..c.num_hidden_layers)
        .map(|_| Block {
            ln1: Init::norm(h, eps, false, device),
            ln2: Init::norm(h, eps, false, device),
            qkv: r.linear(h, 3 * nh * hd, c.qkv_bias(), device),
            o: r.linear(nh * hd, h, c.o_bias(), device),
            mlp_in: r.linear(h, inter, true, device),
            mlp_out: r.linear(inter, h, true, device),
        })
        .collect();
    let final_norm = Init::norm(h, eps, false, device);
    let lm_head = (!c.tie_word_embeddings).then(|| param2(r.normal(vec![h, v]), device));
    Ok(Decoder {
        embed,
        blocks,
        final_norm,
        lm_head,
        spec,
    })
}
