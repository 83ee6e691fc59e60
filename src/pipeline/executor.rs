//! Planning (validate every stage, hash it, decide fresh or stale) and execution (build stale
//! stages in dependency order, independent ones concurrently, each behind a per-hash lock).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::Value;

use super::graph::Graph;
use super::hash::{FileHasher, HashInput, stage_hash};
use super::spec::{InputRef, Pipeline};
use super::stage::{Artifact, BuildContext, Registry, RunContext, Stage, StageKind};
use super::store::{BuildSpec, FileEntry, Manifest, Store};
use crate::error::{clip, user};
use crate::progress::Progress;
use crate::user_bail;
use crate::util::suggest;

/// One stage, validated and hashed.
pub struct Planned {
    pub name: String,
    pub kind: &'static StageKind,
    pub stage: Box<dyn Stage>,
    pub hash: String,
    /// Role -> upstream stage names, in the order written.
    pub inputs: BTreeMap<String, Vec<String>>,
    pub input_hashes: BTreeMap<String, Value>,
    pub external_files: Vec<FileEntry>,
    pub fresh: bool,
    /// Only in a plan made with [`Plan::without_files`]: why the stage's external files could
    /// not be hashed (not there yet). Its hash is then a placeholder, and so are its dependants'.
    pub missing: Option<String>,
}

pub struct Plan {
    pub pipeline: Pipeline,
    pub graph: Graph,
    pub store: Store,
    /// Every stage of the pipeline, in topological order.
    pub stages: Vec<Planned>,
    /// The stage kinds it was planned with (what `gc` knows as sepo's artifacts).
    pub registry: &'static Registry,
    /// Stage name -> position in `stages`: [`Plan::get`] is O(1), so loops over stages that look
    /// others up stay linear.
    index: HashMap<String, usize>,
}

impl Plan {
    /// Width of the name column in `status`, `verify` and `run --dry-run`: the longest stage
    /// name (matrix instances are long), at least 16 and at most 60 characters.
    pub fn name_width(&self) -> usize {
        self.stages
            .iter()
            .map(|s| s.name.chars().count())
            .max()
            .unwrap_or(0)
            .clamp(16, 60)
    }

    /// Validates and hashes every stage, of the kinds `registry` lists. Reads data files only to
    /// hash them (with a stat cache).
    pub fn new(pipeline: Pipeline, registry: &'static Registry) -> Result<Plan> {
        Self::build(pipeline, registry, false)
    }

    /// Like [`Plan::new`], but a stage whose external files (data, model folders) are not there
    /// is planned anyway, marked [`Planned::missing`]: `sepo dag` checks a configuration for a
    /// real run (stage kinds, parameters, roles, graph) before its weights are downloaded.
    pub fn without_files(pipeline: Pipeline, registry: &'static Registry) -> Result<Plan> {
        Self::build(pipeline, registry, true)
    }

    fn build(mut pipeline: Pipeline, registry: &'static Registry, lenient: bool) -> Result<Plan> {
        super::matrix::expand(&mut pipeline, registry)?;
        let fname = pipeline.file.display().to_string();
        let graph = Graph::build(&pipeline)?;
        let store = Store::new(pipeline.cache.clone());
        let hasher = FileHasher::new(Some(store.root.join(".state").join("filehash.json")));
        // Name indexes, so that each stage's lookups cost O(1) and planning stays linear in the
        // number of stages and edges (a scan per lookup made 20,000 stages take most of a minute).
        let decls: HashMap<&str, &super::spec::StageDecl> = pipeline
            .stages
            .iter()
            .map(|d| (d.name.as_str(), d))
            .collect();
        let mut index: HashMap<String, usize> = HashMap::with_capacity(graph.order.len());
        let mut planned: Vec<Planned> = Vec::with_capacity(graph.order.len());
        for name in &graph.order {
            let decl = decls[name.as_str()];
            let shown = clip(name);
            let ctx = || format!("{fname}: stage `{shown}` ({})", clip(&decl.kind));
            let Some(kind) = registry.lookup(&decl.kind) else {
                user_bail!(
                    "{fname}: stage `{shown}`: unknown stage kind `{}`{} (known: {})",
                    clip(&decl.kind),
                    suggest(&decl.kind, &registry.kind_names()),
                    registry.kind_names().join(", ")
                );
            };
            // Upstream stages are planned already (topological order), so they are in `index`.
            let kind_of = |u: &str| -> String {
                index
                    .get(u)
                    .map(|&i| planned[i].kind.kind.to_string())
                    .or_else(|| decls.get(u).map(|d| d.kind.clone()))
                    .unwrap_or_default()
            };
            check_roles(decl.name.as_str(), &decl.inputs, kind, &kind_of).with_context(ctx)?;
            let role_kinds = decl
                .inputs
                .iter()
                .map(|(role, r)| {
                    let kinds = r
                        .stages()
                        .iter()
                        .map(|u| decls.get(u).map(|d| d.kind.clone()).unwrap_or_default())
                        .collect();
                    (role.clone(), kinds)
                })
                .collect();
            let bctx = BuildContext {
                base_dir: &pipeline.dir,
                pipeline_seed: pipeline.seed,
                roles: decl.inputs.keys().cloned().collect(),
                role_kinds,
            };
            let stage =
                (kind.build)(&Value::Object(decl.params.clone()), &bctx).with_context(ctx)?;
            let mut inputs = BTreeMap::new();
            let mut input_hashes = BTreeMap::new();
            for (role, r) in &decl.inputs {
                let ups: Vec<String> = r.stages().iter().map(|s| s.to_string()).collect();
                let hashes: Vec<Value> = ups
                    .iter()
                    .map(|u| Value::from(planned[index[u.as_str()]].hash.clone()))
                    .collect();
                input_hashes.insert(
                    role.clone(),
                    match r {
                        InputRef::One(_) => hashes[0].clone(),
                        InputRef::Many(_) => Value::Array(hashes),
                    },
                );
                inputs.insert(role.clone(), ups);
            }
            let mut external_files = Vec::new();
            let mut missing = None;
            let files = match stage.external_files().with_context(ctx) {
                Err(e) if lenient => {
                    // The cause alone: the line already names the stage.
                    missing = Some(e.root_cause().to_string());
                    Vec::new()
                }
                r => r?,
            };
            for f in files {
                if !f.is_file() {
                    if lenient {
                        missing = Some(format!("{}: not found", f.display()));
                        continue;
                    }
                    return Err(user(format!("{}: data file not found", f.display())))
                        .with_context(ctx);
                }
                let h = hasher.hash(&f).with_context(ctx)?;
                let size = std::fs::metadata(&f).map(|m| m.len()).unwrap_or(0);
                external_files.push(FileEntry {
                    path: f.display().to_string(),
                    blake3: h,
                    size,
                });
            }
            let mut file_hashes: Vec<String> =
                external_files.iter().map(|f| f.blake3.clone()).collect();
            // A placeholder that no real content hashes to, and that taints every dependant.
            let upstream_missing = decl
                .inputs
                .values()
                .flat_map(|r| r.stages())
                .find(|u| index.get(*u).is_some_and(|&i| planned[i].missing.is_some()));
            if missing.is_none()
                && let Some(u) = upstream_missing
            {
                missing = Some(format!("its input `{u}` needs files that are not there"));
            }
            if let Some(m) = &missing {
                file_hashes.push(format!("missing: {m}"));
            }
            let params = stage.params();
            let hash = stage_hash(&HashInput {
                kind: kind.kind,
                version: kind.version,
                params: &params,
                inputs: &input_hashes,
                files: &file_hashes,
            });
            let fresh = missing.is_none() && store.is_fresh(kind.kind, &hash);
            index.insert(name.clone(), planned.len());
            planned.push(Planned {
                name: name.clone(),
                kind,
                stage,
                hash,
                inputs,
                input_hashes,
                external_files,
                fresh,
                missing,
            });
        }
        hasher.save();
        Ok(Plan {
            pipeline,
            graph,
            store,
            stages: planned,
            registry,
            index,
        })
    }

    /// The planned stage called `name` (O(1)); a user error with a "did you mean" if none is.
    pub fn get(&self, name: &str) -> Result<&Planned> {
        self.index
            .get(name)
            .map(|&i| &self.stages[i])
            .ok_or_else(|| {
                if let Some(instances) = self.pipeline.matrices.get(name) {
                    return user(format!(
                        "{}: `{}` is a matrix stage: name one of its {} instances ({})",
                        self.pipeline.file.display(),
                        clip(name),
                        instances.len(),
                        clip(&instances.join(", "))
                    ));
                }
                let names: Vec<&str> = self.stages.iter().map(|s| s.name.as_str()).collect();
                user(format!(
                    "{}: no stage `{}`{}",
                    self.pipeline.file.display(),
                    clip(name),
                    suggest(name, &names)
                ))
            })
    }

    /// The stages `name` stands for: itself, or every instance of a matrix stage.
    pub fn resolve(&self, name: &str) -> Result<Vec<String>> {
        match self.pipeline.matrices.get(name) {
            Some(instances) if !self.index.contains_key(name) => Ok(instances.clone()),
            _ => Ok(vec![self.get(name)?.name.clone()]),
        }
    }

    /// A built stage's manifest, once its artifact passed the cheap integrity check (sizes
    /// always, content when a file changed since it was last seen intact): nothing sepo reads
    /// from the cache is read damaged. Damage is a user error naming the file and the fix.
    pub fn intact_manifest(&self, stage: &str) -> Result<Manifest> {
        let s = self.get(stage)?;
        let m = self
            .store
            .manifest(s.kind.kind, &s.hash)
            .map_err(|e| damaged(self, stage, vec![crate::error::render(&e)]))?;
        let problems = self.store.check(s.kind.kind, &s.hash, &m)?;
        if !problems.is_empty() {
            return Err(damaged(self, stage, problems));
        }
        Ok(m)
    }

    pub fn artifact_dir(&self, p: &Planned) -> PathBuf {
        self.store.artifact_dir(p.kind.kind, &p.hash)
    }
}

/// Checks a stage's input roles against its kind; `kind_of` names the kind of an upstream stage.
fn check_roles(
    stage: &str,
    inputs: &BTreeMap<String, InputRef>,
    kind: &StageKind,
    kind_of: &dyn Fn(&str) -> String,
) -> Result<()> {
    let role_names: Vec<&str> = kind.roles.iter().map(|r| r.name).collect();
    for (role, r) in inputs {
        let Some(spec) = kind.roles.iter().find(|x| x.name == role) else {
            user_bail!(
                "unknown input role `{}`{} ({} stages take: {})",
                clip(role),
                suggest(role, &role_names),
                kind.kind,
                if role_names.is_empty() {
                    "none".to_string()
                } else {
                    role_names.join(", ")
                }
            );
        };
        if let InputRef::Many(v) = r
            && !spec.many
        {
            user_bail!("input `{role}` takes one stage, not a list of {}", v.len());
        }
        if !spec.kinds.is_empty() {
            for up in r.stages() {
                let mut up_kind = kind_of(up);
                if up_kind.is_empty() {
                    up_kind = "?".into();
                }
                if !spec.kinds.contains(&up_kind.as_str()) {
                    user_bail!(
                        "input `{role}` must be a {} stage, but `{}` is a `{}` stage",
                        spec.kinds.join(" or "),
                        clip(up),
                        clip(&up_kind)
                    );
                }
            }
        }
    }
    for spec in kind.roles {
        if spec.required && !inputs.contains_key(spec.name) {
            user_bail!(
                "missing required input `{}` (stage `{}` of kind {})",
                spec.name,
                clip(stage),
                kind.kind
            );
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Stages to materialize (with their upstream); empty = all.
    pub targets: Vec<String>,
    /// Force this stage and everything downstream.
    pub from: Option<String>,
    pub force: bool,
    pub dry_run: bool,
    pub jobs: usize,
    pub device: String,
}

/// What `run` did, per stage in topological order: (name, action).
pub type RunReport = Vec<(String, &'static str)>;

/// Materializes every stale stage the targets need.
pub fn run(plan: &Plan, opts: &RunOptions, progress: &Progress) -> Result<RunReport> {
    // A matrix stage's name stands for all its instances.
    let mut targets: Vec<String> = Vec::new();
    for t in &opts.targets {
        targets.extend(plan.resolve(t)?);
    }
    let from = match &opts.from {
        Some(f) => plan.resolve(f)?,
        None => Vec::new(),
    };
    if opts.targets.is_empty() {
        targets = plan.graph.order.clone();
    }
    let selected = plan.graph.with_upstream(&targets);
    let mut forced: HashSet<String> = HashSet::new();
    if opts.force {
        forced.extend(selected.iter().cloned());
    }
    if !from.is_empty() {
        forced.extend(plan.graph.with_downstream_all(&from));
    }
    let to_run: Vec<&Planned> = selected
        .iter()
        .map(|n| plan.get(n).expect("known"))
        .filter(|p| forced.contains(&p.name) || !p.fresh)
        .collect();
    // A set, not a scan of `to_run` per stage: the report stays linear in the stage count.
    let run_names: HashSet<&str> = to_run.iter().map(|p| p.name.as_str()).collect();
    let report: RunReport = selected
        .iter()
        .map(|n| {
            (
                n.clone(),
                if run_names.contains(n.as_str()) {
                    "run"
                } else {
                    "fresh"
                },
            )
        })
        .collect();
    if opts.dry_run || to_run.is_empty() {
        return Ok(report);
    }
    let jobs = opts.jobs.max(1);
    let mut done: HashSet<String> = HashSet::new();
    let mut started: HashSet<String> = HashSet::new();
    let mut failure: Option<anyhow::Error> = None;
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel::<(String, Result<()>)>();
        let mut running = 0usize;
        loop {
            while failure.is_none() && running < jobs {
                let ready = to_run.iter().find(|p| {
                    !started.contains(&p.name)
                        && plan.graph.deps[&p.name]
                            .iter()
                            .all(|d| !run_names.contains(d.as_str()) || done.contains(d))
                });
                let Some(p) = ready else { break };
                started.insert(p.name.clone());
                running += 1;
                let tx = tx.clone();
                let force = forced.contains(&p.name);
                scope.spawn(move || {
                    // A panic must reach the loop below as an error: an unreported worker would
                    // leave it waiting forever on a channel whose sender it still holds.
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        build_stage(plan, p, force, opts, progress)
                    }))
                    .unwrap_or_else(|payload| Err(panic_error(plan, p, payload.as_ref())));
                    let _ = tx.send((p.name.clone(), r));
                });
            }
            if running == 0 {
                break;
            }
            let (name, r) = rx.recv().expect("workers always report");
            running -= 1;
            match r {
                Ok(()) => {
                    done.insert(name);
                }
                Err(e) => {
                    if failure.is_none() {
                        failure = Some(e);
                    }
                }
            }
        }
    });
    match failure {
        Some(e) => Err(e),
        None => Ok(report),
    }
}

/// `sepo run` on a plan. A real run first refuses a device that a stage which would run cannot
/// use (before anything runs), readies the cache and records the pipeline there with the
/// `--cache` and `--set` it was `loaded_with`, so that `gc` from another pipeline keeps its
/// artifacts; then it builds and logs a summary. A dry run writes the plan to `out` instead: one
/// line per selected stage, `run` or `fresh`, with its kind and hash.
pub fn run_pipeline(
    plan: &Plan,
    opts: &RunOptions,
    loaded_with: (Option<&Path>, &[String]),
    progress: &Progress,
    out: &mut dyn std::io::Write,
) -> Result<()> {
    let t0 = Instant::now();
    if !opts.dry_run {
        // What will run, planned once: the device check and the staleness log both read it.
        let preview = run(
            plan,
            &RunOptions {
                dry_run: true,
                ..opts.clone()
            },
            &Progress::new(true),
        )?;
        check_device(plan, &preview, &opts.device)?;
        plan.store.prepare()?;
        // Only so that `gc` from another pipeline keeps this one's artifacts: a cache that
        // cannot record it still builds.
        if let Err(e) = super::gc::register(plan, loaded_with.0, loaded_with.1) {
            progress.log(format!("warning: {}", crate::error::render(&e)));
        }
        let last = super::why::last_built(plan);
        for (name, action) in &preview {
            let s = plan.get(name)?;
            if *action == "run" && !s.fresh {
                let why = super::why::why(plan, s, &last).join("; ");
                progress.log(format!("  stale  {name}: {why}"));
            }
        }
    }
    let result = run(plan, opts, progress);
    if !opts.dry_run
        && let Err(e) = super::why::remember(plan)
    {
        // Only feeds `status`'s explanations: never fails a run.
        progress.log(format!("warning: {}", crate::error::render(&e)));
    }
    let report = result?;
    if opts.dry_run {
        let w = plan.name_width();
        for (name, action) in &report {
            let s = plan.get(name)?;
            writeln!(out, "{action:<6} {name:<w$} {:<10} {}", s.kind.kind, s.hash)?;
        }
    } else {
        let ran = report.iter().filter(|r| r.1 == "run").count();
        progress.log(format!(
            "{ran} stage(s) run, {} fresh, in {:.2}s; cache {}",
            report.len() - ran,
            t0.elapsed().as_secs_f64(),
            plan.store.root.display()
        ));
    }
    Ok(())
}

/// Refuses a device that is unknown or absent, but only when a stage that would run computes on
/// it ([`StageKind::uses_device`]): a data-only pipeline runs whatever `device:` says. Checked
/// before anything runs, so a bad device never fails a run halfway.
pub fn check_device(plan: &Plan, report: &RunReport, device: &str) -> Result<()> {
    let user = report
        .iter()
        .filter(|(_, action)| *action == "run")
        .filter_map(|(name, _)| plan.get(name).ok())
        .find(|s| s.kind.uses_device);
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

fn build_stage(
    plan: &Plan,
    p: &Planned,
    force: bool,
    opts: &RunOptions,
    progress: &Progress,
) -> Result<()> {
    let fname = plan.pipeline.file.display();
    let ctx = || format!("{fname}: stage `{}` ({})", p.name, p.kind.kind);
    let store = &plan.store;
    let spec = BuildSpec {
        stage: p.name.clone(),
        kind: p.kind.kind.to_string(),
        hash: p.hash.clone(),
        params: p.stage.params(),
        inputs: Value::Object(p.input_hashes.clone().into_iter().collect()),
        external_files: p.external_files.clone(),
        force,
    };
    let built = store
        .build(spec, |out, work| {
            progress.log(format!("  run    {} ({}) {}", p.name, p.kind.kind, p.hash));
            let inputs = input_artifacts(plan, p)?;
            let rctx = RunContext {
                stage: &p.name,
                out,
                work,
                inputs: &inputs,
                device: &opts.device,
                progress,
                store,
            };
            // A panic inside the stage becomes an error here, so the store still cleans up.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                crate::testhook::panic_at("panic-in-stage", &p.name);
                p.stage.run(&rctx)
            }))
            .unwrap_or_else(|payload| Err(panic_error(plan, p, payload.as_ref())))
        })
        .with_context(ctx)?;
    if built.found {
        progress.log(format!(
            "  fresh  {} ({}): built by another sepo process",
            p.name, p.kind.kind
        ));
    } else {
        progress.log(format!(
            "  done   {} ({}) in {:.2}s",
            p.name, p.kind.kind, built.secs
        ));
    }
    Ok(())
}

/// The stage's input artifacts by role, each checked before it is read: never build on a
/// damaged input (sizes always, content when a file changed since it was last seen intact).
fn input_artifacts(plan: &Plan, p: &Planned) -> Result<BTreeMap<String, Vec<Artifact>>> {
    let mut inputs: BTreeMap<String, Vec<Artifact>> = BTreeMap::new();
    for (role, ups) in &p.inputs {
        let mut arts = Vec::new();
        for u in ups {
            let up = plan.get(u)?;
            let manifest = plan.intact_manifest(u)?;
            arts.push(Artifact {
                stage: u.clone(),
                kind: up.kind.kind.to_string(),
                hash: up.hash.clone(),
                dir: plan.artifact_dir(up),
                manifest,
            });
        }
        inputs.insert(role.clone(), arts);
    }
    Ok(inputs)
}

/// The error for a panic inside a stage: a failure (exit 1), naming the stage, never a hang.
fn panic_error(plan: &Plan, p: &Planned, payload: &(dyn std::any::Any + Send)) -> anyhow::Error {
    let msg = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_string());
    anyhow::anyhow!(
        "{}: stage `{}` ({}) crashed: {msg} (a bug in sepo: nothing was written for this stage)",
        plan.pipeline.file.display(),
        p.name,
        p.kind.kind
    )
}

/// The error for an input artifact that no longer matches its manifest, with the way out.
fn damaged(plan: &Plan, stage: &str, problems: Vec<String>) -> anyhow::Error {
    user(format!(
        "artifact of stage `{stage}` is damaged: {}. The cache was changed outside sepo; \
         rebuild it with `sepo run {} --from {stage}` (or delete its folder)",
        problems.join("; "),
        plan.pipeline.file.display()
    ))
}
