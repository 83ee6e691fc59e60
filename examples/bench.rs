//! Throughput benchmark (not a test): forward log-probs and SFT / DPO / SePO training steps on a
//! 4-layer, 256-wide Llama with the Llama-2 vocabulary (32000), batch 8 x 256 tokens.
//!
//! Run one measurement per process so peak RSS is its own:
//!   cargo run --example bench -- forward|sft|dpo|dpo-inline|sepo [--device flex|tch-cpu|...]
//! `scripts/bench.sh` runs them all, and PyTorch on the same machine, and prints a table.

use std::time::Instant;

use burn::tensor::{Int, Tensor, TensorData};
use sepo::model::{CausalLm, ModelConfig};
use sepo::train::trainer::{self, Example, Objective, TrainSpec};

const BATCH: usize = 8;
const SEQ: usize = 256;
const PROMPT: usize = 64;

fn config() -> ModelConfig {
    serde_json::from_value(serde_json::json!({
        "architecture": "llama", "vocab_size": 32000, "hidden_size": 256, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 688,
    }))
    .expect("valid config")
}

/// Deterministic pseudo-random token ids.
fn ids(n: usize, salt: u64) -> Vec<u32> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ salt;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 32000) as u32
        })
        .collect()
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
    let device_name = args
        .iter()
        .position(|a| a == "--device")
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| "cpu".into());
    let reps: usize = args
        .iter()
        .position(|a| a == "--reps")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let device = sepo::device::parse_device(&device_name)?;
    let name = sepo::device::device_name(&device);
    let cfg = config();
    let (secs, tokens) = if mode == "forward" {
        let model = CausalLm::init(&cfg, &device, 0)?;
        let flat: Vec<i64> = ids(BATCH * SEQ, 1).into_iter().map(i64::from).collect();
        let input =
            || Tensor::<2, Int>::from_data(TensorData::new(flat.clone(), [BATCH, SEQ]), &device);
        let run = || {
            let lp = model.token_logprobs(input(), input());
            let _ = lp.sum().into_scalar::<f32>();
        };
        run(); // warm-up
        let t0 = Instant::now();
        for _ in 0..reps {
            run();
        }
        (t0.elapsed().as_secs_f64() / reps as f64, BATCH * SEQ)
    } else {
        let objective = match mode.as_str() {
            "sft" => Objective::Sft,
            "dpo" | "dpo-inline" => Objective::Dpo,
            "sepo" => Objective::Sepo,
            other => anyhow::bail!("unknown mode {other}"),
        };
        let examples: Vec<Example> = (0..BATCH as u64)
            .map(|i| {
                let chosen = ids(SEQ - PROMPT, 100 + i);
                let rejected = ids(SEQ - PROMPT, 200 + i);
                let mask = |n: usize| {
                    (0..n)
                        .map(|t| if t % 10 < 3 { 1.0 } else { 0.0 })
                        .collect::<Vec<f32>>()
                };
                Example {
                    prompt: ids(PROMPT, i),
                    chosen_weights: Some(mask(chosen.len())),
                    rejected_weights: Some(mask(rejected.len())),
                    chosen,
                    rejected,
                    ref_chosen: -100.0,
                    ref_rejected: -110.0,
                }
            })
            .collect();
        let spec = TrainSpec {
            objective,
            lr: 1e-4,
            epochs: reps + 1,
            batch_size: BATCH,
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
        let model = CausalLm::init(&cfg, &ad, 0)?;
        let reference = (mode == "dpo-inline")
            .then(|| CausalLm::init(&cfg, &device, 1))
            .transpose()?;
        let progress = sepo::progress::Progress::new(true);
        let ckpt = std::env::temp_dir().join(format!("sepo-bench-{}", std::process::id()));
        // One warm-up step, then `reps` measured steps (one step per epoch of 8 pairs).
        let mut model = Some(model);
        let mut times = Vec::new();
        for _ in 0..=reps {
            let t0 = Instant::now();
            let mut ex = examples.clone();
            if let Some(r) = &reference {
                // DPO as TRL runs it without precomputed reference log-probs: a reference forward per step.
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
        let pairs_tokens = if objective == Objective::Sft {
            BATCH * SEQ
        } else {
            2 * BATCH * SEQ
        };
        (times[1..].iter().sum::<f64>() / reps as f64, pairs_tokens)
    };
    println!(
        "{{\"impl\": \"sepo\", \"device\": \"{name}\", \"mode\": \"{mode}\", \"seconds\": {secs:.4}, \"tokens\": {tokens}, \"tokens_per_s\": {:.1}, \"peak_rss_mb\": {:.1}}}",
        tokens as f64 / secs,
        peak_rss_mb()
    );
    Ok(())
}
