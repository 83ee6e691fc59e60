//! `sepo compare`: the built evaluate reports of a pipeline in one table (see `crate::compare`).

use std::io::Write;

use anyhow::Result;
use clap::Args;

use super::{PipelineArgs, plan};
use crate::compare::{Format, Table, gather};
use crate::progress::Progress;

#[derive(Args, Debug)]
pub struct CompareArgs {
    #[command(flatten)]
    p: PipelineArgs,
    /// Long form as JSON: [{"evaluate","method","role","metric","mean","std","n_seeds","params"}].
    #[arg(long, conflicts_with = "format")]
    json: bool,
    /// text and md: methods as rows, metrics as columns; csv: long form.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

pub fn run(a: CompareArgs, out: &mut dyn Write) -> Result<i32> {
    let plan = plan(&a.p)?;
    let table = Table::aggregate(&gather(&plan, &Progress::new(a.p.quiet))?);
    if a.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&table.to_json())?)?;
    } else {
        table.write(out, a.format)?;
    }
    Ok(0)
}
