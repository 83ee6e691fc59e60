//! Inputs at and past their limits, through the real binary: `generate`'s bounds (context
//! length, temperature, top-p), malformed tokenizer configs, absurd model sizes, devices no stage
//! uses, a cache path that is a file, an export into the cache, and `dag` output for stage names
//! that are any YAML key. Each is exit 2 with a clear message, never a panic.

mod common;

use std::path::{Path, PathBuf};

use common::*;

const STORIES: &str = "models/stories260K";
const ROW: &str = r#"{"prompt": "p", "chosen": "c", "rejected": "r"}"#;

/// Checks a user error: exit 2, `error: ` first, no panic, every needle present.
fn user_error(r: &Run, needles: &[&str]) {
    assert_eq!(r.code, 2, "expected exit 2, got {}: {}", r.code, r.stderr);
    assert!(r.stderr.starts_with("error: "), "{}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    for n in needles {
        assert!(r.stderr.contains(n), "missing {n:?} in: {}", r.stderr);
    }
}

/// A copy of the stories260K folder, to damage one file of.
fn model_copy(dir: &Path) -> PathBuf {
    let out = dir.join("m");
    std::fs::create_dir_all(&out).unwrap();
    for e in std::fs::read_dir(repo().join(STORIES)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), out.join(e.file_name())).unwrap();
    }
    out
}

fn generate(extra: &[&str]) -> Run {
    let model = data(STORIES);
    let mut args = vec!["generate", "--model", model.as_str()];
    args.extend_from_slice(extra);
    sepo(&args)
}

// ---- A. generate bounds -------------------------------------------------------------------

#[test]
fn generate_refuses_bad_sampling_settings() {
    for (flag, value) in [
        ("--temperature", "nan"),
        ("--temperature", "-1"),
        ("--temperature", "inf"),
        ("--top-p", "nan"),
        ("--top-p", "0"),
        ("--top-p", "1.5"),
        ("--top-p", "-0.5"),
    ] {
        let arg = format!("{flag}={value}");
        let r = generate(&["--prompt", "Once", &arg]);
        user_error(&r, &[flag]);
    }
    // The bounds themselves are fine.
    let r = generate(&[
        "--prompt",
        "Once",
        "--max-new-tokens",
        "3",
        "--temperature",
        "0.7",
        "--top-p",
        "1",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

#[test]
fn generate_stops_at_the_context_length() {
    // stories260K: max_position_embeddings 512.
    let r = generate(&["--prompt", "Once upon a time", "--max-new-tokens", "100000"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let note = r
        .stderr
        .lines()
        .find(|l| l.contains("--max-new-tokens 100000 lowered to"))
        .unwrap_or_else(|| panic!("no note: {}", r.stderr));
    // "lowered to B: the prompt's P tokens ... context of 512": B + P = 512.
    let num_after = |key: &str| -> usize {
        let rest = &note[note.find(key).unwrap() + key.len()..];
        rest.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap()
    };
    let budget = num_after("lowered to ");
    let prompt = num_after("the prompt's ");
    assert_eq!(budget + prompt, 512, "{note}");
    assert!(note.contains("max_position_embeddings"), "{note}");
    // --quiet keeps stderr empty.
    let r = generate(&[
        "--prompt",
        "Once upon a time",
        "--max-new-tokens",
        "100000",
        "--quiet",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.is_empty(), "{}", r.stderr);

    // A prompt longer than the context alone.
    let long = "a ".repeat(700);
    let r = generate(&["--prompt", &long, "--max-new-tokens", "1"]);
    user_error(&r, &["context length", "max_position_embeddings", "512"]);
}

// ---- B. malformed tokenizer configs and absurd model sizes --------------------------------

#[test]
fn a_tokenizer_config_that_is_not_an_object_is_exit_2() {
    for bad in ["[1, 2]", "\"eos\"", "3", "null"] {
        let dir = tempfile::tempdir().unwrap();
        let m = model_copy(dir.path());
        std::fs::write(m.join("tokenizer_config.json"), bad).unwrap();
        // generate reads it from the model folder.
        let r = sepo(&[
            "generate",
            "--model",
            &m.display().to_string(),
            "--prompt",
            "Once",
        ]);
        user_error(&r, &["tokenizer_config.json", "must be a JSON object"]);
        // A tokenizer stage reads it beside tokenizer.json; a model stage from the folder.
        for stage in [
            format!(
                "tok: {{kind: tokenizer, path: {}/tokenizer.json}}",
                m.display()
            ),
            format!("base: {{kind: model, from: {}}}", m.display()),
        ] {
            let p = pipeline(dir.path(), &format!("stages:\n  {stage}\n"));
            let r = sepo(&["run", &p, "-q"]);
            user_error(&r, &["tokenizer_config.json", "must be a JSON object"]);
            assert!(artifacts(&dir.path().join("cache")).is_empty());
        }
    }
}

fn model_stage(config: &str) -> String {
    format!(
        "stages:\n  tok: {{kind: tokenizer, path: {}}}\n  m: {{kind: model, inputs: {{tokenizer: tok}}, config: {{architecture: llama, {config}}}}}\n",
        data("data/tokenizers/gpt2/tokenizer.json")
    )
}

#[test]
fn absurd_model_sizes_are_exit_2_naming_the_keys() {
    let dir = tempfile::tempdir().unwrap();
    for (config, why) in [
        // 10^12 wide: about 10^25 parameters, more than any memory.
        (
            "vocab_size: 32, hidden_size: 1000000000000, num_attention_heads: 1",
            "hidden_size 1000000000000",
        ),
        // The same, with the vocabulary still to come from the tokenizer at run time.
        (
            "hidden_size: 1000000000000, num_attention_heads: 1",
            "hidden_size 1000000000000",
        ),
        // Fits in 64 bits, but not in this machine's memory.
        (
            "vocab_size: 32, hidden_size: 8, num_attention_heads: 2, num_hidden_layers: 1000000000000000",
            "num_hidden_layers 1000000000000000",
        ),
        // The parameter count itself overflows.
        (
            "vocab_size: 10000000000000000000, hidden_size: 64, num_attention_heads: 2",
            "vocab_size 10000000000000000000",
        ),
        (
            "vocab_size: 32, hidden_size: 64, num_attention_heads: 2, intermediate_size: 18000000000000000000",
            "intermediate_size 18000000000000000000",
        ),
    ] {
        let p = pipeline(dir.path(), &model_stage(config));
        // Planning refuses it: status, and run before anything is built.
        for args in [vec!["status", p.as_str()], vec!["run", p.as_str(), "-q"]] {
            let r = sepo(&args);
            user_error(&r, &["stage `m`", "too large", "parameters", why]);
        }
        assert!(artifacts(&dir.path().join("cache")).is_empty());
    }
    // A Hugging Face config.json that says so: generate and a `from:` model stage.
    let m = model_copy(dir.path());
    let cfg = std::fs::read_to_string(m.join("config.json")).unwrap();
    std::fs::write(
        m.join("config.json"),
        cfg.replace("\"hidden_size\": 64", "\"hidden_size\": 1000000000000"),
    )
    .unwrap();
    let r = sepo(&[
        "generate",
        "--model",
        &m.display().to_string(),
        "--prompt",
        "Once",
    ]);
    user_error(
        &r,
        &["config.json", "too large", "hidden_size 1000000000000"],
    );
    let p = pipeline(
        dir.path(),
        &format!("stages:\n  base: {{kind: model, from: {}}}\n", m.display()),
    );
    let r = sepo(&["run", &p, "-q"]);
    user_error(
        &r,
        &["stage `base`", "too large", "hidden_size 1000000000000"],
    );
}

// ---- D. devices, the cache path, export, dag ----------------------------------------------

#[test]
fn a_device_matters_only_to_stages_that_use_one() {
    let dir = tempfile::tempdir().unwrap();
    // Data only: whatever the device, it runs.
    let yaml = small_yaml("").replace("name: small\n", "name: small\ndevice: cuda:97\n");
    let p = pipeline(dir.path(), &yaml);
    let r = sepo(&["run", &p, "-q"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = sepo(&["run", &p, "-q", "--force", "--device", "no-such-device"]);
    assert_eq!(r.code, 0, "{}", r.stderr);

    // With a model stage that would run: exit 2 before anything is built.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("d.jsonl"), ROW).unwrap();
    let yaml = format!(
        "device: no-such-device\nstages:\n  pairs: {{kind: ingest, format: preference, path: d.jsonl}}\n  base: {{kind: model, from: {}}}\n",
        data(STORIES)
    );
    let p = pipeline(dir.path(), &yaml);
    let r = sepo(&["run", &p, "-q"]);
    user_error(&r, &["unknown device `no-such-device`", "stage `base`"]);
    assert!(artifacts(&dir.path().join("cache")).is_empty());
    // The data stage alone runs; a dry run plans everything.
    let r = sepo(&["run", &p, "-q", "--stage", "pairs"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = sepo(&["run", &p, "--dry-run"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // A good device for the model stage, then the bad one again: nothing would run, so fine.
    assert_eq!(sepo(&["run", &p, "-q", "--device", "cpu"]).code, 0);
    let r = sepo(&["run", &p, "-q"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

#[test]
fn a_cache_path_that_is_a_file_is_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-folder");
    std::fs::write(&file, "x").unwrap();
    let f = file.display().to_string();
    let p = pipeline(dir.path(), &small_yaml(""));
    for cmd in ["run", "status", "dag"] {
        let r = sepo(&[cmd, &p, "--cache", &f]);
        user_error(&r, &["--cache", &f, "is a file"]);
    }
    let below = format!("{f}/sub");
    let r = sepo(&["run", &p, "--cache", &below]);
    user_error(&r, &["--cache", "is a file"]);
    // The YAML's `cache:` too.
    let p = pipeline(
        dir.path(),
        &small_yaml("").replace("name: small\n", "name: small\ncache: not-a-folder\n"),
    );
    let r = sepo(&["status", &p]);
    user_error(&r, &["`cache`", "is a file"]);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
}

#[test]
fn export_refuses_a_folder_inside_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(
        dir.path(),
        &format!(
            "stages:\n  base: {{kind: model, from: {}}}\n",
            data(STORIES)
        ),
    );
    assert_eq!(sepo(&["run", &p, "-q"]).code, 0);
    let cache = dir.path().join("cache");
    let before = artifacts(&cache);
    for target in [
        cache.join("exported"),
        cache.join("model"),
        cache.clone(),
        dir.path().join("x/../cache/deep/er"),
    ] {
        let r = sepo(&["export", &p, "base", &target.display().to_string()]);
        user_error(&r, &["inside the cache"]);
    }
    assert_eq!(artifacts(&cache), before);
    assert!(!cache.join("exported").exists() && !cache.join("deep").exists());
    // Beside the cache is fine.
    let out = dir.path().join("cache-export");
    let r = sepo(&["export", &p, "base", &out.display().to_string()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

/// Stage names that are awkward in DOT and mermaid (a stage name is any YAML key).
const NAMES: &[&str] = &[
    "tok\"1\"[x]|y\nz",
    "end",
    "a#quot;b<c>&`d`",
    "m(1){2};",
    "plain",
    "stage_0",
    "tab\there",
];

fn dag_yaml() -> String {
    let yaml_str = |s: &str| serde_json::to_string(s).unwrap(); // JSON strings are YAML
    let mut y = format!(
        "name: {}\nstages:\n  {}: {{kind: tokenizer, path: {}}}\n",
        yaml_str("my \"dag\" \\ x"),
        yaml_str(NAMES[0]),
        data("data/tokenizers/gpt2/tokenizer.json")
    );
    for n in &NAMES[1..] {
        y.push_str(&format!(
            "  {}: {{kind: model, inputs: {{tokenizer: {}}}, config: {{vocab_size: 64, hidden_size: 8, num_attention_heads: 2, num_hidden_layers: 1}}}}\n",
            yaml_str(n),
            yaml_str(NAMES[0])
        ));
    }
    y
}

/// The quoted strings of a DOT line, lexed as graphviz does (`\"` is a quote, `\\` a pair),
/// then unescaped as sepo escapes (`\\`, `\"`, `\n`, `\r`); and the line with each string
/// replaced by `S`, to check the statement's shape.
fn dot_line(line: &str) -> (Vec<String>, String) {
    let mut strings = Vec::new();
    let mut shape = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c != '"' {
            shape.push(c);
            continue;
        }
        let mut s = String::new();
        loop {
            match chars.next().expect("unterminated DOT string") {
                '"' => break,
                '\\' => match chars.next().expect("dangling backslash") {
                    '"' => s.push('"'),
                    '\\' => s.push('\\'),
                    'n' => s.push('\n'),
                    'r' => s.push('\r'),
                    other => panic!("unexpected escape \\{other} in {line:?}"),
                },
                other => s.push(other),
            }
        }
        strings.push(s);
        shape.push('S');
    }
    (strings, shape)
}

#[test]
fn dag_output_escapes_any_stage_name() {
    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(dir.path(), &dag_yaml());

    // DOT: every line a complete statement; ids read back to the exact names.
    let r = sepo(&["dag", &p, "--format", "dot"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    let (title, shape) = dot_line(lines[0]);
    assert_eq!(
        (title[0].as_str(), shape.as_str()),
        ("my \"dag\" \\ x", "digraph S {")
    );
    assert_eq!(lines[1], "  rankdir=LR;");
    assert_eq!(*lines.last().unwrap(), "}");
    let mut nodes = Vec::new();
    let mut edges = Vec::new();
    for l in &lines[2..lines.len() - 1] {
        let (s, shape) = dot_line(l);
        match shape.as_str() {
            "  S [label=S];" => {
                let kind_ok = s[1].ends_with("\n(model)") || s[1].ends_with("\n(tokenizer)");
                assert!(s[1].starts_with(&s[0]) && kind_ok, "{s:?}");
                nodes.push(s[0].clone());
            }
            "  S -> S [label=S];" => edges.push((s[0].clone(), s[1].clone(), s[2].clone())),
            other => panic!("not a DOT statement: {other:?} from {l:?}"),
        }
    }
    let mut want: Vec<String> = NAMES.iter().map(|s| s.to_string()).collect();
    want.sort();
    nodes.sort();
    assert_eq!(nodes, want);
    assert_eq!(edges.len(), NAMES.len() - 1);
    assert!(edges.iter().all(|e| e.0 == NAMES[0] && e.2 == "tokenizer"));

    // Mermaid: plain ids or stage_<n>, unique; labels quoted without a raw quote or line break;
    // entity codes decode back to the names.
    let r = sepo(&["dag", &p, "--format", "mermaid"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines[0], "graph TD");
    let plain = |id: &str| {
        id.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && id.chars().all(|c| c.is_ascii_alphanumeric())
            && id != "end"
    };
    let generated = |id: &str| {
        id.strip_prefix("stage_")
            .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
    };
    let decode = |label: &str| -> String {
        let mut out = String::new();
        let mut rest = label.replace("<br>", "\n").replace("#quot;", "\"");
        while let Some(i) = rest.find('#') {
            out.push_str(&rest[..i]);
            let end = rest[i..].find(';').expect("entity ends with ;") + i;
            let code: u32 = rest[i + 1..end].parse().expect("numeric entity");
            out.push(char::from_u32(code).unwrap());
            rest = rest[end + 1..].to_string();
        }
        out + &rest
    };
    let mut ids = std::collections::HashMap::new();
    let mut edges = 0;
    for l in &lines[1..] {
        let l = l.strip_prefix("  ").expect("indented");
        if let Some((from, rest)) = l.split_once(" -->|") {
            let (role, to) = rest.split_once("| ").expect("edge label");
            assert_eq!(role, "tokenizer");
            assert!(ids.contains_key(from) && ids.contains_key(to), "{l}");
            edges += 1;
            continue;
        }
        let (id, label) = l.split_once("[\"").expect("node");
        let label = label.strip_suffix("\"]").expect("closed label");
        assert!(plain(id) || generated(id), "bad id {id:?}");
        assert!(!label.contains('"') && !label.contains('\n'), "{label:?}");
        let text = decode(label);
        let name = text
            .strip_suffix(" (model)")
            .or_else(|| text.strip_suffix(" (tokenizer)"))
            .expect("kind");
        assert!(
            ids.insert(id, name.to_string()).is_none(),
            "duplicate id {id}"
        );
    }
    let mut names: Vec<String> = ids.values().cloned().collect();
    names.sort();
    assert_eq!(names, want);
    assert_eq!(edges, NAMES.len() - 1);
    assert_eq!(ids.get("plain").map(String::as_str), Some("plain"));
}
