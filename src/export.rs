//! `sepo export`: a model stage's `model/` folder copied out as the user's own Hugging Face
//! model folder.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::pipeline::executor::Plan;
use crate::user_bail;

/// Copies the model of `stage` into `out` (absent or empty, outside the cache); returns the names
/// of the files copied, sorted.
pub fn export(plan: &Plan, stage: &str, out: &Path) -> Result<Vec<String>> {
    let dir = crate::inspect::model_dir(plan, stage)?;
    // The cache is sepo's: `gc` deletes what no stage points to, and a folder there could shadow
    // an artifact. An export is the user's copy, so it goes elsewhere.
    if real_path(out).starts_with(real_path(&plan.store.root)) {
        user_bail!(
            "{}: is inside the cache {}; export to a folder outside it",
            out.display(),
            plan.store.root.display()
        );
    }
    if out.exists()
        && std::fs::read_dir(out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        user_bail!(
            "{}: exists and is not empty; sepo never overwrites your files",
            out.display()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let mut names = Vec::new();
    for e in std::fs::read_dir(&dir)? {
        let e = e?;
        std::fs::copy(e.path(), out.join(e.file_name()))?;
        names.push(e.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// `p` as an absolute path with symbolic links resolved as far as it exists, so that two
/// spellings of one folder compare equal (also how `sepo show --html` keeps its page out of the
/// cache).
pub fn real_path(p: &Path) -> PathBuf {
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
