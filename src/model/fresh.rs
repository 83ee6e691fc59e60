//! A fresh model written straight to its folder: the Hugging Face tensors of the weights that
//! [`super::weights::init`] draws with the ziggurat sampler, drawn while the file is written,
//! with no decoder built and no copy of the whole model in memory.
//!
//! Why a second path beside building the decoder and saving it: the `model` stage from
//! `config:` only writes the weights. Built first, a 162M-parameter model spent its draws (on
//! both cores) and then its write one after the other, and held all 650 MB in fresh pages (a
//! page fault each 4 KiB). Here a drawing thread draws each tensor (on all threads) while the
//! writer hashes and writes the one before, and the buffers of tensors written are drawn into
//! again; the ziggurat sampler's tensors are independent streams (`sepo_kernels::fill_normal`
//! takes the tensor's index), so they can be drawn in the file's order, which is sorted by
//! name, not the decoder's. The bytes are those of drawing the decoder and saving it (a test
//! compares them on every family); Box-Muller, one stream through the tensors in the decoder's
//! order, keeps that path.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, sync_channel};

use anyhow::{Result, anyhow};

use super::config::ModelConfig;
use super::layout::{Head, Layout, LinearLayout, NormLayout};
use super::precision::Precision;
use super::safetensors_io::{self, Streamed, TensorBytes, Written};
use super::weights::{emit_columns, to_stored_rows};

/// One draw: what [`super::weights::Init::normal`] draws for one decoder parameter.
struct Draw {
    /// The tensor's index among the draws (its ziggurat streams).
    tensor: u32,
    /// Its shape in the decoder, `[rows, cols]`.
    shape: [usize; 2],
    /// For a linear stored with its rows permuted ([`LinearLayout::perm`]): the permutation;
    /// the drawing thread then hands over the stored `[out, in]` matrix instead.
    perm: Option<Vec<usize>>,
}

/// Where a Hugging Face tensor's values come from.
enum Fresh {
    /// Every value the same (norm weights: ones; biases: zeros).
    Fill(f32),
    /// A draw as it is (the embeddings).
    Matrix(usize),
    /// Columns of a draw, transposed (the rows of a `[out, in]` linear).
    Columns(usize, Range<usize>),
    /// Rows of a permuted linear's stored matrix.
    Rows(usize, Range<usize>),
}

impl Fresh {
    fn draw(&self) -> Option<usize> {
        match self {
            Fresh::Fill(_) => None,
            Fresh::Matrix(d) | Fresh::Columns(d, _) | Fresh::Rows(d, _) => Some(*d),
        }
    }
}

/// The tensors of a fresh model and the draws they come from, in the decoder's order of
/// drawing (the order [`super::weights::init`] walks: embeddings, each block's q/k/v, output,
/// MLP in and MLP out, the untied LM head).
struct Plan {
    draws: Vec<Draw>,
    tensors: Vec<(String, Vec<usize>, Fresh)>,
}

impl Plan {
    fn new(layout: &Layout) -> Result<Plan> {
        let mut plan = Plan {
            draws: Vec::new(),
            tensors: Vec::new(),
        };
        let [vocab, hidden] = layout.vocab_hidden;
        let embed = plan.draw([vocab, hidden], None);
        plan.tensors.push((
            layout.embed.clone(),
            vec![vocab, hidden],
            Fresh::Matrix(embed),
        ));
        for b in &layout.blocks {
            plan.norm(&b.ln1);
            plan.norm(&b.ln2);
            for lin in [&b.qkv, &b.o, &b.mlp_in, &b.mlp_out] {
                plan.linear(lin);
            }
        }
        plan.norm(&layout.final_norm);
        match &layout.head {
            Head::LmHead { tied: true, .. } => {}
            Head::LmHead { name, tied: false } => {
                let d = plan.draw([hidden, vocab], None);
                plan.tensors.push((
                    name.clone(),
                    vec![vocab, hidden],
                    Fresh::Columns(d, 0..vocab),
                ));
            }
            Head::Score { name, .. } => {
                return Err(anyhow!("`{name}`: a fresh model is a causal LM"));
            }
        }
        Ok(plan)
    }

    fn draw(&mut self, shape: [usize; 2], perm: Option<Vec<usize>>) -> usize {
        let tensor = u32::try_from(self.draws.len()).expect("fewer than 2^32 tensors");
        self.draws.push(Draw {
            tensor,
            shape,
            perm,
        });
        self.draws.len() - 1
    }

    /// Ones, and zero bias for LayerNorm ([`super::weights::Init`]'s norms).
    fn norm(&mut self, n: &NormLayout) {
        self.tensors
            .push((n.weight.clone(), vec![n.dim], Fresh::Fill(1.0)));
        if let Some(b) = &n.bias {
            self.tensors
                .push((b.clone(), vec![n.dim], Fresh::Fill(0.0)));
        }
    }

    /// One draw `[in, out]` for the decoder's linear; its parts are column ranges of it (or
    /// row ranges of the permuted stored matrix), zero biases when the decoder has one.
    fn linear(&mut self, l: &LinearLayout) {
        let d = self.draw([l.in_dim, l.out_dim()], l.perm.clone());
        let mut row = 0;
        for p in &l.parts {
            let rows = row..row + p.out;
            let values = match &l.perm {
                Some(_) => Fresh::Rows(d, rows),
                None => Fresh::Columns(d, rows),
            };
            self.tensors
                .push((p.weight.clone(), vec![p.out, l.in_dim], values));
            if let (Some(b), true) = (&p.bias, l.has_bias()) {
                self.tensors
                    .push((b.clone(), vec![p.out], Fresh::Fill(0.0)));
            }
            row += p.out;
        }
    }
}

/// Writes the weights of a fresh model of `c` (valid), drawn with the ziggurat sampler seeded by
/// `seed`, to `path` as `dtype`: the bytes of [`super::weights::init`] then
/// [`super::weights::HfExport::write_as`], hashed as they are written.
pub fn write_drawn(c: &ModelConfig, seed: u64, path: &Path, dtype: Precision) -> Result<Written> {
    let Plan { draws, mut tensors } = Plan::new(&Layout::new(c))?;
    // The file's order (write_streamed's), and so the order in which draws are first needed.
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut uses = vec![0usize; draws.len()];
    let mut order = Vec::with_capacity(draws.len());
    for d in tensors.iter().filter_map(|t| t.2.draw()) {
        if uses[d] == 0 {
            order.push(d);
        }
        uses[d] += 1;
    }
    let std = c.initializer_range as f32;
    let shared = Shared {
        draws: &draws,
        pool: Mutex::new(Vec::new()),
    };
    std::thread::scope(|s| {
        // One drawn tensor waits while the next is drawn: about three of them in memory.
        let (drawn, received) = sync_channel::<(usize, Vec<f32>)>(1);
        let shared = &shared;
        let order = &order;
        s.spawn(move || {
            for &d in order {
                let buf = shared.draw(d, seed, std);
                if drawn.send((d, buf)).is_err() {
                    // The writer stopped (its error is what the caller sees).
                    return;
                }
            }
        });
        // Dropped before the scope ends, so that a drawing thread still waiting to hand over a
        // tensor is let go when the writer stopped early.
        let ready = Mutex::new(Ready {
            received,
            held: HashMap::new(),
            uses,
        });
        let pieces: Vec<FreshPiece> = tensors
            .iter()
            .map(|(_, shape, values)| FreshPiece {
                values,
                len: shape.iter().product(),
                shared,
                ready: &ready,
            })
            .collect();
        let streamed: Vec<Streamed> = tensors
            .iter()
            .zip(&pieces)
            .map(|((name, shape, _), p)| (name.as_str(), shape.as_slice(), p as &dyn TensorBytes))
            .collect();
        safetensors_io::write_streamed(path, &streamed, dtype)
    })
}

/// What the drawing thread and the writer share.
struct Shared<'a> {
    draws: &'a [Draw],
    /// Buffers of draws already written, drawn into again (fresh memory costs a page fault
    /// every 4 KiB).
    pool: Mutex<Vec<Vec<f32>>>,
}

impl Shared<'_> {
    /// Draw `d`'s values, on all threads; a permuted linear's as its stored `[out, in]` rows.
    /// They are the buffer's first `rows * cols` values (a buffer drawn into again keeps its
    /// length: shortening it and growing it back would write it twice more).
    fn draw(&self, d: usize, seed: u64, std: f32) -> Vec<f32> {
        let Draw {
            tensor,
            shape: [rows, cols],
            ref perm,
        } = self.draws[d];
        let n = rows * cols;
        let mut buf = self.buffer(n);
        sepo_kernels::fill_normal(seed, tensor, std, &mut buf[..n]);
        let Some(perm) = perm else { return buf };
        // Decoder column r, transposed, is stored row perm[r].
        let t = sepo_kernels::transpose(&buf[..n], cols);
        to_stored_rows(&t, rows, perm, &mut buf[..n]);
        buf
    }

    /// A buffer of at least `n` values: the smallest large enough from the pool, or a new one.
    fn buffer(&self, n: usize) -> Vec<f32> {
        let mut pool = self.pool.lock().expect("the buffer pool");
        let fits = (0..pool.len())
            .filter(|&i| pool[i].len() >= n)
            .min_by_key(|&i| pool[i].len());
        match fits {
            Some(i) => pool.swap_remove(i),
            None => vec![0.0; n],
        }
    }
}

/// The writer's side: draws received and not yet written out.
struct Ready {
    received: Receiver<(usize, Vec<f32>)>,
    held: HashMap<usize, Vec<f32>>,
    /// Tensors of each draw still to be written.
    uses: Vec<usize>,
}

struct FreshPiece<'a> {
    values: &'a Fresh,
    /// Values in the tensor.
    len: usize,
    shared: &'a Shared<'a>,
    ready: &'a Mutex<Ready>,
}

impl TensorBytes for FreshPiece<'_> {
    fn emit(&self, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        let d = match self.values {
            Fresh::Fill(v) => return sink(bytemuck::cast_slice(&vec![*v; self.len])),
            Fresh::Matrix(d) | Fresh::Columns(d, _) | Fresh::Rows(d, _) => *d,
        };
        let mut ready = self.ready.lock().expect("the drawn tensors");
        while !ready.held.contains_key(&d) {
            let (got, buf) = ready
                .received
                .recv()
                .map_err(|_| anyhow!("the thread drawing the weights stopped"))?;
            ready.held.insert(got, buf);
        }
        let [rows, cols] = self.shared.draws[d].shape;
        let values = &ready.held[&d][..rows * cols];
        match self.values {
            Fresh::Matrix(_) => sink(bytemuck::cast_slice(values))?,
            Fresh::Columns(_, c) => emit_columns(values, [rows, cols], c.clone(), sink)?,
            // The stored matrix is `[cols, rows]`: `rows` (the input width) values a row.
            Fresh::Rows(_, r) => sink(bytemuck::cast_slice(&values[r.start * rows..r.end * rows]))?,
            Fresh::Fill(_) => unreachable!("handled above"),
        }
        ready.uses[d] -= 1;
        if ready.uses[d] == 0 {
            let buf = ready.held.remove(&d).expect("held");
            self.shared.pool.lock().expect("the buffer pool").push(buf);
        }
        Ok(())
    }
}
