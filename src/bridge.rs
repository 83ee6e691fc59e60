//! Carries per-token key masks, scores and weights of one response from one tokenizer (the
//! source, an oracle's) to another (the destination, a policy's). Token boundaries differ, but
//! both tokenizations cover the same response text, so every value goes through the text's
//! bytes: [`response_spans`] says which bytes each stored token stands for, and
//! [`carry_mask`], [`carry_scores`] and [`carry_weights`] move values from source spans to
//! destination spans. Each is linear in text length plus token count (difference arrays and
//! prefix sums over bytes, no per-token rescans), computed in f64.
//!
//! Tokens may share bytes: byte-level BPE (GPT-2, GPT-NeoX) and byte-fallback (Llama-2) split a
//! multi-byte character over several tokens that all report the whole character as their span.
//! Such tokens are carried as one group: a mask can only say whether the group's bytes are key,
//! and scores and weights are shared out evenly among the tokens covering a byte.

use anyhow::{Result, anyhow};
use tokenizers::Tokenizer;

use crate::user_bail;

/// A token's byte range `[start, end)` in the response text; `None` for the end-of-sequence
/// token that the `tokenize` stage appends (it stands for no characters).
pub type Span = Option<(usize, usize)>;

/// What a Metaspace/`Prepend` tokenizer (Llama-2) writes before the text.
const PREPENDED_MARKER: &str = "\u{2581}";

/// The span of every token in `ids`, a stored response: `ids` must be a prefix of
/// `tok.encode(text, false)`'s ids followed by `eos_id` (the `tokenize` stage appends the end
/// token, then may cut the response short from the end), else a user error names the first
/// position where they differ and both ids. The end token gets `None`.
///
/// Spans are the encoding's byte offsets (`Tokenizer::encode` reports bytes, not characters),
/// tidied so that they cover the text without gaps:
/// - offsets past the text or ending before they start are clamped (`end <= text.len()`,
///   `start <= end`; never seen with the three tokenizers tested);
/// - a first token that is exactly Llama's prepended `▁` and shares its start with the next
///   token stands for no text (the tokenizer gives it the first character's span): it gets the
///   empty span `(0, 0)`;
/// - bytes no token claims (GPT-NeoX's `trim_offsets` drops the leading space of `Ġword` and
///   shrinks all-space tokens to empty spans) go to the token after them, and bytes after the
///   last token of the whole encoding to that last token.
///
/// After tidying, spans start in non-decreasing order, lie inside the text, and cover it all
/// (when the whole encoding is stored); tokens of one split character keep sharing its span.
pub fn response_spans(tok: &Tokenizer, text: &str, ids: &[u32], eos_id: u32) -> Result<Vec<Span>> {
    let enc = tok
        .encode(text, false)
        .map_err(|e| anyhow!("encoding a response: {e}"))?;
    let full = enc.get_ids();
    for (i, &id) in ids.iter().enumerate() {
        let expected = if i < full.len() {
            full[i]
        } else if i == full.len() {
            eos_id
        } else {
            user_bail!(
                "response token {i} is id {id}, but this tokenizer makes {} tokens of the text \
                 plus end token {eos_id} (the ids do not belong to this text and tokenizer)",
                full.len()
            );
        };
        if id != expected {
            user_bail!(
                "response token {i} is id {id}, but this tokenizer makes id {expected} of the \
                 text there (the ids do not belong to this text and tokenizer)"
            );
        }
    }
    let marker_first = enc.get_tokens().first().map(String::as_str) == Some(PREPENDED_MARKER);
    let offsets = tidy(enc.get_offsets(), text.len(), marker_first);
    Ok((0..ids.len()).map(|i| offsets.get(i).copied()).collect())
}

/// [`response_spans`]'s clean-up of a whole encoding's offsets over a text of `len` bytes;
/// `marker_first`: the first token is the prepended `▁`.
fn tidy(offsets: &[(usize, usize)], len: usize, marker_first: bool) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = offsets
        .iter()
        .map(|&(s, e)| {
            let e = e.min(len);
            (s.min(e), e)
        })
        .collect();
    if marker_first && out.len() >= 2 && out[0].0 == out[1].0 {
        out[0] = (0, 0);
    }
    let mut claimed = 0; // every byte before this belongs to some token
    for span in &mut out {
        span.0 = span.0.min(claimed);
        claimed = claimed.max(span.1);
    }
    if let Some(last) = out.last_mut()
        && claimed < len
    {
        last.1 = len;
    }
    out
}

/// Carries a key mask: K is the union of the byte ranges of the source's key tokens (a byte
/// covered twice counts once). A destination token with a span of length L > 0 is key when at
/// least `min_share * L` of its bytes are in K (compared in f64 with a 1e-12 relative slack, so
/// that a share such as 0.7 of 10 bytes is met by exactly 7); a token with an empty span is
/// never key; the destination's end token (`None`) is key exactly when the source has an end
/// token that is key. With `min_share` 1 a token is key only when K covers it whole; with a
/// tiny one, when it touches K at all.
///
/// Panics when `mask` and `src` differ in length or `min_share` is outside (0, 1] (the caller
/// validates the parameter).
pub fn carry_mask(src: &[Span], mask: &[bool], dst: &[Span], min_share: f64) -> Vec<bool> {
    assert_eq!(src.len(), mask.len(), "one mask value per source token");
    assert!(
        min_share > 0.0 && min_share <= 1.0,
        "min_share {min_share} is not in (0, 1]"
    );
    let n = text_end(src, dst);
    let mut depth = vec![0i64; n + 1];
    let mut eos_key = false;
    for (span, _) in src.iter().zip(mask).filter(|(_, key)| **key) {
        match bounds(*span) {
            None => eos_key = true,
            Some((s, e)) => {
                depth[s] += 1;
                depth[e] -= 1;
            }
        }
    }
    // key_before[b]: how many of the bytes before b are in K.
    let mut key_before = vec![0usize; n + 1];
    let mut d = 0;
    for b in 0..n {
        d += depth[b];
        key_before[b + 1] = key_before[b] + usize::from(d > 0);
    }
    dst.iter()
        .map(|span| match bounds(*span) {
            None => eos_key,
            Some((s, e)) => {
                let len = (e - s) as f64;
                e > s && (key_before[e] - key_before[s]) as f64 >= min_share * len * (1.0 - 1e-12)
            }
        })
        .collect()
}

/// Carries scores (a mass, such as a token's share of a reward): each source token's score is
/// spread evenly over the bytes of its span, a byte's mass is split evenly among the
/// destination tokens covering it, and each destination token gets the sum over its bytes. The
/// total is kept over the bytes the destination covers; mass on bytes it does not cover (a
/// destination cut short) is dropped.
/// - Source tokens sharing bytes (one split character) all put their score there, and the
///   destination tokens sharing those bytes split the sum evenly: a group's total is kept, but
///   carrying such a group to itself gives each token the group's mean.
/// - A source token with an empty span puts its whole score on the byte at its start, i.e.
///   on the destination token(s) containing that position; with none (the position is the end
///   of the text or not covered) the score is dropped.
/// - The source's end-token score (`None`) goes to the destination's end token (the first
///   `None`); it is dropped when the destination has none, and a destination end token gets 0
///   when the source has none. Destination tokens with empty spans get 0.
///
/// Panics when `scores` and `src` differ in length.
pub fn carry_scores(src: &[Span], scores: &[f32], dst: &[Span]) -> Vec<f32> {
    assert_eq!(src.len(), scores.len(), "one score per source token");
    let n = text_end(src, dst);
    let mut density = vec![0f64; n + 1]; // a difference array, then mass per byte
    let mut eos = 0f64;
    for (span, &x) in src.iter().zip(scores) {
        match bounds(*span) {
            None => eos += f64::from(x),
            Some((s, e)) if e > s => {
                let per_byte = f64::from(x) / (e - s) as f64;
                density[s] += per_byte;
                density[e] -= per_byte;
            }
            Some(_) => {}
        }
    }
    let mut mass = vec![0f64; n];
    let mut acc = 0.0;
    for b in 0..n {
        acc += density[b];
        mass[b] = acc;
    }
    for (span, &x) in src.iter().zip(scores) {
        if let Some((s, e)) = bounds(*span)
            && s == e
            && s < n
        {
            mass[s] += f64::from(x);
        }
    }
    let cover = coverage(dst, n);
    let per_token: Vec<f64> = mass
        .iter()
        .zip(&cover)
        .map(|(&m, &c)| if c > 0 { m / c as f64 } else { 0.0 })
        .collect();
    let before = prefix_sums(&per_token);
    let mut eos = Some(eos);
    dst.iter()
        .map(|span| match bounds(*span) {
            None => eos.take().unwrap_or(0.0) as f32,
            Some((s, e)) => (before[e] - before[s]) as f32,
        })
        .collect()
}

/// Carries weights (a level, such as a per-token loss weight): a destination token gets the
/// mean, over its bytes, of the source weight at each byte, where a byte's weight is the mean
/// weight of the source tokens covering it (so source tokens sharing bytes are averaged, not
/// added) and 0 when no source token covers it. This is the byte-overlap-weighted mean of the
/// source weights when source spans do not overlap. Source tokens with empty spans count for
/// nothing; destination tokens with empty spans get 0; the destination's end token gets the
/// source's end-token weight (the mean if several), 0 when the source has none.
///
/// Panics when `weights` and `src` differ in length.
pub fn carry_weights(src: &[Span], weights: &[f32], dst: &[Span]) -> Vec<f32> {
    assert_eq!(src.len(), weights.len(), "one weight per source token");
    let n = text_end(src, dst);
    let mut sum = vec![0f64; n + 1]; // difference arrays of the weight sum and count per byte
    let mut count = vec![0i64; n + 1];
    let (mut eos_sum, mut eos_n) = (0f64, 0usize);
    for (span, &w) in src.iter().zip(weights) {
        match bounds(*span) {
            None => {
                eos_sum += f64::from(w);
                eos_n += 1;
            }
            Some((s, e)) if e > s => {
                sum[s] += f64::from(w);
                sum[e] -= f64::from(w);
                count[s] += 1;
                count[e] -= 1;
            }
            Some(_) => {}
        }
    }
    let (mut acc, mut c) = (0f64, 0i64);
    let per_byte: Vec<f64> = (0..n)
        .map(|b| {
            acc += sum[b];
            c += count[b];
            if c > 0 { acc / c as f64 } else { 0.0 }
        })
        .collect();
    let before = prefix_sums(&per_byte);
    let eos = if eos_n > 0 {
        eos_sum / eos_n as f64
    } else {
        0.0
    };
    dst.iter()
        .map(|span| match bounds(*span) {
            None => eos as f32,
            Some((s, e)) if e > s => ((before[e] - before[s]) / (e - s) as f64) as f32,
            Some(_) => 0.0,
        })
        .collect()
}

/// A span with `start <= end` (a reversed one is read as empty at its start).
fn bounds(span: Span) -> Option<(usize, usize)> {
    span.map(|(s, e)| (s, e.max(s)))
}

/// The bytes the two tokenizations talk about: up to the furthest span end.
fn text_end(a: &[Span], b: &[Span]) -> usize {
    a.iter()
        .chain(b)
        .filter_map(|s| bounds(*s).map(|(_, e)| e))
        .max()
        .unwrap_or(0)
}

/// How many of the non-empty spans in `spans` cover each of the first `n` bytes.
fn coverage(spans: &[Span], n: usize) -> Vec<u32> {
    let mut diff = vec![0i64; n + 1];
    for (s, e) in spans.iter().filter_map(|s| bounds(*s)) {
        diff[s] += 1;
        diff[e] -= 1;
    }
    let mut d = 0;
    diff[..n]
        .iter()
        .map(|x| {
            d += x;
            d as u32
        })
        .collect()
}

/// `out[i]` = the sum of `v[..i]`.
fn prefix_sums(v: &[f64]) -> Vec<f64> {
    let mut out = Vec::with_capacity(v.len() + 1);
    let mut acc = 0.0;
    out.push(acc);
    for x in v {
        acc += x;
        out.push(acc);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use proptest::prelude::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};
    use serde_json::Value;

    use super::*;
    use crate::error::is_user_error;

    fn sp(v: &[(usize, usize)]) -> Vec<Span> {
        v.iter().map(|&x| Some(x)).collect()
    }

    // ---- the rules on hand-made spans ----

    #[test]
    fn mask_needs_min_share_of_a_token_in_k() {
        // K = [0, 4) from the first source token; [4, 10) is not key.
        let src = sp(&[(0, 4), (4, 10)]);
        let mask = [true, false];
        // [2, 6): 2 of 4 bytes in K; [0, 3): all of them; [3, 7): 1 of 4; [6, 10): none.
        let dst = sp(&[(2, 6), (0, 3), (3, 7), (6, 10)]);
        assert_eq!(
            carry_mask(&src, &mask, &dst, 0.5),
            [true, true, false, false]
        );
        assert_eq!(
            carry_mask(&src, &mask, &dst, 0.51),
            [false, true, false, false]
        );
        assert_eq!(
            carry_mask(&src, &mask, &dst, 0.25),
            [true, true, true, false]
        );
        assert_eq!(
            carry_mask(&src, &mask, &dst, 1.0),
            [false, true, false, false]
        );
        assert_eq!(
            carry_mask(&src, &mask, &dst, 1e-9),
            [true, true, true, false]
        );
        // A share written as a decimal is met by the exact byte count: 7 of 10 at 0.7.
        let src = sp(&[(0, 7), (7, 10)]);
        assert_eq!(
            carry_mask(&src, &[true, false], &sp(&[(0, 10)]), 0.7),
            [true]
        );
        assert_eq!(
            carry_mask(&src, &[true, false], &sp(&[(0, 10)]), 0.71),
            [false]
        );
    }

    #[test]
    fn mask_eos_empty_spans_and_empty_masks() {
        let src = vec![Some((0, 5)), None];
        let dst = vec![Some((0, 2)), Some((2, 2)), Some((2, 5)), None];
        // An empty span inside K is never key; EOS follows the source's EOS.
        assert_eq!(
            carry_mask(&src, &[true, true], &dst, 0.5),
            [true, false, true, true]
        );
        assert_eq!(
            carry_mask(&src, &[true, false], &dst, 0.5),
            [true, false, true, false]
        );
        // A source without EOS: the destination's EOS is not key.
        assert_eq!(
            carry_mask(&src[..1], &[true], &dst, 0.5),
            [true, false, true, false]
        );
        // A key EOS alone makes no byte key.
        assert_eq!(
            carry_mask(&src, &[false, true], &dst, 1e-9),
            [false, false, false, true]
        );
        assert_eq!(carry_mask(&src, &[false, false], &dst, 0.5), [false; 4]);
        assert!(carry_mask(&[], &[], &dst, 0.5).iter().all(|k| !k));
        assert!(carry_mask(&src, &[true, true], &[], 0.5).is_empty());
    }

    #[test]
    fn mask_counts_bytes_covered_twice_once() {
        // GPT-2 splits "é" (bytes 3..5) into two tokens that both report 3..5.
        let src = sp(&[(0, 3), (3, 5), (3, 5), (5, 7)]);
        let mask = [false, true, true, false];
        // K = [3, 5): 2 of the 4 bytes of [3, 7). Counted twice it would be all 4.
        let dst = sp(&[(3, 7)]);
        assert_eq!(carry_mask(&src, &mask, &dst, 0.5), [true]);
        assert_eq!(carry_mask(&src, &mask, &dst, 0.75), [false]);
        assert_eq!(carry_mask(&src, &mask, &dst, 1.0), [false]);
        // One key token of the pair makes the whole character key for both.
        let back = carry_mask(&src, &[false, true, false, false], &src, 1.0);
        assert_eq!(back, [false, true, true, false]);
    }

    #[test]
    #[should_panic(expected = "min_share")]
    fn mask_rejects_a_zero_share() {
        carry_mask(&sp(&[(0, 1)]), &[true], &sp(&[(0, 1)]), 0.0);
    }

    #[test]
    fn scores_are_spread_over_bytes_and_summed() {
        let src = sp(&[(0, 4), (4, 6)]);
        let dst = sp(&[(0, 1), (1, 5), (5, 6)]);
        let got = carry_scores(&src, &[4.0, -2.0], &dst);
        assert_eq!(got, [1.0, 2.0, -1.0]);
        // A destination cut short keeps only the mass of the bytes it covers.
        let got = carry_scores(&src, &[4.0, -2.0], &sp(&[(0, 2)]));
        assert_eq!(got, [2.0]);
        // Bytes covered by no source token carry nothing.
        let got = carry_scores(&sp(&[(2, 4)]), &[2.0], &sp(&[(0, 3), (3, 8)]));
        assert_eq!(got, [1.0, 1.0]);
    }

    #[test]
    fn scores_on_shared_bytes_empty_spans_and_eos() {
        // Two source tokens share bytes 3..5: both deposit there; two destination tokens sharing
        // them split the sum.
        let src = sp(&[(0, 3), (3, 5), (3, 5)]);
        let got = carry_scores(&src, &[3.0, 1.0, 3.0], &sp(&[(0, 3), (3, 5), (3, 5)]));
        assert_eq!(got, [3.0, 2.0, 2.0]);
        let got = carry_scores(&src, &[3.0, 1.0, 3.0], &sp(&[(0, 5)]));
        assert_eq!(got, [7.0]);
        // An empty source span lands on the token containing its start, else is dropped.
        let src = sp(&[(0, 0), (0, 2), (2, 2), (2, 4), (4, 4)]);
        let dst = sp(&[(0, 1), (1, 3), (3, 4)]);
        let got = carry_scores(&src, &[5.0, 2.0, 7.0, 2.0, 9.0], &dst);
        assert_eq!(got, [6.0, 9.0, 1.0]);
        // EOS goes to EOS; lost when the destination has none; 0 when the source has none.
        let src = vec![Some((0, 2)), None];
        assert_eq!(
            carry_scores(&src, &[1.0, 5.0], &[Some((0, 2)), None]),
            [1.0, 5.0]
        );
        assert_eq!(carry_scores(&src, &[1.0, 5.0], &sp(&[(0, 2)])), [1.0]);
        assert_eq!(
            carry_scores(&src[..1], &[1.0], &[Some((0, 1)), Some((1, 1)), None]),
            [0.5, 0.0, 0.0]
        );
        assert!(carry_scores(&[], &[], &[]).is_empty());
    }

    #[test]
    fn weights_are_means_over_bytes() {
        let src = sp(&[(0, 2), (2, 6)]);
        let dst = vec![Some((0, 4)), Some((1, 2)), Some((4, 4)), Some((4, 8)), None];
        // [0, 4): 2 bytes at 1 and 2 at 0.5; [4, 8): 2 bytes at 0.5, 2 uncovered (0).
        let got = carry_weights(&src, &[1.0, 0.5], &dst);
        assert_eq!(got, [0.75, 1.0, 0.0, 0.25, 0.0]);
        // Shared bytes are averaged, not added; EOS carries the EOS weight.
        let src = vec![Some((0, 2)), Some((0, 2)), None];
        let got = carry_weights(&src, &[1.0, 0.0, 0.3], &[Some((0, 2)), None]);
        assert_eq!(got, [0.5, 0.3]);
        // Empty source spans count for nothing.
        let got = carry_weights(&sp(&[(0, 0), (0, 2)]), &[9.0, 1.0], &sp(&[(0, 2)]));
        assert_eq!(got, [1.0]);
    }

    #[test]
    fn tidy_clamps_and_fills_gaps() {
        // GPT-NeoX trimmed offsets of "  leading spaces": "  "@2..2, "leading"@2..9,
        // "Ġspaces"@10..16.
        assert_eq!(
            tidy(&[(2, 2), (2, 9), (10, 16)], 16, false),
            [(0, 2), (2, 9), (9, 16)]
        );
        // A trailing gap goes to the last token; out-of-range offsets are clamped.
        assert_eq!(tidy(&[(0, 1), (1, 2)], 4, false), [(0, 1), (1, 4)]);
        assert_eq!(tidy(&[(0, 3), (5, 9)], 6, false), [(0, 3), (3, 6)]);
        assert_eq!(tidy(&[(4, 2)], 4, false), [(0, 4)]);
        // Llama's prepended "▁" before a character it cannot merge with.
        assert_eq!(
            tidy(&[(0, 3), (0, 3), (3, 6)], 6, true),
            [(0, 0), (0, 3), (3, 6)]
        );
        // A "▁" that is a real space keeps it.
        assert_eq!(tidy(&[(0, 1), (1, 3)], 3, true), [(0, 1), (1, 3)]);
        assert!(tidy(&[], 5, false).is_empty());
    }

    // ---- real tokenizers ----

    const NAMES: [&str; 3] = ["gpt2", "llama2", "pythia"];
    const EOS: [&str; 3] = ["<|endoftext|>", "</s>", "<|endoftext|>"];

    /// The three tokenizers with their end-token ids, loaded once.
    fn tokenizers() -> &'static [(Tokenizer, u32); 3] {
        static TOKS: OnceLock<[(Tokenizer, u32); 3]> = OnceLock::new();
        TOKS.get_or_init(|| {
            std::array::from_fn(|i| {
                let path = format!(
                    "{}/data/tokenizers/{}/tokenizer.json",
                    env!("CARGO_MANIFEST_DIR"),
                    NAMES[i]
                );
                let tok = Tokenizer::from_file(&path).unwrap();
                let eos = tok.token_to_id(EOS[i]).unwrap();
                (tok, eos)
            })
        })
    }

    /// What the `tokenize` stage stores for a whole response (no truncation).
    fn stored_ids(tok: &Tokenizer, eos: u32, text: &str) -> Vec<u32> {
        let mut ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        ids.push(eos);
        ids
    }

    fn spans_of(t: usize, text: &str) -> Vec<Span> {
        let (tok, eos) = &tokenizers()[t];
        response_spans(tok, text, &stored_ids(tok, *eos, text), *eos).unwrap()
    }

    /// Spans of a whole stored response: EOS last and only there; every other span inside the
    /// text, on character boundaries, starts non-decreasing, together covering every byte.
    fn check_sane(name: &str, text: &str, spans: &[Span]) {
        let ctx = format!("{name} {text:?} {spans:?}");
        assert_eq!(spans.last(), Some(&None), "{ctx}");
        let body = &spans[..spans.len() - 1];
        let mut covered = vec![false; text.len()];
        let mut prev_start = 0;
        for span in body {
            let (s, e) = span.unwrap_or_else(|| panic!("EOS inside: {ctx}"));
            assert!(s <= e && e <= text.len(), "{ctx}");
            assert!(
                text.is_char_boundary(s) && text.is_char_boundary(e),
                "{ctx}"
            );
            assert!(s >= prev_start, "{ctx}");
            prev_start = s;
            covered[s..e].iter_mut().for_each(|c| *c = true);
        }
        assert!(covered.iter().all(|&c| c), "uncovered bytes: {ctx}");
    }

    const TEXTS: [&str; 14] = [
        "Hello world",
        "  leading spaces",
        "a\n\nb\n",
        "hi 😀 there",
        "中文字符测试",
        "café naïve résumé",
        "x  \t y",
        " ",
        "",
        "e\u{301}t\u{e9}",
        "end  ",
        "<|endoftext|>x</s>",
        "\u{a0}nbsp\n  - item 1.5%",
        "😀",
    ];

    #[test]
    fn real_tokenizers_give_sane_byte_spans() {
        for (t, name) in NAMES.iter().enumerate() {
            for text in TEXTS {
                check_sane(name, text, &spans_of(t, text));
            }
        }
    }

    #[test]
    fn odd_offsets_are_tidied() {
        let (gpt2, llama, pythia) = (0, 1, 2);
        // Byte offsets, not characters: "é" is 2 bytes, so " naïve" starts at byte 5.
        let s = spans_of(gpt2, "café naïve résumé");
        assert_eq!(s[..4], sp(&[(0, 1), (1, 3), (3, 5), (5, 12)]));
        // GPT-2 splits "😀" (bytes 3..7) over two tokens, the first with the space before it.
        let s = spans_of(gpt2, "hi 😀 there");
        assert_eq!(
            s,
            [sp(&[(0, 2), (2, 7), (3, 7), (7, 13)]), vec![None]].concat()
        );
        // GPT-NeoX trims spaces from its offsets; the spaces go back to their tokens.
        let s = spans_of(pythia, "Hello world");
        assert_eq!(s, vec![Some((0, 5)), Some((5, 11)), None]);
        let s = spans_of(pythia, "x  \t y");
        assert_eq!(s[..4], sp(&[(0, 1), (1, 3), (3, 4), (4, 6)]));
        assert_eq!(spans_of(pythia, " "), vec![Some((0, 1)), None]);
        // Llama's prepended "▁" as a token of its own stands for no text.
        let s = spans_of(llama, "中文字符测试");
        assert_eq!(s[..3], sp(&[(0, 0), (0, 3), (3, 6)]));
        // Llama's byte-fallback tokens all report their character.
        let s = spans_of(llama, "hi 😀 there");
        assert_eq!(
            s[..7],
            sp(&[(0, 2), (2, 3), (3, 7), (3, 7), (3, 7), (3, 7), (7, 13)])
        );
        // The leading "▁▁" of "  leading" is the prepended marker and the first space.
        let s = spans_of(llama, "  leading spaces");
        assert_eq!(s[..3], sp(&[(0, 1), (1, 9), (9, 16)]));
    }

    #[test]
    fn truncated_and_empty_responses() {
        let text = "The quick brown fox jumps over the lazy dog.";
        for (t, (tok, eos)) in tokenizers().iter().enumerate() {
            let ids = stored_ids(tok, *eos, text);
            let whole = response_spans(tok, text, &ids, *eos).unwrap();
            for cut in 0..ids.len() {
                let spans = response_spans(tok, text, &ids[..cut], *eos).unwrap();
                assert_eq!(spans, whole[..cut], "{}", NAMES[t]);
                assert!(spans.iter().all(Option::is_some));
            }
            assert_eq!(response_spans(tok, "", &[*eos], *eos).unwrap(), vec![None]);
            assert!(response_spans(tok, "", &[], *eos).unwrap().is_empty());
        }
    }

    #[test]
    fn ids_of_another_text_are_a_user_error() {
        let (tok, eos) = &tokenizers()[0];
        let mut ids = stored_ids(tok, *eos, "Hello world");
        let other = ids[1] + 1;
        ids[1] = other;
        let err = response_spans(tok, "Hello world", &ids, *eos).unwrap_err();
        assert!(is_user_error(&err));
        let msg = err.to_string();
        assert!(
            msg.contains("token 1 is id 996") && msg.contains("id 995"),
            "{msg}"
        );
        // Longer than the text plus EOS; EOS missing in the middle; another tokenizer's ids.
        let mut long = stored_ids(tok, *eos, "Hello world");
        long.push(*eos);
        let err = response_spans(tok, "Hello world", &long, *eos).unwrap_err();
        assert!(
            is_user_error(&err) && err.to_string().contains("token 3"),
            "{err}"
        );
        let err = response_spans(tok, "Hello world", &[15496, 11], *eos).unwrap_err();
        assert!(err.to_string().contains("id 11"), "{err}");
        let (llama, llama_eos) = &tokenizers()[1];
        let ids = stored_ids(llama, *llama_eos, "Hello world");
        assert!(response_spans(tok, "Hello world", &ids, *eos).is_err());
    }

    /// Tokens whose bytes no other token covers (carrying to itself is exact for them).
    fn unshared(spans: &[Span]) -> Vec<bool> {
        let n = text_end(spans, &[]);
        let cover = coverage(spans, n);
        spans
            .iter()
            .map(|s| match bounds(*s) {
                None => true,
                Some((s, e)) => e > s && cover[s..e].iter().all(|&c| c == 1),
            })
            .collect()
    }

    #[test]
    fn carrying_to_itself_changes_nothing() {
        for (t, name) in NAMES.iter().enumerate() {
            for text in TEXTS
                .iter()
                .chain(&["Once upon a time, 42 cats — naïvely — sat.\n"])
            {
                let spans = spans_of(t, text);
                let keep = unshared(&spans);
                let mask: Vec<bool> = (0..spans.len()).map(|i| (i * 7 + 3) % 5 < 2).collect();
                for share in [1e-6, 0.3, 0.5, 0.999, 1.0] {
                    let back = carry_mask(&spans, &mask, &spans, share);
                    for i in (0..spans.len()).filter(|&i| keep[i]) {
                        assert_eq!(back[i], mask[i], "{name} {text:?} token {i} at {share}");
                    }
                }
                let scores: Vec<f32> = (0..spans.len()).map(|i| (i as f32 * 0.37).sin()).collect();
                let back = carry_scores(&spans, &scores, &spans);
                let weights = carry_weights(&spans, &scores, &spans);
                for i in (0..spans.len()).filter(|&i| keep[i]) {
                    assert!((back[i] - scores[i]).abs() < 1e-5, "{name} {text:?} {i}");
                    assert!((weights[i] - scores[i]).abs() < 1e-5, "{name} {text:?} {i}");
                }
                let (a, b): (f32, f32) = (scores.iter().sum(), back.iter().sum());
                let empty: f32 = (0..spans.len())
                    .filter(|&i| matches!(spans[i], Some((s, e)) if s == e && s >= text.len()))
                    .map(|i| scores[i])
                    .sum();
                assert!((a - empty - b).abs() < 1e-4, "{name} {text:?}");
            }
        }
    }

    // ---- the property: carrying errs only where a destination token straddles K's edge ----

    const PIECES: [&str; 28] = [
        "the", "Hello", "world", "don't", "x", " ", " ", " ", "  ", "\n", "\n\n", "\t", ",", ".",
        "!", "?", "(", "42", "3.14", "2024", "é", "naïve", "中文", "😀", "—", "Ω", "ß", "’s",
    ];

    fn bytes_of(spans: &[Span], keep: impl Fn(usize) -> bool, n: usize) -> Vec<bool> {
        let mut out = vec![false; n];
        for (_, span) in spans.iter().enumerate().filter(|(i, _)| keep(*i)) {
            if let Some((s, e)) = bounds(*span) {
                out[s..e].iter_mut().for_each(|b| *b = true);
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn carried_masks_differ_only_in_tokens_straddling_a_key_edge(
            pieces in prop::collection::vec(prop::sample::select(&PIECES[..]), 0..40),
            seed in any::<u64>(),
            share in 0.01f64..=1.0,
        ) {
            let text = pieces.concat();
            let n = text.len();
            let mut rng = StdRng::seed_from_u64(seed);
            let spans: Vec<Vec<Span>> = (0..3).map(|t| spans_of(t, &text)).collect();
            for (src, dst) in (0..3).flat_map(|s| (0..3).map(move |d| (s, d))).filter(|(s, d)| s != d) {
                let (a, b) = (&spans[src], &spans[dst]);
                let p = rng.random_range(0.1..0.9);
                let mask: Vec<bool> = a.iter().map(|_| rng.random_bool(p)).collect();
                let k = bytes_of(a, |i| mask[i], n);
                let covered = bytes_of(b, |_| true, n);
                for min_share in [0.5, share] {
                    let carried = carry_mask(a, &mask, b, min_share);
                    let k2 = bytes_of(b, |i| carried[i], n);
                    // Bytes of destination tokens that contain a position where K changes.
                    let straddles = |i: usize| match bounds(b[i]) {
                        Some((s, e)) => e > s && k[s..e].iter().any(|&x| x != k[s]),
                        None => false,
                    };
                    let excused = bytes_of(b, straddles, n);
                    for byte in (0..n).filter(|&x| covered[x]) {
                        prop_assert!(
                            k[byte] == k2[byte] || excused[byte],
                            "{} -> {} at {min_share}: byte {byte} of {text:?}",
                            NAMES[src], NAMES[dst]
                        );
                    }
                    prop_assert_eq!(carried.last(), mask.last());
                }
                // Scores: the total is kept (EOS to EOS; empty source spans land inside).
                let scores: Vec<f32> = a.iter().map(|_| rng.random_range(-2.0..2.0)).collect();
                let got: f64 = carry_scores(a, &scores, b).iter().map(|&x| f64::from(x)).sum();
                let want: f64 = a
                    .iter()
                    .zip(&scores)
                    .filter(|(s, _)| match s {
                        Some((s, e)) => s < e || (*s < n && covered[*s]),
                        None => true,
                    })
                    .map(|(_, &x)| f64::from(x))
                    .sum();
                // Weights: a constant source weight reaches every destination token with bytes.
                let ones = carry_weights(a, &vec![1.0; a.len()], b);
                for (w, span) in ones.iter().zip(b) {
                    let want = if matches!(span, Some((s, e)) if s == e) { 0.0 } else { 1.0 };
                    prop_assert!((w - want).abs() < 1e-5, "{w} for {span:?}: {text:?}");
                }
                let scale: f64 = scores.iter().map(|x| f64::from(x.abs())).sum::<f64>().max(1.0);
                prop_assert!((got - want).abs() <= 1e-3 * scale, "{got} vs {want}: {text:?}");
            }
        }
    }

    // ---- real UltraFeedback answers ----

    /// The assistant answer of a row: a plain string (trl-lib) or the last message (H4).
    fn answer(v: &Value) -> Option<&str> {
        match v {
            Value::String(s) => Some(s),
            Value::Array(msgs) => msgs.last()?.get("content")?.as_str(),
            _ => None,
        }
    }

    #[test]
    fn ultrafeedback_answers_get_sane_spans() {
        let pattern = format!("{}/data/ultrafeedback/*", env!("CARGO_MANIFEST_DIR"));
        let files: Vec<_> = glob::glob(&pattern)
            .unwrap()
            .filter_map(|p| p.ok())
            .filter(|p| crate::data::rows::file_type(p).is_ok())
            .collect();
        assert!(!files.is_empty());
        let mut texts = Vec::new();
        for file in &files {
            let mut rows = 0;
            crate::data::rows::for_each_row(file, |_, row| {
                rows += 1;
                if rows <= 25 {
                    for side in ["chosen", "rejected"] {
                        texts.extend(row.get(side).and_then(answer).map(str::to_string));
                    }
                }
                Ok(())
            })
            .unwrap();
        }
        assert!(texts.len() >= 100, "{}", texts.len());
        for text in &texts {
            let spans: Vec<Vec<Span>> = (0..3).map(|t| spans_of(t, text)).collect();
            for (t, s) in spans.iter().enumerate() {
                check_sane(NAMES[t], text, s);
            }
            let mask: Vec<bool> = (0..spans[0].len()).map(|i| i % 3 == 0).collect();
            let carried = carry_mask(&spans[0], &mask, &spans[1], 0.5);
            assert_eq!(carried.len(), spans[1].len());
        }
    }
}
