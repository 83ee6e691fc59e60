//! The `sepo` command line. Results go to stdout; progress and logs to stderr.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};

use crate::error::{exit_code, render};
use crate::pipeline::Pipeline;
use crate::pipeline::executor::{self, Plan, RunOptions};
use crate::pipeline::hash::hash_file;
use crate::pipeline::store::MANIFEST;
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

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Materialize every stale stage the targets need.
    Run {
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
    },
    /// Each stage's state (fresh or stale) and hash.
    Status {
        #[command(flatten)]
        p: PipelineArgs,
        #[arg(long)]
        json: bool,
    },
    /// An artifact's schema, row count and first rows.
    Show {
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
    },
    /// The stage graph.
    Dag {
        #[command(flatten)]
        p: PipelineArgs,
        #[arg(long, value_enum, default_value_t = DagFormat::Text)]
        format: DagFormat,
    },
    /// Delete cache entries no stage of the pipeline points to now.
    Gc {
        #[command(flatten)]
        p: PipelineArgs,
        #[arg(long)]
        dry_run: bool,
    },
    /// Re-hash stored artifacts; name any that were changed or truncated.
    Verify {
        #[command(flatten)]
        p: PipelineArgs,
    },
    /// Copy a model stage's weights out as a Hugging Face model folder.
    Export {
        #[command(flatten)]
        p: PipelineArgs,
        stage: String,
        /// Destination folder (must not exist, or be empty).
        out: PathBuf,
    },
    /// Continue a prompt with a model stage (or any Hugging Face folder given with --model).
    Generate {
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
        /// Accepted like every command that takes a pipeline; generate logs nothing anyway.
        #[arg(long, short)]
        quiet: bool,
    },
}

#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum DagFormat {
    Text,
    Mermaid,
    Dot,
}

/// Entry point: runs the command and maps errors to exit status 2 (bad input) or 1 (failure).
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", render(&e));
            exit_code(&e)
        }
    }
}

fn load(p: &PipelineArgs) -> Result<Pipeline> {
    let mut pipeline = Pipeline::load(&p.pipeline)?;
    if let Some(c) = &p.cache {
        pipeline.cache = c.clone();
    }
    for s in &p.set {
        pipeline.apply_set(s)?;
    }
    Ok(pipeline)
}

fn dispatch(cli: Cli) -> Result<i32> {
    let mut stdout = std::io::stdout().lock();
    match cli.command {
        Command::Run {
            p,
            stages,
            from,
            force,
            dry_run,
            device,
            jobs,
        } => {
            let pipeline = load(&p)?;
            let device = device.unwrap_or_else(|| pipeline.device.clone());
            let plan = Plan::new(pipeline)?;
            let progress = Progress::new(p.quiet);
            let opts = RunOptions {
                targets: stages,
                from,
                force,
                dry_run,
                jobs,
                device,
            };
            let t0 = std::time::Instant::now();
            let report = executor::run(&plan, &opts, &progress)?;
            if dry_run {
                for (name, action) in &report {
                    let s = plan.get(name)?;
                    writeln!(
                        stdout,
                        "{action:<6} {name:<16} {:<10} {}",
                        s.kind.kind, s.hash
                    )?;
                }
            } else {
                let ran = report.iter().filter(|r| r.1 == "run").count();
                progress.log(format!(
                    "{} stage(s) run, {} fresh, in {:.2}s; cache {}",
                    ran,
                    report.len() - ran,
                    t0.elapsed().as_secs_f64(),
                    plan.store.root.display()
                ));
            }
        }
        Command::Status { p, json } => {
            let plan = Plan::new(load(&p)?)?;
            let rows: Vec<Value> = plan
                .stages
                .iter()
                .map(|s| {
                    json!({
                        "stage": s.name,
                        "kind": s.kind.kind,
                        "state": if s.fresh { "fresh" } else { "stale" },
                        "hash": s.hash,
                        "path": plan.artifact_dir(s).display().to_string(),
                    })
                })
                .collect();
            if json {
                writeln!(stdout, "{}", serde_json::to_string_pretty(&rows)?)?;
            } else {
                for r in &rows {
                    writeln!(
                        stdout,
                        "{:<16} {:<10} {:<6} {}",
                        r["stage"].as_str().unwrap_or(""),
                        r["kind"].as_str().unwrap_or(""),
                        r["state"].as_str().unwrap_or(""),
                        r["hash"].as_str().unwrap_or("")
                    )?;
                }
            }
        }
        Command::Show {
            p,
            stage,
            rows,
            path,
            json,
        } => {
            let plan = Plan::new(load(&p)?)?;
            let s = plan.get(&stage)?;
            let dir = plan.artifact_dir(s);
            if !s.fresh {
                user_bail!(
                    "stage `{stage}` has no artifact for its current hash {} (run `sepo run {} --stage {stage}`)",
                    s.hash,
                    plan.pipeline.file.display()
                );
            }
            if path {
                writeln!(stdout, "{}", dir.display())?;
                return Ok(0);
            }
            show(&mut stdout, &plan, &stage, &dir, rows, json)?;
        }
        Command::Dag { p, format } => {
            let plan = Plan::new(load(&p)?)?;
            write_dag(&mut stdout, &plan, format)?;
        }
        Command::Gc { p, dry_run } => {
            let plan = Plan::new(load(&p)?)?;
            let keep: Vec<PathBuf> = plan.stages.iter().map(|s| plan.artifact_dir(s)).collect();
            let current: Vec<&str> = plan.stages.iter().map(|s| s.hash.as_str()).collect();
            let mut freed = 0u64;
            let mut n = 0;
            for (kind, hash, dir) in plan.store.list()? {
                if keep.contains(&dir) {
                    continue;
                }
                // Derived artifacts (kinds no stage has, e.g. cached log-probs) stay while
                // everything they came from is current.
                if crate::stages::lookup(&kind).is_none()
                    && let Ok(m) = plan.store.manifest(&kind, &hash)
                    && m.inputs.as_object().is_some_and(|o| {
                        o.values()
                            .all(|h| h.as_str().is_some_and(|h| current.contains(&h)))
                    })
                {
                    continue;
                }
                let size = dir_size(&dir);
                freed += size;
                n += 1;
                writeln!(
                    stdout,
                    "{} {}",
                    if dry_run { "would delete" } else { "deleted" },
                    dir.display()
                )?;
                if !dry_run {
                    std::fs::remove_dir_all(&dir)
                        .with_context(|| format!("{}: cannot delete", dir.display()))?;
                }
            }
            if !p.quiet {
                eprintln!(
                    "{n} artifact(s), {:.1} MB{}",
                    freed as f64 / 1e6,
                    if dry_run { " (dry run)" } else { "" }
                );
            }
        }
        Command::Verify { p } => {
            let plan = Plan::new(load(&p)?)?;
            let mut bad = 0;
            for s in &plan.stages {
                if !s.fresh {
                    writeln!(stdout, "{:<16} missing", s.name)?;
                    continue;
                }
                let dir = plan.artifact_dir(s);
                let problems = verify_artifact(&dir)?;
                if problems.is_empty() {
                    writeln!(stdout, "{:<16} ok", s.name)?;
                } else {
                    bad += 1;
                    for pr in problems {
                        writeln!(stdout, "{:<16} CHANGED {pr}", s.name)?;
                    }
                }
            }
            if bad > 0 {
                eprintln!(
                    "error: {bad} artifact(s) changed since they were written; rebuild with `sepo run --force`"
                );
                return Ok(1);
            }
        }
        Command::Export { p, stage, out } => {
            let plan = Plan::new(load(&p)?)?;
            let dir = model_dir_of(&plan, &stage)?;
            if out.exists()
                && std::fs::read_dir(&out)
                    .map(|mut d| d.next().is_some())
                    .unwrap_or(true)
            {
                user_bail!(
                    "{}: exists and is not empty; sepo never overwrites your files",
                    out.display()
                );
            }
            std::fs::create_dir_all(&out)
                .with_context(|| format!("{}: cannot create", out.display()))?;
            let mut names = Vec::new();
            for e in std::fs::read_dir(&dir)? {
                let e = e?;
                std::fs::copy(e.path(), out.join(e.file_name()))?;
                names.push(e.file_name().to_string_lossy().into_owned());
            }
            names.sort();
            writeln!(stdout, "{}", out.display())?;
            if !p.quiet {
                eprintln!(
                    "exported `{stage}` ({}) to {}",
                    names.join(", "),
                    out.display()
                );
            }
        }
        Command::Generate {
            target,
            model,
            prompt,
            max_new_tokens,
            temperature,
            top_p,
            seed,
            device,
            cache,
            set,
            quiet: _,
        } => {
            let (dir, device_name) = match (&model, target.as_slice()) {
                (Some(m), []) => (m.clone(), device.unwrap_or_else(|| "auto".into())),
                (None, [pfile, stage]) => {
                    let args = PipelineArgs {
                        pipeline: pfile.into(),
                        cache,
                        set,
                        quiet: true,
                    };
                    let pipeline = load(&args)?;
                    let dev = device.unwrap_or_else(|| pipeline.device.clone());
                    let plan = Plan::new(pipeline)?;
                    (model_dir_of(&plan, stage)?, dev)
                }
                _ => user_bail!("give `P.yaml STAGE` or `--model DIR`"),
            };
            let text = generate(
                &dir,
                &device_name,
                &prompt,
                max_new_tokens,
                temperature,
                top_p,
                seed,
            )?;
            writeln!(stdout, "{text}")?;
        }
    }
    Ok(0)
}

/// The `model/` folder of a fresh model or train stage.
fn model_dir_of(plan: &Plan, stage: &str) -> Result<PathBuf> {
    let s = plan.get(stage)?;
    if !matches!(s.kind.kind, "model" | "train") {
        user_bail!(
            "stage `{stage}` is a {} stage, not a model (model or train)",
            s.kind.kind
        );
    }
    if !s.fresh {
        user_bail!(
            "stage `{stage}` is not built yet: run `sepo run {} --stage {stage}`",
            plan.pipeline.file.display()
        );
    }
    Ok(plan.artifact_dir(s).join("model"))
}

fn generate(
    dir: &Path,
    device: &str,
    prompt: &str,
    max_new_tokens: usize,
    temperature: f32,
    top_p: f32,
    seed: u64,
) -> Result<String> {
    use crate::model::{CausalLm, GenerateOptions};
    if !dir.join("config.json").is_file() {
        user_bail!("{}: not a model folder (no config.json)", dir.display());
    }
    if !(0.0..=1.0).contains(&top_p) || top_p == 0.0 || temperature < 0.0 {
        user_bail!("--top-p must be in (0, 1] and --temperature at least 0");
    }
    let device =
        crate::device::parse_device(device).map_err(|e| crate::error::user(e.to_string()))?;
    let tok = crate::stages::tokenizer::load(&dir.join("tokenizer.json"))?;
    let model = CausalLm::load(dir, &device).map_err(|e| crate::error::user(format!("{e:#}")))?;
    let tcfg: Option<Value> = std::fs::read(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let eos = tcfg
        .as_ref()
        .and_then(|c| crate::template::special_token(c, "eos_token"))
        .and_then(|e| tok.token_to_id(&e))
        .or_else(|| model.config().eos_token_id.as_ref().and_then(|t| t.first()));
    let enc = tok
        .encode(prompt, true)
        .map_err(|e| anyhow::anyhow!("encoding the prompt: {e}"))?;
    let ids = enc.get_ids().to_vec();
    let opts = GenerateOptions {
        max_new_tokens,
        temperature,
        top_p,
        seed,
        eos_token_id: eos,
    };
    let out = model.generate(&ids, &opts)?;
    let new: Vec<u32> = out.into_iter().filter(|t| Some(*t) != eos).collect();
    let mut all = ids.clone();
    all.extend(&new);
    // Decoding prompt and continuation together keeps SentencePiece's spaces right.
    let full = tok
        .decode(&all, true)
        .map_err(|e| anyhow::anyhow!("decoding: {e}"))?;
    let head = tok
        .decode(&ids, true)
        .map_err(|e| anyhow::anyhow!("decoding: {e}"))?;
    Ok(full
        .strip_prefix(&head)
        .map(|rest| format!("{prompt}{rest}"))
        .unwrap_or(full))
}

/// Files of an artifact that no longer match its manifest.
pub fn verify_artifact(dir: &Path) -> Result<Vec<String>> {
    let m: crate::pipeline::store::Manifest = serde_json::from_slice(
        &std::fs::read(dir.join(MANIFEST))
            .with_context(|| format!("{}: no manifest", dir.display()))?,
    )?;
    let mut problems = Vec::new();
    for f in &m.files {
        let p = dir.join(&f.path);
        match std::fs::metadata(&p) {
            Err(_) => problems.push(format!("{}: missing", p.display())),
            Ok(meta) if meta.len() != f.size => problems.push(format!(
                "{}: size {} (manifest says {})",
                p.display(),
                meta.len(),
                f.size
            )),
            Ok(_) => {
                if hash_file(&p)? != f.blake3 {
                    problems.push(format!("{}: content changed", p.display()));
                }
            }
        }
    }
    let listed: Vec<String> = m.files.iter().map(|f| f.path.clone()).collect();
    for f in crate::pipeline::store::describe_files(dir)? {
        if !listed.contains(&f.path) {
            problems.push(format!(
                "{}: not in the manifest",
                dir.join(&f.path).display()
            ));
        }
    }
    Ok(problems)
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    let p = e.path();
                    if p.is_dir() {
                        dir_size(&p)
                    } else {
                        e.metadata().map(|m| m.len()).unwrap_or(0)
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

fn show(
    out: &mut impl Write,
    plan: &Plan,
    stage: &str,
    dir: &Path,
    rows: usize,
    json: bool,
) -> Result<()> {
    let manifest: crate::pipeline::store::Manifest =
        serde_json::from_slice(&std::fs::read(dir.join(MANIFEST))?)?;
    let Some(main) = manifest.files.iter().find(|f| f.path.ends_with(".parquet")) else {
        if json {
            writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(
                    &json!({"stage": stage, "path": dir, "files": manifest.files})
                )?
            )?;
        } else {
            writeln!(out, "{stage}: {}", dir.display())?;
            for f in &manifest.files {
                writeln!(out, "  {:<40} {:>12} bytes", f.path, f.size)?;
            }
        }
        return Ok(());
    };
    let file = dir.join(&main.path);
    let df = crate::data::parquet::read(&file)?;
    let head = df.head(Some(rows));
    if json {
        let schema: serde_json::Map<String, Value> = df
            .schema()
            .iter()
            .map(|(n, t)| (n.to_string(), Value::String(format!("{t}"))))
            .collect();
        let v = json!({
            "stage": stage,
            "path": file,
            "rows": df.height(),
            "schema": schema,
            "head": crate::data::parquet::rows_as_json(&head)?,
            "stats": manifest.stats,
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        let _ = plan;
        writeln!(out, "{} ({} rows)", file.display(), df.height())?;
        for (n, t) in df.schema().iter() {
            writeln!(out, "  {n}: {t}")?;
        }
        writeln!(out, "{head}")?;
    }
    Ok(())
}

fn write_dag(out: &mut impl Write, plan: &Plan, format: DagFormat) -> Result<()> {
    match format {
        DagFormat::Text => {
            for s in &plan.stages {
                let ins: Vec<String> = s
                    .inputs
                    .iter()
                    .map(|(role, ups)| format!("{role}={}", ups.join(",")))
                    .collect();
                let state = if s.fresh { "fresh" } else { "stale" };
                if ins.is_empty() {
                    writeln!(out, "{} ({}, {state})", s.name, s.kind.kind)?;
                } else {
                    writeln!(
                        out,
                        "{} ({}, {state}) <- {}",
                        s.name,
                        s.kind.kind,
                        ins.join(" ")
                    )?;
                }
            }
        }
        DagFormat::Mermaid => {
            writeln!(out, "graph TD")?;
            for s in &plan.stages {
                writeln!(out, "  {}[\"{} ({})\"]", s.name, s.name, s.kind.kind)?;
            }
            for s in &plan.stages {
                for (role, ups) in &s.inputs {
                    for u in ups {
                        writeln!(out, "  {u} -->|{role}| {}", s.name)?;
                    }
                }
            }
        }
        DagFormat::Dot => {
            writeln!(out, "digraph \"{}\" {{", plan.pipeline.name)?;
            writeln!(out, "  rankdir=LR;")?;
            for s in &plan.stages {
                writeln!(
                    out,
                    "  \"{}\" [label=\"{}\\n({})\"];",
                    s.name, s.name, s.kind.kind
                )?;
            }
            for s in &plan.stages {
                for (role, ups) in &s.inputs {
                    for u in ups {
                        writeln!(out, "  \"{u}\" -> \"{}\" [label=\"{role}\"];", s.name)?;
                    }
                }
            }
            writeln!(out, "}}")?;
        }
    }
    Ok(())
}
