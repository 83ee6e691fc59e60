//! The one path between a [`Layout`] and the decoder, for every family and both heads (a causal
//! LM's output projection, a reward model's score): loading Hugging Face tensors (`[out, in]`
//! linears, separate or interleaved projections) into the decoder's fused `[in, out]`
//! parameters, exporting them back, and drawing fresh seeded weights.
//!
//! Speed (the sepo crate is not optimized in the dev profile, its dependencies are, so nothing
//! here loops over values): transposes are the kernel crate's (`sepo_kernels::transpose`, tiles
//! of 64 x 64, on all threads when loading); loading reads each part of a projection straight
//! into its rows of one buffer, reused from one linear to the next; saving reads each Hugging
//! Face tensor out of the parameters a megabyte at a time, as the file is written
//! ([`HfExport::write`]): on flex straight from the parameter's own memory ([`HostView`]),
//! elsewhere through the backend, so a save costs no second copy of the model; fresh weights
//! come from rand's ChaCha12 core one 64-word buffer at a time, drawn on all threads.

use std::ops::Range;

use anyhow::Result;
use burn::module::Param;
use burn::tensor::{DType, Device, Tensor, TensorData};
use rand::SeedableRng;
use rand_chacha::ChaCha12Core;
use rand_chacha::rand_core::block::BlockRngCore;
use rayon::prelude::*;
use schemars::JsonSchema;

use super::config::ModelConfig;
use super::layout::{Head, Layout, LinearLayout, NormLayout};
use super::safetensors_io::{self, HostTensor, Streamed, TensorBytes, WeightFiles, Written};
use super::transformer::{Block, Decoder, Linear, Norm, Spec, param1, param2};

/// Where the decoder's parameters come from: a checkpoint or a seeded generator. Both are
/// walked by [`build`] in the same order, so reading and initializing cannot drift apart.
trait Source {
    /// Token embeddings `[vocab, hidden]`.
    fn embed(&mut self, name: &str, shape: [usize; 2]) -> Result<Param<Tensor<2>>>;
    /// The untied output projection, in the decoder's `[hidden, vocab]`.
    fn lm_head(&mut self, name: &str, vocab_hidden: [usize; 2]) -> Result<Param<Tensor<2>>>;
    /// The tied output projection (nothing to read or draw).
    fn tied_lm_head(&mut self, name: &str);
    /// A reward model's score, stored `[num_labels, hidden]`, in the decoder's
    /// `[hidden, num_labels]`.
    fn score(&mut self, name: &str, labels_hidden: [usize; 2]) -> Result<Linear>;
    /// A decoder linear.
    fn linear(&mut self, l: &LinearLayout) -> Result<Linear>;
    /// A norm.
    fn norm(&mut self, n: &NormLayout) -> Result<Norm>;
}

/// The decoder (its `lm_head` `None` for a reward model) and, for a reward model, its score.
fn build(
    c: &ModelConfig,
    layout: &Layout,
    src: &mut impl Source,
) -> Result<(Decoder, Option<Linear>)> {
    // Validates the config, so that the layout's sizes are sane.
    let spec = Spec::from_config(c)?;
    let embed = src.embed(&layout.embed, layout.vocab_hidden)?;
    let mut blocks = Vec::with_capacity(layout.blocks.len());
    for b in &layout.blocks {
        blocks.push(Block {
            ln1: src.norm(&b.ln1)?,
            ln2: src.norm(&b.ln2)?,
            qkv: src.linear(&b.qkv)?,
            o: src.linear(&b.o)?,
            mlp_in: src.linear(&b.mlp_in)?,
            mlp_out: src.linear(&b.mlp_out)?,
        });
    }
    let final_norm = src.norm(&layout.final_norm)?;
    let (lm_head, score) = match &layout.head {
        Head::LmHead { name, tied: true } => {
            src.tied_lm_head(name);
            (None, None)
        }
        Head::LmHead { name, tied: false } => (Some(src.lm_head(name, layout.vocab_hidden)?), None),
        Head::Score { name, num_labels } => (
            None,
            Some(src.score(name, [*num_labels, layout.vocab_hidden[1]])?),
        ),
    };
    let decoder = Decoder {
        embed,
        blocks,
        final_norm,
        lm_head,
        spec,
    };
    Ok((decoder, score))
}

/// Loads a causal LM's decoder from Hugging Face tensors. Every tensor of the layout must be
/// there with its shape, and no other (recomputed buffers aside); errors name the tensor and
/// the shapes.
pub fn load(c: &ModelConfig, files: &mut WeightFiles, device: &Device) -> Result<Decoder> {
    Ok(load_layout(c, &Layout::new(c), files, device)?.0)
}

/// Loads a reward model (`*ForSequenceClassification`): its decoder (without LM head) and its
/// score `[hidden, num_labels]`, by the same rules as [`load`].
pub fn load_reward(
    c: &ModelConfig,
    num_labels: usize,
    files: &mut WeightFiles,
    device: &Device,
) -> Result<(Decoder, Linear)> {
    let (decoder, score) = load_layout(c, &Layout::reward(c, num_labels), files, device)?;
    Ok((decoder, score.expect("a reward layout has a score")))
}

fn load_layout(
    c: &ModelConfig,
    layout: &Layout,
    files: &mut WeightFiles,
    device: &Device,
) -> Result<(Decoder, Option<Linear>)> {
    let built = build(
        c,
        layout,
        &mut Reader {
            files,
            device,
            scratch: Vec::new(),
        },
    )?;
    files.finish(|name| layout.ignorable(name))?;
    Ok(built)
}

/// How a fresh model's weights are drawn from `N(0, initializer_range)` (the `model` stage's
/// `init`; see `sepo_kernels::normal`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum InitSampler {
    /// rand_distr's ziggurat on a ChaCha12 stream per tensor and block of 65,536 weights (drawn
    /// on all threads).
    #[default]
    Ziggurat,
    /// sepo's first sampler: Box-Muller on one stream, rand's `StdRng`, through all tensors in
    /// order (about five times slower).
    BoxMuller,
}

/// A fresh decoder with weights drawn from `N(0, initializer_range)` by `sampler` seeded by
/// `seed` (norms one, biases zero), in the order of the layout.
pub fn init(c: &ModelConfig, device: &Device, seed: u64, sampler: InitSampler) -> Result<Decoder> {
    let mut init = Init::new(seed, c.initializer_range, device, sampler);
    Ok(build(c, &Layout::new(c), &mut init)?.0)
}

/// A fresh reward-model score `[hidden, num_labels]`, drawn as transformers' `_init_weights`
/// draws a linear (`N(0, initializer_range)`, no bias), seeded by `seed`, host-side (the same
/// numbers on every backend; Box-Muller, as ever: a `reward` train stage's start did not move).
pub fn init_score(c: &ModelConfig, num_labels: usize, device: &Device, seed: u64) -> Linear {
    let w = Init::new(seed, c.initializer_range, device, InitSampler::BoxMuller)
        .normal(vec![num_labels, c.hidden_size]);
    Linear::from_host(w.transpose2(), None, device)
}

/// The Hugging Face tensors of a causal LM's decoder, in the layout's order.
pub fn export(c: &ModelConfig, d: &Decoder) -> Vec<(String, HostTensor)> {
    export_layout(&Layout::new(c), d, None).into_host()
}

/// The Hugging Face tensors of a causal LM's decoder, to be written as they are read out of it
/// ([`HfExport::write`]).
pub fn export_weights<'a>(c: &ModelConfig, d: &'a Decoder) -> HfExport<'a> {
    export_layout(&Layout::new(c), d, None)
}

/// The Hugging Face tensors of a reward model, in the layout's order (`score.weight` last).
pub fn export_reward(c: &ModelConfig, d: &Decoder, score: &Linear) -> Vec<(String, HostTensor)> {
    let num_labels = score.weight.val().dims()[1];
    export_layout(&Layout::reward(c, num_labels), d, Some(score)).into_host()
}

/// A decoder's Hugging Face tensors, each named and shaped, its values still in the decoder's
/// parameters: read out (and transposed) piece by piece when written, through a small buffer
/// rather than a copy of the whole model.
pub struct HfExport<'a> {
    tensors: Vec<(String, Vec<usize>, Piece<'a>)>,
}

/// Where a Hugging Face tensor's values are in the decoder.
enum Piece<'a> {
    /// Columns `cols` of an `[in, out]` weight, transposed: rows `cols` of `[out, in]`.
    Columns(&'a Param<Tensor<2>>, Range<usize>),
    /// A matrix as it is (the embeddings).
    Matrix(&'a Param<Tensor<2>>),
    /// Elements of a vector.
    Elems(&'a Param<Tensor<1>>, Range<usize>),
    /// Bytes worked out beforehand (the parts of a row-permuted projection).
    Bytes(Vec<u8>),
}

/// About how many bytes of a large tensor are read out of the backend at a time: a piece the
/// writer copies while it is still in the cache.
const PIECE_BYTES: usize = 1 << 20;

impl TensorBytes for Piece<'_> {
    fn emit(&self, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        match self {
            Piece::Columns(p, cols) => {
                if let Some(host) = HostView::of(p) {
                    return emit_columns(host.values(), p.val().dims(), cols.clone(), sink);
                }
                let w = p.val().detach();
                let step = (PIECE_BYTES / (4 * w.dims()[0]).max(1)).max(1);
                for c in cols.clone().step_by(step) {
                    let part = w.clone().slice_dim(1, c..(c + step).min(cols.end));
                    emit_data(part.transpose().into_data(), sink)?;
                }
                Ok(())
            }
            Piece::Matrix(p) => {
                if let Some(host) = HostView::of(p) {
                    return sink(bytemuck::cast_slice(host.values()));
                }
                let w = p.val().detach();
                let [rows, cols] = w.dims();
                let step = (PIECE_BYTES / (4 * cols).max(1)).max(1);
                for r in (0..rows).step_by(step) {
                    let part = w.clone().slice_dim(0, r..(r + step).min(rows));
                    emit_data(part.into_data(), sink)?;
                }
                Ok(())
            }
            Piece::Elems(p, range) => {
                if let Some(host) = HostView::of(p) {
                    return sink(bytemuck::cast_slice(&host.values()[range.clone()]));
                }
                emit_data(
                    p.val().detach().slice_dim(0, range.clone()).into_data(),
                    sink,
                )
            }
            Piece::Bytes(b) => sink(b),
        }
    }
}

/// Hands columns `cols` of the row-major `[rows, width]` host matrix `values` to `sink` as the
/// rows of their transpose (f32, native byte order), transposed a piece of about
/// [`PIECE_BYTES`] at a time into one buffer.
pub(super) fn emit_columns(
    values: &[f32],
    [rows, width]: [usize; 2],
    cols: Range<usize>,
    sink: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    let step = (PIECE_BYTES / (4 * rows).max(1)).max(1);
    let mut buf = vec![0f32; step.min(cols.len()) * rows];
    for c in cols.clone().step_by(step) {
        let end = (c + step).min(cols.end);
        let out = &mut buf[..(end - c) * rows];
        sepo_kernels::transpose_columns(values, width, c..end, out);
        sink(bytemuck::cast_slice(out))?;
    }
    Ok(())
}

/// A parameter's f32 values where the backend keeps them in host memory as they are (flex, a
/// contiguous buffer, a little-endian host), borrowed: saving reads them without asking the
/// backend for a copy (burn-flex's copy of a view allocates and zeroes its output first, and
/// a transposed view is copied again).
struct HostView {
    #[cfg(feature = "flex")]
    tensor: burn::backend::flex::FlexTensor,
    len: usize,
}

impl HostView {
    fn of<const D: usize>(p: &Param<Tensor<D>>) -> Option<HostView> {
        let t = p.val();
        if t.dtype() != DType::F32
            || !crate::device::is_flex(&t.device())
            || cfg!(target_endian = "big")
        {
            return None;
        }
        let len = t.shape().num_elements();
        #[cfg(feature = "flex")]
        {
            let tensor = t.inner().try_into_primitive::<burn::backend::Flex>().ok()?;
            let whole = tensor.is_contiguous() && tensor.layout().start_offset() == 0;
            whole.then_some(HostView { tensor, len })
        }
        #[cfg(not(feature = "flex"))]
        {
            let _ = len;
            None
        }
    }

    fn values(&self) -> &[f32] {
        #[cfg(feature = "flex")]
        {
            &self.tensor.storage::<f32>()[..self.len]
        }
        #[cfg(not(feature = "flex"))]
        {
            unreachable!("no host view without flex")
        }
    }
}

/// Hands a backend buffer's values to `sink` as f32 little-endian bytes (as they are, on a
/// little-endian host with f32 parameters).
fn emit_data(data: TensorData, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
    let data = if data.dtype() == DType::F32 {
        data
    } else {
        data.convert::<f32>()
    };
    if cfg!(target_endian = "little") {
        sink(data.as_bytes())
    } else {
        let v: Vec<f32> = bytemuck::pod_collect_to_vec(data.as_bytes());
        sink(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())
    }
}

impl HfExport<'_> {
    /// Writes the tensors as `model.safetensors` ([`safetensors_io::write_f32_streamed`]): the
    /// bytes of [`safetensors_io::serialize_f32`] of [`HfExport::into_host`], hashed on the way.
    pub fn write(&self, path: &std::path::Path) -> Result<Written> {
        self.write_as(path, super::Precision::F32)
    }

    /// [`HfExport::write`] storing the values as `dtype` ([`safetensors_io::write_streamed`]).
    pub fn write_as(&self, path: &std::path::Path, dtype: super::Precision) -> Result<Written> {
        let streamed: Vec<Streamed> = self
            .tensors
            .iter()
            .map(|(name, shape, piece)| {
                (name.as_str(), shape.as_slice(), piece as &dyn TensorBytes)
            })
            .collect();
        safetensors_io::write_streamed(path, &streamed, dtype)
    }

    /// The tensors as host tensors, in the layout's order (read out on all threads).
    pub fn into_host(self) -> Vec<(String, HostTensor)> {
        let read = |piece: &Piece| -> Vec<f32> {
            let mut bytes = Vec::new();
            piece
                .emit(&mut |b| {
                    bytes.extend_from_slice(b);
                    Ok(())
                })
                .expect("reading a parameter back from the device");
            let mut v: Vec<f32> = bytemuck::pod_collect_to_vec(&bytes);
            if cfg!(target_endian = "big") {
                for x in &mut v {
                    *x = f32::from_bits(u32::from_le(x.to_bits()));
                }
            }
            v
        };
        let data: Vec<Vec<f32>> = self.tensors.par_iter().map(|(_, _, p)| read(p)).collect();
        self.tensors
            .into_iter()
            .zip(data)
            .map(|((name, shape, _), data)| (name, HostTensor::new(shape, data)))
            .collect()
    }
}

fn export_layout<'a>(layout: &Layout, d: &'a Decoder, score: Option<&'a Linear>) -> HfExport<'a> {
    let mut out: Vec<(String, Vec<usize>, Piece<'a>)> = Vec::new();
    let [vocab, hidden] = layout.vocab_hidden;
    out.push((
        layout.embed.clone(),
        vec![vocab, hidden],
        Piece::Matrix(&d.embed),
    ));
    for (b, l) in d.blocks.iter().zip(&layout.blocks) {
        export_norm(&b.ln1, &l.ln1, &mut out);
        export_norm(&b.ln2, &l.ln2, &mut out);
        export_linear(&b.qkv, &l.qkv, &mut out);
        export_linear(&b.o, &l.o, &mut out);
        export_linear(&b.mlp_in, &l.mlp_in, &mut out);
        export_linear(&b.mlp_out, &l.mlp_out, &mut out);
    }
    export_norm(&d.final_norm, &layout.final_norm, &mut out);
    let head = match (&layout.head, &d.lm_head, score) {
        (Head::LmHead { name, .. }, Some(w), _) => Some((name, w)),
        (Head::Score { name, .. }, _, Some(s)) => Some((name, &s.weight)),
        _ => None,
    };
    if let Some((name, w)) = head {
        let [rows, cols] = w.val().dims();
        out.push((name.clone(), vec![cols, rows], Piece::Columns(w, 0..cols)));
    }
    HfExport { tensors: out }
}

/// A norm's tensors.
fn export_norm<'a>(norm: &'a Norm, l: &NormLayout, out: &mut Vec<(String, Vec<usize>, Piece<'a>)>) {
    out.push((
        l.weight.clone(),
        vec![l.dim],
        Piece::Elems(&norm.weight, 0..l.dim),
    ));
    if let (Some(b), Some(name)) = (&norm.bias, &l.bias) {
        out.push((name.clone(), vec![l.dim], Piece::Elems(b, 0..l.dim)));
    }
}

/// The inverse of reading a linear: its parts' Hugging Face tensors, each a range of the
/// decoder weight's columns (transposed), or, when the layout permutes rows, the parts of the
/// whole weight read out and reordered.
fn export_linear<'a>(
    lin: &'a Linear,
    l: &LinearLayout,
    out: &mut Vec<(String, Vec<usize>, Piece<'a>)>,
) {
    let in_dim = l.in_dim;
    let Some(perm) = &l.perm else {
        let mut row = 0;
        for p in &l.parts {
            let rows = row..row + p.out;
            out.push((
                p.weight.clone(),
                vec![p.out, in_dim],
                Piece::Columns(&lin.weight, rows.clone()),
            ));
            if let (Some(bn), Some(b)) = (&p.bias, &lin.bias) {
                out.push((bn.clone(), vec![p.out], Piece::Elems(b, rows)));
            }
            row += p.out;
        }
        return;
    };
    // Undo the permutation: stored row perm[r] = decoder row r (f32 bytes, rows of `in_dim`).
    let bytes = |piece: Piece| {
        let mut v = Vec::new();
        piece
            .emit(&mut |b| {
                v.extend_from_slice(b);
                Ok(())
            })
            .expect("reading a parameter back from the device");
        v
    };
    let total = l.out_dim();
    let w = bytes(Piece::Columns(&lin.weight, 0..total));
    let b = lin.bias.as_ref().map(|b| bytes(Piece::Elems(b, 0..total)));
    let row = 4 * in_dim;
    let mut uw = vec![0u8; w.len()];
    to_stored_rows(&w, row, perm, &mut uw);
    let ub = b.as_ref().map(|b| {
        let mut ub = vec![0u8; b.len()];
        to_stored_rows(b, 4, perm, &mut ub);
        ub
    });
    let mut start = 0;
    for p in &l.parts {
        let rows = start..start + p.out;
        out.push((
            p.weight.clone(),
            vec![p.out, in_dim],
            Piece::Bytes(uw[rows.start * row..rows.end * row].to_vec()),
        ));
        if let (Some(bn), Some(ub)) = (&p.bias, ub.as_ref()) {
            out.push((
                bn.clone(),
                vec![p.out],
                Piece::Bytes(ub[4 * rows.start..4 * rows.end].to_vec()),
            ));
        }
        start += p.out;
    }
}

/// Rows of `row` values in the decoder's order into `stored`, the order a row-permuted layout
/// keeps ([`LinearLayout::perm`]): decoder row `r` is stored row `perm[r]`.
pub(super) fn to_stored_rows<T: Copy>(decoder: &[T], row: usize, perm: &[usize], stored: &mut [T]) {
    for (r, &to) in perm.iter().enumerate() {
        stored[to * row..(to + 1) * row].copy_from_slice(&decoder[r * row..(r + 1) * row]);
    }
}

/// A `[rows, cols]` host buffer as the `[cols, rows]` parameter on `device`, transposed on the
/// host ([`sepo_kernels::transpose`], on all threads) into the buffer the parameter keeps (on
/// flex; other backends copy it to their device).
fn param2_transposed(data: &[f32], [rows, cols]: [usize; 2], device: &Device) -> Param<Tensor<2>> {
    debug_assert_eq!(data.len(), rows * cols);
    let t = sepo_kernels::transpose(data, cols);
    Param::from_tensor(Tensor::from_data(TensorData::new(t, [cols, rows]), device))
}

struct Reader<'a> {
    files: &'a mut WeightFiles,
    device: &'a Device,
    /// The `[out, in]` weight of a linear as read, before its transpose: one buffer for all
    /// of them, so that only the parameters' own memory is new (fresh pages cost a fault
    /// each).
    scratch: Vec<f32>,
}

impl Source for Reader<'_> {
    fn embed(&mut self, name: &str, shape: [usize; 2]) -> Result<Param<Tensor<2>>> {
        Ok(param2(self.files.take(name, &shape)?, self.device))
    }

    fn lm_head(&mut self, name: &str, vocab_hidden: [usize; 2]) -> Result<Param<Tensor<2>>> {
        let w = self.files.take(name, &vocab_hidden)?;
        Ok(param2_transposed(&w.data, vocab_hidden, self.device))
    }

    fn tied_lm_head(&mut self, name: &str) {
        self.files.skip(name);
    }

    fn score(&mut self, name: &str, labels_hidden: [usize; 2]) -> Result<Linear> {
        let w = self.files.take(name, &labels_hidden)?;
        Ok(Linear {
            weight: param2_transposed(&w.data, labels_hidden, self.device),
            bias: None,
        })
    }

    /// Reads the parts `[out_i, in]` into their rows of one `[out, in]` buffer, reorders the
    /// rows by `perm` (when given) and returns the `[in, out]` linear.
    fn linear(&mut self, l: &LinearLayout) -> Result<Linear> {
        let (total, in_dim, has_bias) = (l.out_dim(), l.in_dim, l.has_bias());
        let mut w = std::mem::take(&mut self.scratch);
        w.resize(total * in_dim, 0.0);
        let mut b = vec![0f32; if has_bias { total } else { 0 }];
        let mut row = 0;
        for p in &l.parts {
            let rows = row * in_dim..(row + p.out) * in_dim;
            self.files
                .take_into(&p.weight, &[p.out, in_dim], &mut w[rows])?;
            match &p.bias {
                Some(bn) if has_bias => {
                    self.files
                        .take_into(bn, &[p.out], &mut b[row..row + p.out])?;
                }
                // Read (and so accounted for), but unused: not every part has a bias.
                Some(bn) => drop(self.files.take(bn, &[p.out])?),
                None => {}
            }
            row += p.out;
        }
        if let Some(perm) = &l.perm {
            let mut pw = vec![0f32; w.len()];
            for (r, &src) in perm.iter().enumerate() {
                pw[r * in_dim..(r + 1) * in_dim]
                    .copy_from_slice(&w[src * in_dim..(src + 1) * in_dim]);
            }
            w = pw;
            if has_bias {
                b = perm.iter().map(|&s| b[s]).collect();
            }
        }
        let linear = Linear {
            weight: param2_transposed(&w, [total, in_dim], self.device),
            bias: has_bias.then(|| param1(HostTensor::new(vec![total], b), self.device)),
        };
        self.scratch = w;
        Ok(linear)
    }

    fn norm(&mut self, n: &NormLayout) -> Result<Norm> {
        let weight = param1(self.files.take(&n.weight, &[n.dim])?, self.device);
        let bias = match &n.bias {
            Some(b) => Some(param1(self.files.take(b, &[n.dim])?, self.device)),
            None => None,
        };
        Ok(Norm {
            weight,
            bias,
            eps: n.eps,
            rms: n.rms,
        })
    }
}

/// Pairs of normal draws per ChaCha buffer: the core makes 64 words at a time, and a pair takes
/// two u64, four words.
const PAIRS_PER_BUFFER: u64 = 16;

/// The u64 stream of rand 0.9's `StdRng::seed_from_u64(seed)` (a `ChaCha12Rng`, whose
/// `next_u64` joins two consecutive words, low first), read straight from the ChaCha core one
/// 64-word buffer at a time: one call into optimized code per 16 pairs instead of two
/// unoptimized calls per pair, and a stream that can be cloned and run ahead (a clone skips
/// buffers by generating them, which is cheap next to the arithmetic on each pair).
#[derive(Clone)]
struct Stream {
    core: ChaCha12Core,
    /// The index of the buffer the next `generate` makes.
    next: u64,
    /// Buffer `next - 1` (when `next > 0`).
    buf: <ChaCha12Core as BlockRngCore>::Results,
}

impl Stream {
    fn new(seed: u64) -> Stream {
        Stream {
            core: ChaCha12Core::seed_from_u64(seed),
            next: 0,
            buf: Default::default(),
        }
    }

    /// Buffer `b`, which must not come before the last one made.
    fn buffer(&mut self, b: u64) -> &[u32] {
        assert!(b + 1 >= self.next, "the stream only runs forward");
        while self.next <= b {
            self.core.generate(&mut self.buf);
            self.next += 1;
        }
        self.buf.as_ref()
    }
}

/// Fills `out` with Box-Muller draws from pair `first` of the stream on: pair `p` (u64s `2p`,
/// `2p + 1`) gives `r cos t` and then, if there is room, `r sin t`, each times `std`. The same
/// arithmetic, in the same order, as drawing `u1 = 1 - rng.random::<f64>()` and
/// `u2 = rng.random::<f64>()` (`(x >> 11) * 2^-53`) from the `StdRng`.
fn fill_box_muller(stream: &mut Stream, first: u64, out: &mut [f32], std: f32) {
    let n = out.len();
    let (mut i, mut p) = (0, first);
    while i < n {
        let w = stream.buffer(p / PAIRS_PER_BUFFER);
        let at = p % PAIRS_PER_BUFFER;
        let pairs = (PAIRS_PER_BUFFER - at).min((n - i).div_ceil(2) as u64);
        let end = (i + 2 * pairs as usize).min(n);
        sepo_kernels::box_muller(&w[4 * at as usize..], std, &mut out[i..end]);
        i = end;
        p += pairs;
    }
}

/// Where `threads` chunks of `pairs` pairs start, so that each takes about as long: chunk `k`
/// first skips `start_k` pairs (generating their buffers, about a fifth of the cost of
/// drawing a pair in the dev profile), so later chunks are shorter.
fn chunk_starts(pairs: u64, threads: usize) -> Vec<u64> {
    const SKIP: f64 = 0.2;
    let t = threads.max(1) as i32;
    let keep = 1.0 - SKIP;
    let per = pairs as f64 * SKIP / (1.0 - keep.powi(t));
    let mut starts: Vec<u64> = (0..t)
        .map(|k| ((per * (1.0 - keep.powi(k)) / SKIP) as u64).min(pairs))
        .collect();
    starts.dedup();
    // No empty chunk (but one, empty, when there is nothing to draw).
    starts.retain(|&s| s == 0 || s < pairs);
    starts
}

/// Seeded source of fresh weights (host-side, so every backend gets the same numbers).
pub struct Init {
    sampler: InitSampler,
    seed: u64,
    /// Tensors drawn so far (ziggurat: the next tensor's stream).
    tensors: u32,
    /// Box-Muller's one stream, and the pairs drawn from it so far.
    stream: Stream,
    pos: u64,
    std: f32,
    device: Device,
}

impl Init {
    /// A generator of `N(0, std)` weights seeded by `seed`, for parameters on `device`.
    pub fn new(seed: u64, std: f64, device: &Device, sampler: InitSampler) -> Self {
        Init {
            sampler,
            seed,
            tensors: 0,
            stream: Stream::new(seed),
            pos: 0,
            std: std as f32,
            device: device.clone(),
        }
    }

    /// Normal draws filling `shape`, the next tensor's. Ziggurat: `sepo_kernels::fill_normal`
    /// with this tensor's index (the first is 0). Box-Muller: those of a `StdRng` seeded as
    /// [`Init::new`] says, consumed pair by pair from one tensor to the next. Large tensors are
    /// drawn on all threads either way.
    pub fn normal(&mut self, shape: Vec<usize>) -> HostTensor {
        let mut data = vec![0f32; shape.iter().product()];
        match self.sampler {
            InitSampler::Ziggurat => {
                sepo_kernels::fill_normal(self.seed, self.tensors, self.std, &mut data);
                self.tensors += 1;
            }
            InitSampler::BoxMuller => self.box_muller(&mut data),
        }
        HostTensor::new(shape, data)
    }

    /// Box-Muller draws into `data` from the stream's next pairs, in chunks on all threads.
    fn box_muller(&mut self, data: &mut [f32]) {
        let n = data.len();
        let pairs = n.div_ceil(2) as u64;
        let threads = if pairs < 1 << 16 {
            1
        } else {
            rayon::current_num_threads()
        };
        let starts = chunk_starts(pairs, threads);
        let mut chunks = Vec::with_capacity(starts.len());
        let mut rest = data;
        for (k, &s) in starts.iter().enumerate() {
            let end = starts.get(k + 1).map_or(n, |&e| 2 * e as usize);
            let (chunk, tail) = rest.split_at_mut(end - 2 * s as usize);
            chunks.push((self.pos + s, chunk));
            rest = tail;
        }
        let (master, std) = (&self.stream, self.std);
        let ends: Vec<Stream> = chunks
            .into_par_iter()
            .map(|(first, out)| {
                let mut s = master.clone();
                fill_box_muller(&mut s, first, out, std);
                s
            })
            .collect();
        if let Some(last) = ends.into_iter().last() {
            self.stream = last;
        }
        self.pos += pairs;
    }
}

impl Source for Init {
    fn embed(&mut self, _: &str, shape: [usize; 2]) -> Result<Param<Tensor<2>>> {
        Ok(param2(self.normal(shape.to_vec()), &self.device))
    }

    fn lm_head(&mut self, _: &str, [vocab, hidden]: [usize; 2]) -> Result<Param<Tensor<2>>> {
        Ok(param2(self.normal(vec![hidden, vocab]), &self.device))
    }

    fn tied_lm_head(&mut self, _: &str) {}

    fn score(&mut self, _: &str, labels_hidden: [usize; 2]) -> Result<Linear> {
        let w = self.normal(labels_hidden.to_vec());
        Ok(Linear {
            weight: param2_transposed(&w.data, labels_hidden, &self.device),
            bias: None,
        })
    }

    /// Normal weight drawn in the decoder's `[in, out]` order, zero bias, as transformers
    /// initializes.
    fn linear(&mut self, l: &LinearLayout) -> Result<Linear> {
        let out = l.out_dim();
        let w = self.normal(vec![l.in_dim, out]);
        let b = l
            .has_bias()
            .then(|| HostTensor::new(vec![out], vec![0.0; out]));
        Ok(Linear::from_host(w, b, &self.device))
    }

    /// Ones, and zero bias for LayerNorm.
    fn norm(&mut self, n: &NormLayout) -> Result<Norm> {
        let filled = |v: f32| HostTensor::new(vec![n.dim], vec![v; n.dim]);
        Ok(Norm {
            weight: param1(filled(1.0), &self.device),
            bias: n.bias.as_ref().map(|_| param1(filled(0.0), &self.device)),
            eps: n.eps,
            rms: n.rms,
        })
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, rngs::StdRng};

    use super::*;

    /// The generator as it was: one `StdRng`, drawn pair by pair (the bytes of every `model`
    /// stage's fresh weights).
    fn reference(seed: u64, std: f32, shapes: &[usize]) -> Vec<Vec<f32>> {
        let mut rng = StdRng::seed_from_u64(seed);
        shapes
            .iter()
            .map(|&n| {
                let mut data = Vec::with_capacity(n);
                while data.len() < n {
                    let u1: f64 = 1.0 - rng.random::<f64>();
                    let u2: f64 = rng.random::<f64>();
                    let r = (-2.0 * u1.ln()).sqrt();
                    let t = 2.0 * std::f64::consts::PI * u2;
                    data.push((r * t.cos()) as f32 * std);
                    if data.len() < n {
                        data.push((r * t.sin()) as f32 * std);
                    }
                }
                data
            })
            .collect()
    }

    #[test]
    fn split_generator_draws_what_one_stdrng_draws() {
        let device = crate::device::parse_device("cpu").unwrap();
        // Odd and even sizes, empty ones, sizes that end mid-buffer, and large ones that are
        // drawn in chunks on several threads.
        let shapes = [5, 0, 32, 1, 33, 300_001, 131_072, 7, 262_146];
        let want = reference(11, 0.02, &shapes);
        let mut init = Init::new(11, 0.02, &device, InitSampler::BoxMuller);
        for (n, want) in shapes.iter().zip(&want) {
            let got = init.normal(vec![*n]).data;
            let same = got
                .iter()
                .zip(want)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same && got.len() == want.len(), "size {n}");
        }
        // With more chunks than this machine has threads.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(5)
            .build()
            .unwrap();
        let want = reference(3, 1.0, &[3, 400_003]);
        let got = pool.install(|| {
            let mut init = Init::new(3, 1.0, &device, InitSampler::BoxMuller);
            [init.normal(vec![3]).data, init.normal(vec![400_003]).data]
        });
        for (g, w) in got.iter().zip(&want) {
            assert!(g.iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }

    #[test]
    fn chunks_cover_the_pairs_in_order() {
        for (pairs, threads) in [(0, 2), (1, 1), (10, 4), (1 << 20, 2), (12_345_678, 16)] {
            let s = chunk_starts(pairs, threads);
            assert_eq!(s[0], 0);
            assert!(s.windows(2).all(|w| w[0] < w[1]), "{s:?}");
            assert!(pairs == 0 || *s.last().unwrap() < pairs);
            assert!(s.len() <= threads.max(1));
        }
    }
}
