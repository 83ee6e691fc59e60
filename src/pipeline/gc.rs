//! `sepo gc`: what a cache keeps, for whom, and the crash-safe way it deletes the rest.
//!
//! A cache may be shared by several pipelines (the shipped ones share `cache/`), so each `run`
//! records its pipeline file in `<cache>/.state/pipelines.json`; gc re-plans every recorded
//! pipeline and keeps what any of them points to now. gc deletes only what is provably sepo's:
//! a `<kind>/<hash>` folder of a known kind whose manifest agrees with its path, in a folder that
//! carries the cache marker, never through a symbolic link. A deletion first renames the artifact
//! out of the live tree (one atomic step, like a commit), so a kill mid-delete leaves either the
//! whole artifact or none of it; what a killed gc or build left in `tmp/` is collected next time.

use std::collections::{BTreeSet, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::executor::Plan;
use super::spec::Pipeline;
use super::store::{EntryType, MANIFEST, Store, entry_type, is_hash_name, write_atomic};
use crate::progress::Progress;
use crate::user_bail;

/// Kinds of artifacts that stages derive and share rather than declare (see `Store::derived`).
pub const DERIVED_KINDS: &[&str] = &["logprobs"];

const REGISTRY: &str = "pipelines.json";

/// What a stage's work folder `tmp/<hash>/` may hold: its output in progress and a training
/// checkpoint with the two names its atomic swap uses.
const WORK_ENTRIES: &[&str] = &["out", "ckpt", "ckpt.partial", "ckpt.old"];

/// One pipeline that ran against this cache, as it was last run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UseRecord {
    /// The pipeline file, absolute.
    pub file: PathBuf,
    /// `--cache` given on that run (absolute), if any.
    #[serde(default)]
    pub cache: Option<PathBuf>,
    /// `--set` overrides given on that run.
    #[serde(default)]
    pub set: Vec<String>,
    /// `kind/hash` of every stage as that run planned it: kept if the file can no longer be
    /// planned (edited into an invalid state, say), so gc never guesses in the deleting direction.
    pub artifacts: Vec<String>,
}

fn state_dir(store: &Store) -> PathBuf {
    store.root.join(".state")
}

fn read_registry(store: &Store) -> Vec<UseRecord> {
    std::fs::read(state_dir(store).join(REGISTRY))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Runs `f` on the registry under an exclusive lock and writes back what it returns, if changed.
fn update_registry(store: &Store, f: impl FnOnce(&mut Vec<UseRecord>)) -> Result<Vec<UseRecord>> {
    let dir = state_dir(store);
    std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let lock_path = dir.join("pipelines.lock");
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("{}: cannot open lock", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("{}: lock failed", lock_path.display()))?;
    let before = read_registry(store);
    let mut recs = before.clone();
    f(&mut recs);
    if recs != before {
        write_atomic(&dir.join(REGISTRY), &serde_json::to_vec_pretty(&recs)?)?;
    }
    Ok(recs)
}

/// Records that `plan`'s pipeline uses its cache (called by `run` before it builds anything).
pub fn register(plan: &Plan, cache_override: Option<&Path>, set: &[String]) -> Result<()> {
    let file = std::path::absolute(&plan.pipeline.file)?;
    let rec = UseRecord {
        file: file.clone(),
        cache: cache_override.map(std::path::absolute).transpose()?,
        set: set.to_vec(),
        artifacts: plan
            .stages
            .iter()
            .map(|s| format!("{}/{}", s.kind.kind, s.hash))
            .collect(),
    };
    update_registry(&plan.store, |recs| {
        match recs.iter_mut().find(|r| r.file == file) {
            Some(r) => *r = rec,
            None => recs.push(rec),
        }
    })?;
    Ok(())
}

/// Re-plans a recorded pipeline as it was last run, with the stage kinds `plan` knows; `None`
/// with the reason if it can't be.
fn replan(plan: &Plan, rec: &UseRecord) -> std::result::Result<Plan, String> {
    let mut p = Pipeline::load(&rec.file).map_err(|e| crate::error::render(&e))?;
    if let Some(c) = &rec.cache {
        p.cache = c.clone();
    }
    for s in &rec.set {
        p.apply_set(s).map_err(|e| crate::error::render(&e))?;
    }
    Plan::new(p, plan.registry).map_err(|e| crate::error::render(&e))
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// What gc did (or would do, in a dry run).
#[derive(Debug, Default)]
pub struct GcReport {
    pub deleted: Vec<(PathBuf, u64)>,
    /// Notes for stderr: what was kept and why, what was skipped.
    pub notes: Vec<String>,
}

impl GcReport {
    /// On stderr (`progress`, silent under `--quiet`): the notes, then how many entries and
    /// bytes were deleted (or would be, in a dry run).
    pub fn log(&self, progress: &Progress, dry_run: bool) {
        for n in &self.notes {
            progress.log(n);
        }
        let n = self.deleted.len();
        let freed: u64 = self.deleted.iter().map(|d| d.1).sum();
        progress.log(format!(
            "{n} entr{}, {:.1} MB{}",
            if n == 1 { "y" } else { "ies" },
            freed as f64 / 1e6,
            if dry_run {
                " (dry run: nothing deleted)"
            } else {
                " deleted"
            }
        ));
    }
}

/// Deletes every cache entry that no pipeline using the cache points to now. `out` receives one
/// `deleted PATH` (or `would delete PATH`) line per entry, written only after the fact.
pub fn collect(plan: &Plan, dry_run: bool, out: &mut dyn Write) -> Result<GcReport> {
    let store = &plan.store;
    match entry_type(&store.root) {
        None => user_bail!("{}: no such cache folder", store.root.display()),
        Some(EntryType::Dir) => {}
        Some(EntryType::Symlink) if store.root.is_dir() => {}
        Some(_) => user_bail!(
            "{}: not a folder, so not a sepo cache",
            store.root.display()
        ),
    }
    if !store.is_marked() {
        user_bail!(
            "{}: not a sepo cache (no `{}` marker), so gc deletes nothing there. sepo marks a \
             cache when `sepo run` first writes into it; if this is a cache made by an older \
             sepo, `sepo run {}` marks it",
            store.root.display(),
            super::store::MARKER,
            plan.pipeline.file.display()
        );
    }
    // Work below the real path, so no link on the way can redirect a deletion.
    let root = std::fs::canonicalize(&store.root)
        .with_context(|| format!("{}: cannot resolve", store.root.display()))?;
    let store = Store::new(root.clone());
    let mut report = GcReport::default();

    // What to keep: this pipeline's current artifacts and those of every other pipeline that
    // ran against this cache.
    let mut keep: HashSet<String> = plan
        .stages
        .iter()
        .map(|s| format!("{}/{}", s.kind.kind, s.hash))
        .collect();
    let this = std::path::absolute(&plan.pipeline.file)?;
    let mut forget: Vec<PathBuf> = Vec::new();
    for rec in read_registry(&store) {
        if rec.file == this {
            continue;
        }
        if !rec.file.is_file() {
            report.notes.push(format!(
                "forgetting {}: the file no longer exists",
                rec.file.display()
            ));
            forget.push(rec.file.clone());
            continue;
        }
        match replan(plan, &rec) {
            Ok(other) if !same_dir(&other.store.root, &root) => {
                report.notes.push(format!(
                    "forgetting {}: it now uses another cache ({})",
                    rec.file.display(),
                    other.store.root.display()
                ));
                forget.push(rec.file.clone());
            }
            Ok(other) => {
                let arts: Vec<String> = other
                    .stages
                    .iter()
                    .map(|s| format!("{}/{}", s.kind.kind, s.hash))
                    .collect();
                let n = arts.iter().filter(|a| !keep.contains(*a)).count();
                report.notes.push(format!(
                    "keeping what {} points to ({n} more stage artifact(s)); it uses this cache too",
                    rec.file.display()
                ));
                keep.extend(arts);
            }
            Err(why) => {
                report.notes.push(format!(
                    "cannot plan {} ({why}); keeping the {} artifact(s) of its last run",
                    rec.file.display(),
                    rec.artifacts.len()
                ));
                keep.extend(rec.artifacts);
            }
        }
    }
    if !forget.is_empty() && !dry_run {
        update_registry(&store, |recs| recs.retain(|r| !forget.contains(&r.file)))?;
    }
    let kept_hashes: HashSet<&str> = keep
        .iter()
        .filter_map(|a| a.split_once('/').map(|(_, h)| h))
        .collect();

    // Artifacts: `<kind>/<hash>` folders, read without following links.
    let stage_kinds = plan.registry.kind_names();
    let mut kinds: Vec<(String, PathBuf)> = Vec::new();
    for e in std::fs::read_dir(&root).with_context(|| format!("{}: cannot list", root.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name == "tmp" || name.starts_with('.') {
            continue;
        }
        let known = stage_kinds.contains(&name.as_str()) || DERIVED_KINDS.contains(&name.as_str());
        match entry_type(&e.path()) {
            Some(EntryType::Dir) if known => kinds.push((name, e.path())),
            Some(EntryType::Symlink) => report.notes.push(format!(
                "not touched: {} (a symbolic link; sepo never follows links in its cache)",
                e.path().display()
            )),
            _ => report.notes.push(format!(
                "not touched: {} (not an artifact kind of sepo's)",
                e.path().display()
            )),
        }
    }
    kinds.sort();
    for (kind, kdir) in kinds {
        let mut entries: Vec<_> = std::fs::read_dir(&kdir)
            .with_context(|| format!("{}: cannot list", kdir.display()))?
            .flatten()
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let hash = e.file_name().to_string_lossy().into_owned();
            let path = e.path();
            let proof = match entry_type(&path) {
                Some(EntryType::Symlink) => Err("a symbolic link; not followed".to_string()),
                Some(EntryType::Dir) if !is_hash_name(&hash) => {
                    Err("not named like an artifact".to_string())
                }
                Some(EntryType::Dir) => store
                    .manifest(&kind, &hash)
                    .map_err(|e| format!("not provably an artifact: {}", crate::error::render(&e))),
                _ => Err("not an artifact folder".to_string()),
            };
            let manifest = match proof {
                Ok(m) => m,
                Err(why) => {
                    report
                        .notes
                        .push(format!("not touched: {} ({why})", path.display()));
                    continue;
                }
            };
            if keep.contains(&format!("{kind}/{hash}")) {
                continue;
            }
            // A derived artifact stays while everything it was derived from is kept.
            if DERIVED_KINDS.contains(&kind.as_str())
                && manifest.inputs.as_object().is_some_and(|o| {
                    o.values()
                        .all(|h| h.as_str().is_some_and(|h| kept_hashes.contains(h)))
                })
            {
                continue;
            }
            let Some(_lock) = store.try_lock(&hash)? else {
                report.notes.push(format!(
                    "not touched: {} (a running sepo holds its lock)",
                    path.display()
                ));
                continue;
            };
            let size = tree_size(&path);
            if dry_run {
                writeln!(out, "would delete {}", path.display())?;
            } else {
                // Its lock file goes when `_lock` drops; its integrity record in the sweep below.
                remove_tree(&store, &path, &format!("{kind}.{hash}"))?;
                writeln!(out, "deleted {}", path.display())?;
            }
            report.deleted.push((path, size));
        }
    }

    collect_tmp(plan, &store, &kept_hashes, dry_run, out, &mut report)?;
    Ok(report)
}

/// Deletes a folder of the live tree crash-safely: one rename moves it into `tmp/` (after which
/// it is gone from the store's point of view), then it is removed at leisure.
fn remove_tree(store: &Store, path: &Path, tag: &str) -> Result<()> {
    let tmp = store.root.join("tmp");
    std::fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    let trash = tmp.join(format!("gc.{}.{tag}", std::process::id()));
    std::fs::rename(path, &trash).with_context(|| format!("{}: cannot delete", path.display()))?;
    if let Some(parent) = path.parent()
        && let Ok(d) = File::open(parent)
    {
        let _ = d.sync_all();
    }
    crate::testhook::abort_at("gc-after-rename", tag);
    std::fs::remove_dir_all(&trash).with_context(|| format!("{}: cannot delete", trash.display()))
}

/// Debris in `tmp/`: trash of a killed gc, the old copy a killed forced rebuild swapped out, work
/// folders no current stage can resume from, and unused lock files.
fn collect_tmp(
    plan: &Plan,
    store: &Store,
    kept_hashes: &HashSet<&str>,
    dry_run: bool,
    out: &mut dyn Write,
    report: &mut GcReport,
) -> Result<()> {
    let tmp = store.root.join("tmp");
    match entry_type(&tmp) {
        None => return Ok(()),
        Some(EntryType::Dir) => {}
        Some(_) => {
            report.notes.push(format!(
                "not touched: {} (not a folder; sepo never follows links in its cache)",
                tmp.display()
            ));
            return Ok(());
        }
    }
    let mut entries: Vec<_> = std::fs::read_dir(&tmp)
        .with_context(|| format!("{}: cannot list", tmp.display()))?
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect();
    entries.sort();
    let mut locks: BTreeSet<String> = BTreeSet::new();
    for (name, path) in entries {
        let t = entry_type(&path);
        if let Some(h) = name.strip_suffix(".lock")
            && is_hash_name(h)
            && t == Some(EntryType::File)
        {
            locks.insert(h.to_string());
            continue;
        }
        // `gc.<pid>.<kind>.<hash>`: a folder a killed gc had already taken out of the tree.
        // `<hash>.old.<pid>`: the previous copy a killed forced rebuild had swapped out.
        // `<hash>`: a stage's work folder.
        // Each is recognised by its exact name pattern; a work folder also by its contents.
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        let (hash, what, shaped) = if let Some(rest) = name.strip_prefix("gc.") {
            let parts: Vec<&str> = rest.splitn(3, '.').collect();
            let ok = parts.len() == 3
                && digits(parts[0])
                && (plan.registry.lookup(parts[1]).is_some() || DERIVED_KINDS.contains(&parts[1]));
            (
                parts.last().copied().unwrap_or(""),
                "left by an interrupted gc",
                ok,
            )
        } else if let Some((h, pid)) = name.split_once(".old.") {
            (h, "old copy left by an interrupted rebuild", digits(pid))
        } else {
            let only_work = std::fs::read_dir(&path).is_ok_and(|d| {
                d.flatten()
                    .all(|e| WORK_ENTRIES.contains(&e.file_name().to_string_lossy().as_ref()))
            });
            (
                name.as_str(),
                "work folder no current stage can resume from",
                only_work,
            )
        };
        if t != Some(EntryType::Dir) || !is_hash_name(hash) || !shaped {
            report.notes.push(format!(
                "not touched: {} (not something sepo leaves in tmp/)",
                path.display()
            ));
            continue;
        }
        let Some(_lock) = store.try_lock(hash)? else {
            report.notes.push(format!(
                "not touched: {} (a running sepo holds its lock)",
                path.display()
            ));
            continue;
        };
        if name == hash && kept_hashes.contains(hash) {
            report.notes.push(format!(
                "keeping {}: work of a current stage (a checkpoint to resume from)",
                path.display()
            ));
            continue;
        }
        let size = tree_size(&path);
        if dry_run {
            writeln!(out, "would delete {} ({what})", path.display())?;
        } else {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("{}: cannot delete", path.display()))?;
            writeln!(out, "deleted {} ({what})", path.display())?;
        }
        report.deleted.push((path, size));
    }
    // Lock files of hashes nothing is building: taking and releasing such a lock removes its
    // file (`StageLock`'s drop); a held one is left to its owner.
    if !dry_run {
        for hash in &locks {
            drop(store.try_lock(hash)?);
        }
    }
    // Integrity records of artifacts that are gone.
    let vdir = store.root.join(".state").join("verified");
    if !dry_run && entry_type(&vdir) == Some(EntryType::Dir) {
        for e in std::fs::read_dir(&vdir)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let gone = name
                .strip_suffix(".json")
                .and_then(|s| s.rsplit_once('.'))
                .is_none_or(|(kind, hash)| !store.artifact_dir(kind, hash).join(MANIFEST).exists());
            if gone && entry_type(&e.path()) == Some(EntryType::File) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(())
}

/// Bytes under `dir`, counting links as themselves (never followed).
pub fn tree_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => tree_size(&e.path()),
                    _ => std::fs::symlink_metadata(e.path())
                        .map(|m| m.len())
                        .unwrap_or(0),
                })
                .sum()
        })
        .unwrap_or(0)
}
