//! The `sepo` command line. Results go to stdout; progress and logs to stderr.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};

use crate::error::{clip, exit_code, render};
use crate::pipeline::Pipeline;
use crate::pipeline::executor::{self, Plan, RunOptions};
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
        /// No notes on stderr (e.g. that --max-new-tokens was lowered to fit the context).
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
    check_cache_path(
        &pipeline.cache,
        if p.cache.is_some() {
            "--cache"
        } else {
            "`cache`"
        },
    )?;
    for s in &p.set {
        pipeline.apply_set(s)?;
    }
    Ok(pipeline)
}

/// The cache must be a folder or a path where one can be made. A regular file there (or above
/// it) is the user's mistake, said plainly by every command instead of a failed `mkdir` in
/// `run` or an all-stale `status`.
fn check_cache_path(cache: &Path, from: &str) -> Result<()> {
    for a in cache.ancestors() {
        if a.as_os_str().is_empty() || !a.exists() {
            continue;
        }
        if a.is_dir() {
            return Ok(());
        }
        if a == cache {
            user_bail!(
                "{from} {}: is a file; the cache must be a folder (it holds the artifacts)",
                cache.display()
            );
        }
        user_bail!(
            "{from} {}: {} is a file, so no cache folder can be made there",
            cache.display(),
            a.display()
        );
    }
    Ok(())
}

/// `p` as an absolute path with symbolic links resolved as far as it exists, so that two
/// spellings of one folder compare equal.
fn real_path(p: &Path) -> PathBuf {
    let abs = crate::pipeline::spec::normalize(&if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(p)
    });
    let mut existing = abs.as_path();
    let mut missing = Vec::new();
    loop {
        if let Ok(mut real) = std::fs::canonicalize(existing) {
            real.extend(missing.iter().rev());
            return real;
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                missing.push(name.to_os_string());
                existing = parent;
            }
            _ => return abs,
        }
    }
}

/// Refuses a device that is unknown or absent, but only when a stage that would run computes on
/// it (`model`, `train`, `score`): a data-only pipeline runs whatever `device:` says. Checked
/// before anything runs, so a bad device never fails a run halfway.
fn check_device(
    plan: &Plan,
    targets: &[String],
    from: Option<&str>,
    force: bool,
    device: &str,
) -> Result<()> {
    let preview = RunOptions {
        targets: targets.to_vec(),
        from: from.map(str::to_string),
        force,
        dry_run: true,
        device: device.to_string(),
        ..RunOptions::default()
    };
    let report = executor::run(plan, &preview, &Progress::new(true))?;
    let user = report
        .iter()
        .filter(|(_, action)| *action == "run")
        .filter_map(|(name, _)| plan.get(name).ok())
        .find(|s| crate::stages::uses_device(s.kind.kind));
    if let Some(s) = user {
        crate::device::parse_device(device).map_err(|e| {
            crate::error::user(format!(
                "{e} (stage `{}` ({}) would run on it; pick another with `device:` or --device)",
                clip(&s.name),
                s.kind.kind
            ))
        })?;
    }
    Ok(())
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
            if !dry_run {
                check_device(&plan, &stages, from.as_deref(), force, &device)?;
            }
            if !dry_run {
                plan.store.prepare()?;
                // Only so that `gc` from another pipeline keeps this one's artifacts: a cache
                // that cannot record it still builds.
                if let Err(e) = crate::pipeline::gc::register(&plan, p.cache.as_deref(), &p.set) {
                    progress.log(format!("warning: {}", render(&e)));
                }
            }
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
            show(&mut stdout, &plan, &stage, rows, json)?;
        }
        Command::Dag { p, format } => {
            let plan = Plan::new(load(&p)?)?;
            write_dag(&mut stdout, &plan, format)?;
        }
        Command::Gc { p, dry_run } => {
            let plan = Plan::new(load(&p)?)?;
            let report = crate::pipeline::gc::collect(&plan, dry_run, &mut stdout)?;
            if !p.quiet {
                for n in &report.notes {
                    eprintln!("{n}");
                }
                let freed: u64 = report.deleted.iter().map(|d| d.1).sum();
                eprintln!(
                    "{} entr{}, {:.1} MB{}",
                    report.deleted.len(),
                    if report.deleted.len() == 1 {
                        "y"
                    } else {
                        "ies"
                    },
                    freed as f64 / 1e6,
                    if dry_run {
                        " (dry run: nothing deleted)"
                    } else {
                        " deleted"
                    }
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
                let problems = plan.store.verify(s.kind.kind, &s.hash)?;
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
                    "error: {bad} artifact(s) changed since they were written; rebuild with `sepo run {} --from STAGE`",
                    plan.pipeline.file.display()
                );
                return Ok(1);
            }
        }
        Command::Export { p, stage, out } => {
            let plan = Plan::new(load(&p)?)?;
            let dir = model_dir_of(&plan, &stage)?;
            // The cache is sepo's: `gc` deletes what no stage points to, and a folder there
            // could shadow an artifact. An export is the user's copy, so it goes elsewhere.
            if real_path(&out).starts_with(real_path(&plan.store.root)) {
                user_bail!(
                    "{}: is inside the cache {}; export to a folder outside it",
                    out.display(),
                    plan.store.root.display()
                );
            }
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
            quiet,
        } => {
            // Before anything is loaded: bad sampling settings are the cheapest error to give.
            check_sampling(temperature, top_p)?;
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
            let opts = crate::model::GenerateOptions {
                max_new_tokens,
                temperature,
                top_p,
                seed,
                eos_token_id: None,
            };
            let text = generate(&dir, &device_name, &prompt, opts, quiet)?;
            writeln!(stdout, "{text}")?;
        }
    }
    Ok(0)
}

/// Refuses to read an artifact that no longer matches its manifest.
fn check_intact(plan: &Plan, stage: &str) -> Result<()> {
    let s = plan.get(stage)?;
    let m = plan.store.manifest(s.kind.kind, &s.hash)?;
    let problems = plan.store.check(s.kind.kind, &s.hash, &m)?;
    if !problems.is_empty() {
        user_bail!(
            "artifact of stage `{stage}` is damaged: {}. Rebuild it with `sepo run {} --from {stage}`",
            problems.join("; "),
            plan.pipeline.file.display()
        );
    }
    Ok(())
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
    check_intact(plan, stage)?;
    Ok(plan.artifact_dir(s).join("model"))
}

/// `--temperature` and `--top-p` as the flags name them (the library checks the same bounds).
fn check_sampling(temperature: f32, top_p: f32) -> Result<()> {
    if !temperature.is_finite() || temperature < 0.0 {
        user_bail!(
            "--temperature must be a finite number at least 0 (0, the default, is greedy), got {temperature}"
        );
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        user_bail!("--top-p must be in (0, 1] (1, the default, keeps every token), got {top_p}");
    }
    Ok(())
}

/// Continues `prompt` with the model in `dir`. `opts.max_new_tokens` is lowered to what fits in
/// the model's context (`max_position_embeddings`), with a note on stderr unless `quiet`; a
/// prompt that fills the context alone is an input error.
fn generate(
    dir: &Path,
    device: &str,
    prompt: &str,
    mut opts: crate::model::GenerateOptions,
    quiet: bool,
) -> Result<String> {
    use crate::model::CausalLm;
    if !dir.join("config.json").is_file() {
        user_bail!("{}: not a model folder (no config.json)", dir.display());
    }
    check_sampling(opts.temperature, opts.top_p)?;
    let device =
        crate::device::parse_device(device).map_err(|e| crate::error::user(e.to_string()))?;
    let tok = crate::stages::tokenizer::load(&dir.join("tokenizer.json"))?;
    let tcfg = crate::template::read_tokenizer_config(&dir.join("tokenizer_config.json"))?;
    let model = CausalLm::load(dir, &device).map_err(|e| crate::error::user(format!("{e:#}")))?;
    let eos = tcfg
        .as_ref()
        .and_then(|c| crate::template::special_token(c, "eos_token"))
        .and_then(|e| tok.token_to_id(&e))
        .or_else(|| model.config().eos_token_id.as_ref().and_then(|t| t.first()));
    let enc = tok
        .encode(prompt, true)
        .map_err(|e| anyhow::anyhow!("encoding the prompt: {e}"))?;
    let ids = enc.get_ids().to_vec();
    if ids.is_empty() {
        user_bail!(
            "the prompt encodes to no tokens and the tokenizer adds no BOS: give a --prompt"
        );
    }
    opts.eos_token_id = eos;
    let context = model.context_length();
    let budget = opts.new_token_budget(ids.len(), context)?;
    if budget < opts.max_new_tokens && !quiet {
        eprintln!(
            "note: --max-new-tokens {} lowered to {budget}: the prompt's {} tokens and the \
             continuation must fit in the model's context of {context} (max_position_embeddings)",
            opts.max_new_tokens,
            ids.len()
        );
    }
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

fn show(out: &mut impl Write, plan: &Plan, stage: &str, rows: usize, json: bool) -> Result<()> {
    check_intact(plan, stage)?;
    let s = plan.get(stage)?;
    let manifest = plan.store.manifest(s.kind.kind, &s.hash)?;
    let dir = &plan.artifact_dir(s);
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
            // A stage name is any YAML key: node ids are the name only when mermaid reads it as
            // a plain id, else `stage_<position>` (plain ids never hold `_`, so the two cannot
            // collide); labels are quoted with mermaid's entity codes.
            let ids: std::collections::HashMap<&str, String> = plan
                .stages
                .iter()
                .enumerate()
                .map(|(i, s)| (s.name.as_str(), mermaid_id(&s.name, i)))
                .collect();
            writeln!(out, "graph TD")?;
            for s in &plan.stages {
                writeln!(
                    out,
                    "  {}[\"{} ({})\"]",
                    ids[s.name.as_str()],
                    mermaid_text(&s.name),
                    mermaid_text(s.kind.kind)
                )?;
            }
            for s in &plan.stages {
                for (role, ups) in &s.inputs {
                    let label = if is_plain_id(role) {
                        role.clone()
                    } else {
                        format!("\"{}\"", mermaid_text(role))
                    };
                    for u in ups {
                        writeln!(
                            out,
                            "  {} -->|{label}| {}",
                            ids[u.as_str()],
                            ids[s.name.as_str()]
                        )?;
                    }
                }
            }
        }
        DagFormat::Dot => {
            writeln!(out, "digraph {} {{", dot_string(&plan.pipeline.name))?;
            writeln!(out, "  rankdir=LR;")?;
            for s in &plan.stages {
                // `\n` in a label is graphviz's line break; in the id it is two plain characters.
                writeln!(
                    out,
                    "  {} [label=\"{}\\n({})\"];",
                    dot_string(&s.name),
                    dot_escape(&s.name),
                    dot_escape(s.kind.kind)
                )?;
            }
            for s in &plan.stages {
                for (role, ups) in &s.inputs {
                    for u in ups {
                        writeln!(
                            out,
                            "  {} -> {} [label={}];",
                            dot_string(u),
                            dot_string(&s.name),
                            dot_string(role)
                        )?;
                    }
                }
            }
            writeln!(out, "}}")?;
        }
    }
    Ok(())
}

/// A DOT double-quoted string's content: `"` and `\` escaped (graphviz reads `\\` as a pair, so
/// a name ending in a backslash cannot escape the closing quote), line breaks as `\n` and `\r`.
fn dot_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out
}

/// `s` as a DOT quoted string (an id or an attribute value).
fn dot_string(s: &str) -> String {
    format!("\"{}\"", dot_escape(s))
}

/// Whether mermaid reads `s` as a plain node id: ASCII letters and digits starting with a
/// letter, and not one of its keywords (`end` would close a block).
fn is_plain_id(s: &str) -> bool {
    const KEYWORDS: &[&str] = &[
        "end",
        "graph",
        "flowchart",
        "subgraph",
        "direction",
        "style",
        "linkstyle",
        "classdef",
        "class",
        "click",
        "call",
        "href",
        "callback",
        "default",
        "interpolate",
        "accdescr",
        "acctitle",
    ];
    s.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && s.chars().all(|c| c.is_ascii_alphanumeric())
        && !KEYWORDS.contains(&s.to_ascii_lowercase().as_str())
}

/// The mermaid node id of the stage at `position` named `name`.
fn mermaid_id(name: &str, position: usize) -> String {
    if is_plain_id(name) {
        name.to_string()
    } else {
        format!("stage_{position}")
    }
}

/// Text for inside a mermaid `"..."` label: every character that could end the string or be
/// read as markup becomes an entity code (`#quot;`, `#35;`, ...), line breaks `<br>`.
fn mermaid_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("#quot;"),
            '\n' => out.push_str("<br>"),
            // `#` too, or a name holding `#quot;` would be read as an entity.
            '#' | '<' | '>' | '&' | '`' => out.push_str(&format!("#{};", c as u32)),
            c if c.is_control() => out.push_str(&format!("#{};", c as u32)),
            c => out.push(c),
        }
    }
    out
}
