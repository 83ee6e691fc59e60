//! The artifact store: `<cache>/<kind>/<hash>/` holds a finished artifact with its `manifest.json`;
//! `<cache>/tmp/<hash>/` is where a stage works. An artifact appears only by one directory rename
//! after its manifest (written last) is on disk, so a killed run never leaves one that reads as
//! fresh, and two processes racing on the same stage both end with the same complete artifact.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::hash::hash_file;

pub const MANIFEST: &str = "manifest.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: String,
    pub blake3: String,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub stage: String,
    pub kind: String,
    pub hash: String,
    pub params: Value,
    pub inputs: Value,
    #[serde(default)]
    pub external_files: Vec<FileEntry>,
    pub files: Vec<FileEntry>,
    #[serde(default)]
    pub stats: Value,
    pub sepo_version: String,
    pub created: String,
    pub wall_time_s: f64,
}

#[derive(Debug, Clone)]
pub struct Store {
    pub root: PathBuf,
}

/// An exclusive lock on one stage hash, held while the stage builds; released on drop.
pub struct StageLock {
    _file: File,
}

impl Store {
    pub fn new(root: impl Into<PathBuf>) -> Store {
        Store { root: root.into() }
    }

    pub fn artifact_dir(&self, kind: &str, hash: &str) -> PathBuf {
        self.root.join(kind).join(hash)
    }

    pub fn work_dir(&self, hash: &str) -> PathBuf {
        self.root.join("tmp").join(hash)
    }

    pub fn is_fresh(&self, kind: &str, hash: &str) -> bool {
        self.artifact_dir(kind, hash).join(MANIFEST).is_file()
    }

    pub fn manifest(&self, kind: &str, hash: &str) -> Result<Manifest> {
        let p = self.artifact_dir(kind, hash).join(MANIFEST);
        let bytes = std::fs::read(&p).with_context(|| format!("{}: cannot read", p.display()))?;
        serde_json::from_slice(&bytes)
            .with_context(|| format!("{}: not a sepo manifest", p.display()))
    }

    /// Blocks until this process is the only one building `hash`. Returns whether it had to wait.
    pub fn lock(&self, hash: &str) -> Result<(StageLock, bool)> {
        let dir = self.root.join("tmp");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
        let path = dir.join(format!("{hash}.lock"));
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("{}: cannot open lock", path.display()))?;
        let waited = match file.try_lock() {
            Ok(()) => false,
            Err(std::fs::TryLockError::WouldBlock) => {
                file.lock()
                    .with_context(|| format!("{}: lock failed", path.display()))?;
                true
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("{}: lock failed", path.display()));
            }
        };
        Ok((StageLock { _file: file }, waited))
    }

    /// Moves a completed output folder into place. `out` must already hold `manifest.json`.
    /// If an artifact exists (a forced rebuild), it is swapped out first and then deleted.
    pub fn commit(&self, out: &Path, kind: &str, hash: &str) -> Result<PathBuf> {
        let dest = self.artifact_dir(kind, hash);
        let parent = dest.parent().expect("has parent");
        std::fs::create_dir_all(parent)
            .with_context(|| format!("{}: cannot create", parent.display()))?;
        sync_tree(out)?;
        if dest.exists() {
            let trash = self
                .root
                .join("tmp")
                .join(format!("{hash}.old.{}", std::process::id()));
            std::fs::rename(&dest, &trash)
                .with_context(|| format!("{}: cannot replace", dest.display()))?;
            std::fs::rename(out, &dest)
                .with_context(|| format!("{}: cannot commit", dest.display()))?;
            let _ = std::fs::remove_dir_all(&trash);
        } else {
            std::fs::rename(out, &dest)
                .with_context(|| format!("{}: cannot commit", dest.display()))?;
        }
        if let Ok(d) = File::open(parent) {
            let _ = d.sync_all();
        }
        Ok(dest)
    }

    /// Every artifact directory in the store: (kind, hash, path).
    pub fn list(&self) -> Result<Vec<(String, String, PathBuf)>> {
        let mut out = Vec::new();
        let Ok(kinds) = std::fs::read_dir(&self.root) else {
            return Ok(out);
        };
        for k in kinds.flatten() {
            let kname = k.file_name().to_string_lossy().into_owned();
            if kname == "tmp" || kname.starts_with('.') || !k.path().is_dir() {
                continue;
            }
            for h in std::fs::read_dir(k.path())?.flatten() {
                if h.path().is_dir() {
                    out.push((
                        kname.clone(),
                        h.file_name().to_string_lossy().into_owned(),
                        h.path(),
                    ));
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

/// Lists the files under `dir` (relative, `/`-separated, sorted), with blake3 and size.
pub fn describe_files(dir: &Path) -> Result<Vec<FileEntry>> {
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<FileEntry>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))? {
        let e = e?;
        let p = e.path();
        if p.is_dir() {
            walk(root, &p, out)?;
        } else {
            let rel = p.strip_prefix(root).expect("under root");
            let rel = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            if rel == MANIFEST {
                continue;
            }
            out.push(FileEntry {
                path: rel,
                blake3: hash_file(&p)?,
                size: e.metadata()?.len(),
            });
        }
    }
    Ok(())
}

fn sync_tree(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            sync_tree(&p)?;
        } else {
            File::open(&p)?.sync_all()?;
        }
    }
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file and a rename, so readers never see half.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("partial{}", std::process::id()));
    {
        let mut f =
            File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(())
}

/// Seconds since the epoch as RFC 3339 UTC (no time-zone database needed).
pub fn rfc3339_utc(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

impl Store {
    /// Builds (once) an artifact that stages derive and share rather than declare — reference
    /// log-probs, for instance — with the same lock, atomic commit and manifest as a stage.
    /// `inputs` names what it was derived from; `build` writes its files into the folder given.
    pub fn derived(
        &self,
        kind: &str,
        hash: &str,
        inputs: Value,
        build: impl FnOnce(&Path) -> Result<Value>,
    ) -> Result<PathBuf> {
        let dest = self.artifact_dir(kind, hash);
        if self.is_fresh(kind, hash) {
            return Ok(dest);
        }
        let (_lock, _) = self.lock(hash)?;
        if self.is_fresh(kind, hash) {
            return Ok(dest);
        }
        let work = self.work_dir(hash);
        let out = work.join("out");
        if out.exists() {
            std::fs::remove_dir_all(&out)?;
        }
        std::fs::create_dir_all(&out)?;
        let t0 = std::time::Instant::now();
        let created = rfc3339_utc(std::time::SystemTime::now());
        let result = build(&out).and_then(|stats| {
            let manifest = Manifest {
                stage: format!("({kind})"),
                kind: kind.to_string(),
                hash: hash.to_string(),
                params: Value::Null,
                inputs,
                external_files: Vec::new(),
                files: describe_files(&out)?,
                stats,
                sepo_version: env!("CARGO_PKG_VERSION").to_string(),
                created,
                wall_time_s: t0.elapsed().as_secs_f64(),
            };
            write_atomic(&out.join(MANIFEST), &serde_json::to_vec_pretty(&manifest)?)?;
            self.commit(&out, kind, hash)
        });
        let _ = std::fs::remove_dir_all(&work);
        let _ = std::fs::remove_file(self.root.join("tmp").join(format!("{hash}.lock")));
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_dates() {
        let t = |s| std::time::UNIX_EPOCH + std::time::Duration::from_secs(s);
        assert_eq!(rfc3339_utc(t(0)), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(t(951_782_400)), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(t(1_795_781_730)), "2026-11-27T12:15:30Z");
    }

    #[test]
    fn commit_is_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let out = store.work_dir("h1").join("out");
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(out.join("a.parquet"), b"x").unwrap();
        // Without its manifest an output is never fresh, even if something moved it into place.
        assert!(!store.is_fresh("k", "h1"));
        std::fs::write(out.join(MANIFEST), b"{}").unwrap();
        store.commit(&out, "k", "h1").unwrap();
        assert!(store.is_fresh("k", "h1"));
        assert!(!out.exists());
        let files = describe_files(&store.artifact_dir("k", "h1")).unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].path, "a.parquet");
    }
}
