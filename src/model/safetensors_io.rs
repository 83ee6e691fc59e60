//! Reading Hugging Face weights (single `model.safetensors` or sharded with
//! `model.safetensors.index.json`; f32, f16, bf16, f64) and writing them (f32, deterministic).
//! Which files a folder's weights are is decided in one place, [`WeightSource::find`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

/// A tensor on the host, row-major f32.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Shape.
    pub shape: Vec<usize>,
    /// Values.
    pub data: Vec<f32>,
}

impl HostTensor {
    /// A new host tensor; panics when the sizes disagree.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "shape {shape:?}"
        );
        HostTensor { shape, data }
    }

    /// Transposes a 2-D tensor.
    pub fn transpose2(&self) -> HostTensor {
        let [r, c] = [self.shape[0], self.shape[1]];
        let mut out = vec![0f32; r * c];
        for i in 0..r {
            let row = &self.data[i * c..(i + 1) * c];
            for (j, &v) in row.iter().enumerate() {
                out[j * r + i] = v;
            }
        }
        HostTensor::new(vec![c, r], out)
    }
}

/// Which files hold a model folder's weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightSource {
    /// `model.safetensors`.
    Single(PathBuf),
    /// `model.safetensors.index.json` and the shards its `weight_map` names (sorted, each once).
    Sharded {
        /// The index.
        index: PathBuf,
        /// The shards.
        shards: Vec<PathBuf>,
    },
}

impl WeightSource {
    /// Finds the weights of `dir` by transformers' rule for a local folder
    /// (`_get_resolved_checkpoint_files`): `model.safetensors` when it exists, else the index
    /// and its shards. Loading and the `model` stage's hash both ask this one function, so a
    /// folder holding both forms hashes exactly the files it loads. Errors name the folder,
    /// and the index or shard at fault.
    pub fn find(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if single.is_file() {
            return Ok(WeightSource::Single(single));
        }
        if !index.is_file() {
            if dir.join("pytorch_model.bin").is_file() {
                bail!(
                    "{} has only pytorch_model.bin; sepo reads safetensors (convert with \
                     `transformers`: model.save_pretrained(dir, safe_serialization=True))",
                    dir.display()
                );
            }
            bail!(
                "no model.safetensors or model.safetensors.index.json in {}",
                dir.display()
            );
        }
        let text = std::fs::read_to_string(&index)
            .with_context(|| format!("cannot read {}", index.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{} has no `weight_map`", index.display()))?;
        let names: BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
        if names.is_empty() {
            bail!("{} lists no shard", index.display());
        }
        let shards: Vec<PathBuf> = names.into_iter().map(|f| dir.join(f)).collect();
        if let Some(missing) = shards.iter().find(|s| !s.is_file()) {
            bail!(
                "{}: shard listed in {} is missing",
                missing.display(),
                index.display()
            );
        }
        Ok(WeightSource::Sharded { index, shards })
    }

    /// The files tensors are read from.
    pub fn tensor_files(&self) -> &[PathBuf] {
        match self {
            WeightSource::Single(f) => std::slice::from_ref(f),
            WeightSource::Sharded { shards, .. } => shards,
        }
    }

    /// Every file that defines the weights, for hashing: the single file, or the index then
    /// its shards.
    pub fn files(&self) -> Vec<PathBuf> {
        match self {
            WeightSource::Single(f) => vec![f.clone()],
            WeightSource::Sharded { index, shards } => {
                std::iter::once(index).chain(shards).cloned().collect()
            }
        }
    }
}

/// The safetensors files of a model folder, read lazily tensor by tensor.
pub struct WeightFiles {
    files: Vec<(PathBuf, Vec<u8>)>,
    /// tensor name -> index into `files`
    index: BTreeMap<String, usize>,
    taken: BTreeSet<String>,
}

impl WeightFiles {
    /// Opens the weight files of a model folder ([`WeightSource::find`]).
    pub fn open(dir: &Path) -> Result<Self> {
        let paths = WeightSource::find(dir)?.tensor_files().to_vec();
        let mut files = Vec::new();
        let mut index = BTreeMap::new();
        for (i, path) in paths.into_iter().enumerate() {
            let bytes =
                std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            let st = SafeTensors::deserialize(&bytes).map_err(|e| {
                anyhow::anyhow!("{} is not a safetensors file: {e}", path.display())
            })?;
            for name in st.names() {
                if let Some(prev) = index.insert(name.to_string(), i)
                    && prev != i
                {
                    bail!("tensor `{name}` appears in two shards of {}", dir.display());
                }
            }
            drop(st);
            files.push((path, bytes));
        }
        Ok(WeightFiles {
            files,
            index,
            taken: BTreeSet::new(),
        })
    }

    /// All tensor names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// Whether a tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn path_of(&self, name: &str) -> Option<&Path> {
        self.index.get(name).map(|&i| self.files[i].0.as_path())
    }

    /// A description of where the weights live, for error messages.
    pub fn location(&self) -> String {
        match self.files.as_slice() {
            [(p, _)] => p.display().to_string(),
            files => format!(
                "{} ({} shards)",
                files[0].0.parent().unwrap_or(Path::new(".")).display(),
                files.len()
            ),
        }
    }

    /// Reads tensor `name` as f32, checking its shape. Errors name the tensor, the file and
    /// both shapes.
    pub fn take(&mut self, name: &str, expected: &[usize]) -> Result<HostTensor> {
        let Some(&i) = self.index.get(name) else {
            bail!(
                "weight `{name}` (expected shape {expected:?}) is missing from {}",
                self.location()
            );
        };
        let (path, bytes) = &self.files[i];
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let view = st
            .tensor(name)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        if view.shape() != expected {
            bail!(
                "weight `{name}` in {} has shape {:?}, expected {expected:?}",
                path.display(),
                view.shape()
            );
        }
        let data =
            to_f32(&view).with_context(|| format!("weight `{name}` in {}", path.display()))?;
        self.taken.insert(name.to_string());
        Ok(HostTensor::new(expected.to_vec(), data))
    }

    /// Marks a tensor as read without reading it (e.g. a duplicated tied `lm_head.weight`).
    pub fn skip(&mut self, name: &str) {
        if self.index.contains_key(name) {
            self.taken.insert(name.to_string());
        }
    }

    /// Errors when some tensor was never read, unless `ignorable` accepts its name.
    pub fn finish(&self, ignorable: impl Fn(&str) -> bool) -> Result<()> {
        let unexpected: Vec<&str> = self
            .index
            .keys()
            .filter(|n| !self.taken.contains(*n) && !ignorable(n))
            .map(String::as_str)
            .collect();
        if let Some(first) = unexpected.first() {
            let shape = self
                .path_of(first)
                .and_then(|_| {
                    let (_, bytes) = &self.files[self.index[*first]];
                    SafeTensors::deserialize(bytes)
                        .ok()
                        .and_then(|st| st.tensor(first).ok().map(|v| v.shape().to_vec()))
                })
                .unwrap_or_default();
            bail!(
                "unexpected weight `{first}` (shape {shape:?}) in {}{}",
                self.path_of(first)
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                if unexpected.len() > 1 {
                    format!(
                        " (and {} more: {})",
                        unexpected.len() - 1,
                        unexpected[1..].join(", ")
                    )
                } else {
                    String::new()
                }
            );
        }
        Ok(())
    }
}

fn to_f32(view: &TensorView<'_>) -> Result<Vec<f32>> {
    let bytes = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32)
            .collect(),
        other => bail!("dtype {other:?} is not supported (f32, f16, bf16, f64 are)"),
    })
}

/// Serializes tensors as f32 safetensors: names sorted, metadata `{"format":"pt"}`, so equal
/// weights give equal bytes.
pub fn serialize_f32(tensors: &[(String, HostTensor)]) -> Result<Vec<u8>> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            let mut b = Vec::with_capacity(t.data.len() * 4);
            for v in &t.data {
                b.extend_from_slice(&v.to_le_bytes());
            }
            (name.clone(), t.shape.clone(), b)
        })
        .collect();
    let mut views = Vec::with_capacity(bytes.len());
    let mut seen = BTreeSet::new();
    for (name, shape, b) in &bytes {
        if !seen.insert(name.as_str()) {
            bail!("tensor `{name}` written twice");
        }
        let view = TensorView::new(Dtype::F32, shape.clone(), b)
            .map_err(|e| anyhow::anyhow!("tensor `{name}`: {e}"))?;
        views.push((name.as_str(), view));
    }
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    safetensors::serialize(views, Some(metadata)).map_err(|e| anyhow::anyhow!("safetensors: {e}"))
}

/// Reads every tensor of a safetensors file as f32 (for tests and tools).
pub fn read_all_f32(path: &Path) -> Result<BTreeMap<String, HostTensor>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let st =
        SafeTensors::deserialize(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let data = to_f32(&view)?;
        out.insert(name, HostTensor::new(view.shape().to_vec(), data));
    }
    Ok(out)
}
