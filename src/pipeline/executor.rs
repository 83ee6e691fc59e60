//! Planning (validate every stage, hash it, decide fresh or stale) and execution (build stale
//! stages in dependency order, independent ones concurrently, each behind a per-hash lock).

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Instant, SystemTime};

use anyhow::{Context, Result};
use serde_json::Value;

use super::graph::Graph;
use super::hash::{FileHasher, HashInput, stage_hash};
use super::spec::{InputRef, Pipeline, suggest};
use super::store::{
    FileEntry, MANIFEST, Manifest, Store, describe_files, rfc3339_utc, write_atomic,
};
use crate::error::user;
use crate::progress::Progress;
use crate::stages::{self, Artifact, BuildContext, RunContext, Stage, StageKind};
use crate::user_bail;

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
}

pub struct Plan {
    pub pipeline: Pipeline,
    pub graph: Graph,
    pub store: Store,
    /// Every stage of the pipeline, in topological order.
    pub stages: Vec<Planned>,
}

impl Plan {
    /// Validates and hashes every stage. Reads data files only to hash them (with a stat cache).
    pub fn new(pipeline: Pipeline) -> Result<Plan> {
        let fname = pipeline.file.display().to_string();
        let graph = Graph::build(&pipeline)?;
        let store = Store::new(pipeline.cache.clone());
        let hasher = FileHasher::new(Some(store.root.join(".state").join("filehash.json")));
        let mut planned: Vec<Planned> = Vec::new();
        for name in &graph.order {
            let decl = pipeline
                .stage(name)
                .expect("graph holds only declared stages");
            let ctx = || format!("{fname}: stage `{name}` ({})", decl.kind);
            let Some(kind) = stages::lookup(&decl.kind) else {
                user_bail!(
                    "{fname}: stage `{name}`: unknown stage kind `{}`{} (known: {})",
                    decl.kind,
                    suggest(&decl.kind, &stages::kind_names()),
                    stages::kind_names().join(", ")
                );
            };
            check_roles(&pipeline, decl.name.as_str(), &decl.inputs, kind, &planned)
                .with_context(ctx)?;
            let role_kinds = decl
                .inputs
                .iter()
                .map(|(role, r)| {
                    let kinds = r
                        .stages()
                        .iter()
                        .map(|u| {
                            pipeline
                                .stage(u)
                                .map(|d| d.kind.clone())
                                .unwrap_or_default()
                        })
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
                    .map(|u| {
                        Value::from(
                            planned
                                .iter()
                                .find(|p| &p.name == u)
                                .expect("topological")
                                .hash
                                .clone(),
                        )
                    })
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
            for f in stage.external_files().with_context(ctx)? {
                if !f.is_file() {
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
            let file_hashes: Vec<String> =
                external_files.iter().map(|f| f.blake3.clone()).collect();
            let params = stage.params();
            let hash = stage_hash(&HashInput {
                kind: kind.kind,
                version: kind.version,
                params: &params,
                inputs: &input_hashes,
                files: &file_hashes,
            });
            let fresh = store.is_fresh(kind.kind, &hash);
            planned.push(Planned {
                name: name.clone(),
                kind,
                stage,
                hash,
                inputs,
                input_hashes,
                external_files,
                fresh,
            });
        }
        hasher.save();
        Ok(Plan {
            pipeline,
            graph,
            store,
            stages: planned,
        })
    }

    pub fn get(&self, name: &str) -> Result<&Planned> {
        self.stages.iter().find(|s| s.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.stages.iter().map(|s| s.name.as_str()).collect();
            user(format!(
                "{}: no stage `{name}`{}",
                self.pipeline.file.display(),
                suggest(name, &names)
            ))
        })
    }

    pub fn artifact_dir(&self, p: &Planned) -> PathBuf {
        self.store.artifact_dir(p.kind.kind, &p.hash)
    }
}

fn check_roles(
    p: &Pipeline,
    stage: &str,
    inputs: &BTreeMap<String, InputRef>,
    kind: &StageKind,
    planned: &[Planned],
) -> Result<()> {
    let role_names: Vec<&str> = kind.roles.iter().map(|r| r.name).collect();
    for (role, r) in inputs {
        let Some(spec) = kind.roles.iter().find(|x| x.name == role) else {
            user_bail!(
                "unknown input role `{role}`{} ({} stages take: {})",
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
                let up_kind = planned
                    .iter()
                    .find(|x| x.name == up)
                    .map(|x| x.kind.kind)
                    .or_else(|| p.stage(up).map(|d| d.kind.as_str()))
                    .unwrap_or("?");
                if !spec.kinds.contains(&up_kind) {
                    user_bail!(
                        "input `{role}` must be a {} stage, but `{up}` is a `{up_kind}` stage",
                        spec.kinds.join(" or ")
                    );
                }
            }
        }
    }
    for spec in kind.roles {
        if spec.required && !inputs.contains_key(spec.name) {
            user_bail!(
                "missing required input `{}` (stage `{stage}` of kind {})",
                spec.name,
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
    for t in opts.targets.iter().chain(opts.from.iter()) {
        plan.get(t)?;
    }
    let targets: Vec<String> = if opts.targets.is_empty() {
        plan.graph.order.clone()
    } else {
        opts.targets.clone()
    };
    let selected = plan.graph.with_upstream(&targets);
    let mut forced: HashSet<String> = HashSet::new();
    if opts.force {
        forced.extend(selected.iter().cloned());
    }
    if let Some(f) = &opts.from {
        forced.extend(plan.graph.with_downstream(f));
    }
    let to_run: Vec<&Planned> = selected
        .iter()
        .map(|n| plan.get(n).expect("known"))
        .filter(|p| forced.contains(&p.name) || !p.fresh)
        .collect();
    let report: RunReport = selected
        .iter()
        .map(|n| {
            (
                n.clone(),
                if to_run.iter().any(|r| r.name == *n) {
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
    let run_names: HashSet<&str> = to_run.iter().map(|p| p.name.as_str()).collect();
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
                    let r = build_stage(plan, p, force, opts, progress);
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
    let (_lock, waited) = store.lock(&p.hash).with_context(ctx)?;
    if store.is_fresh(p.kind.kind, &p.hash) && (!force || waited) {
        progress.log(format!(
            "  fresh  {} ({}): built by another sepo process",
            p.name, p.kind.kind
        ));
        return Ok(());
    }
    progress.log(format!("  run    {} ({}) {}", p.name, p.kind.kind, p.hash));
    let work = store.work_dir(&p.hash);
    let out = work.join("out");
    if out.exists() {
        std::fs::remove_dir_all(&out).with_context(ctx)?;
    }
    std::fs::create_dir_all(&out).with_context(ctx)?;
    let mut inputs: BTreeMap<String, Vec<Artifact>> = BTreeMap::new();
    for (role, ups) in &p.inputs {
        let mut arts = Vec::new();
        for u in ups {
            let up = plan.get(u)?;
            let manifest = store.manifest(up.kind.kind, &up.hash).with_context(ctx)?;
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
    let t0 = Instant::now();
    let created = rfc3339_utc(SystemTime::now());
    let rctx = RunContext {
        stage: &p.name,
        out: &out,
        work: &work,
        inputs: &inputs,
        device: &opts.device,
        progress,
        store,
    };
    let result = p.stage.run(&rctx).and_then(|stats| {
        let files = describe_files(&out)?;
        let manifest = Manifest {
            stage: p.name.clone(),
            kind: p.kind.kind.to_string(),
            hash: p.hash.clone(),
            params: p.stage.params(),
            inputs: Value::Object(p.input_hashes.clone().into_iter().collect()),
            external_files: p.external_files.clone(),
            files,
            stats,
            sepo_version: env!("CARGO_PKG_VERSION").to_string(),
            created,
            wall_time_s: t0.elapsed().as_secs_f64(),
        };
        write_atomic(&out.join(MANIFEST), &serde_json::to_vec_pretty(&manifest)?)?;
        // Test hook: die the hardest way at the worst moment, a complete output not yet committed.
        if std::env::var("SEPO_TEST_ABORT_BEFORE_COMMIT").is_ok_and(|s| s == p.name) {
            std::process::abort();
        }
        store.commit(&out, p.kind.kind, &p.hash)
    });
    match result {
        Ok(_) => {
            let _ = std::fs::remove_dir_all(&work);
            let _ = std::fs::remove_file(store.root.join("tmp").join(format!("{}.lock", p.hash)));
            progress.log(format!(
                "  done   {} ({}) in {:.2}s",
                p.name,
                p.kind.kind,
                t0.elapsed().as_secs_f64()
            ));
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&out);
            // Keep the work folder only when it holds something worth resuming (a checkpoint).
            if std::fs::read_dir(&work)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false)
            {
                let _ = std::fs::remove_dir(&work);
            }
            let _ = std::fs::remove_file(store.root.join("tmp").join(format!("{}.lock", p.hash)));
            let tmp = store.root.join("tmp");
            if std::fs::read_dir(&tmp)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false)
            {
                let _ = std::fs::remove_dir(&tmp);
            }
            Err(e.context(ctx()))
        }
    }
}
