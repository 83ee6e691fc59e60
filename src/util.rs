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
