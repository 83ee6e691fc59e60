//! The artifact store: `<cache>/<kind>/<hash>/` holds a finished artifact with its `manifest.json`;
//! `<cache>/tmp/<hash>/` is where a stage works. An artifact appears only by one directory rename
//! after its manifest (written last) is on disk, so a killed run never leaves one that reads as
//! fresh, and two processes racing on the same stage both end with the same complete artifact.
//!
//! The store never follows a symbolic link below its root: a link inside the cache is reported,
//! never read, hashed or deleted through. A cache is recognisable by its marker file, written the
//! first time sepo writes into it; `gc` refuses any folder without one.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::hash::{HASH_HEX_LEN, hash_file};
use crate::error::user;
pub use crate::util::{rfc3339_utc, write_atomic};

pub const MANIFEST: &str = "manifest.json";
/// Written into a cache folder when sepo first writes there; `gc` touches only marked folders.
pub const MARKER: &str = ".sepo-cache";

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

/// An exclusive lock on one stage hash, held while the stage builds. On drop it removes its
/// lock file (while still holding the lock) and releases it: a finished build leaves no debris.
/// A process that opened the file just before sees the artifact fresh once it gets the lock.
pub struct StageLock {
    file: Option<File>,
    path: PathBuf,
}

impl Drop for StageLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        drop(self.file.take());
    }
}

/// Whether `name` has the shape of an artifact hash (what every `<kind>/<hash>` folder is named).
pub fn is_hash_name(name: &str) -> bool {
    name.len() == HASH_HEX_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// What a directory entry is, read without following links.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum EntryType {
    File,
    Dir,
    Symlink,
    /// A FIFO, socket or device: never read.
    Other,
}

impl From<std::fs::FileType> for EntryType {
    /// From a type read without following links (`symlink_metadata`, `DirEntry::file_type`).
    fn from(ft: std::fs::FileType) -> EntryType {
        if ft.is_symlink() {
            EntryType::Symlink
        } else if ft.is_dir() {
            EntryType::Dir
        } else if ft.is_file() {
            EntryType::File
        } else {
            EntryType::Other
        }
    }
}

pub fn entry_type(path: &Path) -> Option<EntryType> {
    Some(std::fs::symlink_metadata(path).ok()?.file_type().into())
}

/// Every entry below `dir` (relative, `/`-separated, sorted) with its type; links and special
/// files are listed, never entered or read.
pub fn list_tree(dir: &Path) -> Result<Vec<(String, EntryType)>> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, EntryType)>) -> Result<()> {
        for e in
            std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))?
        {
            let e = e?;
            let p = e.path();
            let t = EntryType::from(e.file_type()?);
            if t == EntryType::Dir {
                walk(root, &p, out)?;
                continue;
            }
            let rel = p
                .strip_prefix(root)
                .expect("under root")
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            out.push((rel, t));
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
}

/// A file's hash, computed while it was written, and the (size, mtime in ns) it had then.
struct WrittenHash {
    size: u64,
    mtime_ns: i128,
    blake3: String,
}

/// Hashes of files computed as they were written ([`record_written`]), by canonical path: what
/// [`describe_files`] takes instead of reading a file that a stage has just written (a model's
/// weights: hundreds of megabytes). Process-local; each entry is used at most once.
static WRITTEN: Mutex<Option<HashMap<PathBuf, WrittenHash>>> = Mutex::new(None);

/// At most this many entries are kept (a writer whose files are never described, e.g. an
/// export outside the store, must not make the map grow without end).
const WRITTEN_MAX: usize = 4096;

/// (size, mtime in ns) of a regular file, read without following links.
fn size_mtime(path: &Path) -> Option<(u64, i128)> {
    let m = std::fs::symlink_metadata(path).ok()?;
    if !m.file_type().is_file() {
        return None;
    }
    let mtime = m
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_nanos() as i128;
    Some((m.len(), mtime))
}

/// Records that `path`, just written and closed, holds `size` bytes whose blake3 is `blake3`
/// (computed over the bytes as they were written). [`describe_files`] uses it instead of
/// re-reading the file as long as the file still has that size and the mtime it has now, the
/// rule the store's own integrity check ([`Store::check`]) and the external-file hash cache go
/// by. Nothing is recorded when the file's size already differs.
pub fn record_written(path: &Path, size: u64, blake3: String) {
    let (Some((now_size, mtime_ns)), Ok(key)) = (size_mtime(path), std::fs::canonicalize(path))
    else {
        return;
    };
    if now_size != size {
        return;
    }
    let mut map = WRITTEN.lock().unwrap_or_else(|e| e.into_inner());
    let map = map.get_or_insert_with(HashMap::new);
    if map.len() >= WRITTEN_MAX {
        map.clear();
    }
    map.insert(
        key,
        WrittenHash {
            size,
            mtime_ns,
            blake3,
        },
    );
}

/// The blake3 of `path` recorded by [`record_written`], if the file is unchanged since (same
/// size and mtime); the entry is dropped either way.
fn written_hash(path: &Path) -> Option<String> {
    let key = std::fs::canonicalize(path).ok()?;
    let entry = WRITTEN
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_mut()?
        .remove(&key)?;
    (size_mtime(path)? == (entry.size, entry.mtime_ns)).then_some(entry.blake3)
}

/// blake3 of a file's bytes, hex: the same digest as [`hash_file`], computed on all threads for a
/// large file. BLAKE3 is a tree: the file is split as the tree splits (the left subtree the
/// largest power-of-two number of chunks), the subtrees are hashed in parallel, each read with
/// its own handle, and their chaining values merged.
pub fn hash_file_parallel(path: &Path) -> Result<String> {
    hash_file_split(path, 32 << 20)
}

/// [`hash_file_parallel`] with subtrees of at most `leaf` bytes hashed whole (smaller in tests).
fn hash_file_split(path: &Path, leaf: u64) -> Result<String> {
    use blake3::hazmat::{Mode, left_subtree_len, merge_subtrees_root};
    let len = std::fs::symlink_metadata(path)
        .with_context(|| format!("{}: cannot stat", path.display()))?
        .len();
    if len <= leaf || rayon::current_num_threads() < 2 {
        return hash_file(path);
    }
    let left = left_subtree_len(len);
    let (a, b) = rayon::join(
        || subtree_cv(path, 0, left, leaf),
        || subtree_cv(path, left, len - left, leaf),
    );
    let digest = merge_subtrees_root(&a?, &b?, Mode::Hash);
    // A file that changed size meanwhile is hashed again, whole, as it now is.
    if std::fs::symlink_metadata(path).map(|m| m.len()).ok() != Some(len) {
        return hash_file(path);
    }
    Ok(digest.to_hex().to_string())
}

/// The chaining value of the subtree of `path` that starts at `offset` (a multiple of its size's
/// power of two, as the tree places it) and holds `len` bytes.
fn subtree_cv(
    path: &Path,
    offset: u64,
    len: u64,
    leaf: u64,
) -> Result<blake3::hazmat::ChainingValue> {
    use blake3::hazmat::{HasherExt, Mode, left_subtree_len, merge_subtrees_non_root};
    use std::io::{Read, Seek, SeekFrom};
    if len > leaf {
        let left = left_subtree_len(len);
        let (a, b) = rayon::join(
            || subtree_cv(path, offset, left, leaf),
            || subtree_cv(path, offset + left, len - left, leaf),
        );
        return Ok(merge_subtrees_non_root(&a?, &b?, Mode::Hash));
    }
    let mut f = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    f.seek(SeekFrom::Start(offset))
        .with_context(|| format!("{}: read failed", path.display()))?;
    let mut hasher = blake3::Hasher::new();
    hasher.set_input_offset(offset);
    let mut buf = vec![0u8; (1 << 20).min(len as usize)];
    let mut left = len;
    while left > 0 {
        let n = (buf.len() as u64).min(left) as usize;
        f.read_exact(&mut buf[..n])
            .with_context(|| format!("{}: read failed", path.display()))?;
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(hasher.finalize_non_root())
}

/// Lists the files under `dir` (relative, `/`-separated, sorted), with blake3 and size. A stage
/// output holding a link or special file is refused: the store never follows links. A file
/// hashed as it was written ([`record_written`]) and unchanged since is not read again.
pub fn describe_files(dir: &Path) -> Result<Vec<FileEntry>> {
    let mut out = Vec::new();
    for (rel, t) in list_tree(dir)? {
        if rel == MANIFEST {
            continue;
        }
        let p = dir.join(&rel);
        if t != EntryType::File {
            anyhow::bail!(
                "{}: not a regular file; an artifact holds only regular files",
                p.display()
            );
        }
        let blake3 = match written_hash(&p) {
            Some(h) => h,
            None => hash_file_parallel(&p)?,
        };
        out.push(FileEntry {
            blake3,
            size: std::fs::symlink_metadata(&p)?.len(),
            path: rel,
        });
    }
    Ok(out)
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
        entry_type(&self.artifact_dir(kind, hash).join(MANIFEST)) == Some(EntryType::File)
    }

    pub fn is_marked(&self) -> bool {
        entry_type(&self.root.join(MARKER)) == Some(EntryType::File)
    }

    /// Makes the cache folder ready for writing: refuses a path that is a file, creates the
    /// folder and writes the marker that makes it recognisable as a sepo cache.
    pub fn prepare(&self) -> Result<()> {
        if self.root.exists() && !self.root.is_dir() {
            return Err(user(format!(
                "{}: the cache must be a folder, but this is a file",
                self.root.display()
            )));
        }
        std::fs::create_dir_all(&self.root)
            .with_context(|| format!("{}: cannot create the cache", self.root.display()))?;
        if !self.is_marked() {
            write_atomic(
                &self.root.join(MARKER),
                b"This folder is a sepo artifact cache. `sepo gc` deletes only in folders marked so.\n",
            )?;
        }
        Ok(())
    }

    /// An artifact's manifest, checked against the folder it lives in.
    pub fn manifest(&self, kind: &str, hash: &str) -> Result<Manifest> {
        let p = self.artifact_dir(kind, hash).join(MANIFEST);
        if entry_type(&p) != Some(EntryType::File) {
            return Err(user(format!(
                "{}: missing or not a regular file",
                p.display()
            )));
        }
        let bytes = std::fs::read(&p).with_context(|| format!("{}: cannot read", p.display()))?;
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| {
            user(format!(
                "{}: damaged manifest ({e}); the cache was changed outside sepo",
                p.display()
            ))
        })?;
        if m.kind != kind || m.hash != hash {
            return Err(user(format!(
                "{}: the manifest says `{}/{}` but lives in `{kind}/{hash}`; the cache was changed outside sepo",
                p.display(),
                m.kind,
                m.hash
            )));
        }
        Ok(m)
    }

    /// Blocks until this process is the only one building `hash`. Returns whether it had to wait.
    pub fn lock(&self, hash: &str) -> Result<(StageLock, bool)> {
        let file = self.lock_file(hash)?;
        let path = self.lock_path(hash);
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
        Ok((
            StageLock {
                file: Some(file),
                path,
            },
            waited,
        ))
    }

    /// The lock on `hash` if no other process holds it now (gc never waits for a build).
    pub fn try_lock(&self, hash: &str) -> Result<Option<StageLock>> {
        let file = self.lock_file(hash)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(StageLock {
                file: Some(file),
                path: self.lock_path(hash),
            })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("{}: lock failed", self.lock_path(hash).display()))
            }
        }
    }

    pub fn lock_path(&self, hash: &str) -> PathBuf {
        self.root.join("tmp").join(format!("{hash}.lock"))
    }

    fn lock_file(&self, hash: &str) -> Result<File> {
        let dir = self.root.join("tmp");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
        let path = self.lock_path(hash);
        File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("{}: cannot open lock", path.display()))
    }

    /// Moves a completed output folder into place. `out` must already hold `manifest.json`.
    /// If an artifact exists (a forced rebuild), it is swapped out first and then deleted.
    pub fn commit(&self, out: &Path, kind: &str, hash: &str) -> Result<PathBuf> {
        let dest = self.artifact_dir(kind, hash);
        let parent = dest.parent().expect("has parent");
        std::fs::create_dir_all(parent)
            .with_context(|| format!("{}: cannot create", parent.display()))?;
        sync_tree(out)?;
        if entry_type(&dest).is_some() {
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
        if let Ok(m) = self.manifest(kind, hash) {
            self.record_verified(kind, hash, &m);
        }
        Ok(dest)
    }
}

fn sync_tree(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let p = e.path();
        if e.file_type()?.is_dir() {
            sync_tree(&p)?;
        } else {
            File::open(&p)?.sync_all()?;
        }
    }
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// Everything a manifest records besides the files: what built the artifact and from what.
pub struct BuildSpec {
    /// The stage's name, or `(kind)` for a derived artifact.
    pub stage: String,
    pub kind: String,
    pub hash: String,
    pub params: Value,
    pub inputs: Value,
    pub external_files: Vec<FileEntry>,
    /// Rebuild even when an intact artifact exists (a forced stage), unless another process
    /// built it while this one waited for the lock.
    pub force: bool,
}

/// What [`Store::build`] did.
pub struct Built {
    pub dir: PathBuf,
    /// Whether an intact artifact was found (built before, or by another process meanwhile).
    pub found: bool,
    pub secs: f64,
}

impl Store {
    /// Whether the artifact exists, its manifest agrees with its folder, and its files pass the
    /// cheap integrity check.
    pub fn is_intact(&self, kind: &str, hash: &str) -> bool {
        self.is_fresh(kind, hash)
            && self
                .manifest(kind, hash)
                .and_then(|m| self.check(kind, hash, &m))
                .is_ok_and(|p| p.is_empty())
    }

    /// The one way an artifact comes to exist, for stages and derived artifacts alike: under the
    /// hash's lock, `body` writes the files into an empty `out` folder (with `work` beside it for
    /// what a rerun may resume from), then the manifest is written last and the folder committed
    /// by one rename. On failure nothing is committed and only a resumable work folder remains.
    pub fn build(
        &self,
        spec: BuildSpec,
        body: impl FnOnce(&Path, &Path) -> Result<Value>,
    ) -> Result<Built> {
        let t0 = std::time::Instant::now();
        let (kind, hash) = (spec.kind.as_str(), spec.hash.as_str());
        let dest = self.artifact_dir(kind, hash);
        let (lock, waited) = self.lock(hash)?;
        if self.is_intact(kind, hash) && (!spec.force || waited) {
            return Ok(Built {
                dir: dest,
                found: true,
                secs: 0.0,
            });
        }
        let work = self.work_dir(hash);
        let out = work.join("out");
        if entry_type(&out).is_some() {
            std::fs::remove_dir_all(&out)
                .with_context(|| format!("{}: cannot clear", out.display()))?;
        }
        std::fs::create_dir_all(&out)
            .with_context(|| format!("{}: cannot create", out.display()))?;
        let created = rfc3339_utc(std::time::SystemTime::now());
        let result = body(&out, &work).and_then(|stats| {
            let manifest = Manifest {
                stage: spec.stage.clone(),
                kind: kind.to_string(),
                hash: hash.to_string(),
                params: spec.params,
                inputs: spec.inputs,
                external_files: spec.external_files,
                files: describe_files(&out)?,
                stats,
                sepo_version: env!("CARGO_PKG_VERSION").to_string(),
                created,
                wall_time_s: t0.elapsed().as_secs_f64(),
            };
            write_atomic(&out.join(MANIFEST), &serde_json::to_vec_pretty(&manifest)?)?;
            crate::testhook::abort_at("abort-before-commit", &spec.stage);
            self.commit(&out, kind, hash)
        });
        match result {
            Ok(dir) => {
                let _ = std::fs::remove_dir_all(&work);
                drop(lock);
                Ok(Built {
                    dir,
                    found: false,
                    secs: t0.elapsed().as_secs_f64(),
                })
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&out);
                // Keep the work folder only when it holds something worth resuming (a checkpoint).
                if std::fs::read_dir(&work).is_ok_and(|mut d| d.next().is_none()) {
                    let _ = std::fs::remove_dir(&work);
                }
                drop(lock);
                let tmp = self.root.join("tmp");
                if std::fs::read_dir(&tmp).is_ok_and(|mut d| d.next().is_none()) {
                    let _ = std::fs::remove_dir(&tmp);
                }
                Err(e)
            }
        }
    }

    /// Builds (once) an artifact that stages derive and share rather than declare — reference
    /// log-probs, for instance. `inputs` names what it was derived from; `build` writes its files
    /// into the folder given. A damaged one is rebuilt: it is only a cache of a computation.
    pub fn derived(
        &self,
        kind: &str,
        hash: &str,
        inputs: Value,
        build: impl FnOnce(&Path) -> Result<Value>,
    ) -> Result<PathBuf> {
        let dest = self.artifact_dir(kind, hash);
        if self.is_intact(kind, hash) {
            return Ok(dest);
        }
        let spec = BuildSpec {
            stage: format!("({kind})"),
            kind: kind.to_string(),
            hash: hash.to_string(),
            params: Value::Null,
            inputs,
            external_files: Vec::new(),
            force: false,
        };
        Ok(self.build(spec, |out, _work| build(out))?.dir)
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
    fn the_tree_split_hash_is_blake3() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        // Sizes around chunk (1 KiB) and leaf boundaries; leaves of 4 KiB force deep splits.
        for len in [
            0usize, 1, 1023, 1024, 1025, 4096, 4097, 10_000, 65_536, 100_003,
        ] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            std::fs::write(&p, &bytes).unwrap();
            let want = blake3::hash(&bytes).to_hex().to_string();
            assert_eq!(hash_file_split(&p, 4096).unwrap(), want, "{len} bytes");
            assert_eq!(hash_file_parallel(&p).unwrap(), want, "{len} bytes");
        }
    }

    #[test]
    fn a_hash_recorded_while_writing_is_used_once_and_only_for_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.bin");
        std::fs::write(&p, b"written").unwrap();
        let real = hash_file(&p).unwrap();
        // A recorded hash stands in for reading the file (a wrong one shows it was used) ...
        record_written(&p, 7, "recorded".into());
        assert_eq!(describe_files(dir.path()).unwrap()[0].blake3, "recorded");
        // ... once.
        assert_eq!(describe_files(dir.path()).unwrap()[0].blake3, real);
        // Not when the size recorded is not the file's.
        record_written(&p, 8, "recorded".into());
        assert_eq!(describe_files(dir.path()).unwrap()[0].blake3, real);
        // Not when the file changed after it was recorded.
        record_written(&p, 7, "recorded".into());
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&p, b"changed!").unwrap();
        assert_eq!(
            describe_files(dir.path()).unwrap()[0].blake3,
            hash_file(&p).unwrap()
        );
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
