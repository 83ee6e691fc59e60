//! `sepo generate`: a continuation of a prompt by a model stage or any Hugging Face folder.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::pipeline::Pipeline;
use crate::pipeline::executor::Plan;
use crate::progress::Progress;
use crate::user_bail;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// `P.yaml STAGE`, or nothing with --model.
    #[arg(num_args = 0..=2, value_names = ["P.yaml", "STAGE"])]
    target: Vec<String>,
    /// A Hugging Face model folder (config.json, model.safetensors, tokenizer.json).
    #[arg(long, conflicts_with = "target")]
    model: Option<PathBuf>,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// 0 (the default) is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    device: Option<String>,
    #[arg(long)]
    cache: Option<PathBuf>,
    #[arg(long = "set", value_name = "STAGE.KEY=VALUE")]
    set: Vec<String>,
    /// No notes on stderr (e.g. that --max-new-tokens was lowered to fit the context).
    #[arg(long, short)]
    quiet: bool,
}

pub fn run(a: GenerateArgs, out: &mut dyn Write) -> Result<i32> {
    // Before anything is loaded: bad sampling settings are the cheapest error to give.
    crate::model::generate::check_sampling_flags(a.temperature, a.top_p)?;
    let (dir, device) = match (a.model, a.target.as_slice()) {
        (Some(m), []) => (m, a.device.unwrap_or_else(|| "auto".into())),
        (None, [pfile, stage]) => {
            let pipeline = Pipeline::load_with(pfile.as_ref(), a.cache.as_deref(), &a.set)?;
            let plan = Plan::new(pipeline, &crate::stages::REGISTRY)?;
            let device = a.device.unwrap_or_else(|| plan.pipeline.device.clone());
            (crate::inspect::model_dir(&plan, stage)?, device)
        }
        _ => user_bail!("give `P.yaml STAGE` or `--model DIR`"),
    };
    let opts = crate::model::GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        eos_token_id: None,
    };
    let progress = Progress::new(a.quiet);
    let text = crate::model::generate::generate_text(&dir, &device, &a.prompt, opts, &progress)?;
    writeln!(out, "{text}")?;
    Ok(0)
}
