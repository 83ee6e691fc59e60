//! `sepo dag`: the stage graph as text, mermaid or DOT. A stage name is any YAML key, so DOT and
//! mermaid quote and escape every name (see SPEC.md).

use std::io::Write;

use anyhow::Result;

use super::executor::Plan;

/// How `sepo dag` draws the graph. A value of `--format`, hence clap's derive: the names are
/// what users type.
#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum Format {
    Text,
    Mermaid,
    Dot,
}

/// The graph of `plan` in `format`.
pub fn write(out: &mut dyn Write, plan: &Plan, format: Format) -> Result<()> {
    match format {
        Format::Text => text(out, plan),
        Format::Mermaid => mermaid(out, plan),
        Format::Dot => dot(out, plan),
    }
}

/// One line per stage in topological order: `name (kind, state) <- role=upstream,...`.
pub fn text(out: &mut dyn Write, plan: &Plan) -> Result<()> {
    for s in &plan.stages {
        let ins: Vec<String> = s
            .inputs
            .iter()
            .map(|(role, ups)| format!("{role}={}", ups.join(",")))
            .collect();
        let state = match (&s.missing, s.fresh) {
            (Some(m), _) => format!("needs files: {m}"),
            (None, true) => "fresh".into(),
            (None, false) => "stale".into(),
        };
        if ins.is_empty() {
            writeln!(out, "{} ({}, {state})", s.name, s.kind.kind)?;
        } else {
            writeln!(
                out,
                "{} ({}, {state}) <- {}",
                s.name,
                s.kind.kind,
                ins.join(" ")
            )?;
        }
    }
    Ok(())
}

/// A mermaid flowchart.
pub fn mermaid(out: &mut dyn Write, plan: &Plan) -> Result<()> {
    // A stage name is any YAML key: node ids are the name only when mermaid reads it as
    // a plain id, else `stage_<position>` (plain ids never hold `_`, so the two cannot
    // collide); labels are quoted with mermaid's entity codes.
    let ids: std::collections::HashMap<&str, String> = plan
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.as_str(), mermaid_id(&s.name, i)))
        .collect();
    writeln!(out, "graph TD")?;
    for s in &plan.stages {
        writeln!(
            out,
            "  {}[\"{} ({})\"]",
            ids[s.name.as_str()],
            mermaid_text(&s.name),
            mermaid_text(s.kind.kind)
        )?;
    }
    for s in &plan.stages {
        for (role, ups) in &s.inputs {
            let label = if is_plain_id(role) {
                role.clone()
            } else {
                format!("\"{}\"", mermaid_text(role))
            };
            for u in ups {
                writeln!(
                    out,
                    "  {} -->|{label}| {}",
                    ids[u.as_str()],
                    ids[s.name.as_str()]
                )?;
            }
        }
    }
    Ok(())
}

/// A graphviz digraph.
pub fn dot(out: &mut dyn Write, plan: &Plan) -> Result<()> {
    writeln!(out, "digraph {} {{", dot_string(&plan.pipeline.name))?;
    writeln!(out, "  rankdir=LR;")?;
    for s in &plan.stages {
        // `\n` in a label is graphviz's line break; in the id it is two plain characters.
        writeln!(
            out,
            "  {} [label=\"{}\\n({})\"];",
            dot_string(&s.name),
            dot_escape(&s.name),
            dot_escape(s.kind.kind)
        )?;
    }
    for s in &plan.stages {
        for (role, ups) in &s.inputs {
            for u in ups {
                writeln!(
                    out,
                    "  {} -> {} [label={}];",
                    dot_string(u),
                    dot_string(&s.name),
                    dot_string(role)
                )?;
            }
        }
    }
    writeln!(out, "}}")?;
    Ok(())
}

/// A DOT double-quoted string's content: `"` and `\` escaped (graphviz reads `\\` as a pair, so
/// a name ending in a backslash cannot escape the closing quote), line breaks as `\n` and `\r`.
fn dot_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out
}

/// `s` as a DOT quoted string (an id or an attribute value).
fn dot_string(s: &str) -> String {
    format!("\"{}\"", dot_escape(s))
}

/// Whether mermaid reads `s` as a plain node id: ASCII letters and digits starting with a
/// letter, and not one of its keywords (`end` would close a block).
fn is_plain_id(s: &str) -> bool {
    const KEYWORDS: &[&str] = &[
        "end",
        "graph",
        "flowchart",
        "subgraph",
        "direction",
        "style",
        "linkstyle",
        "classdef",
        "class",
        "click",
        "call",
        "href",
        "callback",
        "default",
        "interpolate",
        "accdescr",
        "acctitle",
    ];
    s.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && s.chars().all(|c| c.is_ascii_alphanumeric())
        && !KEYWORDS.contains(&s.to_ascii_lowercase().as_str())
}

/// The mermaid node id of the stage at `position` named `name`.
fn mermaid_id(name: &str, position: usize) -> String {
    if is_plain_id(name) {
        name.to_string()
    } else {
        format!("stage_{position}")
    }
}

/// Text for inside a mermaid `"..."` label: every character that could end the string or be
/// read as markup becomes an entity code (`#quot;`, `#35;`, ...), line breaks `<br>`.
fn mermaid_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("#quot;"),
            '\n' => out.push_str("<br>"),
            // `#` too, or a name holding `#quot;` would be read as an entity.
            '#' | '<' | '>' | '&' | '`' => out.push_str(&format!("#{};", c as u32)),
            c if c.is_control() => out.push_str(&format!("#{};", c as u32)),
            c => out.push(c),
        }
    }
    out
}
