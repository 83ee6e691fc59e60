//! Content hashing: canonical JSON, stage hashes and file hashes (with a stat cache so a no-op
//! rerun does not re-read every data file).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Length of the hex digest used in artifact paths (80 bits).
pub const HASH_HEX_LEN: usize = 20;

/// Canonical JSON: object keys sorted at every depth, no whitespace, numbers as serde_json prints
/// them (shortest round-trip form), so equal values always give equal bytes.
pub fn canonical_json(v: &Value) -> String {
    fn sort(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let sorted: BTreeMap<&String, Value> =
                    m.iter().map(|(k, v)| (k, sort(v))).collect();
                let mut out = serde_json::Map::new();
                for (k, v) in sorted {
                    out.insert(k.clone(), v);
                }
                Value::Object(out)
            }
            Value::Array(a) => Value::Array(a.iter().map(sort).collect()),
            other => other.clone(),
        }
    }
    serde_json::to_string(&sort(v)).expect("JSON values always serialize")
}

/// What goes into a stage hash. The stage's name and the device are deliberately absent.
#[derive(Debug, Serialize)]
pub struct HashInput<'a> {
    pub kind: &'a str,
    pub version: &'a str,
    pub params: &'a Value,
    /// Role -> upstream hash (or list of hashes, in the order written).
    pub inputs: &'a BTreeMap<String, Value>,
    /// Content hashes of external files, in the order the stage reads them.
    pub files: &'a [String],
}

pub fn stage_hash(h: &HashInput) -> String {
    let v = serde_json::to_value(h).expect("serializable");
    let digest = blake3::hash(canonical_json(&v).as_bytes());
    digest.to_hex()[..HASH_HEX_LEN].to_string()
}

/// blake3 of a file's bytes, hex.
pub fn hash_file(path: &Path) -> Result<String> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("{}: read failed", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().to_hex().to_string())
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct StatEntry {
    size: u64,
    mtime_ns: i128,
    blake3: String,
}

/// Remembers file hashes by (path, size, mtime), as DVC and git do, so unchanged files are not
/// re-read. A stale or corrupt cache file only costs a re-hash.
pub struct FileHasher {
    path: Option<PathBuf>,
    entries: Mutex<BTreeMap<String, StatEntry>>,
    dirty: Mutex<bool>,
}

impl FileHasher {
    /// A hasher whose memory lives in `cache_file` (read now, written by [`FileHasher::save`]).
    pub fn new(cache_file: Option<PathBuf>) -> FileHasher {
        let entries = cache_file
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        FileHasher {
            path: cache_file,
            entries: Mutex::new(entries),
            dirty: Mutex::new(false),
        }
    }

    pub fn hash(&self, path: &Path) -> Result<String> {
        let meta =
            std::fs::metadata(path).with_context(|| format!("{}: cannot stat", path.display()))?;
        let mtime_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(-1);
        let key = std::fs::canonicalize(path)
            .unwrap_or_else(|_| path.to_path_buf())
            .display()
            .to_string();
        if let Some(e) = self.entries.lock().expect("lock").get(&key)
            && e.size == meta.len()
            && e.mtime_ns == mtime_ns
            && mtime_ns >= 0
        {
            return Ok(e.blake3.clone());
        }
        let h = hash_file(path)?;
        self.entries.lock().expect("lock").insert(
            key,
            StatEntry {
                size: meta.len(),
                mtime_ns,
                blake3: h.clone(),
            },
        );
        *self.dirty.lock().expect("lock") = true;
        Ok(h)
    }

    /// Persists the memory; failures are ignored because it is only a speed-up.
    pub fn save(&self) {
        let Some(path) = &self.path else { return };
        if !*self.dirty.lock().expect("lock") {
            return;
        }
        let entries = self.entries.lock().expect("lock");
        if let Some(parent) = path.parent()
            && std::fs::create_dir_all(parent).is_ok()
        {
            let _ =
                crate::util::write_atomic(path, &serde_json::to_vec(&*entries).unwrap_or_default());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            (-1e12f64..1e12).prop_map(Value::from),
            "[a-z]{0,6}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-z]{1,4}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn reversed_keys(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let mut out = serde_json::Map::new();
                for (k, v) in m.iter().rev() {
                    out.insert(k.clone(), reversed_keys(v));
                }
                Value::Object(out)
            }
            Value::Array(a) => Value::Array(a.iter().map(reversed_keys).collect()),
            o => o.clone(),
        }
    }

    fn h(params: &Value, inputs: &BTreeMap<String, Value>) -> String {
        stage_hash(&HashInput {
            kind: "k",
            version: "1",
            params,
            inputs,
            files: &[],
        })
    }

    proptest! {
        #[test]
        fn key_order_never_changes_the_hash(v in arb_json()) {
            let inputs = BTreeMap::new();
            prop_assert_eq!(h(&v, &inputs), h(&reversed_keys(&v), &inputs));
        }

        #[test]
        fn equal_numbers_spelled_differently_hash_the_same(x in -1e6f64..1e6) {
            // YAML parses `1e-3` and `0.001` to the same f64, which prints one way.
            let a: serde_yaml::Value = serde_yaml::from_str(&format!("{x:e}")).unwrap();
            let b: serde_yaml::Value = serde_yaml::from_str(&format!("{x}")).unwrap();
            let ja = crate::pipeline::spec::yaml_to_json(&a, "t").unwrap();
            let jb = crate::pipeline::spec::yaml_to_json(&b, "t").unwrap();
            prop_assert_eq!(canonical_json(&ja), canonical_json(&jb));
        }

        #[test]
        fn changing_one_param_changes_the_hash(a in any::<i64>(), b in any::<i64>()) {
            prop_assume!(a != b);
            let inputs = BTreeMap::new();
            prop_assert_ne!(h(&json!({"x": a, "y": 1}), &inputs), h(&json!({"x": b, "y": 1}), &inputs));
        }

        #[test]
        fn input_hashes_are_part_of_the_hash(a in "[0-9a-f]{8}", b in "[0-9a-f]{8}") {
            prop_assume!(a != b);
            let p = json!({});
            let ia = BTreeMap::from([("data".to_string(), Value::from(a))]);
            let ib = BTreeMap::from([("data".to_string(), Value::from(b))]);
            prop_assert_ne!(h(&p, &ia), h(&p, &ib));
        }
    }

    #[test]
    fn kind_version_and_files_matter() {
        let p = json!({});
        let i = BTreeMap::new();
        let base = stage_hash(&HashInput {
            kind: "k",
            version: "1",
            params: &p,
            inputs: &i,
            files: &[],
        });
        let v2 = stage_hash(&HashInput {
            kind: "k",
            version: "2",
            params: &p,
            inputs: &i,
            files: &[],
        });
        let k2 = stage_hash(&HashInput {
            kind: "j",
            version: "1",
            params: &p,
            inputs: &i,
            files: &[],
        });
        let files = ["abc".to_string()];
        let f = stage_hash(&HashInput {
            kind: "k",
            version: "1",
            params: &p,
            inputs: &i,
            files: &files,
        });
        assert_eq!(base.len(), HASH_HEX_LEN);
        assert!(base != v2 && base != k2 && base != f);
    }

    #[test]
    fn file_hasher_notices_changes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.txt");
        std::fs::write(&f, "one").unwrap();
        let cache = dir.path().join("state.json");
        let fh = FileHasher::new(Some(cache.clone()));
        let h1 = fh.hash(&f).unwrap();
        assert_eq!(h1, blake3::hash(b"one").to_hex().to_string());
        fh.save();
        std::fs::write(&f, "two!").unwrap();
        let fh2 = FileHasher::new(Some(cache));
        assert_eq!(
            fh2.hash(&f).unwrap(),
            blake3::hash(b"two!").to_hex().to_string()
        );
    }
}
