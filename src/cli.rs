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

mod compare;
mod generate;

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
    /// Override a stage parameter, as if written in the YAML: STAGE.KEY=VALUE (repeatable). A
    /// matrix stage's name sets every instance; `NAME@K=V.KEY=VALUE` one instance;
    /// `NAME.matrix.K=[...]` the values swept.
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
    Generate(generate::GenerateArgs),
    /// Every built evaluate report in one table: mean ± std over seeds per method and metric.
    Compare(compare::CompareArgs),
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
    /// Write the key-token view of a select (or score) stage as a self-contained HTML page.
    #[arg(long, value_name = "OUT.html", conflicts_with = "path")]
    html: Option<PathBuf>,
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
        Command::Generate(a) => generate::run(a, out),
        Command::Compare(a) => compare::run(a, out),
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
    let view = View::of(a.path, a.html, a.rows, a.json);
    crate::inspect::show(out, &plan(&a.p)?, &a.stage, view).map(|()| 0)
}

fn dag(a: DagArgs, out: &mut dyn Write) -> Result<i32> {
    // The graph needs no data: a configuration for a real run is checked before its downloads.
    let pipeline = Pipeline::load_with(&a.p.pipeline, a.p.cache.as_deref(), &a.p.set)?;
    let plan = Plan::without_files(pipeline, &crate::stages::REGISTRY)?;
    dag::write(out, &plan, a.format).map(|()| 0)
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
