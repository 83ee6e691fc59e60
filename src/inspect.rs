//! Reading a plan and its built artifacts back for the user: `sepo status` and `sepo verify`, `sepo
//! show`'s schema, row count and first rows (or, with `--html`, the key-token view of
//! [`crate::keyview`]), and the `model/` folder of a model stage for `export` and `generate`.
//! Reading an artifact refuses one that no longer matches its manifest.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use serde_json::{Value, json};

use crate::pipeline::executor::Plan;
use crate::user_bail;

/// Each stage's state (`fresh` when the artifact of its current hash exists, else `stale`) and
/// hash: one line per stage, or SPEC's JSON `[{"stage","kind","state","hash","path"}]`.
pub fn status(out: &mut dyn Write, plan: &Plan, json: bool) -> Result<()> {
    let state = |fresh: bool| if fresh { "fresh" } else { "stale" };
    let last = crate::pipeline::why::last_built(plan);
    if json {
        let rows: Vec<Value> = plan
            .stages
            .iter()
            .map(|s| {
                json!({
                    "stage": s.name,
                    "kind": s.kind.kind,
                    "state": state(s.fresh),
                    "hash": s.hash,
                    "path": plan.artifact_dir(s).display().to_string(),
                    "why": crate::pipeline::why::why(plan, s, &last),
                })
            })
            .collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
    } else {
        let w = plan.name_width();
        for s in &plan.stages {
            let (name, kind) = (&s.name, s.kind.kind);
            let why = crate::pipeline::why::why(plan, s, &last);
            let why = if why.is_empty() {
                String::new()
            } else {
                format!("  ({})", why.join("; "))
            };
            writeln!(
                out,
                "{name:<w$} {kind:<10} {:<6} {}{why}",
                state(s.fresh),
                s.hash
            )?;
        }
    }
    Ok(())
}

/// Re-hashes every stored artifact of the plan: one line per stage (`ok`, `missing`, or a
/// `CHANGED` line per problem). Returns how many artifacts changed.
pub fn verify(out: &mut dyn Write, plan: &Plan) -> Result<usize> {
    let mut bad = 0;
    let w = plan.name_width();
    for s in &plan.stages {
        if !s.fresh {
            writeln!(out, "{:<w$} missing", s.name)?;
            continue;
        }
        let problems = plan.store.verify(s.kind.kind, &s.hash)?;
        if problems.is_empty() {
            writeln!(out, "{:<w$} ok", s.name)?;
        } else {
            bad += 1;
            for pr in problems {
                writeln!(out, "{:<w$} CHANGED {pr}", s.name)?;
            }
        }
    }
    Ok(bad)
}

/// The `model/` folder of a fresh model or train stage.
pub fn model_dir(plan: &Plan, stage: &str) -> Result<PathBuf> {
    let s = plan.get(stage)?;
    if !matches!(s.kind.kind, "model" | "train") {
        user_bail!(
            "stage `{stage}` is a {} stage, not a model (model or train)",
            s.kind.kind
        );
    }
    if !s.fresh {
        user_bail!(
            "stage `{stage}` is not built yet: run `sepo run {} --stage {stage}`",
            plan.pipeline.file.display()
        );
    }
    // Refuses to hand out a folder that no longer matches its manifest.
    plan.intact_manifest(stage)?;
    Ok(
        crate::artifacts::model::ModelDir::in_artifact(&plan.artifact_dir(s))
            .path()
            .to_path_buf(),
    )
}

/// What `sepo show` prints of an artifact.
pub enum View {
    /// Its folder only.
    Path,
    /// Its main Parquet file: schema, row count and first `rows` rows (or, for an artifact
    /// without one, its files and sizes), as text or JSON.
    Preview { rows: usize, json: bool },
    /// The key-token view of a select or score stage, written as an HTML page to this file.
    Html(PathBuf),
}

impl View {
    /// The view `sepo show`'s flags ask for: `--path`, else `--html OUT`, else a preview.
    pub fn of(path: bool, html: Option<PathBuf>, rows: usize, json: bool) -> View {
        match (path, html) {
            (true, _) => View::Path,
            (false, Some(file)) => View::Html(file),
            (false, None) => View::Preview { rows, json },
        }
    }
}

/// `sepo show`: the artifact of `stage`'s current hash, which must exist.
pub fn show(out: &mut dyn Write, plan: &Plan, stage: &str, view: View) -> Result<()> {
    if let View::Html(file) = &view {
        crate::keyview::write_page(plan, stage, file)?;
        writeln!(out, "{}", file.display())?;
        return Ok(());
    }
    let s = plan.get(stage)?;
    if !s.fresh {
        user_bail!(
            "stage `{stage}` has no artifact for its current hash {} (run `sepo run {} --stage {stage}`)",
            s.hash,
            plan.pipeline.file.display()
        );
    }
    let dir = &plan.artifact_dir(s);
    let View::Preview { rows, json } = view else {
        writeln!(out, "{}", dir.display())?;
        return Ok(());
    };
    let manifest = plan.intact_manifest(stage)?;
    let Some(main) = manifest.files.iter().find(|f| f.path.ends_with(".parquet")) else {
        if json {
            writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(
                    &json!({"stage": stage, "path": dir, "files": manifest.files})
                )?
            )?;
        } else {
            writeln!(out, "{stage}: {}", dir.display())?;
            for f in &manifest.files {
                writeln!(out, "  {:<40} {:>12} bytes", f.path, f.size)?;
            }
        }
        return Ok(());
    };
    let file = dir.join(&main.path);
    let df = crate::data::parquet::read(&file)?;
    let head = df.head(Some(rows));
    if json {
        let schema: serde_json::Map<String, Value> = df
            .schema()
            .iter()
            .map(|(n, t)| (n.to_string(), Value::String(format!("{t}"))))
            .collect();
        let v = json!({
            "stage": stage,
            "path": file,
            "rows": df.height(),
            "schema": schema,
            "head": crate::data::parquet::rows_as_json(&head)?,
            "stats": manifest.stats,
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        writeln!(out, "{} ({} rows)", file.display(), df.height())?;
        for (n, t) in df.schema().iter() {
            writeln!(out, "  {n}: {t}")?;
        }
        writeln!(out, "{head}")?;
    }
    Ok(())
}
