//! A model folder holding both a single `model.safetensors` and a sharded copy
//! (`model.safetensors.index.json` + shards) must hash the files it loads. Rule (transformers'
//! `_get_resolved_checkpoint_files` for a local folder): the single file wins. The two copies
//! here hold different weights, so the tests can tell which one was used.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use sepo::model::safetensors_io::{HostTensor, serialize_f32};
use sepo::model::{CausalLm, ModelConfig};
use sepo::stages::model::model_files;

fn cpu() -> burn::tensor::Device {
    sepo::device::parse_device("cpu").unwrap()
}

fn tiny(seed: u64) -> CausalLm {
    let cfg: ModelConfig = serde_json::from_value(serde_json::json!({
        "architecture": "llama", "vocab_size": 512, "hidden_size": 16, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 24
    }))
    .unwrap();
    CausalLm::init(&cfg, &cpu(), seed).unwrap()
}

const SHARDS: [&str; 2] = [
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
];

/// Writes `model`'s tensors into `dir` as two shards and their index.
fn write_sharded(model: &CausalLm, dir: &Path) {
    let tensors = model.hf_tensors();
    let half = tensors.len() / 2;
    let mut weight_map = serde_json::Map::new();
    for (shard, part) in SHARDS.iter().zip([&tensors[..half], &tensors[half..]]) {
        for (name, _) in part {
            weight_map.insert(name.clone(), (*shard).into());
        }
        std::fs::write(dir.join(shard), serialize_f32(part).unwrap()).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

fn tensors_of(dir: &Path) -> Vec<(String, HostTensor)> {
    CausalLm::load(dir, &cpu()).unwrap().hf_tensors()
}

/// `both/`: model `a` as model.safetensors and model `b` as shards; `sharded/`: `b` only.
fn folders(root: &Path) -> (PathBuf, PathBuf, CausalLm, CausalLm) {
    let (a, b) = (tiny(1), tiny(2));
    assert_ne!(a.hf_tensors(), b.hf_tensors());
    let both = root.join("both");
    a.save(&both).unwrap();
    write_sharded(&b, &both);
    std::fs::copy(
        repo().join("tests/fixtures/hf/tiny-llama/tokenizer.json"),
        both.join("tokenizer.json"),
    )
    .unwrap();
    let sharded = root.join("sharded");
    std::fs::create_dir_all(&sharded).unwrap();
    std::fs::copy(both.join("config.json"), sharded.join("config.json")).unwrap();
    write_sharded(&b, &sharded);
    (both, sharded, a, b)
}

#[test]
fn single_file_wins_for_loading_and_hashing() {
    let tmp = tempfile::tempdir().unwrap();
    let (both, sharded, a, b) = folders(tmp.path());

    // Loading: the single file, whatever the shards hold; a folder with only shards loads them.
    assert_eq!(tensors_of(&both), a.hf_tensors());
    assert_eq!(tensors_of(&sharded), b.hf_tensors());

    // Hashing: the same files.
    assert_eq!(
        model_files(&both).unwrap(),
        vec![
            both.join("config.json"),
            both.join("model.safetensors"),
            both.join("tokenizer.json"),
        ]
    );
    let mut want = vec![
        sharded.join("config.json"),
        sharded.join("model.safetensors.index.json"),
    ];
    want.extend(SHARDS.iter().map(|s| sharded.join(s)));
    assert_eq!(model_files(&sharded).unwrap(), want);
}

#[test]
fn stage_hash_follows_the_loaded_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (both, _, a, _) = folders(tmp.path());
    let cache = tmp.path().join("cache").display().to_string();
    let p = pipeline(
        tmp.path(),
        &format!("stages:\n  m: {{kind: model, from: {}}}\n", both.display()),
    );
    let stage_hash = || {
        let r = sepo(&["status", &p, "--json", "--cache", &cache]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        v[0]["hash"].as_str().unwrap().to_string()
    };
    let before = stage_hash();

    // Shards that are not loaded do not move the hash ...
    write_sharded(&tiny(3), &both);
    assert_eq!(stage_hash(), before);
    std::fs::write(both.join("model.safetensors.index.json"), "not json").unwrap();
    assert_eq!(stage_hash(), before);

    // ... and the run loads the file that was hashed.
    let r = sepo(&["run", &p, "-q", "--cache", &cache]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = sepo(&["show", &p, "m", "--path", "--cache", &cache]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let out = Path::new(r.stdout.trim()).join("model");
    assert_eq!(tensors_of(&out), a.hf_tensors());

    // The single file does move it.
    tiny(4).save(&both).unwrap();
    assert_ne!(stage_hash(), before);
}
