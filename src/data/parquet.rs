//! Parquet artifacts through Polars: builders for the list and struct columns of SPEC.md's
//! schemas, a row-to-JSON view for ingesting user Parquet, and typed column readers.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use polars::prelude::*;
use serde_json::Value;

use crate::error::user;

/// Reads a whole Parquet file.
pub fn read(path: &Path) -> Result<DataFrame> {
    let f = std::fs::File::open(path)
        .map_err(|e| user(format!("{}: cannot open: {e}", path.display())))?;
    ParquetReader::new(f).finish().map_err(|e| {
        user(format!(
            "{}: not a readable Parquet file: {e}",
            path.display()
        ))
    })
}

/// Writes `df` to `path` (zstd; statistics on) and syncs it.
pub fn write(df: &mut DataFrame, path: &Path) -> Result<()> {
    let f = std::fs::File::create(path)
        .with_context(|| format!("{}: cannot create", path.display()))?;
    ParquetWriter::new(&f)
        .with_compression(ParquetCompression::Zstd(None))
        .with_statistics(StatisticsOptions::default())
        .finish(df)
        .map_err(|e| anyhow!("{}: write failed: {e}", path.display()))?;
    f.sync_all()?;
    Ok(())
}

pub fn utf8(name: &str, v: Vec<String>) -> Column {
    Column::new(name.into(), v)
}

pub fn opt_f64(name: &str, v: Vec<Option<f64>>) -> Column {
    Column::new(name.into(), v)
}

pub fn f32s(name: &str, v: Vec<f32>) -> Column {
    Column::new(name.into(), v)
}

pub fn bools(name: &str, v: Vec<bool>) -> Column {
    Column::new(name.into(), v)
}

/// A `list<T>` column from one vector per row.
pub fn list<T>(name: &str, rows: &[Vec<T>]) -> Column
where
    T: Clone,
    Series: NamedFrom<Vec<T>, [T]>,
{
    let mut lc: ListChunked = rows
        .iter()
        .map(|r| Some(Series::new(PlSmallStr::EMPTY, r.clone())))
        .collect();
    lc.rename(name.into());
    if rows.is_empty() {
        // An empty column still needs its inner type for the schema.
        let inner = Series::new(PlSmallStr::EMPTY, Vec::<T>::new());
        lc = ListChunked::full_null_with_dtype(name.into(), 0, inner.dtype());
    }
    lc.into_series().into_column()
}

/// A `list<struct<role utf8, content utf8>>` column: one chat per row.
pub fn messages(name: &str, rows: &[Vec<(String, String)>]) -> Result<Column> {
    let dtype = DataType::Struct(vec![
        Field::new("role".into(), DataType::String),
        Field::new("content".into(), DataType::String),
    ]);
    let mut series = Vec::with_capacity(rows.len());
    for r in rows {
        let roles = Series::new(
            "role".into(),
            r.iter().map(|m| m.0.as_str()).collect::<Vec<_>>(),
        );
        let contents = Series::new(
            "content".into(),
            r.iter().map(|m| m.1.as_str()).collect::<Vec<_>>(),
        );
        let s = StructChunked::from_series(PlSmallStr::EMPTY, r.len(), [roles, contents].iter())?;
        series.push(Some(s.into_series()));
    }
    let mut lc: ListChunked = if rows.is_empty() {
        ListChunked::full_null_with_dtype(name.into(), 0, &dtype)
    } else {
        series.into_iter().collect()
    };
    lc.rename(name.into());
    Ok(lc.into_series().into_column())
}

pub fn frame(columns: Vec<Column>) -> Result<DataFrame> {
    Ok(DataFrame::new_infer_height(columns)?)
}

/// Column accessors that name the file and column on failure.
pub struct Reader<'a> {
    pub df: &'a DataFrame,
    pub file: &'a Path,
}

impl Reader<'_> {
    fn col(&self, name: &str) -> Result<&Column> {
        self.df
            .column(name)
            .map_err(|_| anyhow!("{}: missing column `{name}`", self.file.display()))
    }

    pub fn strings(&self, name: &str) -> Result<Vec<String>> {
        let c = self.col(name)?.str()?;
        Ok(c.iter()
            .map(|s| s.unwrap_or_default().to_string())
            .collect())
    }

    pub fn opt_f64(&self, name: &str) -> Result<Vec<Option<f64>>> {
        Ok(self
            .col(name)?
            .cast(&DataType::Float64)?
            .f64()?
            .iter()
            .collect())
    }

    pub fn bools(&self, name: &str) -> Result<Vec<bool>> {
        Ok(self
            .col(name)?
            .bool()?
            .iter()
            .map(|b| b.unwrap_or(false))
            .collect())
    }

    /// Each row of a list column, its elements converted by `elems` (a null list is empty).
    fn lists<T>(
        &self,
        name: &str,
        elems: impl Fn(&Series) -> Result<Vec<T>>,
    ) -> Result<Vec<Vec<T>>> {
        let lc = self.col(name)?.list()?;
        (0..lc.len())
            .map(|i| lc.get_as_series(i).map_or(Ok(Vec::new()), |s| elems(&s)))
            .collect()
    }

    pub fn u32_lists(&self, name: &str) -> Result<Vec<Vec<u32>>> {
        self.lists(name, |s| {
            Ok(s.cast(&DataType::UInt32)?
                .u32()?
                .into_no_null_iter()
                .collect())
        })
    }

    pub fn f32_lists(&self, name: &str) -> Result<Vec<Vec<f32>>> {
        self.lists(name, |s| {
            Ok(s.cast(&DataType::Float32)?
                .f32()?
                .iter()
                .map(|x| x.unwrap_or(f32::NAN))
                .collect())
        })
    }

    pub fn bool_lists(&self, name: &str) -> Result<Vec<Vec<bool>>> {
        self.lists(name, |s| {
            Ok(s.bool()?.iter().map(|x| x.unwrap_or(false)).collect())
        })
    }

    pub fn has(&self, name: &str) -> bool {
        self.df.column(name).is_ok()
    }

    pub fn messages(&self, name: &str) -> Result<Vec<Vec<(String, String)>>> {
        self.lists(name, |s| {
            let st = s.struct_()?;
            let fields = st.fields_as_series();
            let role = fields
                .iter()
                .find(|f| f.name() == "role")
                .ok_or_else(|| anyhow!("no role"))?;
            let content = fields
                .iter()
                .find(|f| f.name() == "content")
                .ok_or_else(|| anyhow!("no content"))?;
            Ok(role
                .str()?
                .iter()
                .zip(content.str()?.iter())
                .map(|(r, c)| {
                    (
                        r.unwrap_or_default().to_string(),
                        c.unwrap_or_default().to_string(),
                    )
                })
                .collect())
        })
    }
}

/// Every row as a JSON object (for ingesting user Parquet with the same code as JSON Lines).
pub fn rows_as_json(df: &DataFrame) -> Result<Vec<Value>> {
    let names: Vec<String> = df
        .get_column_names()
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut rows: Vec<serde_json::Map<String, Value>> = vec![serde_json::Map::new(); df.height()];
    for (name, col) in names.iter().zip(df.columns()) {
        let s = col.as_materialized_series();
        for (i, row) in rows.iter_mut().enumerate() {
            row.insert(name.clone(), any_to_json(&s.get(i)?));
        }
    }
    Ok(rows.into_iter().map(Value::Object).collect())
}

/// One Polars value as JSON (nested lists and structs included).
pub fn any_to_json(v: &AnyValue) -> Value {
    match v {
        AnyValue::Null => Value::Null,
        AnyValue::Boolean(b) => Value::Bool(*b),
        AnyValue::String(s) => Value::String(s.to_string()),
        AnyValue::StringOwned(s) => Value::String(s.to_string()),
        AnyValue::UInt8(x) => Value::from(*x),
        AnyValue::UInt16(x) => Value::from(*x),
        AnyValue::UInt32(x) => Value::from(*x),
        AnyValue::UInt64(x) => Value::from(*x),
        AnyValue::Int8(x) => Value::from(*x),
        AnyValue::Int16(x) => Value::from(*x),
        AnyValue::Int32(x) => Value::from(*x),
        AnyValue::Int64(x) => Value::from(*x),
        AnyValue::Float32(x) => {
            serde_json::Number::from_f64(f64::from(*x)).map_or(Value::Null, Value::Number)
        }
        AnyValue::Float64(x) => serde_json::Number::from_f64(*x).map_or(Value::Null, Value::Number),
        AnyValue::List(s) => Value::Array(s.iter().map(|x| any_to_json(&x)).collect()),
        AnyValue::Struct(_, _, fields) => {
            let vals: Vec<AnyValue> = v._iter_struct_av().collect();
            Value::Object(
                fields
                    .iter()
                    .zip(vals.iter())
                    .map(|(f, x)| (f.name().to_string(), any_to_json(x)))
                    .collect(),
            )
        }
        AnyValue::StructOwned(b) => {
            let (vals, fields) = &**b;
            Value::Object(
                fields
                    .iter()
                    .zip(vals.iter())
                    .map(|(f, x)| (f.name().to_string(), any_to_json(x)))
                    .collect(),
            )
        }
        other => Value::String(other.to_string()),
    }
}
