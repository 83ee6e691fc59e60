//! Integrity of stored artifacts: a cheap check before an artifact is read (sizes always,
//! content only when a file's size or mtime changed since it was last seen intact) and the full
//! re-hash of `sepo verify` (blake3 on all threads, [`hash_file_parallel`]). Links and special
//! files are reported, never followed or read.

use std::path::{Path, PathBuf};

use anyhow::Result;

use super::store::{
    EntryType, MANIFEST, Manifest, Store, entry_type, hash_file_parallel, list_tree, write_atomic,
};

/// (size, mtime in ns) of a regular file, read without following links.
fn stat(path: &Path) -> Option<(u64, i128)> {
    let m = std::fs::symlink_metadata(path).ok()?;
    if !m.file_type().is_file() {
        return None;
    }
    let mtime = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as i128)?;
    Some((m.len(), mtime))
}

/// When each file of one artifact was last seen to match its manifest: (size, mtime) per path.
/// A file whose size and mtime are unchanged since is not re-hashed before it is read again.
type Verified = std::collections::BTreeMap<String, (u64, i128)>;

impl Store {
    fn verified_path(&self, kind: &str, hash: &str) -> PathBuf {
        self.root
            .join(".state")
            .join("verified")
            .join(format!("{kind}.{hash}.json"))
    }

    /// Records that every file of a just-committed (or just-verified) artifact matches its
    /// manifest, so reading it later costs a `stat` per file, not a re-hash.
    pub(super) fn record_verified(&self, kind: &str, hash: &str, m: &Manifest) {
        let dir = self.artifact_dir(kind, hash);
        let v: Verified = m
            .files
            .iter()
            .filter_map(|f| stat(&dir.join(&f.path)).map(|s| (f.path.clone(), s)))
            .collect();
        let p = self.verified_path(kind, hash);
        if let Some(parent) = p.parent()
            && std::fs::create_dir_all(parent).is_ok()
        {
            // Only a speed-up: a failure costs a re-hash next time.
            let _ = write_atomic(&p, &serde_json::to_vec(&v).unwrap_or_default());
        }
    }

    /// Cheap integrity check before an artifact is read: every manifest file must be a regular
    /// file of the recorded size, and is re-hashed only when its size or mtime changed since it
    /// was last seen intact. Returns the problems found (empty: intact).
    pub fn check(&self, kind: &str, hash: &str, m: &Manifest) -> Result<Vec<String>> {
        let dir = self.artifact_dir(kind, hash);
        let vpath = self.verified_path(kind, hash);
        let verified: Verified = std::fs::read(&vpath)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let mut problems = Vec::new();
        let mut rehashed = false;
        for f in &m.files {
            let p = dir.join(&f.path);
            match entry_type(&p) {
                None => problems.push(format!("{}: missing", p.display())),
                Some(EntryType::File) => {
                    let Some((size, mtime)) = stat(&p) else {
                        problems.push(format!("{}: cannot stat", p.display()));
                        continue;
                    };
                    if size != f.size {
                        problems.push(format!(
                            "{}: size {size} (manifest says {})",
                            p.display(),
                            f.size
                        ));
                    } else if verified.get(&f.path) != Some(&(size, mtime)) {
                        rehashed = true;
                        if hash_file_parallel(&p)? != f.blake3 {
                            problems.push(format!("{}: content changed", p.display()));
                        }
                    }
                }
                Some(EntryType::Symlink) => problems.push(format!(
                    "{}: a symbolic link (sepo never follows links in its cache)",
                    p.display()
                )),
                Some(_) => problems.push(format!("{}: not a regular file", p.display())),
            }
        }
        if problems.is_empty() && rehashed {
            self.record_verified(kind, hash, m);
        }
        Ok(problems)
    }

    /// The intact artifact of `hash`, whatever its kind (the folder `<kind>/<hash>/` that holds
    /// it): what a stage reads behind its direct inputs ([`super::stage::RunContext::upstream`]).
    /// Missing or damaged is an error naming the files and the fix.
    pub fn upstream_artifact(&self, hash: &str) -> Result<super::stage::Artifact> {
        let kind = std::fs::read_dir(&self.root)
            .ok()
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .find(|k| {
                !k.starts_with('.')
                    && k != "tmp"
                    && entry_type(&self.artifact_dir(k, hash).join(MANIFEST))
                        == Some(EntryType::File)
            });
        let Some(kind) = kind else {
            return Err(crate::error::user(format!(
                "artifact {hash} is not in the cache {} (deleted by `sepo gc`?): rerun the pipeline",
                self.root.display()
            )));
        };
        let manifest = self.manifest(&kind, hash)?;
        let problems = self.check(&kind, hash, &manifest)?;
        if !problems.is_empty() {
            return Err(crate::error::user(format!(
                "artifact `{}` ({kind}) is damaged: {}; rebuild it with `sepo run P.yaml --from {}`",
                manifest.stage,
                problems.join("; "),
                manifest.stage
            )));
        }
        Ok(super::stage::Artifact {
            stage: manifest.stage.clone(),
            kind: kind.clone(),
            hash: hash.to_string(),
            dir: self.artifact_dir(&kind, hash),
            manifest,
        })
    }

    /// Everything `sepo verify` reports about one artifact: a full re-hash of every file, files
    /// the manifest does not list, links and special files (listed, never followed).
    pub fn verify(&self, kind: &str, hash: &str) -> Result<Vec<String>> {
        let dir = self.artifact_dir(kind, hash);
        let m = match self.manifest(kind, hash) {
            Ok(m) => m,
            Err(e) => return Ok(vec![crate::error::render(&e)]),
        };
        let mut problems = Vec::new();
        for f in &m.files {
            let p = dir.join(&f.path);
            match entry_type(&p) {
                None => problems.push(format!("{}: missing", p.display())),
                Some(EntryType::File) => {
                    let size = std::fs::symlink_metadata(&p)?.len();
                    if size != f.size {
                        problems.push(format!(
                            "{}: size {size} (manifest says {})",
                            p.display(),
                            f.size
                        ));
                    } else if hash_file_parallel(&p)? != f.blake3 {
                        problems.push(format!("{}: content changed", p.display()));
                    }
                }
                Some(EntryType::Symlink) => {
                    problems.push(format!("{}: a symbolic link, not followed", p.display()))
                }
                Some(_) => problems.push(format!("{}: not a regular file", p.display())),
            }
        }
        for (rel, t) in list_tree(&dir)? {
            if rel == MANIFEST || m.files.iter().any(|f| f.path == rel) {
                continue;
            }
            let what = match t {
                EntryType::Symlink => "a symbolic link not in the manifest, not followed",
                _ => "not in the manifest",
            };
            problems.push(format!("{}: {what}", dir.join(&rel).display()));
        }
        if problems.is_empty() {
            self.record_verified(kind, hash, &m);
        }
        Ok(problems)
    }
}
