//! Reading Hugging Face weights (single `model.safetensors` or sharded with
//! `model.safetensors.index.json`; f32, f16, bf16, f64) and writing them (f32, deterministic).
//! Which files a folder's weights are is decided in one place, [`WeightSource::find`].
//!
//! Both directions move each tensor's bytes once: reading parses a file's header and then reads
//! each tensor straight into the buffer that becomes its parameter (f32 on a little-endian host
//! needs no conversion); writing streams the header and each tensor's bytes to the file and
//! hashes them (blake3) on the way, the write system calls on a thread of their own. The sepo
//! crate itself is built without optimization in the dev profile, so nothing here walks the
//! values one by one: bytes are cast (`bytemuck`) and copied (`memcpy`), and transposes are the
//! kernel crate's or the backend's.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{Read, Write};
#[cfg(not(unix))]
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use super::Precision;

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

/// One safetensors file: its header, parsed, and the open file its tensors are read from (each
/// straight into its own buffer, never the whole file at once).
pub struct SafetensorsFile {
    path: PathBuf,
    file: File,
    /// Where the data section starts (8 + the header's length).
    data_start: u64,
    meta: Metadata,
}

/// The largest header accepted (safetensors' own limit).
const MAX_HEADER: u64 = 100_000_000;

impl SafetensorsFile {
    /// Opens `path` and parses its header as `SafeTensors::read_metadata` does (the same
    /// checks: header length, UTF-8, JSON, offsets that tile the data section, sizes that match
    /// the shapes, and a file exactly as long as header and data), without reading the data.
    pub fn open(path: &Path) -> Result<SafetensorsFile> {
        let bad = |e: &dyn std::fmt::Display| {
            anyhow::anyhow!("{} is not a safetensors file: {e}", path.display())
        };
        let mut file =
            File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
        let len = file
            .metadata()
            .with_context(|| format!("cannot read {}", path.display()))?
            .len();
        let mut n = [0u8; 8];
        file.read_exact(&mut n)
            .map_err(|_| bad(&"the header is too small"))?;
        let n = u64::from_le_bytes(n);
        if n > MAX_HEADER {
            return Err(bad(&"the header is too large"));
        }
        if 8 + n > len {
            return Err(bad(&"invalid header length"));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let text = std::str::from_utf8(&header).map_err(|e| bad(&e))?;
        let meta: Metadata = serde_json::from_str(text).map_err(|e| bad(&e))?;
        if 8 + n + meta.data_len() as u64 != len {
            return Err(bad(&"the metadata does not describe the whole file"));
        }
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            file,
            data_start: 8 + n,
            meta,
        })
    }

    fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.meta.info(name)
    }

    /// The header's `__metadata__`.
    pub fn metadata(&self) -> &Option<HashMap<String, String>> {
        self.meta.metadata()
    }

    /// Tensor `name`: its dtype, shape and raw (little-endian) bytes.
    pub fn read(&self, name: &str) -> Result<(Dtype, Vec<usize>, Vec<u8>)> {
        let info = self
            .info(name)
            .ok_or_else(|| anyhow::anyhow!("{}: no tensor `{name}`", self.path.display()))?;
        let (start, end) = info.data_offsets;
        let mut bytes = vec![0u8; end - start];
        self.read_into(info, &mut bytes)?;
        Ok((info.dtype, info.shape.clone(), bytes))
    }

    /// Reads `info`'s bytes into `dst` (exactly its length): one positioned read on Unix (safe
    /// from several threads at once), a seek and a read elsewhere.
    fn read_into(&self, info: &TensorInfo, dst: &mut [u8]) -> Result<()> {
        let (start, end) = info.data_offsets;
        debug_assert_eq!(end - start, dst.len());
        let at = self.data_start + start as u64;
        #[cfg(unix)]
        let read = std::os::unix::fs::FileExt::read_exact_at(&self.file, dst, at);
        #[cfg(not(unix))]
        let read = {
            let mut f = &self.file;
            f.seek(SeekFrom::Start(at)).and_then(|_| f.read_exact(dst))
        };
        read.with_context(|| format!("cannot read {}", self.path.display()))
    }

    /// Reads a tensor as f32 into `dst` (its element count): f32 bytes straight into place,
    /// other dtypes through one temporary buffer.
    fn read_f32(&self, info: &TensorInfo, dst: &mut [f32]) -> Result<()> {
        if info.dtype == Dtype::F32 {
            self.read_into(info, bytemuck::cast_slice_mut(dst))?;
            from_le_in_place(dst);
            return Ok(());
        }
        let (start, end) = info.data_offsets;
        let mut bytes = vec![0u8; end - start];
        self.read_into(info, &mut bytes)?;
        f32_from_bytes(info.dtype, &bytes, dst)
    }
}

/// The safetensors files of a model folder, read lazily tensor by tensor.
pub struct WeightFiles {
    files: Vec<SafetensorsFile>,
    /// tensor name -> index into `files`
    index: BTreeMap<String, usize>,
    taken: BTreeSet<String>,
}

impl WeightFiles {
    /// Opens the weight files of a model folder ([`WeightSource::find`]), reading their headers
    /// only.
    pub fn open(dir: &Path) -> Result<Self> {
        let paths = WeightSource::find(dir)?.tensor_files().to_vec();
        let mut files = Vec::new();
        let mut index = BTreeMap::new();
        for (i, path) in paths.into_iter().enumerate() {
            let f = SafetensorsFile::open(&path)?;
            for name in f.meta.tensors().into_keys() {
                if let Some(prev) = index.insert(name.clone(), i)
                    && prev != i
                {
                    bail!("tensor `{name}` appears in two shards of {}", dir.display());
                }
            }
            files.push(f);
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
        self.index.get(name).map(|&i| self.files[i].path.as_path())
    }

    /// A description of where the weights live, for error messages.
    pub fn location(&self) -> String {
        match self.files.as_slice() {
            [f] => f.path.display().to_string(),
            files => format!(
                "{} ({} shards)",
                files[0].path.parent().unwrap_or(Path::new(".")).display(),
                files.len()
            ),
        }
    }

    /// The file and header entry of tensor `name`, its shape checked. Errors name the tensor,
    /// the file and both shapes.
    fn find(&self, name: &str, expected: &[usize]) -> Result<(&SafetensorsFile, &TensorInfo)> {
        let Some(&i) = self.index.get(name) else {
            bail!(
                "weight `{name}` (expected shape {expected:?}) is missing from {}",
                self.location()
            );
        };
        let f = &self.files[i];
        let info = f
            .info(name)
            .ok_or_else(|| anyhow::anyhow!("{}: no tensor `{name}`", f.path.display()))?;
        if info.shape != expected {
            bail!(
                "weight `{name}` in {} has shape {:?}, expected {expected:?}",
                f.path.display(),
                info.shape
            );
        }
        Ok((f, info))
    }

    /// Reads tensor `name` as f32, checking its shape. Errors name the tensor, the file and
    /// both shapes.
    pub fn take(&mut self, name: &str, expected: &[usize]) -> Result<HostTensor> {
        let mut data = vec![0f32; expected.iter().product()];
        self.take_into(name, expected, &mut data)?;
        Ok(HostTensor::new(expected.to_vec(), data))
    }

    /// [`WeightFiles::take`] into `dst` (as many values as `expected` has), so that the parts
    /// of a fused parameter are read straight into place.
    pub fn take_into(&mut self, name: &str, expected: &[usize], dst: &mut [f32]) -> Result<()> {
        let (f, info) = self.find(name, expected)?;
        assert_eq!(dst.len(), expected.iter().product::<usize>(), "`{name}`");
        f.read_f32(info, dst)
            .with_context(|| format!("weight `{name}` in {}", f.path.display()))?;
        self.taken.insert(name.to_string());
        Ok(())
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
                .index
                .get(*first)
                .and_then(|&i| self.files[i].info(first))
                .map(|info| info.shape.clone())
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

/// Little-endian f32 (as read into place) to native: nothing on a little-endian host.
fn from_le_in_place(v: &mut [f32]) {
    if cfg!(target_endian = "big") {
        for x in v {
            *x = f32::from_bits(u32::from_le(x.to_bits()));
        }
    }
}

/// Converts little-endian `bytes` of `dtype` into `dst` (as many values).
fn f32_from_bytes(dtype: Dtype, bytes: &[u8], dst: &mut [f32]) -> Result<()> {
    use half::slice::HalfFloatSliceExt;
    match dtype {
        Dtype::F32 => {
            bytemuck::cast_slice_mut(dst).copy_from_slice(bytes);
            from_le_in_place(dst);
        }
        Dtype::F16 => {
            let mut h: Vec<half::f16> = bytemuck::pod_collect_to_vec(bytes);
            if cfg!(target_endian = "big") {
                for x in &mut h {
                    *x = half::f16::from_bits(u16::from_le(x.to_bits()));
                }
            }
            h.convert_to_f32_slice(dst);
        }
        Dtype::BF16 => {
            let mut h: Vec<half::bf16> = bytemuck::pod_collect_to_vec(bytes);
            if cfg!(target_endian = "big") {
                for x in &mut h {
                    *x = half::bf16::from_bits(u16::from_le(x.to_bits()));
                }
            }
            h.convert_to_f32_slice(dst);
        }
        Dtype::F64 => {
            for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(8)) {
                *d = f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32;
            }
        }
        other => bail!("dtype {other:?} is not supported (f32, f16, bf16, f64 are)"),
    }
    Ok(())
}

fn to_f32(view: &TensorView<'_>) -> Result<Vec<f32>> {
    let bytes = view.data();
    let n = view.shape().iter().product();
    let mut out = vec![0f32; n];
    f32_from_bytes(view.dtype(), bytes, &mut out)?;
    Ok(out)
}

/// An f32 tensor to write: its name, shape and values as little-endian bytes (borrowed where
/// possible: a parameter's bytes as the backend holds them, one part of a fused projection).
#[derive(Debug, Clone)]
pub struct TensorRef<'a> {
    /// Name.
    pub name: &'a str,
    /// Shape.
    pub shape: &'a [usize],
    /// Values, row-major, f32 little-endian.
    pub bytes: Cow<'a, [u8]>,
}

impl<'a> TensorRef<'a> {
    /// A tensor of f32 values (borrowed as bytes on a little-endian host).
    pub fn f32(name: &'a str, shape: &'a [usize], data: &'a [f32]) -> Self {
        let bytes = if cfg!(target_endian = "little") {
            Cow::Borrowed(bytemuck::cast_slice(data))
        } else {
            Cow::Owned(data.iter().flat_map(|v| v.to_le_bytes()).collect())
        };
        TensorRef { name, shape, bytes }
    }
}

/// What was written: the file's size and blake3, computed from the bytes on their way out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// Bytes.
    pub size: u64,
    /// blake3, hex.
    pub blake3: String,
}

/// The start of a safetensors file, exactly as `safetensors::serialize` writes it: the header's
/// length (u64, little-endian) and the header (tensors sorted by dtype, largest alignment first,
/// then name; `metadata`; padded with spaces to 8 bytes). `tensors` are (name, dtype, shape,
/// bytes); returns the header and the order in which their bytes follow it (indices into
/// `tensors`).
pub fn header(
    tensors: &[(&str, Dtype, &[usize], usize)],
    metadata: Option<HashMap<String, String>>,
) -> Result<(Vec<u8>, Vec<usize>)> {
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&tensors[a], &tensors[b]);
        b.1.cmp(&a.1).then(a.0.cmp(b.0))
    });
    let mut infos = Vec::with_capacity(order.len());
    let mut offset = 0;
    for &i in &order {
        let (name, dtype, shape, len) = tensors[i];
        infos.push((
            name.to_string(),
            TensorInfo {
                dtype,
                shape: shape.to_vec(),
                data_offsets: (offset, offset + len),
            },
        ));
        offset += len;
    }
    let meta = Metadata::new(metadata, infos).map_err(|e| anyhow::anyhow!("safetensors: {e}"))?;
    let mut header = serde_json::to_string(&meta)?.into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + header.len());
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(&header);
    Ok((out, order))
}

/// The start of an f32 safetensors file ([`header`], metadata `{"format":"pt"}`) and the
/// tensors in file order (by name).
fn f32_header<'a>(tensors: &[TensorRef<'a>]) -> Result<(Vec<u8>, Vec<TensorRef<'a>>)> {
    let mut sorted = tensors.to_vec();
    // (Cloning a `TensorRef` copies no borrowed bytes.)
    sorted.sort_by(|a, b| a.name.cmp(b.name));
    let mut entries = Vec::with_capacity(sorted.len());
    for (i, t) in sorted.iter().enumerate() {
        if i > 0 && sorted[i - 1].name == t.name {
            bail!("tensor `{}` written twice", t.name);
        }
        if 4 * t.shape.iter().product::<usize>() != t.bytes.len() {
            bail!(
                "tensor `{}`: shape {:?} but {} bytes of f32",
                t.name,
                t.shape,
                t.bytes.len()
            );
        }
        entries.push((t.name, Dtype::F32, t.shape, t.bytes.len()));
    }
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    // Sorted by name already, and one dtype: the header keeps this order.
    let (head, _) = header(&entries, Some(metadata))?;
    Ok((head, sorted))
}

/// Serializes tensors as f32 safetensors: names sorted, metadata `{"format":"pt"}`, so equal
/// weights give equal bytes (those of `safetensors::serialize`).
pub fn serialize_f32(tensors: &[(String, HostTensor)]) -> Result<Vec<u8>> {
    let refs = as_refs(tensors);
    let (mut out, sorted) = f32_header(&refs)?;
    out.reserve_exact(sorted.iter().map(|t| t.bytes.len()).sum());
    for t in &sorted {
        out.extend_from_slice(&t.bytes);
    }
    Ok(out)
}

/// Borrows host tensors as [`TensorRef`]s.
pub fn as_refs(tensors: &[(String, HostTensor)]) -> Vec<TensorRef<'_>> {
    tensors
        .iter()
        .map(|(name, t)| TensorRef::f32(name, &t.shape, &t.data))
        .collect()
}

/// A tensor's f32 little-endian bytes, produced when it is written: handed to a sink in order,
/// in as many pieces as the producer likes (so that a large tensor goes out through a small,
/// reused buffer instead of a copy of the whole of it).
pub trait TensorBytes: Sync {
    /// Hands every byte of the tensor, in order, to `sink`.
    fn emit(&self, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()>;
}

impl TensorBytes for TensorRef<'_> {
    fn emit(&self, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        sink(&self.bytes)
    }
}

/// A tensor to stream into a file: name, shape and where its bytes come from.
pub type Streamed<'a> = (&'a str, &'a [usize], &'a dyn TensorBytes);

/// Writes the bytes of [`serialize_f32`] to `path` without assembling them in memory: the
/// header, then each tensor's values as they are, hashed (blake3) while a second thread writes
/// them. Returns the size and hash of what was written.
pub fn write_f32(path: &Path, tensors: &[TensorRef<'_>]) -> Result<Written> {
    write_as(path, tensors, Precision::F32)
}

/// [`write_f32`] storing the values as `dtype` ([`write_streamed`]).
pub fn write_as(path: &Path, tensors: &[TensorRef<'_>], dtype: Precision) -> Result<Written> {
    let streamed: Vec<Streamed> = tensors
        .iter()
        .map(|t| (t.name, t.shape, t as &dyn TensorBytes))
        .collect();
    write_streamed(path, &streamed, dtype)
}

/// [`write_f32`] of tensors whose bytes are produced as they are written ([`TensorBytes`]):
/// the same file, byte for byte, for the same values. The pieces are hashed as they come and
/// gathered into 1 MiB chunks that a second thread writes, so that producing a piece overlaps
/// writing the last ones ([`write_hashed`]). A tensor that produces more or fewer bytes than
/// its shape says is an error.
pub fn write_f32_streamed(path: &Path, tensors: &[Streamed<'_>]) -> Result<Written> {
    write_streamed(path, tensors, Precision::F32)
}

/// [`write_f32_streamed`] storing the values as `dtype`: f32 as they are, or rounded to
/// bf16/f16 (round to nearest even, as `torch.Tensor.to` rounds) on their way out, piece by
/// piece. The bytes are those of `safetensors::serialize` of the rounded tensors.
pub fn write_streamed(path: &Path, tensors: &[Streamed<'_>], dtype: Precision) -> Result<Written> {
    let (st_dtype, size) = match dtype {
        Precision::F32 => (Dtype::F32, 4),
        Precision::Bf16 => (Dtype::BF16, 2),
        Precision::F16 => (Dtype::F16, 2),
    };
    let mut sorted = tensors.to_vec();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut entries = Vec::with_capacity(sorted.len());
    for (i, (name, shape, _)) in sorted.iter().enumerate() {
        if i > 0 && sorted[i - 1].0 == *name {
            bail!("tensor `{name}` written twice");
        }
        entries.push((
            *name,
            st_dtype,
            *shape,
            size * shape.iter().product::<usize>(),
        ));
    }
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    // Sorted by name already, and one dtype: the header keeps this order.
    let (header, _) = header(&entries, Some(metadata))?;
    write_hashed(path, |out| {
        out.put(&header);
        for ((name, _, bytes), (_, _, _, len)) in sorted.iter().zip(&entries) {
            let before = out.size;
            bytes.emit(&mut |b: &[u8]| {
                let b = encode(b, dtype)
                    .with_context(|| format!("tensor `{name}`: f32 bytes expected"))?;
                out.put(&b);
                out.sent()
            })?;
            let wrote = out.size - before;
            if wrote != *len as u64 {
                bail!("tensor `{name}`: {wrote} bytes written, its shape says {len}");
            }
        }
        Ok(())
    })
}

/// f32 little-endian bytes as `dtype` stores them: as they are for f32, else rounded to bf16 or
/// f16 little-endian bytes (half's slice conversion: one call per piece, vectorized where the
/// CPU allows). Little-endian hosts, as the rest of the writer.
fn encode(f32_bytes: &[u8], dtype: Precision) -> Result<Cow<'_, [u8]>> {
    use half::slice::HalfFloatSliceExt;
    let values = || -> Result<Cow<[f32]>> {
        if !f32_bytes.len().is_multiple_of(4) {
            bail!(
                "{} bytes is not a whole number of f32 values",
                f32_bytes.len()
            );
        }
        // A copy when the piece is not 4-aligned (`Piece::Bytes` of a `Vec<u8>` need not be).
        Ok(match bytemuck::try_cast_slice(f32_bytes) {
            Ok(v) => Cow::Borrowed(v),
            Err(_) => Cow::Owned(bytemuck::pod_collect_to_vec(f32_bytes)),
        })
    };
    Ok(match dtype {
        Precision::F32 => Cow::Borrowed(f32_bytes),
        Precision::Bf16 => {
            let values = values()?;
            let mut out = vec![half::bf16::ZERO; values.len()];
            out.convert_from_f32_slice(&values);
            Cow::Owned(bytemuck::cast_slice(&out).to_vec())
        }
        Precision::F16 => {
            let values = values()?;
            let mut out = vec![half::f16::ZERO; values.len()];
            out.convert_from_f32_slice(&values);
            Cow::Owned(bytemuck::cast_slice(&out).to_vec())
        }
    })
}

/// Creates `path` and writes what `body` puts into the [`HashingFile`] it is given, hashing it
/// (blake3) on the way; returns the size and hash of what was written. A write error is
/// reported as such, whatever `body` made of it.
///
/// Three threads: the caller's produces the bytes and hashes them, a writer writes them, and a
/// flusher asks the disk to store what has been written so far (`sync_data`) after every
/// [`HashingFile::FLUSH`] bytes, so that the disk works while the rest is produced: the
/// artifact's closing `fsync` then has only the tail left to wait for (on a 2-core VM,
/// 0.35 s of a 650 MB file's fsync were left after writing it; the flusher's calls take
/// 30-50 ms each and overlap the writing). A failed early flush is left to that closing
/// `fsync` to report.
fn write_hashed(path: &Path, body: impl FnOnce(&mut HashingFile) -> Result<()>) -> Result<Written> {
    use std::sync::mpsc::{channel, sync_channel};
    let cannot = || format!("cannot write {}", path.display());
    let mut file = File::create(path).with_context(cannot)?;
    let to_flush = file.try_clone().with_context(cannot)?;
    let (full, to_write) = sync_channel::<Vec<u8>>(HashingFile::QUEUE);
    let (recycle, empty) = channel::<Vec<u8>>();
    let (flush, flush_requests) = channel::<()>();
    std::thread::scope(|scope| {
        scope.spawn(move || {
            while flush_requests.recv().is_ok() {
                // Requests that queued up during the last flush are covered by this one.
                while flush_requests.try_recv().is_ok() {}
                if to_flush.sync_data().is_err() {
                    break;
                }
            }
        });
        let writer = scope.spawn(move || -> std::io::Result<()> {
            let mut unflushed = 0;
            for chunk in to_write {
                file.write_all(&chunk)?;
                unflushed += chunk.len();
                if unflushed >= HashingFile::FLUSH {
                    unflushed = 0;
                    let _ = flush.send(());
                }
                // The producer may be gone (it stopped on an error): nothing to hand back to.
                let _ = recycle.send(chunk);
            }
            Ok(())
        });
        let mut out = HashingFile {
            hasher: blake3::Hasher::new(),
            chunk: Vec::with_capacity(HashingFile::CHUNK),
            size: 0,
            full: Some(full),
            empty,
        };
        let produced = body(&mut out).and_then(|()| {
            out.send_chunk();
            out.sent()
        });
        let (size, hash) = (out.size, out.hasher.finalize());
        // Closes the queue: the writer ends once it has written what is in it (and the
        // flusher once the writer has ended, when the scope waits for it).
        drop(out);
        let wrote = writer
            .join()
            .expect("the safetensors writer thread panicked");
        // First: a failed write is why a producer stopped.
        wrote.with_context(cannot)?;
        produced?;
        Ok(Written {
            size,
            blake3: hash.to_hex().to_string(),
        })
    })
}

/// A file being written on a thread of its own: the producer's thread hashes each piece and
/// copies it into a chunk, the writer writes full chunks. So making the next piece (a
/// transpose out of the backend, a bf16 rounding) overlaps the write system calls, which copy
/// into the page cache at well under memory speed; the copy into a chunk, from a piece just
/// made, costs a few percent of that.
struct HashingFile {
    hasher: blake3::Hasher,
    chunk: Vec<u8>,
    size: u64,
    /// Full chunks to the writer (`None` once the writer has stopped early).
    full: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    /// Chunks the writer is done with, to fill again.
    empty: std::sync::mpsc::Receiver<Vec<u8>>,
}

impl HashingFile {
    /// Bytes per write: a chunk still in the cache when the writer copies it.
    const CHUNK: usize = 1 << 20;
    /// Full chunks waiting for the writer at most.
    const QUEUE: usize = 4;
    /// Bytes written between two early flushes.
    const FLUSH: usize = 64 << 20;

    /// Hashes `bytes` and queues them for writing.
    fn put(&mut self, mut bytes: &[u8]) {
        self.size += bytes.len() as u64;
        self.hasher.update(bytes);
        while !bytes.is_empty() {
            let take = (Self::CHUNK - self.chunk.len()).min(bytes.len());
            self.chunk.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.chunk.len() == Self::CHUNK {
                self.send_chunk();
            }
        }
    }

    /// Hands the chunk (if it holds anything) to the writer and takes an empty one.
    fn send_chunk(&mut self) {
        if self.chunk.is_empty() {
            return;
        }
        let next = match self.empty.try_recv() {
            Ok(mut c) => {
                c.clear();
                c
            }
            Err(_) => Vec::with_capacity(Self::CHUNK),
        };
        let chunk = std::mem::replace(&mut self.chunk, next);
        if let Some(full) = &self.full
            && full.send(chunk).is_err()
        {
            self.full = None;
        }
    }

    /// An error once the writer has stopped (on a write error, which [`write_hashed`]
    /// reports), so that the producer stops early.
    fn sent(&self) -> Result<()> {
        match self.full {
            Some(_) => Ok(()),
            None => bail!("the file could not be written"),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<(String, HostTensor)> {
        let t = |shape: Vec<usize>, k: f32| {
            let n = shape.iter().product();
            HostTensor::new(shape, (0..n).map(|i| (i as f32 - 7.5) * k).collect())
        };
        vec![
            ("b.weight".into(), t(vec![3, 5], 0.25)),
            ("a.bias".into(), t(vec![5], -1.5)),
            ("c".into(), t(vec![200_000], 1e-3)),
            ("a.weight".into(), t(vec![2, 2, 2], 3.0)),
            ("empty".into(), t(vec![0, 4], 1.0)),
        ]
    }

    /// The bytes of `safetensors::serialize`, which the writer must reproduce.
    fn reference(tensors: &[(String, HostTensor)]) -> Vec<u8> {
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
            .iter()
            .map(|(n, t)| {
                let b = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
                (n.clone(), t.shape.clone(), b)
            })
            .collect();
        let views: Vec<(&str, TensorView)> = bytes
            .iter()
            .map(|(n, s, b)| {
                (
                    n.as_str(),
                    TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
                )
            })
            .collect();
        let metadata: HashMap<String, String> = [("format".into(), "pt".into())].into();
        safetensors::serialize(views, Some(metadata)).unwrap()
    }

    #[test]
    fn serialize_and_write_give_the_bytes_of_safetensors_serialize() {
        let tensors = sample();
        let want = reference(&tensors);
        assert_eq!(serialize_f32(&tensors).unwrap(), want);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let written = write_f32(&path, &as_refs(&tensors)).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), want);
        assert_eq!(written.size, want.len() as u64);
        assert_eq!(written.blake3, blake3::hash(&want).to_hex().to_string());
        // Read back, whole and tensor by tensor, bit for bit.
        let all = read_all_f32(&path).unwrap();
        for (name, t) in &tensors {
            assert_eq!(&all[name], t, "{name}");
        }
        let mut wf = WeightFiles::open(dir.path()).unwrap();
        for (name, t) in &tensors {
            assert_eq!(&wf.take(name, &t.shape).unwrap(), t, "{name}");
        }
        wf.finish(|_| false).unwrap();
    }

    /// Bytes handed out in pieces of odd sizes, and a given number of bytes in all.
    struct Pieces {
        bytes: Vec<u8>,
        piece: usize,
    }

    impl TensorBytes for Pieces {
        fn emit(&self, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
            self.bytes.chunks(self.piece).try_for_each(sink)
        }
    }

    /// A file past several chunks and one early flush ([`HashingFile::CHUNK`],
    /// [`HashingFile::FLUSH`]), from pieces that straddle chunks, is the bytes of
    /// `safetensors::serialize`, and its size and hash are theirs.
    #[test]
    fn streamed_pieces_across_chunks_and_flushes_give_the_same_file() {
        let n = (HashingFile::FLUSH + 3 * HashingFile::CHUNK) / 4 + 12_345;
        let big = HostTensor::new(vec![n], (0..n).map(|i| i as f32 * 0.5 - 3.0).collect());
        let small = HostTensor::new(vec![7], vec![1.5; 7]);
        let tensors = vec![("w".to_string(), big), ("b".to_string(), small)];
        let want = reference(&tensors);
        let pieces: Vec<Pieces> = tensors
            .iter()
            .zip([333_331, 5])
            .map(|((_, t), piece)| Pieces {
                bytes: bytemuck::cast_slice(&t.data).to_vec(),
                piece,
            })
            .collect();
        let streamed: Vec<Streamed> = tensors
            .iter()
            .zip(&pieces)
            .map(|((name, t), p)| (name.as_str(), t.shape.as_slice(), p as &dyn TensorBytes))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let written = write_f32_streamed(&path, &streamed).unwrap();
        assert!(std::fs::read(&path).unwrap() == want, "the file's bytes");
        assert_eq!(written.size, want.len() as u64);
        assert_eq!(written.blake3, blake3::hash(&want).to_hex().to_string());
    }

    /// A tensor that hands out fewer bytes than its shape says, or fails, is an error naming it.
    #[test]
    fn short_and_failing_producers_are_errors() {
        struct Failing;
        impl TensorBytes for Failing {
            fn emit(&self, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
                sink(&[0; 8])?;
                bail!("the device is gone")
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let short = Pieces {
            bytes: vec![0; 12],
            piece: 5,
        };
        let err = write_f32_streamed(&path, &[("t", &[4], &short)]).unwrap_err();
        assert!(
            err.to_string()
                .contains("tensor `t`: 12 bytes written, its shape says 16"),
            "{err:#}"
        );
        let err = write_f32_streamed(&path, &[("u", &[4], &Failing)]).unwrap_err();
        assert!(format!("{err:#}").contains("the device is gone"), "{err:#}");
    }

    #[test]
    fn duplicate_names_are_refused() {
        let mut tensors = sample();
        tensors.push(("c".into(), HostTensor::new(vec![1], vec![0.0])));
        let err = serialize_f32(&tensors).unwrap_err().to_string();
        assert!(err.contains("`c` written twice"), "{err}");
    }

    #[test]
    fn half_precision_and_f64_read_as_f32() {
        let vals = [0.5f32, -2.0, 1.0e-3, 65504.0];
        let f16: Vec<u8> = vals
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        let bf16: Vec<u8> = vals
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect();
        let f64b: Vec<u8> = vals
            .iter()
            .flat_map(|&v| (v as f64).to_le_bytes())
            .collect();
        let mut out = [0f32; 4];
        f32_from_bytes(Dtype::F16, &f16, &mut out).unwrap();
        let want: Vec<f32> = vals
            .iter()
            .map(|&v| half::f16::from_f32(v).to_f32())
            .collect();
        assert_eq!(out.to_vec(), want);
        f32_from_bytes(Dtype::BF16, &bf16, &mut out).unwrap();
        let want: Vec<f32> = vals
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect();
        assert_eq!(out.to_vec(), want);
        f32_from_bytes(Dtype::F64, &f64b, &mut out).unwrap();
        assert_eq!(out, vals);
    }

    #[test]
    fn truncated_and_padded_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let good = serialize_f32(&sample()).unwrap();
        for bad in [
            &good[..good.len() - 1],
            &[good.as_slice(), &[0u8]].concat(),
            &good[..4],
        ] {
            std::fs::write(&path, bad).unwrap();
            let err = WeightFiles::open(dir.path())
                .err()
                .expect("refused")
                .to_string();
            assert!(err.contains("is not a safetensors file"), "{err}");
        }
    }
}
