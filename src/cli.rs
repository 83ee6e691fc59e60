//! The `sepo` command line: argument structs and one small function per command; the work is
//! done by the engine (`pipeline`), `inspect`, `export`, `model::generate` and `schema`. Results
//! go to stdout through one writer; progress and logs to stderr.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use crate::error::{exit_code, render};
use crate::inspect::View;
use crate::pipeline::executor::{self, Plan, RunOptions};
use crate::pipeline::{Pipeline, dag, gc};
use crate::progress::Progress;
use crate::user_bail;

#[derive(Parser, Debug)]
#[command(
    name = "sepo",
    version,
    about = "Selective Preference Optimization as a reproducible pipeline"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command that reads a pipeline file takes.
#[derive(Args, Debug, Clone)]
pub struct PipelineArgs {
    /// The pipeline YAML file.
    pub pipeline: PathBuf,
    /// Artifact store (overrides the YAML's `cache`).
    #[arg(long, global = true)]
    pub cache: Option<PathBuf>,
    /// Override a stage parameter, as if written in the YAML: STAGE.KEY=VALUE (repeatable).
    #[arg(long = "set", value_name = "STAGE.KEY=VALUE", global = true)]
    pub set: Vec<String>,
    /// No progress or logs on stderr.
    #[arg(long, short, global = true)]
    pub quiet: bool,
}

// The argument structs carry no doc comment of their own: the variant's is the command's help.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Materialize every stale stage the targets need.
    Run(RunArgs),
    /// Each stage's state (fresh or stale) and hash.
    Status(StatusArgs),
    /// An artifact's schema, row count and first rows.
    Show(ShowArgs),
    /// The stage graph.
    Dag(DagArgs),
    /// Delete cache entries no stage of the pipeline points to now.
    Gc(GcArgs),
    /// Re-hash stored artifacts; name any that were changed or truncated.
    Verify(VerifyArgs),
    /// Copy a model stage's weights out as a Hugging Face model folder.
    Export(ExportArgs),
    /// Continue a prompt with a model stage (or any Hugging Face folder given with --model).
    Generate(GenerateArgs),
    /// Print the JSON Schema of pipeline files (schemas/pipeline.schema.json is its output).
    Schema,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    p: PipelineArgs,
    /// Only these stages (and what they read); repeatable.
    #[arg(long = "stage", value_name = "S")]
    stages: Vec<String>,
    /// Force this stage and everything downstream of it.
    #[arg(long, value_name = "S")]
    from: Option<String>,
    /// Rebuild the targeted stages even if fresh.
    #[arg(long)]
    force: bool,
    /// Print the plan only.
    #[arg(long)]
    dry_run: bool,
    /// Device: auto | cpu | cuda:N | flex | tch-cpu | tch-cuda:N (overrides the YAML's).
    #[arg(long)]
    device: Option<String>,
    /// Independent stages built at once.
    #[arg(long, short, default_value_t = 2)]
    jobs: usize,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    p: PipelineArgs,
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct ShowArgs {
    #[command(flatten)]
    p: PipelineArgs,
    stage: String,
    #[arg(long, default_value_t = 5)]
    rows: usize,
    /// Print the artifact's directory only.
    #[arg(long)]
    path: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct DagArgs {
    #[command(flatten)]
    p: PipelineArgs,
    #[arg(long, value_enum, default_value_t = dag::Format::Text)]
    format: dag::Format,
}

#[derive(Args, Debug)]
pub struct GcArgs {
    #[command(flatten)]
    p: PipelineArgs,
    #[arg(long)]
    dry_run: bool,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    #[command(flatten)]
    p: PipelineArgs,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    #[command(flatten)]
    p: PipelineArgs,
    stage: String,
    /// Destination folder (must not exist, or be empty).
    out: PathBuf,
}

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

/// Entry point: runs the command and maps errors to exit status 2 (bad input) or 1 (failure).
/// A reader that closes stdout early (`sepo dag P.yaml | head -1`) ends the command quietly
/// with status 0, as ripgrep does: the reader has what it wanted.
pub fn main() -> i32 {
    // clap prints help and version (status 0) or a usage error (status 2) and exits.
    let cli = Cli::parse();
    let mut stdout = std::io::stdout().lock();
    let result = dispatch(cli, &mut stdout).and_then(|code| Ok(stdout.flush().map(|_| code)?));
    match result {
        Ok(code) => code,
        Err(e) if crate::error::is_broken_pipe(&e) => 0,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "error: {}", render(&e));
            exit_code(&e)
        }
    }
}

fn dispatch(cli: Cli, out: &mut dyn Write) -> Result<i32> {
    match cli.command {
        Command::Run(a) => run(a, out),
        Command::Status(a) => status(a, out),
        Command::Show(a) => show(a, out),
        Command::Dag(a) => dag(a, out),
        Command::Gc(a) => gc(a, out),
        Command::Verify(a) => verify(a, out),
        Command::Export(a) => export(a, out),
        Command::Generate(a) => generate(a, out),
        Command::Schema => crate::schema::write(out).map(|()| 0),
    }
}

/// The pipeline with `--cache` and `--set` applied, planned with every stage kind sepo has.
fn plan(p: &PipelineArgs) -> Result<Plan> {
    let pipeline = Pipeline::load_with(&p.pipeline, p.cache.as_deref(), &p.set)?;
    Plan::new(pipeline, &crate::stages::REGISTRY)
}

fn run(a: RunArgs, out: &mut dyn Write) -> Result<i32> {
    let plan = plan(&a.p)?;
    let opts = RunOptions {
        device: a.device.unwrap_or_else(|| plan.pipeline.device.clone()),
        targets: a.stages,
        from: a.from,
        force: a.force,
        dry_run: a.dry_run,
        jobs: a.jobs,
    };
    let loaded_with = (a.p.cache.as_deref(), a.p.set.as_slice());
    executor::run_pipeline(&plan, &opts, loaded_with, &Progress::new(a.p.quiet), out)?;
    Ok(0)
}

fn status(a: StatusArgs, out: &mut dyn Write) -> Result<i32> {
    crate::inspect::status(out, &plan(&a.p)?, a.json).map(|()| 0)
}

fn show(a: ShowArgs, out: &mut dyn Write) -> Result<i32> {
    let (rows, json) = (a.rows, a.json);
    let view = if a.path {
        View::Path
    } else {
        View::Preview { rows, json }
    };
    crate::inspect::show(out, &plan(&a.p)?, &a.stage, view)?;
    Ok(0)
}

fn dag(a: DagArgs, out: &mut dyn Write) -> Result<i32> {
    dag::write(out, &plan(&a.p)?, a.format).map(|()| 0)
}

fn gc(a: GcArgs, out: &mut dyn Write) -> Result<i32> {
    let report = gc::collect(&plan(&a.p)?, a.dry_run, out)?;
    report.log(&Progress::new(a.p.quiet), a.dry_run);
    Ok(0)
}

fn verify(a: VerifyArgs, out: &mut dyn Write) -> Result<i32> {
    let plan = plan(&a.p)?;
    let bad = crate::inspect::verify(out, &plan)?;
    if bad > 0 {
        let _ = writeln!(
            std::io::stderr(),
            "error: {bad} artifact(s) changed since they were written; rebuild with `sepo run {} --from STAGE`",
            plan.pipeline.file.display()
        );
        return Ok(1);
    }
    Ok(0)
}

fn export(a: ExportArgs, out: &mut dyn Write) -> Result<i32> {
    let names = crate::export::export(&plan(&a.p)?, &a.stage, &a.out)?;
    writeln!(out, "{}", a.out.display())?;
    let (stage, dest, names) = (&a.stage, a.out.display(), names.join(", "));
    Progress::new(a.p.quiet).log(format!("exported `{stage}` ({names}) to {dest}"));
    Ok(0)
}

fn generate(a: GenerateArgs, out: &mut dyn Write) -> Result<i32> {
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
