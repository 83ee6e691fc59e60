//! The key-token view (`sepo show P.yaml keys --html OUT.html`) in a real headless browser:
//! Debian's chromium renders the page (its script builds the pairs), dumps the DOM and takes a
//! screenshot. Chromium is not part of a fresh machine, so these tests are ignored by `cargo test`
//! and run by `.ci/run`, which installs it; when they run, a missing chromium is a failure.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use sepo::data::parquet as pq;

/// Pairs in the test pipeline: more than one page of 20.
const PAIRS: usize = 25;
/// The first pair: markup, quotes, an ampersand, newlines and indentation, and characters that
/// the tokenizer splits over byte tokens. None of it may become markup in the page.
const TRICKY: &str = "Say </script><b>bold</b> & \"quoted\"\n  indented line\nnaïve café 東京";

fn chromium() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser"] {
            if dir.join(name).is_file() {
                return dir.join(name);
            }
        }
    }
    panic!(
        "chromium is not installed (looked for `chromium` and `chromium-browser` on PATH); \
         install it with `apt-get install -y --no-install-recommends chromium` (.ci/run does)"
    );
}

/// Runs headless chromium on `url` with `args` (a fresh profile each time, so parallel tests do
/// not share one); returns stdout. Killed after 120 s so a hung browser fails the test.
fn run_chromium(url: &str, args: &[&str], profile: &Path) -> String {
    // Output goes to files, not pipes: a DOM larger than a pipe's buffer would block chromium
    // while this waits for it to exit.
    std::fs::create_dir_all(profile).unwrap();
    let (out, err) = (profile.join("stdout"), profile.join("stderr"));
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("chromium starts");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(120) {
            child.kill().ok();
            child.wait().ok();
            panic!("chromium did not finish within 120 s on {url}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        status.success(),
        "chromium failed on {url}: {}",
        std::fs::read_to_string(&err).unwrap_or_default()
    );
    std::fs::read_to_string(&out).expect("chromium's DOM is UTF-8")
}

/// A select stage over `PAIRS` pairs scored by the tiny test models, and its page.
struct Built {
    _dir: tempfile::TempDir,
    pipeline: String,
    html: PathBuf,
}

fn build() -> Built {
    let dir = tempfile::tempdir().unwrap();
    let mut lines = Vec::new();
    for i in 0..PAIRS {
        let chosen = if i == 0 {
            TRICKY.to_string()
        } else {
            format!("The cat number {i} liked to play in the sun.")
        };
        let row = serde_json::json!({
            "id": format!("pair-{i:02}"),
            "prompt": format!("Tell me about cat {i}."),
            "chosen": chosen,
            "rejected": format!("The dog {i} was sad and did not play."),
        });
        lines.push(row.to_string());
    }
    std::fs::write(dir.path().join("pairs.jsonl"), lines.join("\n")).unwrap();
    let hf = |m: &str| data(&format!("tests/fixtures/hf/{m}"));
    let yaml = format!(
        "stages:
  pairs: {{kind: ingest, format: preference, path: pairs.jsonl}}
  tok: {{kind: tokenizer, path: {tok}}}
  tokens: {{kind: tokenize, inputs: {{data: pairs, tokenizer: tok}}, template: none, max_len: 4096}}
  llama: {{kind: model, from: {llama}}}
  mistral: {{kind: model, from: {mistral}}}
  scores: {{kind: score, inputs: {{oracle: llama, reference: mistral, data: tokens}}}}
  keys: {{kind: select, inputs: {{scores: scores}}, chosen_ratio: 0.3, rejected_ratio: 0.3}}
",
        tok = hf("tiny-llama/tokenizer.json"),
        llama = hf("tiny-llama"),
        mistral = hf("tiny-mistral"),
    );
    let p = pipeline(dir.path(), &yaml);
    let r = sepo(&["run", &p, "--quiet"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let html = dir.path().join("out").join("keys.html");
    let r = sepo(&["show", &p, "keys", "--html", &html.display().to_string()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout.trim(), html.display().to_string());
    Built {
        _dir: dir,
        pipeline: p,
        html,
    }
}

/// The select artifact's token ids and masks (chosen, then rejected), read independently of the
/// page.
type Ids = Vec<Vec<u32>>;
type Masks = Vec<Vec<bool>>;
fn selection(p: &str) -> (Ids, Ids, Masks, Masks) {
    let r = sepo(&["show", p, "keys", "--path"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let file = PathBuf::from(r.stdout.trim()).join("selection.parquet");
    let df = pq::read(&file).unwrap();
    let rd = pq::Reader {
        df: &df,
        file: &file,
    };
    (
        rd.u32_lists("chosen_ids").unwrap(),
        rd.u32_lists("rejected_ids").unwrap(),
        rd.bool_lists("chosen_mask").unwrap(),
        rd.bool_lists("rejected_mask").unwrap(),
    )
}

/// The text of an element as chromium serializes it: text nodes escape `&`, `<`, `>` and
/// no-break spaces, so the text between tags reads back with these four undone.
fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&nbsp;", "\u{a0}")
        .replace("&amp;", "&")
}

/// The part of `dom` from the first `from` on, up to (not including) the next `to` after it.
fn between<'a>(dom: &'a str, from: &str, to: &str) -> &'a str {
    let start = dom
        .find(from)
        .unwrap_or_else(|| panic!("no {from:?} in the DOM"));
    let rest = &dom[start..];
    &rest[..rest.find(to).unwrap_or(rest.len())]
}

/// The texts of the token spans in a `<div class="kv-toks">...</div>` (spans hold text only).
fn token_texts(toks: &str) -> Vec<String> {
    toks.split("<span class=\"kv-tok")
        .skip(1)
        .map(|s| {
            let body = &s[s.find('>').unwrap() + 1..];
            unescape(&body[..body.find("</span>").unwrap()])
        })
        .collect()
}

#[test]
#[ignore = "needs chromium: run by .ci/run"]
fn the_page_renders_tokens_marks_legend_and_paging() {
    let b = build();
    let profile = tempfile::tempdir().unwrap();
    let url = format!("file://{}", b.html.display());
    let dom = run_chromium(&url, &["--dump-dom"], &profile.path().join("a"));

    // What the page says it holds, the legend and the paging controls.
    assert!(
        dom.contains(&format!("{PAIRS} pairs in this view.")),
        "{dom}"
    );
    assert!(dom.contains("class=\"kv-legend-bar\""));
    assert!(dom.contains("<span class=\"kv-legend-key\">outlined</span><span>key token</span>"));
    assert!(dom.contains("class=\"kv-search\""));
    assert!(
        dom.contains(&format!("page 1 of 2 · {PAIRS} pairs")),
        "{dom}"
    );
    assert!(dom.contains("<button type=\"button\" class=\"kv-prev\" disabled=\"\">"));
    assert!(dom.contains("<button type=\"button\" class=\"kv-next\">"));
    let shown = between(&dom, "<div class=\"kv-pairs\">", "<script");
    assert_eq!(shown.matches("<section class=\"kv-pair\"").count(), 20);
    assert!(dom.contains("(the paper's Figure 1 quantity)"));

    // The first pair's chosen response: its tokens, put back together, are the decoded ids (a
    // whole-sequence decode by the tokenizers crate, not the page's per-token stream), and the
    // markup in it is text: no <b> element was made.
    let (chosen_ids, rejected_ids, chosen_mask, rejected_mask) = selection(&b.pipeline);
    let tok = tokenizers::Tokenizer::from_file(data("tests/fixtures/hf/tiny-llama/tokenizer.json"))
        .unwrap();
    let want = tok.decode(&chosen_ids[0], false).unwrap();
    assert!(want.starts_with(TRICKY), "{want:?}");
    let first = between(shown, "data-id=\"pair-00\"", "</section>");
    let chosen = between(first, "<div class=\"kv-resp kv-chosen\">", "</div></div>");
    let texts = token_texts(chosen);
    assert_eq!(texts.len(), chosen_ids[0].len());
    assert_eq!(texts.concat(), want);
    assert!(texts.iter().any(|t| t.contains('\n')));
    assert!(
        !shown.contains("<b>"),
        "markup from the data became elements"
    );
    assert!(first.contains("class=\"kv-prompt\">"));
    assert!(first.contains("chosen_reward "));
    assert!(first.contains("rejected_reward "));

    // Key tokens: one outlined span per true mask entry of the 20 pairs shown.
    let keys: usize = chosen_mask[..20]
        .iter()
        .chain(&rejected_mask[..20])
        .map(|m| m.iter().filter(|k| **k).count())
        .sum();
    assert!(keys >= 40, "every response keeps at least one key token");
    assert_eq!(shown.matches("kv-key").count(), keys);
    // And one span per response token of those pairs.
    let tokens: usize = chosen_ids[..20]
        .iter()
        .chain(&rejected_ids[..20])
        .map(Vec::len)
        .sum();
    assert_eq!(shown.matches("<span class=\"kv-tok").count(), tokens);

    // Shaded: token spans carry a background colour.
    assert!(shown.contains("background-color: rgb("));

    // A link to one pair opens the view filtered on it.
    let one = run_chromium(
        &format!("{url}#id=pair-07"),
        &["--dump-dom"],
        profile.path(),
    );
    assert!(one.contains(&format!("page 1 of 1 · 1 of {PAIRS} pairs match")));
    let shown = between(&one, "<div class=\"kv-pairs\">", "<script");
    assert_eq!(shown.matches("<section class=\"kv-pair\"").count(), 1);
    assert!(shown.contains("data-id=\"pair-07\""));
}

#[test]
#[ignore = "needs chromium: run by .ci/run"]
fn the_screenshot_shows_a_shaded_page() {
    let b = build();
    let profile = tempfile::tempdir().unwrap();
    let shot = profile.path().join("shot.png");
    let url = format!("file://{}", b.html.display());
    run_chromium(
        &url,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1200,1600",
        ],
        &profile.path().join("profile"),
    );
    let bytes = std::fs::read(&shot).expect("chromium wrote the screenshot");
    assert!(bytes.len() > 20_000, "screenshot is {} bytes", bytes.len());
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (1200, 1600));
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    let channels = info.color_type.samples();
    assert!(channels >= 3, "{:?}", info.color_type);
    let pixels: Vec<&[u8]> = buf[..info.buffer_size()].chunks(channels).collect();
    let distinct: std::collections::HashSet<&[u8]> = pixels.iter().copied().collect();
    assert!(distinct.len() > 50, "{} colours", distinct.len());
    // Both ends of the diverging scale appear: reddish (negative) and bluish (positive) tokens.
    let red = pixels
        .iter()
        .filter(|p| p[0] as i32 > p[2] as i32 + 60)
        .count();
    let blue = pixels
        .iter()
        .filter(|p| p[2] as i32 > p[0] as i32 + 60)
        .count();
    assert!(red > 100 && blue > 100, "red {red}, blue {blue} pixels");
}

/// What `--html` refuses, before anything is built (no chromium needed): exit 2 with the reason.
#[test]
fn refusals_are_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "{}  scores: {{kind: score, inputs: {{oracle: m, reference: m, data: tokens}}}}\n  keys: {{kind: select, inputs: {{scores: scores}}}}\n  m: {{kind: model, from: {}}}\n",
        small_yaml(""),
        data("tests/fixtures/hf/tiny-llama")
    );
    let p = pipeline(dir.path(), &yaml);
    let out = dir.path().join("keys.html").display().to_string();
    let cases = [
        ("tokens", out.as_str(), "is a tokenize stage"),
        ("keys", out.as_str(), "stage `keys` is not built yet"),
        ("scores", out.as_str(), "stage `scores` is not built yet"),
    ];
    let in_cache = dir.path().join("cache").join("keys.html");
    let in_cache = in_cache.display().to_string();
    let folder = dir.path().display().to_string();
    for (stage, file, want) in cases.into_iter().chain([
        ("keys", in_cache.as_str(), "is inside the cache folder"),
        ("keys", folder.as_str(), "is a folder"),
    ]) {
        let r = sepo(&[
            "show",
            &p,
            stage,
            "--html",
            file,
            "--cache",
            &format!("{}/cache", dir.path().display()),
        ]);
        assert_eq!(r.code, 2, "{stage} {file}: {}", r.stderr);
        assert!(r.stderr.contains(want), "{stage} {file}: {}", r.stderr);
    }
    assert!(!dir.path().join("keys.html").exists());
}

/// The evaluate report renders in the browser: the summary table with a row per model, the
/// plots as SVG, and the embedded key-token view of the test pairs, its script run (tokens
/// drawn, key tokens outlined).
#[test]
#[ignore = "needs chromium: run by .ci/run"]
fn the_evaluate_report_renders_with_its_key_token_view() {
    let dir = tempfile::tempdir().unwrap();
    let hf = |m: &str| data(&format!("tests/fixtures/hf/{m}"));
    let yaml = format!(
        "stages:
  pairs: {{kind: ingest, format: preference, path: {pairs}}}
  tok: {{kind: tokenizer, path: {tok}}}
  tokens: {{kind: tokenize, inputs: {{data: pairs, tokenizer: tok}}, template: none, max_len: 4096}}
  llama: {{kind: model, from: {llama}}}
  mistral: {{kind: model, from: {mistral}}}
  rm: {{kind: model, from: {rm}}}
  scores: {{kind: score, inputs: {{oracle: llama, reference: mistral, data: tokens}}}}
  keys: {{kind: select, inputs: {{scores: scores}}}}
  policy: {{kind: train, objective: sepo, inputs: {{model: mistral, data: keys}}, lr: 1e-3, batch_size: 2}}
  report: {{kind: evaluate, inputs: {{policies: [policy], reference: mistral, data: keys, judge: rm}}, max_new_tokens: 4}}
",
        pairs = data("tests/fixtures/eval/pairs.jsonl"),
        tok = hf("tiny-llama/tokenizer.json"),
        llama = hf("tiny-llama"),
        mistral = hf("tiny-mistral"),
        rm = hf("tiny-llama-rm"),
    );
    let p = pipeline(dir.path(), &yaml);
    let r = sepo(&["run", &p, "--quiet"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = sepo(&["show", &p, "report", "--path"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let page = PathBuf::from(r.stdout.trim()).join("report.html");
    let profile = tempfile::tempdir().unwrap();
    let dom = run_chromium(
        &format!("file://{}", page.display()),
        &["--dump-dom"],
        &profile.path().join("r"),
    );
    assert!(dom.contains("<tr data-model=\"policy\">"), "{dom}");
    assert!(dom.contains("<tr data-model=\"mistral\">"), "{dom}");
    // Win rates against the reference and against chosen, lengths, and the policy's loss.
    assert_eq!(dom.matches("<svg").count(), 4, "{dom}");
    // The key-token view of the 6 test pairs, drawn by its script.
    assert!(dom.contains("6 pairs in this view."), "{dom}");
    assert!(dom.matches("kv-key").count() > 1, "{dom}");
}
