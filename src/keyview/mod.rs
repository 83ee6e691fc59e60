//! The key-token view (`sepo show P.yaml STAGE --html OUT.html`): every pair of a `select` (or
//! `score`) artifact with its prompt and both responses, each token shaded by its score and the
//! key tokens outlined, as one self-contained HTML page (or a fragment the evaluate report
//! embeds). Also the paper's Figure 1 quantity, [`figure1_share`]: how few tokens carry most of
//! the chosen-minus-rejected reward gap.

use std::path::Path;

use anyhow::{Context, Result, bail};
use minijinja::{Environment, Value, context};
use serde::Serialize;
use tokenizers::Tokenizer;

use crate::artifacts::{Artifact, HfTokenizer, Scores, Tokens, tokenizer_of};
use crate::pipeline::executor::Plan;
use crate::user_bail;

/// The share of the reward gap Figure 1 of the paper asks about.
pub const FIGURE1_SHARE: f64 = 0.8;
/// Pairs per page when the page opens.
pub const PAGE_SIZE: usize = 20;
/// The percentile of |score| at which the colour scale saturates: a robust maximum, so that a few
/// extreme tokens do not wash every other token out to white.
const SCALE_PERCENTILE: f64 = 0.99;

/// The paper's Figure 1 quantity over a set of pairs: for each pair whose reward gap
/// `G = sum(chosen scores) - sum(rejected scores)` is positive, the smallest share of its response
/// tokens (chosen and rejected together) whose contributions sum to at least `share * G`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Figure1 {
    /// Mean of the per-pair shares (a fraction in (0, 1]); NaN when no pair was used.
    pub mean: f64,
    /// Median of the per-pair shares; NaN when no pair was used.
    pub median: f64,
    /// Pairs with a positive gap.
    pub pairs_used: usize,
    /// Pairs left out: a gap <= 0 (or not a number), where "a share of the gap" means nothing.
    pub pairs_excluded: usize,
}

/// One pair's share of Figure 1: the smallest fraction of its response tokens whose
/// contributions (each chosen token's score, each rejected token's negated score), taken largest
/// first, sum to at least `share` of the gap `G`. `None` when `G <= 0` or is not finite.
pub fn gap_share(chosen: &[f32], rejected: &[f32], share: f64) -> Option<f64> {
    let mut contrib: Vec<f64> = chosen
        .iter()
        .map(|&s| s as f64)
        .chain(rejected.iter().map(|&s| -(s as f64)))
        .collect();
    // Largest first; which of several equal contributions is taken first does not change the count.
    contrib.sort_by(|a, b| b.total_cmp(a));
    let gap: f64 = contrib.iter().sum();
    if !gap.is_finite() || gap <= 0.0 {
        return None;
    }
    // A running sum that equals the target exactly on paper can land an ulp short in floats.
    let target = share * gap - 1e-12 * gap;
    let mut sum = 0.0;
    let mut taken = contrib.len();
    for (i, c) in contrib.iter().enumerate() {
        sum += c;
        if sum >= target {
            taken = i + 1;
            break;
        }
    }
    Some(taken as f64 / contrib.len() as f64)
}

/// [`gap_share`] over every pair (row `i` of both lists), summarized as mean and median.
pub fn figure1_share(
    chosen_scores: &[Vec<f32>],
    rejected_scores: &[Vec<f32>],
    share: f64,
) -> Figure1 {
    summarize(
        chosen_scores
            .iter()
            .zip(rejected_scores)
            .map(|(c, r)| gap_share(c, r, share)),
    )
}

/// Mean and median of the per-pair shares, `None` (a gap <= 0) counted as excluded.
fn summarize(per_pair: impl Iterator<Item = Option<f64>>) -> Figure1 {
    let (mut shares, mut excluded) = (Vec::new(), 0);
    for s in per_pair {
        match s {
            Some(s) => shares.push(s),
            None => excluded += 1,
        }
    }
    let n = shares.len();
    shares.sort_by(f64::total_cmp);
    let (mean, median) = match n {
        0 => (f64::NAN, f64::NAN),
        _ => (
            shares.iter().sum::<f64>() / n as f64,
            if n % 2 == 1 {
                shares[n / 2]
            } else {
                (shares[n / 2 - 1] + shares[n / 2]) / 2.0
            },
        ),
    };
    Figure1 {
        mean,
        median,
        pairs_used: n,
        pairs_excluded: excluded,
    }
}

/// One response as the view shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct SideView {
    pub ids: Vec<u32>,
    /// Each token's text, decoded in context (see [`token_texts`]).
    pub tokens: Vec<String>,
    pub scores: Vec<f32>,
    /// The key-token mask of a `select` artifact; `None` for a `score` artifact.
    pub keys: Option<Vec<bool>>,
}

/// One pair as the view shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct PairView {
    pub id: String,
    pub split: String,
    /// Whether `tokenize` cut the prompt or the responses to fit `max_len`.
    pub truncated: bool,
    /// The prompt ids decoded, special tokens included (what the model saw).
    pub prompt: String,
    pub chosen: SideView,
    pub rejected: SideView,
}

/// The pairs of one `select` or `score` artifact, decoded, ready to render. Keep a subset (e.g.
/// `pairs.retain(|p| p.split == "test")`) before rendering to show only those: the colour scale
/// and Figure 1 are computed from the pairs present.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyView {
    pub stage: String,
    /// `select` or `score`.
    pub kind: String,
    pub pairs: Vec<PairView>,
}

impl KeyView {
    /// The pairs of a `select` or `score` artifact `a`, whose token ids `tok` decodes (the
    /// tokenizer the data was tokenized with).
    pub fn from_artifact(a: &Artifact, tok: &HfTokenizer) -> Result<KeyView> {
        if !matches!(a.kind.as_str(), "select" | "score") {
            user_bail!(
                "stage `{}` is a {} stage: the key-token view shows a select or score stage",
                a.stage,
                a.kind
            );
        }
        let tokens = Tokens::open(a)?;
        let rows = tokens.rows()?;
        let scores = Scores::open(a)?;
        let (cs, rs) = (scores.chosen()?, scores.rejected()?);
        let masks = if a.kind == "select" {
            tokens.masks()?
        } else {
            None
        };
        let file = tokens.path().display();
        if cs.len() != rows.len() || rs.len() != rows.len() {
            bail!("{file}: {} rows but {} score rows", rows.len(), cs.len());
        }
        let tok = tok.tokenizer();
        let mut pairs = Vec::with_capacity(rows.len());
        for (i, (row, (c, r))) in rows.into_iter().zip(cs.into_iter().zip(rs)).enumerate() {
            let keys = |side: usize| masks.as_ref().map(|m| [&m.0, &m.1][side][i].clone());
            let side = |ids: Vec<u32>, scores: Vec<f32>, keys: Option<Vec<bool>>| {
                if scores.len() != ids.len() || keys.as_ref().is_some_and(|k| k.len() != ids.len())
                {
                    bail!(
                        "{file}: row {i} (`{}`): {} tokens but {} scores or a mask of another length",
                        row.id,
                        ids.len(),
                        scores.len()
                    );
                }
                Ok(SideView {
                    tokens: token_texts(tok, &ids),
                    ids,
                    scores,
                    keys,
                })
            };
            let chosen = side(row.chosen_ids.clone(), c, keys(0))?;
            let rejected = side(row.rejected_ids.clone(), r, keys(1))?;
            pairs.push(PairView {
                prompt: tok
                    .decode(&row.prompt_ids, false)
                    .map_err(|e| anyhow::anyhow!("decoding the prompt of `{}`: {e}", row.id))?,
                id: row.id,
                split: row.split,
                truncated: row.truncated,
                chosen,
                rejected,
            });
        }
        Ok(KeyView {
            stage: a.stage.clone(),
            kind: a.kind.clone(),
            pairs,
        })
    }

    /// The view of the built `select` or `score` stage `stage` of `plan`, its tokens decoded with
    /// the tokenizer its data was tokenized with (found by walking the stage's inputs).
    pub fn load(plan: &Plan, stage: &str) -> Result<KeyView> {
        let a = built(plan, stage)?;
        KeyView::from_artifact(&a, &tokenizer_upstream(plan, stage)?)
    }

    /// The Figure 1 summary of these pairs at [`FIGURE1_SHARE`].
    pub fn figure1(&self) -> Figure1 {
        summarize(
            self.pairs
                .iter()
                .map(|p| gap_share(&p.chosen.scores, &p.rejected.scores, FIGURE1_SHARE)),
        )
    }
}

/// Each token's text as it reads in its response: decoded in a stream (tokenizers'
/// `DecodeStream`), so a word-start marker becomes a space and a character split over byte
/// tokens shows whole, on the token that completes it. Tokens that complete nothing show empty;
/// trailing ones that never complete (a response cut mid-character) show what decoding them
/// gives. Special tokens (the EOS every response ends with) show as their text.
pub fn token_texts(tok: &Tokenizer, ids: &[u32]) -> Vec<String> {
    let mut out = Vec::with_capacity(ids.len());
    let mut stream = tok.decode_stream(false);
    let mut pending = 0;
    for &id in ids {
        match stream.step(id) {
            Ok(Some(text)) => {
                pending = 0;
                out.push(text);
            }
            Ok(None) => {
                pending += 1;
                out.push(String::new());
            }
            // A decoder whose output for a longer prefix does not extend the shorter one (space
            // clean-up): show this token alone and start a new stream after it.
            Err(_) => {
                pending = 0;
                stream = tok.decode_stream(false);
                out.push(tok.decode(&[id], false).unwrap_or_default());
            }
        }
    }
    if pending > 0 {
        let start = ids.len() - pending;
        out[ids.len() - 1] = tok.decode(&ids[start..], false).unwrap_or_default();
    }
    out
}

/// A built stage as an input artifact, refused when it is not built or no longer intact.
fn built(plan: &Plan, stage: &str) -> Result<Artifact> {
    let s = plan.get(stage)?;
    if !s.fresh {
        user_bail!(
            "stage `{stage}` is not built yet: run `sepo run {} --stage {stage}`",
            plan.pipeline.file.display()
        );
    }
    Ok(Artifact {
        stage: stage.to_string(),
        kind: s.kind.kind.to_string(),
        hash: s.hash.clone(),
        dir: plan.artifact_dir(s),
        manifest: plan.intact_manifest(stage)?,
    })
}

/// The tokenizer of the data under `stage`: select -> scores -> data (tokenize) -> tokenizer
/// (a tokenizer, model or train stage).
fn tokenizer_upstream(plan: &Plan, stage: &str) -> Result<HfTokenizer> {
    let mut name = stage.to_string();
    loop {
        let s = plan.get(&name)?;
        let role = match s.kind.kind {
            "select" => "scores",
            "score" => "data",
            "tokenize" => "tokenizer",
            _ => return tokenizer_of(&built(plan, &name)?),
        };
        name = match s.inputs.get(role).and_then(|v| v.first()) {
            Some(up) => up.clone(),
            None => bail!("stage `{name}` has no `{role}` input"),
        };
    }
}

/// `sepo show P.yaml STAGE --html OUT`: writes the page of `stage` to `out` (atomically; a page
/// already there is replaced). Refuses a stage of another kind, one not built, and a file inside
/// the cache.
pub fn write_page(plan: &Plan, stage: &str, out: &Path) -> Result<()> {
    let kind = plan.get(stage)?.kind.kind;
    if !matches!(kind, "select" | "score") {
        user_bail!(
            "stage `{stage}` is a {kind} stage: `--html` shows the key tokens of a select stage (or the scores of a score stage)"
        );
    }
    // The cache is sepo's: `gc` deletes what no stage points to, so the user's page goes elsewhere.
    let real = crate::export::real_path;
    if real(out).starts_with(real(&plan.store.root)) {
        user_bail!(
            "{}: is inside the cache folder {}; write the page outside it",
            out.display(),
            plan.store.root.display()
        );
    }
    if out.is_dir() {
        user_bail!(
            "{}: is a folder; name the HTML file to write",
            out.display()
        );
    }
    let html = render_page(&KeyView::load(plan, stage)?)?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
    }
    crate::util::write_atomic(out, html.as_bytes())?;
    // The temporary file write_atomic renames is private to its owner (0600); a page is for
    // reading and serving, as a file the user made with any other tool would be.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o644))
            .with_context(|| format!("{}: cannot set permissions", out.display()))?;
    }
    Ok(())
}

/// The view as a whole HTML page: inline CSS and JS, the data embedded, nothing fetched.
pub fn render_page(view: &KeyView) -> Result<String> {
    // The section goes in rendered: sepo's minijinja is built without `{% include %}`.
    let section = Value::from_safe_string(render_section(view)?);
    let env = Environment::new();
    let page = env.template_from_named_str("page.html", include_str!("page.html"))?;
    Ok(page.render(context! { stage => view.stage, section })?)
}

/// The embedded data, short keys because a large artifact holds millions of tokens.
#[derive(Serialize)]
struct Data<'a> {
    scale: f64,
    page_size: usize,
    share: f64,
    pairs: Vec<PairData<'a>>,
}

#[derive(Serialize)]
struct PairData<'a> {
    id: &'a str,
    split: &'a str,
    /// Truncated by `tokenize`.
    cut: bool,
    prompt: &'a str,
    /// chosen_reward and rejected_reward: the sums of each side's token scores.
    cr: f64,
    rr: f64,
    /// This pair's Figure 1 share, `None` when its gap is not positive.
    g: Option<f64>,
    c: SideData<'a>,
    r: SideData<'a>,
}

#[derive(Serialize)]
struct SideData<'a> {
    t: &'a [String],
    s: &'a [f32],
    i: &'a [u32],
    /// The mask as 0/1 (shorter than true/false).
    k: Option<Vec<u8>>,
}

fn side_data(s: &SideView) -> SideData<'_> {
    SideData {
        t: &s.tokens,
        s: &s.scores,
        i: &s.ids,
        k: s.keys
            .as_ref()
            .map(|k| k.iter().map(|&b| b as u8).collect()),
    }
}

/// The colour scale's maximum: the 99th percentile (nearest rank) of |score| over every token, or
/// 1 when that is 0 or there are no tokens.
fn robust_max(view: &KeyView) -> f64 {
    let mut abs: Vec<f32> = view
        .pairs
        .iter()
        .flat_map(|p| p.chosen.scores.iter().chain(&p.rejected.scores))
        .map(|s| s.abs())
        .filter(|s| s.is_finite())
        .collect();
    if abs.is_empty() {
        return 1.0;
    }
    let k = ((SCALE_PERCENTILE * abs.len() as f64).ceil() as usize).clamp(1, abs.len()) - 1;
    let (_, v, _) = abs.select_nth_unstable_by(k, f32::total_cmp);
    if *v > 0.0 { *v as f64 } else { 1.0 }
}

fn percent(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

/// The same view as a fragment to put inside another page's `<body>` (the evaluate report): one
/// `<div class="sepo-kv">` with its own CSS (every rule under `.sepo-kv`) and script (which works
/// on its own `<div>` only), so several can share a page.
pub fn render_section(view: &KeyView) -> Result<String> {
    let sum = |s: &[f32]| s.iter().map(|&x| x as f64).sum::<f64>();
    let scale = robust_max(view);
    let data = Data {
        scale,
        page_size: PAGE_SIZE,
        share: FIGURE1_SHARE,
        pairs: view
            .pairs
            .iter()
            .map(|p| PairData {
                id: &p.id,
                split: &p.split,
                cut: p.truncated,
                prompt: &p.prompt,
                cr: sum(&p.chosen.scores),
                rr: sum(&p.rejected.scores),
                g: gap_share(&p.chosen.scores, &p.rejected.scores, FIGURE1_SHARE),
                c: side_data(&p.chosen),
                r: side_data(&p.rejected),
            })
            .collect(),
    };
    // Inside <script>, only `<` can end the element early (`</script>`, `<!--`); `\u003c` is the
    // same character to JSON.parse, so no text in the data can break out of the script element.
    let json = serde_json::to_string(&data)?.replace('<', "\\u003c");
    let fig = view.figure1();
    let env = Environment::new();
    let section = env.template_from_named_str("section.html", include_str!("section.html"))?;
    let html = section.render(context! {
        stage => view.stage,
        kind => view.kind,
        has_keys => view.kind == "select",
        n_pairs => view.pairs.len(),
        scale => format!("{scale:.3}"),
        share => format!("{:.0}%", 100.0 * FIGURE1_SHARE),
        fig_used => fig.pairs_used,
        fig_excluded => fig.pairs_excluded,
        fig_mean => percent(fig.mean),
        fig_median => percent(fig.median),
        data => Value::from_safe_string(json),
    })?;
    Ok(html)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fig(c: Vec<Vec<f32>>, r: Vec<Vec<f32>>) -> Figure1 {
        figure1_share(&c, &r, 0.8)
    }

    #[test]
    fn one_pair_by_hand() {
        // Contributions 3, 1, 0.5 (rejected -0.5 negated), -0.5 (rejected 0.5 negated): G = 4,
        // 80% of it is 3.2: 3 alone is short, 3 + 1 reaches it: 2 of 4 tokens.
        assert_eq!(gap_share(&[1.0, 3.0], &[-0.5, 0.5], 0.8), Some(0.5));
        // A single dominant token: 10 of G = 9 already exceeds 7.2.
        assert_eq!(gap_share(&[10.0, -1.0], &[0.0, 0.0], 0.8), Some(0.25));
        // Positive contributions 2 + 2 exceed G = 3: even the whole gap needs only those two,
        // never the negative one; half of it (1.5) needs one.
        assert_eq!(gap_share(&[2.0, 2.0, -1.0], &[], 1.0), Some(2.0 / 3.0));
        assert_eq!(gap_share(&[2.0, 2.0, -1.0], &[], 0.5), Some(1.0 / 3.0));
    }

    #[test]
    fn ties_reach_the_target_exactly() {
        // Five equal tokens, G = 5, target 4: exactly four of them (a running sum that falls an
        // ulp short must not take the fifth).
        assert_eq!(gap_share(&[1.0; 5], &[], 0.8), Some(0.8));
        // Ties across the two sides: chosen 1, 1 and rejected -1, -1 all contribute 1.
        assert_eq!(gap_share(&[1.0, 1.0], &[-1.0, -1.0], 0.5), Some(0.5));
        // 0.1 is not exact in binary: ten of them sum to 0.9999999999999999 in f64.
        assert_eq!(gap_share(&[0.1; 10], &[], 1.0), Some(1.0));
        assert_eq!(gap_share(&[0.1; 10], &[], 0.8), Some(0.8));
    }

    #[test]
    fn non_positive_gaps_and_empty_responses() {
        assert_eq!(gap_share(&[1.0], &[1.0], 0.8), None); // G = 0
        assert_eq!(gap_share(&[-1.0], &[1.0], 0.8), None); // G < 0
        assert_eq!(gap_share(&[], &[], 0.8), None); // nothing to share
        assert_eq!(gap_share(&[f32::NAN, 1.0], &[], 0.8), None);
        // An empty rejected response: the chosen tokens alone, 2 + 1 of G = 3 needs both.
        assert_eq!(gap_share(&[2.0, 1.0], &[], 0.8), Some(1.0));
        // An empty chosen response: -(-4) = 4 alone is G.
        assert_eq!(gap_share(&[], &[-4.0, 0.0], 0.8), Some(0.5));
    }

    #[test]
    fn summary_over_pairs() {
        let f = fig(
            vec![
                vec![1.0, 3.0],
                vec![10.0, -1.0],
                vec![1.0],
                vec![],
                vec![2.0, 1.0],
            ],
            vec![vec![-0.5, 0.5], vec![0.0, 0.0], vec![2.0], vec![], vec![]],
        );
        // Shares 0.5, 0.25, 1.0; the third and fourth pairs have G <= 0.
        assert_eq!(f.pairs_used, 3);
        assert_eq!(f.pairs_excluded, 2);
        assert!((f.mean - 1.75 / 3.0).abs() < 1e-12);
        assert_eq!(f.median, 0.5);
        // An even count: the median is the mean of the middle two.
        let f = fig(vec![vec![1.0, 3.0], vec![10.0, -1.0]], vec![vec![], vec![]]);
        // 3 + 1 = 4 = G needs 2 of 2 (1.0); 10 of G = 9 is 1 of 2 (0.5).
        assert_eq!((f.mean, f.median, f.pairs_used), (0.75, 0.75, 2));
        let none = fig(vec![vec![0.0]], vec![vec![1.0]]);
        assert!(none.mean.is_nan() && none.median.is_nan());
        assert_eq!((none.pairs_used, none.pairs_excluded), (0, 1));
    }

    fn side(tokens: &[&str], scores: &[f32], keys: Option<Vec<bool>>) -> SideView {
        SideView {
            ids: (0..tokens.len() as u32).collect(),
            tokens: tokens.iter().map(|t| t.to_string()).collect(),
            scores: scores.to_vec(),
            keys,
        }
    }

    fn view() -> KeyView {
        KeyView {
            stage: "keys</h2><i>".into(),
            kind: "select".into(),
            pairs: vec![PairView {
                id: "a\"<b>".into(),
                split: "train".into(),
                truncated: false,
                prompt: "<!-- p -->".into(),
                chosen: side(
                    &["</script><b>", " x"],
                    &[1.0, -2.0],
                    Some(vec![true, false]),
                ),
                rejected: side(&["\n"], &[0.5], Some(vec![false])),
            }],
        }
    }

    #[test]
    fn text_is_escaped_in_the_markup_and_the_data() {
        for html in [
            render_page(&view()).unwrap(),
            render_section(&view()).unwrap(),
        ] {
            // Nothing from the data appears raw: the stage name is HTML-escaped where the
            // template prints it, and the embedded JSON has no `<` left to close the script.
            assert!(!html.contains("</script><b>"), "{html}");
            assert!(!html.contains("<!-- p -->"));
            assert!(!html.contains("</h2><i>"));
            assert!(html.contains("keys&lt;&#x2f;h2&gt;&lt;i&gt;"));
            assert!(html.contains(r#""t":["\u003c/script>\u003cb>"," x"]"#));
            // One script element of data, one of code: the data did not open or close another.
            assert_eq!(html.matches("<script").count(), 2);
            assert_eq!(html.matches("</script>").count(), 2);
            // The embedded JSON parses back to the token text.
            let start = html.find(r#"type="application/json""#).unwrap();
            let body = &html[start..];
            let body = &body[body.find('>').unwrap() + 1..body.find("</script>").unwrap()];
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(v["pairs"][0]["c"]["t"][0], "</script><b>");
            assert_eq!(v["pairs"][0]["id"], "a\"<b>");
            assert_eq!(v["pairs"][0]["c"]["k"], serde_json::json!([1, 0]));
        }
        let page = render_page(&view()).unwrap();
        assert!(page.starts_with("<!doctype html>"));
        assert!(!render_section(&view()).unwrap().contains("<html"));
    }

    #[test]
    fn scale_is_a_robust_maximum() {
        let mut v = view();
        // 200 scores of magnitude 1 and two outliers: the 99th percentile ignores them.
        let mut s = vec![1.0f32; 200];
        s[0] = 100.0;
        s[1] = -50.0;
        v.pairs[0].chosen = side(&vec!["x"; 200], &s, None);
        v.pairs[0].rejected = side(&[], &[], None);
        assert_eq!(robust_max(&v), 1.0);
        v.pairs[0].chosen = side(&["x"], &[0.0], None);
        assert_eq!(robust_max(&v), 1.0);
        v.pairs[0].chosen = side(&["x", "y"], &[0.25, -3.0], None);
        assert_eq!(robust_max(&v), 3.0);
    }

    #[test]
    fn tokens_decode_in_context() {
        let tok = crate::tokenizer::load(
            &std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("data/tokenizers/gpt2/tokenizer.json"),
        )
        .unwrap();
        let text = "Hi there,\n  naïve </script><b> 東京";
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        let texts = token_texts(&tok, &ids);
        assert_eq!(texts.len(), ids.len());
        // The pieces put back together are the text, spaces, newline and all; the multi-byte
        // characters that GPT-2 splits over byte tokens come out whole on one of them.
        assert_eq!(texts.concat(), text);
    }
}
