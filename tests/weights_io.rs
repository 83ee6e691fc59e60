//! Weights at disk speed, without a byte changed: saving streams each tensor out of the model
//! (hashing it on the way) and loading reads each tensor straight into place, and both must give
//! exactly what the plain path gives — the bytes of `serialize_f32` of the model's Hugging Face
//! tensors, a bit-exact model back, the blake3 of the bytes on disk — for every family's layout
//! (fused and split projections, gpt_neox's interleaved one, biases, tied heads), on a plain and an
//! autodiff device. The optimizer half of a checkpoint likewise: the file `AdamW::save` streams is
//! `AdamW::to_bytes`, and loading it back restores the state exactly.

mod common;

use burn::tensor::{Int, Tensor, TensorData};
use common::{artifact_dir, pipeline, raw_tensors, sepo};
use sepo::model::safetensors_io::{HostTensor, read_all_f32, serialize_f32};
use sepo::model::{CausalLm, ModelConfig};
use sepo::train::{AdamW, AdamWConfig, ParamGrads};

fn cpu() -> burn::tensor::Device {
    sepo::device::parse_device("cpu").unwrap()
}

fn config(v: serde_json::Value) -> ModelConfig {
    serde_json::from_value(v).unwrap()
}

/// One small model of each layout the weights code distinguishes.
fn configs() -> Vec<(&'static str, ModelConfig)> {
    vec![
        (
            "llama, GQA",
            config(
                serde_json::json!({"architecture": "llama", "vocab_size": 97,
                "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "intermediate_size": 24}),
            ),
        ),
        (
            "llama, tied head",
            config(
                serde_json::json!({"architecture": "llama", "vocab_size": 50,
                "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                "intermediate_size": 12, "tie_word_embeddings": true}),
            ),
        ),
        (
            "gpt_neox (interleaved qkv, biases, LayerNorm)",
            config(
                serde_json::json!({"architecture": "gpt_neox", "vocab_size": 61,
                "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                "intermediate_size": 48}),
            ),
        ),
        (
            "qwen2 (q/k/v biases)",
            config(
                serde_json::json!({"architecture": "qwen2", "vocab_size": 70,
                "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 4,
                "num_key_value_heads": 2, "intermediate_size": 20}),
            ),
        ),
    ]
}

fn bits(t: &[(String, HostTensor)]) -> Vec<(String, Vec<usize>, Vec<u32>)> {
    t.iter()
        .map(|(n, t)| {
            (
                n.clone(),
                t.shape.clone(),
                t.data.iter().map(|v| v.to_bits()).collect(),
            )
        })
        .collect()
}

#[test]
fn saving_streams_the_bytes_of_serialize_f32_and_loading_reads_them_back_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    for (what, cfg) in configs() {
        for (dev_name, device) in [("cpu", cpu()), ("autodiff", cpu().autodiff())] {
            let model = CausalLm::init(&cfg, &device, 5).unwrap();
            let dir = tmp
                .path()
                .join(format!("{}-{dev_name}", cfg.architecture.model_type()));
            model.save(&dir).unwrap();
            let file = std::fs::read(dir.join("model.safetensors")).unwrap();
            let tensors = model.hf_tensors();
            assert!(
                file == serialize_f32(&tensors).unwrap(),
                "{what} on {dev_name}: the streamed file is not serialize_f32 of the tensors"
            );
            // Loading (pieces read into place, transposed by the backend) gives the same model.
            let back = CausalLm::load(&dir, &device).unwrap();
            assert!(
                bits(&back.hf_tensors()) == bits(&tensors),
                "{what} on {dev_name}: load(save(m)) != m"
            );
            // And the file read whole agrees.
            let all = read_all_f32(&dir.join("model.safetensors")).unwrap();
            for (name, t) in &tensors {
                assert_eq!(&all[name], t, "{what}: {name}");
            }
            // A second save of the loaded model: the same bytes.
            back.save(&tmp.path().join("again")).unwrap();
            assert!(std::fs::read(tmp.path().join("again/model.safetensors")).unwrap() == file);
        }
    }
}

#[test]
fn a_large_tensor_is_written_in_pieces_with_the_same_bytes() {
    // The embeddings (2000 x 1100 x 4 bytes, 8.8 MB) and the head go out in several pieces.
    let cfg = config(
        serde_json::json!({"architecture": "llama", "vocab_size": 2000,
        "hidden_size": 1100, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 8}),
    );
    let model = CausalLm::init(&cfg, &cpu(), 1).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    model.save(tmp.path()).unwrap();
    let file = std::fs::read(tmp.path().join("model.safetensors")).unwrap();
    assert!(file == serialize_f32(&model.hf_tensors()).unwrap());
}

/// A two-parameter AdamW state after one step on a tiny model.
fn stepped_optimizer() -> AdamW {
    let device = cpu().autodiff();
    let cfg = &configs()[0].1;
    let model = CausalLm::init(cfg, &device, 2).unwrap();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(vec![1i64, 5, 9, 3], [1, 4]), &device);
    let targets =
        Tensor::<2, Int>::from_data(TensorData::new(vec![5i64, 9, 3, 7], [1, 4]), &device);
    let loss = model.token_logprobs(ids, targets).mean().neg();
    let grads = ParamGrads::from_backward(&model, loss.backward());
    let mut opt = AdamWConfig::default().with_weight_decay(0.01).init();
    let _ = opt.step(1e-3, model, grads);
    opt
}

#[test]
fn the_optimizer_state_file_is_to_bytes_and_loads_back_exactly() {
    let opt = stepped_optimizer();
    assert!(opt.num_states() > 0);
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("optim.safetensors");
    opt.save(&path).unwrap();
    let bytes = opt.to_bytes();
    assert!(
        std::fs::read(&path).unwrap() == bytes,
        "save() wrote other bytes than to_bytes()"
    );
    let back = AdamW::load(&path, &cpu()).unwrap();
    assert!(back.to_bytes() == bytes);
    assert_eq!(back.steps(), opt.steps());
    // A damaged file is refused, naming what it is.
    std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
    let err = format!("{:#}", AdamW::load(&path, &cpu()).unwrap_err());
    assert!(err.contains("AdamW state"), "{err}");
}

/// `dtype: bf16` / `f16` keep a folder's half-precision weights: a `model` stage from
/// transformers' own bf16 folder (tiny-llama-tied-bf16) or f16 folder (tiny-qwen2) writes back
/// exactly transformers' tensors, byte for byte (half -> f32 -> half is exact), with
/// config.json saying so; a `train` stage's `dtype: bf16` writes bf16 that a later stage loads;
/// and `dtype: f32` is the default spelled out (the same stage).
#[test]
fn dtype_bf16_and_f16_write_the_half_precision_bytes_transformers_wrote() {
    let hf = |m: &str| format!("{}/tests/fixtures/hf/{m}", env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "seed: 3
stages:
  pairs: {{kind: ingest, format: preference, path: {root}/tests/fixtures/eval/pairs.jsonl}}
  tok: {{kind: tokenizer, path: {llama}/tokenizer.json}}
  tokens: {{kind: tokenize, inputs: {{data: pairs, tokenizer: tok}}, template: none}}
  bf: {{kind: model, from: {bf}, dtype: bf16}}
  half: {{kind: model, from: {qwen}, dtype: f16}}
  plain: {{kind: model, from: {llama}}}
  plain_f32: {{kind: model, from: {llama}, dtype: f32}}
  sft16: {{kind: train, objective: sft, inputs: {{model: plain, data: tokens}}, lr: 1e-3, batch_size: 4, dtype: bf16}}
  again: {{kind: train, objective: sft, inputs: {{model: sft16, data: tokens}}, lr: 0, batch_size: 4}}
",
        root = env!("CARGO_MANIFEST_DIR"),
        llama = hf("tiny-llama"),
        bf = hf("tiny-llama-tied-bf16"),
        qwen = hf("tiny-qwen2"),
    );
    let p = pipeline(dir.path(), &yaml);
    let r = sepo(&["run", &p, "--quiet"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let path = |stage: &str| artifact_dir(&p, stage);
    for (stage, src, dtype, name) in [
        ("bf", "tiny-llama-tied-bf16", "BF16", "bfloat16"),
        ("half", "tiny-qwen2", "F16", "float16"),
    ] {
        let ours = raw_tensors(&path(stage).join("model/model.safetensors"));
        let theirs = raw_tensors(&std::path::Path::new(&hf(src)).join("model.safetensors"));
        assert_eq!(ours.len(), theirs.len(), "{stage}: tensor names");
        for (n, (d, shape, bytes)) in &theirs {
            assert_eq!(d, dtype, "{src}: {n} is {d}");
            let (od, oshape, obytes) = &ours[n];
            assert_eq!((od, oshape), (d, shape), "{stage}: {n}");
            assert!(
                obytes == bytes,
                "{stage}: {n}: bytes differ from transformers'"
            );
        }
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(path(stage).join("model/config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            (cfg["dtype"].as_str(), cfg["torch_dtype"].as_str()),
            (Some(name), Some(name))
        );
    }
    assert_eq!(
        path("plain"),
        path("plain_f32"),
        "dtype: f32 is the default"
    );
    let trained = raw_tensors(&path("sft16").join("model/model.safetensors"));
    assert!(trained.values().all(|(d, _, _)| d == "BF16"));
    // The bf16 folder loads: the next stage trained from it at lr 0 writes back the same values.
    let back = read_all_f32(&path("again").join("model/model.safetensors")).unwrap();
    let sent = read_all_f32(&path("sft16").join("model/model.safetensors")).unwrap();
    assert_eq!(back.len(), sent.len());
    for (n, t) in &sent {
        assert_eq!(back[n].data, t.data, "{n}");
    }
}

/// `init` on a fresh model: `ziggurat` is the default (the same stage spelled out or not) and
/// draws what `sepo_kernels::fill_normal` defines (the embedding is the first tensor drawn);
/// `box-muller` rebuilds what sepo drew before `init` existed, byte for byte and under the same
/// hash (both pinned from that build); `init` with `from:` is a planning error.
/// A fresh model's `config:` keys (without braces): a one-layer, 16-wide Llama.
const TINY_LLAMA: &str = "architecture: llama, hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 24";

/// A folder holding the tiny Llama fixture's tokenizer.json, for a pipeline beside it to name
/// relatively: the hashes depend on the parameters and the file's bytes, not on where the
/// checkout is.
fn tiny_tokenizer_folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        common::data("tests/fixtures/hf/tiny-llama/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    dir
}

#[test]
fn init_ziggurat_is_the_default_and_box_muller_rebuilds_the_old_model() {
    let dir = tiny_tokenizer_folder();
    let config = format!("{{{TINY_LLAMA}}}");
    let yaml = format!(
        "seed: 3
stages:
  tok: {{kind: tokenizer, path: tokenizer.json}}
  z: {{kind: model, inputs: {{tokenizer: tok}}, config: {config}}}
  z2: {{kind: model, inputs: {{tokenizer: tok}}, config: {config}, init: ziggurat}}
  bm: {{kind: model, inputs: {{tokenizer: tok}}, config: {config}, init: box-muller}}
"
    );
    let p = pipeline(dir.path(), &yaml);
    let hash = |stage: &str| {
        common::status_json(&p, &[])
            .into_iter()
            .find(|s| s["stage"] == stage)
            .unwrap()["hash"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(hash("z"), hash("z2"), "ziggurat is the default");
    assert_eq!(
        hash("bm"),
        "e42b01dd7055e9906836",
        "box-muller keeps the old hash"
    );
    let r = sepo(&["run", &p, "--quiet"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let file = |stage: &str| artifact_dir(&p, stage).join("model/model.safetensors");
    let old = blake3::hash(&std::fs::read(file("bm")).unwrap());
    assert_eq!(
        old.to_hex().as_str(),
        "8edd34a28ec98c1234611d7532b626d3e7079fc9955252a4109dbd97ce86ee97",
        "box-muller draws the old bytes"
    );
    let fresh = read_all_f32(&file("z")).unwrap();
    let embed = &fresh["model.embed_tokens.weight"];
    let mut want = vec![0f32; embed.data.len()];
    sepo_kernels::fill_normal(3, 0, 0.02, &mut want);
    assert_eq!(embed.data, want);

    let bad = pipeline(
        dir.path(),
        &format!(
            "stages:\n  m: {{kind: model, from: {}, init: ziggurat}}\n",
            common::data("tests/fixtures/hf/tiny-llama")
        ),
    );
    let r = sepo(&["status", &bad]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("`init` draws a fresh model"),
        "{}",
        r.stderr
    );
}

/// A fresh model's folder holds the tokenizer stage's files byte for byte (copied unparsed: the
/// vocabulary comes from the tokenizer's manifest) and the tokenizer's vocabulary size; a
/// `vocab_size` below the tokenizer's is exit 2 naming both sizes.
#[test]
fn a_fresh_model_copies_its_tokenizer_and_refuses_a_smaller_vocabulary() {
    let dir = tiny_tokenizer_folder();
    let config = TINY_LLAMA;
    let yaml = format!(
        "stages:\n  tok: {{kind: tokenizer, path: tokenizer.json}}\n  m: {{kind: model, inputs: {{tokenizer: tok}}, config: {{{config}}}}}\n"
    );
    let p = pipeline(dir.path(), &yaml);
    let r = sepo(&["run", &p, "--quiet"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let (tok, model) = (artifact_dir(&p, "tok"), artifact_dir(&p, "m").join("model"));
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        let (a, b) = (
            std::fs::read(tok.join(f)).unwrap(),
            std::fs::read(model.join(f)).unwrap(),
        );
        assert!(a == b, "{f} differs from the tokenizer stage's");
    }
    let json = |path: std::path::PathBuf| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    };
    let vocab = json(tok.join("manifest.json"))["stats"]["vocab_size"]
        .as_u64()
        .unwrap();
    assert_eq!(json(model.join("config.json"))["vocab_size"], vocab);

    let small = pipeline(
        dir.path(),
        &format!(
            "stages:\n  tok: {{kind: tokenizer, path: tokenizer.json}}\n  m: {{kind: model, inputs: {{tokenizer: tok}}, config: {{{config}, vocab_size: 10}}}}\n"
        ),
    );
    let r = sepo(&["run", &small, "--quiet"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    let want = format!("the tokenizer has {vocab} tokens but the model's vocabulary is 10");
    assert!(r.stderr.contains(&want), "{}", r.stderr);
}
