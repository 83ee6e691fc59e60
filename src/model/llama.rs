//! Llama, Mistral and Qwen2 (`LlamaForCausalLM` naming): RMSNorm, grouped-query attention,
//! rotary embeddings on the whole head, SwiGLU MLP, optional q/k/v bias (qwen2), tied or
//! untied output embeddings.

use anyhow::Result;
use burn::tensor::Device;

use super::config::ModelConfig;
use super::safetensors_io::{HostTensor, WeightFiles};
use super::transformer::{Block, Decoder, Spec, host, param2};
use super::weights::{Init, Part, read_linear, read_norm, write_linear, write_norm};

fn attn_parts(c: &ModelConfig, i: usize) -> ([Part; 3], [Part; 1]) {
    let (nh, kv, hd) = (c.num_attention_heads, c.num_kv_heads(), c.head_dim());
    let p = format!("model.layers.{i}.self_attn");
    let qb = c.qkv_bias();
    (
        [
            Part::new(&format!("{p}.q_proj"), nh * hd, qb),
            Part::new(&format!("{p}.k_proj"), kv * hd, qb),
            Part::new(&format!("{p}.v_proj"), kv * hd, qb),
        ],
        [Part::new(&format!("{p}.o_proj"), c.hidden_size, c.o_bias())],
    )
}

fn mlp_parts(c: &ModelConfig, i: usize) -> ([Part; 2], [Part; 1]) {
    let p = format!("model.layers.{i}.mlp");
    let (inter, b) = (c.intermediate_size(), c.mlp_has_bias());
    (
        [
            Part::new(&format!("{p}.gate_proj"), inter, b),
            Part::new(&format!("{p}.up_proj"), inter, b),
        ],
        [Part::new(&format!("{p}.down_proj"), c.hidden_size, b)],
    )
}

/// Names of buffers some checkpoints carry that are recomputed, not loaded.
pub fn ignorable(name: &str) -> bool {
    name.ends_with(".rotary_emb.inv_freq")
}

/// Loads a decoder from Hugging Face tensors.
pub fn load(c: &ModelConfig, files: &mut WeightFiles, device: &Device) -> Result<Decoder> {
    let spec = Spec::from_config(c)?;
    let (h, v) = (c.hidden_size, c.vocab_size);
    let embed = param2(files.take("model.embed_tokens.weight", &[v, h])?, device);
    let mut blocks = Vec::with_capacity(c.num_hidden_layers);
    for i in 0..c.num_hidden_layers {
        let (qkv, o) = attn_parts(c, i);
        let (gate_up, down) = mlp_parts(c, i);
        let p = format!("model.layers.{i}");
        blocks.push(Block {
            ln1: read_norm(
                files,
                &format!("{p}.input_layernorm"),
                h,
                c.rms_norm_eps,
                true,
                device,
            )?,
            ln2: read_norm(
                files,
                &format!("{p}.post_attention_layernorm"),
                h,
                c.rms_norm_eps,
                true,
                device,
            )?,
            qkv: read_linear(files, &qkv, h, None, device)?,
            o: read_linear(
                files,
                &o,
                c.num_attention_heads * c.head_dim(),
                None,
                device,
            )?,
            mlp_in: read_linear(files, &gate_up, h, None, device)?,
            mlp_out: read_linear(files, &down, c.intermediate_size(), None, device)?,
        });
    }
    let final_norm = read_norm(files, "model.norm", h, c.rms_norm_eps, true, device)?;
    let lm_head = if c.tie_word_embeddings {
        // Some exports keep a copy of the tied matrix; it is the embedding, so not read.
        files.skip("lm_head.weight");
        None
    } else {
        Some(param2(
            files.take("lm_head.weight", &[v, h])?.transpose2(),
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
    let mut out = Vec::new();
    out.push(("model.embed_tokens.weight".to_string(), host(&d.embed)));
    for (i, b) in d.blocks.iter().enumerate() {
        let (qkv, o) = attn_parts(c, i);
        let (gate_up, down) = mlp_parts(c, i);
        let p = format!("model.layers.{i}");
        write_norm(&b.ln1, &format!("{p}.input_layernorm"), &mut out);
        write_norm(&b.ln2, &format!("{p}.post_attention_layernorm"), &mut out);
        write_linear(&b.qkv, &qkv, None, &mut out);
        write_linear(&b.o, &o, None, &mut out);
        write_linear(&b.mlp_in, &gate_up, None, &mut out);
        write_linear(&b.mlp_out, &down, None, &mut out);
    }
    write_norm(&d.final_norm, "model.norm", &mut out);
    if let Some(w) = &d.lm_head {
        out.push(("lm_head.weight".to_string(), host(w).transpose2()));
    }
    out
}

/// A fresh decoder.
pub fn init(c: &ModelConfig, device: &Device, seed: u64) -> Result<Decoder> {
    let spec = Spec::from_config(c)?;
    let mut r = Init::new(seed, c.initializer_range);
    let (h, v) = (c.hidden_size, c.vocab_size);
    let (nh, kv, hd, inter) = (
        c.num_attention_heads,
        c.num_kv_heads(),
        c.head_dim(),
        c.intermediate_size(),
    );
    let embed = param2(r.normal(vec![v, h]), device);
    let blocks = (0..c.num_hidden_layers)
        .map(|_| Block {
            ln1: Init::norm(h, c.rms_norm_eps, true, device),
            ln2: Init::norm(h, c.rms_norm_eps, true, device),
            qkv: r.linear(h, (nh + 2 * kv) * hd, c.qkv_bias(), device),
            o: r.linear(nh * hd, h, c.o_bias(), device),
            mlp_in: r.linear(h, 2 * inter, c.mlp_has_bias(), device),
            mlp_out: r.linear(inter, h, c.mlp_has_bias(), device),
        })
        .collect();
    let final_norm = Init::norm(h, c.rms_norm_eps, true, device);
    let lm_head = (!c.tie_word_embeddings).then(|| param2(r.normal(vec![h, v]), device));
    Ok(Decoder {
        embed,
        blocks,
        final_norm,
        lm_head,
        spec,
    })
}
