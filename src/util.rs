//! Small helpers shared by the engine, the stages and the CLI.

/// " (did you mean `x`?)" when a close candidate exists: the one with the smallest edit
/// (Levenshtein) distance, within 2 or a third of its length; ties go to the first in sort order.
pub fn suggest(word: &str, candidates: &[&str]) -> String {
    let len = word.chars().count();
    candidates
        .iter()
        // The distance is at least the difference in length: skipping hopeless candidates
        // keeps a huge word (a megabyte `--stage` value) from costing len x len per candidate.
        .filter(|c| len.abs_diff(c.chars().count()) <= 2.max(c.len() / 3))
        .map(|c| (strsim::levenshtein(word, c), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min()
        .map(|(_, c)| format!(" (did you mean `{c}`?)"))
        .unwrap_or_default()
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, synced, then
/// renamed over `path` (tempfile's `persist`), so a reader sees the old bytes or the new, never
/// half. The one way sepo writes a file that something else may read concurrently or after a
/// crash: manifests, the file-hash and integrity state, optimizer state, checkpoints.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    let mut f = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("{}: cannot create a temporary file", dir.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.as_file().sync_all())
        .with_context(|| format!("{}: cannot write", path.display()))?;
    f.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(())
}

/// A time as RFC 3339 UTC to the second (`2026-11-27T12:15:30Z`), as manifests record it.
pub fn rfc3339_utc(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_the_closest_candidate_within_reach() {
        let kinds = ["ingest", "tokenizer", "tokenize", "model", "train"];
        assert_eq!(suggest("tokenzie", &kinds), " (did you mean `tokenize`?)");
        assert_eq!(suggest("trian", &kinds), " (did you mean `train`?)");
        assert_eq!(suggest("evaluate", &kinds), "");
        // Characters, not bytes: one substituted multi-byte letter is one edit.
        assert_eq!(suggest("modél", &kinds), " (did you mean `model`?)");
        assert_eq!(suggest(&"x".repeat(1 << 20), &kinds), "");
    }
}
