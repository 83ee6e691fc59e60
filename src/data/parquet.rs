//! Parquet artifacts through Polars: builders for the list and struct columns of SPEC.md's
//! schemas, a row-to-JSON view for ingesting user Parquet, and typed column readers.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use polars::prelude::*;
use serde_json::Value;

use crate::error::user;
use crate::user_bail;

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

    pub fn i64s(&self, name: &str) -> Result<Vec<i64>> {
        Ok(self
            .col(name)?
            .cast(&DataType::Int64)?
            .i64()?
            .iter()
            .map(|x| x.unwrap_or(0))
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

/// Every row as a JSON object, for `sepo show` on artifacts (which hold only types sepo writes).
/// Lenient: bytes that are not UTF-8 are shown with replacement characters, and a type without a
/// JSON form as its Polars text.
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

/// One Polars value as JSON (nested lists and structs included), lenient as [`rows_as_json`].
pub fn any_to_json(v: &AnyValue) -> Value {
    to_json(v).unwrap_or_else(|e| match e {
        NotJson::Bytes(b) => Value::String(String::from_utf8_lossy(&b).into_owned()),
        NotJson::Type => Value::String(v.to_string()),
    })
}

/// Why a value has no JSON form.
enum NotJson {
    /// Binary data that is not UTF-8 text (the bytes, for a lenient caller).
    Bytes(Vec<u8>),
    /// A type sepo does not convert (not reached for columns `unreadable_part` lets through).
    Type,
}

fn to_json(v: &AnyValue) -> std::result::Result<Value, NotJson> {
    let number = |x: f64| serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number);
    Ok(match v {
        AnyValue::Null => Value::Null,
        AnyValue::Boolean(b) => Value::Bool(*b),
        AnyValue::UInt8(x) => Value::from(*x),
        AnyValue::UInt16(x) => Value::from(*x),
        AnyValue::UInt32(x) => Value::from(*x),
        AnyValue::UInt64(x) => Value::from(*x),
        AnyValue::Int8(x) => Value::from(*x),
        AnyValue::Int16(x) => Value::from(*x),
        AnyValue::Int32(x) => Value::from(*x),
        AnyValue::Int64(x) => Value::from(*x),
        AnyValue::Float32(x) => number(f64::from(*x)),
        AnyValue::Float64(x) => number(*x),
        // Text stored as bytes (some writers do that) is text to sepo, never `b"..."`.
        AnyValue::Binary(b) => bytes_to_json(b)?,
        AnyValue::BinaryOwned(b) => bytes_to_json(b)?,
        AnyValue::List(s) => Value::Array(
            s.iter()
                .map(|x| to_json(&x))
                .collect::<std::result::Result<_, _>>()?,
        ),
        AnyValue::Struct(_, _, fields) => {
            let vals: Vec<AnyValue> = v._iter_struct_av().collect();
            Value::Object(
                fields
                    .iter()
                    .zip(vals.iter())
                    .map(|(f, x)| Ok((f.name().to_string(), to_json(x)?)))
                    .collect::<std::result::Result<_, _>>()?,
            )
        }
        AnyValue::StructOwned(b) => {
            let (vals, fields) = &**b;
            Value::Object(
                fields
                    .iter()
                    .zip(vals.iter())
                    .map(|(f, x)| Ok((f.name().to_string(), to_json(x)?)))
                    .collect::<std::result::Result<_, _>>()?,
            )
        }
        // Strings, and categoricals (pandas' `category` columns) by their text.
        other => match other.get_str() {
            Some(s) => Value::String(s.to_string()),
            None => return Err(NotJson::Type),
        },
    })
}

fn bytes_to_json(b: &[u8]) -> std::result::Result<Value, NotJson> {
    match std::str::from_utf8(b) {
        Ok(s) => Ok(Value::String(s.to_string())),
        Err(_) => Err(NotJson::Bytes(b.to_vec())),
    }
}

/// Reads a user's Parquet file as JSON rows, in file order. Only the columns in `columns` are read
/// (all when `None`); a name there may be `struct.field` to read `struct` only when it has that
/// field. Columns a format does not use are never decoded, so their types do not matter; a used
/// column of a type sepo cannot decode is an input error naming file, column and type.
pub fn read_rows(path: &Path, columns: Option<&[&str]>) -> Result<Vec<Value>> {
    let f = std::fs::File::open(path)
        .map_err(|e| user(format!("{}: cannot open: {e}", path.display())))?;
    let unreadable = |e: PolarsError| {
        user(format!(
            "{}: not a readable Parquet file: {e}",
            path.display()
        ))
    };
    let mut reader = ParquetReader::new(f);
    let schema = reader.schema().map_err(unreadable)?;
    let wanted: Vec<String> = schema
        .iter()
        .filter(|(name, field)| {
            columns.is_none_or(|cols| {
                cols.iter().any(|c| match c.split_once('.') {
                    Some((top, sub)) => {
                        top == name.as_str()
                            && matches!(field.dtype(), ArrowDataType::Struct(fs)
                                if fs.iter().any(|f| f.name.as_str() == sub))
                    }
                    None => *c == name.as_str(),
                })
            })
        })
        .map(|(name, _)| name.to_string())
        .collect();
    for name in &wanted {
        let Some(dtype) = schema.get(name.as_str()).map(|f| f.dtype()) else {
            continue;
        };
        if let Some((part, bad)) = unreadable_part(dtype, name) {
            let at = if part == *name {
                String::new()
            } else {
                format!(" ({} at `{part}`)", type_name(bad))
            };
            user_bail!(
                "{}: column `{name}` has type {}{at}, which sepo cannot read; cast it to a type it \
                 reads (string, binary, bool, int32, int64, float32, float64, or lists and structs \
                 of these) or drop the column",
                path.display(),
                type_name(dtype)
            );
        }
    }
    if wanted.is_empty() {
        // No column to decode, but the rows still count (each misses every field).
        let n = reader.num_rows().map_err(unreadable)?;
        return Ok(vec![Value::Object(serde_json::Map::new()); n]);
    }
    let df = reader
        .with_columns(Some(wanted))
        .finish()
        .map_err(unreadable)?;
    let mut rows: Vec<serde_json::Map<String, Value>> = vec![serde_json::Map::new(); df.height()];
    for col in df.columns() {
        let s = col.as_materialized_series();
        for (i, row) in rows.iter_mut().enumerate() {
            let v = s.get(i).map_err(unreadable)?;
            let json = to_json(&v).map_err(|e| match e {
                NotJson::Bytes(_) => user(format!(
                    "{} row {}: column `{}` holds bytes that are not UTF-8 text",
                    path.display(),
                    i + 1,
                    s.name()
                )),
                NotJson::Type => user(format!(
                    "{}: column `{}` has type {}, which sepo cannot read",
                    path.display(),
                    s.name(),
                    s.dtype()
                )),
            })?;
            row.insert(s.name().to_string(), json);
        }
    }
    Ok(rows.into_iter().map(Value::Object).collect())
}

/// The column names of a Parquet file (from its footer), for messages about missing fields.
pub fn column_names(path: &Path) -> Result<Vec<String>> {
    let f = std::fs::File::open(path)
        .map_err(|e| user(format!("{}: cannot open: {e}", path.display())))?;
    let schema = ParquetReader::new(f).schema().map_err(|e| {
        user(format!(
            "{}: not a readable Parquet file: {e}",
            path.display()
        ))
    })?;
    Ok(schema.iter().map(|(n, _)| n.to_string()).collect())
}

/// The first part of a column (itself, or a nested field as `a.b` / `a[]`) whose type Polars, as
/// built here, cannot turn into a Series: decoding such a column fails or panics inside Polars, so
/// it is refused before it is read.
fn unreadable_part<'a>(
    dtype: &'a ArrowDataType,
    path: &str,
) -> Option<(String, &'a ArrowDataType)> {
    use ArrowDataType as A;
    match dtype {
        A::Null
        | A::Boolean
        | A::Int32
        | A::Int64
        | A::UInt8
        | A::UInt16
        | A::UInt32
        | A::UInt64
        | A::Float32
        | A::Float64
        | A::Utf8
        | A::LargeUtf8
        | A::Utf8View
        | A::Binary
        | A::LargeBinary
        | A::BinaryView
        | A::FixedSizeBinary(_) => None,
        A::List(f) | A::LargeList(f) => unreadable_part(f.dtype(), &format!("{path}[]")),
        A::Struct(fields) if !fields.is_empty() => fields
            .iter()
            .find_map(|f| unreadable_part(f.dtype(), &format!("{path}.{}", f.name))),
        A::Dictionary(_, values, _) if matches!(**values, A::Utf8 | A::LargeUtf8 | A::Utf8View) => {
            None
        }
        other => Some((path.to_string(), other)),
    }
}

/// A Parquet/Arrow type as users know it from pyarrow.
fn type_name(dtype: &ArrowDataType) -> String {
    use ArrowDataType as A;
    let unit = |u: &ArrowTimeUnit| match u {
        ArrowTimeUnit::Second => "s",
        ArrowTimeUnit::Millisecond => "ms",
        ArrowTimeUnit::Microsecond => "us",
        ArrowTimeUnit::Nanosecond => "ns",
    };
    match dtype {
        A::Null => "null".into(),
        A::Boolean => "bool".into(),
        A::Int8 => "int8".into(),
        A::Int16 => "int16".into(),
        A::Int32 => "int32".into(),
        A::Int64 => "int64".into(),
        A::Int128 => "int128".into(),
        A::UInt8 => "uint8".into(),
        A::UInt16 => "uint16".into(),
        A::UInt32 => "uint32".into(),
        A::UInt64 => "uint64".into(),
        A::UInt128 => "uint128".into(),
        A::Float16 => "float16".into(),
        A::Float32 => "float32".into(),
        A::Float64 => "float64".into(),
        A::Utf8 | A::LargeUtf8 | A::Utf8View => "string".into(),
        A::Binary | A::LargeBinary | A::BinaryView => "binary".into(),
        A::FixedSizeBinary(n) => format!("fixed_size_binary[{n}]"),
        A::Date32 => "date32".into(),
        A::Date64 => "date64".into(),
        A::Timestamp(u, None) => format!("timestamp[{}]", unit(u)),
        A::Timestamp(u, Some(tz)) => format!("timestamp[{}, tz={tz}]", unit(u)),
        A::Time32(u) | A::Time64(u) => format!("time[{}]", unit(u)),
        A::Duration(u) => format!("duration[{}]", unit(u)),
        A::Decimal(p, s) | A::Decimal32(p, s) | A::Decimal64(p, s) | A::Decimal256(p, s) => {
            format!("decimal({p}, {s})")
        }
        A::List(f) | A::LargeList(f) => format!("list<{}>", type_name(f.dtype())),
        A::FixedSizeList(f, n) => format!("fixed_size_list<{}>[{n}]", type_name(f.dtype())),
        A::Struct(fields) => format!(
            "struct<{}>",
            fields
                .iter()
                .map(|f| format!("{}: {}", f.name, type_name(f.dtype())))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        A::Map(..) => "map".into(),
        A::Dictionary(_, values, _) => format!("dictionary<{}>", type_name(values)),
        A::Extension(ext) => format!("extension<{}>", ext.name),
        other => format!("{other:?}").to_lowercase(),
    }
}
