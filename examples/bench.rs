//! Throughput benchmark (not a test): forward log-probs and SFT / DPO / SePO training steps.
//! Default: a 4-layer, 256-wide Llama with the Llama-2 vocabulary (32000), batch 8 x 256 tokens
//! of seeded random ids. `--model tinyllama` is the TinyLlama-1.1B shape (22 layers, 2048 wide,
//! 32/4 heads); `--model overhead` its depth at 64 wide (host overhead per step); `--model
//! stories` the main job's stories260K shape. `--batch`, `--seq` set the shape; `--data
//! tokens.parquet` takes real token rows (see [`real_rows`]) instead of random ids.
//!
//! Run one measurement per process so peak RSS is its own:
//!   cargo run --example bench -- forward|sft|dpo|dpo-inline|sepo [--device flex|tch-cpu|tch-cuda:0|...]
//!       [--model small|tinyllama|overhead|stories] [--batch 8] [--seq 256] [--data tokens.parquet] [--reps 3]
//!       [--precision f32|bf16|f16]   (mixed precision: f32 master weights, as `train`'s)
//! `scripts/bench.sh` runs them all on CPU, and PyTorch on the same machine, and prints a table;
//! `bench/gpu.sh` does the same on a GPU machine (f32 and bf16 PyTorch beside sepo).

use std::time::Instant;

use burn::tensor::{Int, Tensor, TensorData};
use sepo::model::{CausalLm, ModelConfig};
use sepo::train::trainer::{self, Example, Objective, TrainSpec};

/// The model shapes the benchmark knows (Hugging Face config keys).
fn config(model: &str) -> anyhow::Result<ModelConfig> {
    let v = match model {
        "small" => serde_json::json!({
            "architecture": "llama", "vocab_size": 32000, "hidden_size": 256, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 688,
        }),
        // TinyLlama-1.1B's shape (its config.json), 1.10B parameters.
        "tinyllama" => serde_json::json!({
            "architecture": "llama", "vocab_size": 32000, "hidden_size": 2048,
            "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
            "intermediate_size": 5632, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        }),
        // TinyLlama's depth and head layout with almost no arithmetic: a step's time is the
        // host's cost of issuing its operations, which bounds a GPU step once kernels are fast.
        "overhead" => serde_json::json!({
            "architecture": "llama", "vocab_size": 512, "hidden_size": 64,
            "num_hidden_layers": 22, "num_attention_heads": 8, "num_key_value_heads": 1,
            "intermediate_size": 176, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        }),
        // stories260K's shape (models/stories260K/config.json), the main job's model.
        "stories" => serde_json::json!({
            "architecture": "llama", "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 5,
            "num_attention_heads": 8, "num_key_value_heads": 4, "intermediate_size": 172,
            "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "tie_word_embeddings": true,
        }),
        other => anyhow::bail!("unknown model {other} (small | tinyllama | overhead | stories)"),
    };
    Ok(serde_json::from_value(v)?)
}

/// Deterministic pseudo-random token ids below `vocab`.
fn ids(n: usize, salt: u64, vocab: u64) -> Vec<u32> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ salt;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % vocab) as u32
        })
        .collect()
}

/// One benchmark pair: prompt, chosen and rejected token ids.
type Triple = (Vec<u32>, Vec<u32>, Vec<u32>);

/// `batch` (prompt, chosen, rejected) triples of exactly `seq` tokens per side from a
/// tokens.parquet: the first rows (in file order) whose answers are both at least
/// `seq - prompt_len` tokens long, with `prompt_len = min(len(prompt), seq / 4)` (the prompt's
/// last tokens) and each answer's first `seq - prompt_len` tokens. scripts/bench_torch.py takes
/// the same rows by the same rule.
fn real_rows(path: &std::path::Path, batch: usize, seq: usize) -> anyhow::Result<Vec<Triple>> {
    let rows = sepo::artifacts::tokens::read_tokens(path)?;
    let picked: Vec<_> = rows
        .iter()
        .filter_map(|r| {
            let p = r.prompt_ids.len().min(seq / 4);
            let n = seq - p;
            (p > 0 && r.chosen_ids.len() >= n && r.rejected_ids.len() >= n).then(|| {
                (
                    r.prompt_ids[r.prompt_ids.len() - p..].to_vec(),
                    r.chosen_ids[..n].to_vec(),
                    r.rejected_ids[..n].to_vec(),
                )
            })
        })
        .take(batch)
        .collect();
    anyhow::ensure!(
        picked.len() == batch,
        "{}: only {} rows have answers long enough for {seq}-token sequences",
        path.display(),
        picked.len()
    );
    Ok(picked)
}

fn arg<T: std::str::FromStr>(args: &[String], name: &str) -> Option<T> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
}

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().cloned().unwrap_or_else(|| "forward".into());
    let device_name: String = arg(&args, "--device").unwrap_or_else(|| "cpu".into());
    let reps: usize = arg(&args, "--reps").unwrap_or(3);
    let model_name: String = arg(&args, "--model").unwrap_or_else(|| "small".into());
    let batch: usize = arg(&args, "--batch").unwrap_or(8);
    let seq: usize = arg(&args, "--seq").unwrap_or(256);
    let data: Option<String> = arg(&args, "--data");
    let precision: sepo::model::Precision = match arg::<String>(&args, "--precision") {
        Some(p) => serde_json::from_value(serde_json::json!(p))?,
        None => Default::default(),
    };
    let device = sepo::device::parse_device(&device_name)?;
    let name = sepo::device::device_name(&device);
    let cfg = config(&model_name)?;
    // Every sequence is exactly `seq` tokens: random ids (a prompt of seq / 4), or real rows.
    let triples: Vec<Triple> = match &data {
        Some(path) => real_rows(std::path::Path::new(path), batch, seq)?,
        None => (0..batch as u64)
            .map(|i| {
                let (p, v) = (seq / 4, cfg.vocab_size as u64);
                (
                    ids(p, i, v),
                    ids(seq - p, 100 + i, v),
                    ids(seq - p, 200 + i, v),
                )
            })
            .collect(),
    };
    let (secs, tokens, params) = if mode == "forward" {
        let model = CausalLm::init(&cfg, &device, 0)?.with_precision(precision);
        let params = model.param_count();
        let flat: Vec<i64> = triples
            .iter()
            .flat_map(|(p, c, _)| p.iter().chain(c).map(|&t| i64::from(t)))
            .collect();
        let input =
            || Tensor::<2, Int>::from_data(TensorData::new(flat.clone(), [batch, seq]), &device);
        let run = || {
            let lp = model.token_logprobs(input(), input());
            let _ = lp.sum().into_scalar::<f32>();
        };
        run(); // warm-up
        let t0 = Instant::now();
        for _ in 0..reps {
            run();
        }
        (
            t0.elapsed().as_secs_f64() / reps as f64,
            batch * seq,
            params,
        )
    } else {
        let objective = match mode.as_str() {
            "sft" => Objective::Sft,
            "dpo" | "dpo-inline" => Objective::Dpo,
            "sepo" => Objective::Sepo,
            other => anyhow::bail!("unknown mode {other}"),
        };
        let examples: Vec<Example> = triples
            .iter()
            .map(|(prompt, chosen, rejected)| {
                let mask = |n: usize| {
                    (0..n)
                        .map(|t| if t % 10 < 3 { 1.0 } else { 0.0 })
                        .collect::<Vec<f32>>()
                };
                Example {
                    prompt: prompt.clone(),
                    chosen_weights: Some(mask(chosen.len())),
                    rejected_weights: Some(mask(rejected.len())),
                    chosen: chosen.clone(),
                    rejected: rejected.clone(),
                    ref_chosen: -100.0,
                    ref_rejected: -110.0,
                }
            })
            .collect();
        let spec = TrainSpec {
            objective,
            lr: 1e-4,
            epochs: reps + 1,
            batch_size: batch,
            grad_accum: 1,
            warmup_ratio: 0.0,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            beta: 0.1,
            gamma: 1.0,
            margin: 0.0,
            label_smoothing: 0.0,
            ipo_average: true,
            rrhf_weight: 1.0,
            shuffle: false,
            group_by_length: false,
            seed: 0,
            checkpoint_every: 0,
        };
        let ad = device.clone().autodiff();
        let model = CausalLm::init(&cfg, &ad, 0)?.with_precision(precision);
        let params = model.param_count();
        let reference = (mode == "dpo-inline")
            .then(|| CausalLm::init(&cfg, &device, 1).map(|m| m.with_precision(precision)))
            .transpose()?;
        let progress = sepo::progress::Progress::new(true);
        let ckpt = std::env::temp_dir().join(format!("sepo-bench-{}", std::process::id()));
        let times: Vec<f64> = if let Some(r) = &reference {
            // DPO as TRL runs it without precomputed reference log-probs: a reference forward
            // before each step, so one `train` call per step (one warm-up, then `reps`).
            let mut model = Some(model);
            let mut times = Vec::new();
            for _ in 0..=reps {
                let t0 = Instant::now();
                let mut ex = examples.clone();
                let pairs: Vec<(Vec<u32>, Vec<u32>)> = ex
                    .iter()
                    .flat_map(|e| {
                        [
                            (e.prompt.clone(), e.chosen.clone()),
                            (e.prompt.clone(), e.rejected.clone()),
                        ]
                    })
                    .collect();
                let lp = r.response_logprobs(&pairs, &device)?;
                for (i, e) in ex.iter_mut().enumerate() {
                    e.ref_chosen = lp[2 * i].iter().sum();
                    e.ref_rejected = lp[2 * i + 1].iter().sum();
                }
                let one = TrainSpec {
                    epochs: 1,
                    ..spec.clone()
                };
                let (m, _) = trainer::train(
                    model.take().expect("model"),
                    &ex,
                    &one,
                    &ckpt,
                    &ad,
                    &progress,
                    "bench",
                )?;
                model = Some(m);
                times.push(t0.elapsed().as_secs_f64());
            }
            times[1..].to_vec()
        } else {
            // One `train` call of 1 + reps steps (one step per epoch of the batch), as a stage
            // trains: the optimizer state carries over. Each step's end is stamped after its
            // optimizer update is issued; the next step's loss read waits for it, so the
            // differences of the stamps after the warm-up step are whole steps.
            let (_, metrics) =
                trainer::train(model, &examples, &spec, &ckpt, &ad, &progress, "bench")?;
            metrics
                .windows(2)
                .map(|w| w[1].elapsed_s - w[0].elapsed_s)
                .collect()
        };
        let pairs_tokens = if objective == Objective::Sft {
            batch * seq
        } else {
            2 * batch * seq
        };
        (
            times.iter().sum::<f64>() / times.len() as f64,
            pairs_tokens,
            params,
        )
    };
    // Model FLOPs per second (PaLM's MFU numerator): 6 N per trained token (forward and
    // backward), 2 N per token of a forward pass; divide by the chip's peak for MFU.
    let per_token = if mode == "forward" { 2.0 } else { 6.0 };
    println!(
        "{}",
        serde_json::json!({
            "impl": if precision.is_f32() { "sepo".to_string() } else { format!("sepo {precision}") },
            "device": name, "mode": mode, "model": model_name,
            "batch": batch, "seq": seq, "data": data.as_deref().unwrap_or("random"),
            "parameters": params, "seconds": secs, "tokens": tokens,
            "tokens_per_s": tokens as f64 / secs,
            "model_flops_per_s": per_token * params as f64 * tokens as f64 / secs,
            "peak_rss_mb": peak_rss_mb(),
        })
    );
    Ok(())
}
