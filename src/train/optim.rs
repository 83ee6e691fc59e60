//! What the training loop needs around the optimizer:
//!
//! - [`ParamGrads`]: a module's gradients taken out of burn's `Gradients`, keyed by **parameter
//!   path** (`"layers.0.attn.q_proj.weight"`), accumulated over micro-batches, with
//!   `torch.nn.utils.clip_grad_norm_`-style **global** norm clipping ([`ParamGrads::clip_total_norm`]).
//! - [`AdamW`]: `torch.optim.AdamW`, op for op (decoupled weight decay, bias correction, eps added
//!   after the bias-corrected sqrt), generic over any burn [`Module`], with its state saved and
//!   loaded bit-exactly ([`AdamW::save`] / [`AdamW::load`]).
//! - [`save_module`] / [`load_module`]: the weights half of a checkpoint (burnpack).
//!
//! Why not burn's own `burn::optim` (crate `burn-optim`, feature `optim`, not enabled in this crate):
//! - its AdamW is the same algorithm, but orders the float ops differently
//!   (`m*b1 + g*(1-b1)`, `(m/bc1) / (sqrt(v/bc2) + eps)`, bias corrections in f32) and defaults to
//!   `eps = 1e-5`, `weight_decay = 1e-4` (PyTorch: 1e-8, 1e-2);
//! - its `GradientClipping::Norm` clips **each parameter tensor separately** (it is applied inside
//!   the per-parameter step), which is not `clip_grad_norm_`, and it reports no norm;
//! - its state is keyed by `ParamId`, so resuming needs the exact same ids (burn's own module
//!   record restores them, a model re-created from safetensors does not, and a mismatch silently
//!   restarts the moments at zero). State here is keyed by the parameter path instead.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{DType, Device, Gradients, Tensor, TensorData};
use safetensors::tensor::{Dtype as SafeDtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::safetensors_io;

// ------------------------------------------------------------------------------------------------
// gradients
// ------------------------------------------------------------------------------------------------

/// Gradients of a module's trainable parameters, keyed by parameter path, each flattened to 1-D.
///
/// ```ignore
/// let mut grads = ParamGrads::new();
/// for micro in batch.chunks(..) {
///     let loss = objective(..).loss.div_scalar(n_micro as f64);   // mean over micro-batches
///     grads.accumulate(&model, &mut loss.backward());
/// }
/// let grad_norm = grads.clip_total_norm(max_grad_norm);           // logged as `grad_norm`
/// model = optim.step(lr, model, grads);
/// ```
#[derive(Debug, Clone, Default)]
pub struct ParamGrads {
    grads: BTreeMap<String, Tensor<1>>,
}

impl ParamGrads {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the gradient of every trainable parameter of `module` out of `grads` (the result of
    /// `loss.backward()`) and adds it to what is already held.
    pub fn accumulate<M: Module>(&mut self, module: &M, grads: &mut Gradients) {
        let mut visitor = GradCollector {
            path: Vec::new(),
            grads,
            out: &mut self.grads,
        };
        module.visit(&mut visitor);
    }

    /// The gradients of one backward pass.
    pub fn from_backward<M: Module>(module: &M, mut grads: Gradients) -> Self {
        let mut out = Self::new();
        out.accumulate(module, &mut grads);
        out
    }

    pub fn len(&self) -> usize {
        self.grads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.grads.is_empty()
    }

    /// The flattened gradient of the parameter at `path`, if it has one.
    pub fn get(&self, path: &str) -> Option<&Tensor<1>> {
        self.grads.get(path)
    }

    /// Parameter paths, sorted.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.grads.keys().map(String::as_str)
    }

    /// Multiplies every gradient by `factor`.
    pub fn scale(&mut self, factor: f64) {
        for g in self.grads.values_mut() {
            *g = g.clone().mul_scalar(factor);
        }
    }

    /// The L2 norm of all gradients together, as if concatenated into one vector (computed like
    /// torch: each tensor's norm, then the norm of those norms). One device sync.
    pub fn total_norm(&self) -> f64 {
        if self.grads.is_empty() {
            return 0.0;
        }
        let norms: Vec<Tensor<1>> = self
            .grads
            .values()
            .map(|g| g.clone().square().sum().sqrt())
            .collect();
        let total = Tensor::cat(norms, 0).square().sum().sqrt();
        total
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .expect("f32")[0] as f64
    }

    /// `torch.nn.utils.clip_grad_norm_(params, max_norm)`: ONE norm over all parameters; when it
    /// exceeds `max_norm`, every gradient is multiplied by `max_norm / (total_norm + 1e-6)` (in f32,
    /// as torch). Returns the total norm **before** clipping (what HF logs as `grad_norm`).
    /// `max_norm <= 0` (or not finite) only measures. A non-finite norm propagates into the
    /// gradients, as in torch; check the returned value if that must stop training.
    pub fn clip_total_norm(&mut self, max_norm: f64) -> f64 {
        let total = self.total_norm();
        if max_norm > 0.0 && max_norm.is_finite() {
            let coef = (max_norm as f32) / (total as f32 + 1e-6f32);
            // torch multiplies by min(coef, 1) unconditionally; multiplying by 1.0 is the identity.
            // (NaN included: a NaN norm makes NaN gradients, as in torch.)
            if coef < 1.0 || coef.is_nan() {
                self.scale(coef as f64);
            }
        }
        total
    }
}

struct GradCollector<'a> {
    path: Vec<String>,
    grads: &'a mut Gradients,
    out: &'a mut BTreeMap<String, Tensor<1>>,
}

impl ModuleVisitor for GradCollector<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        // As burn-optim: a parameter that is not tracked has no gradient (and grad_remove on a
        // non-autodiff tensor would panic).
        if !param.is_require_grad() {
            return;
        }
        let Some(grad) = param.val().grad_remove(self.grads) else {
            return;
        };
        let n = grad.shape().num_elements();
        let grad = grad.reshape([n]);
        let path = self.path.join(".");
        let acc = match self.out.remove(&path) {
            Some(prev) => prev + grad,
            None => grad,
        };
        self.out.insert(path, acc);
    }
}

// ------------------------------------------------------------------------------------------------
// AdamW
// ------------------------------------------------------------------------------------------------

/// Which parameters weight decay applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecayScope {
    /// Every parameter (`torch.optim.AdamW(model.parameters(), ..)`).
    All,
    /// Parameters of rank >= 2 only: weight matrices and embeddings decay, biases and norm weights
    /// do not. For llama / mistral / qwen2 / gpt_neox this is exactly the HF Trainer's split
    /// (`get_decay_parameter_names`: everything except biases and LayerNorm/RMSNorm weights).
    MatricesOnly,
}

/// `torch.optim.AdamW` hyper-parameters (the learning rate is passed to each [`AdamW::step`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub decay: DecayScope,
}

impl Default for AdamWConfig {
    /// betas (0.9, 0.999), eps 1e-8 (PyTorch); weight decay 0.0 (the HF `TrainingArguments`
    /// default; torch's own default is 1e-2), applied to [`DecayScope::MatricesOnly`].
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            decay: DecayScope::MatricesOnly,
        }
    }
}

impl AdamWConfig {
    pub fn with_weight_decay(mut self, weight_decay: f64) -> Self {
        self.weight_decay = weight_decay;
        self
    }

    pub fn with_decay(mut self, decay: DecayScope) -> Self {
        self.decay = decay;
        self
    }

    pub fn init(self) -> AdamW {
        AdamW::new(self)
    }
}

#[derive(Debug, Clone)]
struct AdamState {
    /// Updates applied to this parameter (torch's `state["step"]`).
    step: u64,
    exp_avg: Tensor<1>,
    exp_avg_sq: Tensor<1>,
}

/// AdamW with PyTorch semantics (`torch.optim.AdamW`, single-tensor path, `amsgrad=False`,
/// `maximize=False`). Per parameter, with `t` its own step count:
///
/// ```text
/// t += 1
/// p *= 1 - lr * weight_decay                       (decoupled; skipped when the scope excludes p)
/// m  = m + (1 - beta1) * (g - m)                   (torch: exp_avg.lerp_(g, 1 - beta1))
/// v  = v * beta2 + (1 - beta2) * g * g
/// step_size = lr / (1 - beta1^t)                   (f64, like torch's Python floats)
/// denom     = sqrt(v) / sqrt(1 - beta2^t) + eps
/// p  = p + (-step_size * m) / denom                (torch: addcdiv_)
/// ```
/// A parameter without a gradient in a step is left alone and its state does not advance (torch
/// skips parameters whose `.grad` is None). States are keyed by parameter path.
#[derive(Debug, Clone)]
pub struct AdamW {
    config: AdamWConfig,
    states: BTreeMap<String, AdamState>,
}

impl AdamW {
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            states: BTreeMap::new(),
        }
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// The most updates any parameter has received (0 before the first step).
    pub fn steps(&self) -> u64 {
        self.states.values().map(|s| s.step).max().unwrap_or(0)
    }

    /// Number of parameters that have state.
    pub fn num_states(&self) -> usize {
        self.states.len()
    }

    /// Applies one update with learning rate `lr` to every parameter of `module` that has a
    /// gradient in `grads`; returns the updated module (same parameter ids, still trainable).
    ///
    /// Panics if `grads` holds a path the module does not have (gradients from another model).
    pub fn step<M: Module>(&mut self, lr: f64, module: M, grads: ParamGrads) -> M {
        let mut mapper = AdamWMapper {
            path: Vec::new(),
            lr,
            config: &self.config,
            states: &mut self.states,
            grads: grads.grads,
        };
        let module = module.map(&mut mapper);
        assert!(
            mapper.grads.is_empty(),
            "AdamW::step: gradients for parameters the module does not have: {:?}",
            mapper.grads.keys().collect::<Vec<_>>()
        );
        module
    }

    /// Serializes the configuration and every state tensor as a safetensors file: tensors
    /// `<param>.exp_avg` and `<param>.exp_avg_sq` (raw bytes, so a reload is bit-exact), the
    /// format, the configuration and each parameter's step in the header's metadata. Any
    /// safetensors reader (Python's included) can open it.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut raws = Vec::with_capacity(2 * self.states.len());
        for (path, s) in &self.states {
            raws.push((format!("{path}.exp_avg"), raw(&s.exp_avg)));
            raws.push((format!("{path}.exp_avg_sq"), raw(&s.exp_avg_sq)));
        }
        let views: Vec<(String, TensorView)> = raws
            .iter()
            .map(|(name, r)| {
                let view = TensorView::new(r.dtype, vec![r.numel], &r.bytes)
                    .expect("sizes agree by construction");
                (name.clone(), view)
            })
            .collect();
        safetensors::serialize(views, Some(self.metadata())).expect("valid safetensors")
    }

    /// The inverse of [`to_bytes`](Self::to_bytes); state tensors are created on `device` (use the
    /// training device; a state on another device is moved at its next step anyway).
    pub fn from_bytes(bytes: &[u8], device: &Device) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| anyhow::anyhow!("not a sepo AdamW state file ({e})"))?;
        let (_, header) = SafeTensors::read_metadata(bytes)
            .map_err(|e| anyhow::anyhow!("not a sepo AdamW state file ({e})"))?;
        let tensor = |name: &str| -> Result<(SafeDtype, Vec<usize>, Vec<u8>)> {
            let v = st
                .tensor(name)
                .map_err(|e| anyhow::anyhow!("AdamW state {name}: {e}"))?;
            Ok((v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        };
        Self::from_parts(header.metadata(), tensor, device)
    }

    /// The state from its header's metadata and its tensors (dtype, shape, raw bytes) by name.
    fn from_parts(
        metadata: &Option<HashMap<String, String>>,
        tensor: impl Fn(&str) -> Result<(SafeDtype, Vec<usize>, Vec<u8>)>,
        device: &Device,
    ) -> Result<Self> {
        // Optimizer state never takes part in autodiff.
        let device = &device.clone().without_autodiff();
        let meta: Value = metadata
            .as_ref()
            .and_then(|m| m.get(META_KEY))
            .and_then(|v| serde_json::from_str(v).ok())
            .ok_or_else(|| {
                anyhow::anyhow!("not a sepo AdamW state file (no `{META_KEY}` metadata)")
            })?;
        let format = meta["format"].as_str().unwrap_or("");
        ensure!(
            format == FORMAT,
            "AdamW state format {format:?}, expected {FORMAT:?}"
        );
        let config: AdamWConfig =
            serde_json::from_value(meta["config"].clone()).context("AdamW state config")?;
        let steps: BTreeMap<String, u64> =
            serde_json::from_value(meta["steps"].clone()).context("AdamW state steps")?;
        let mut states = BTreeMap::new();
        for (path, step) in steps {
            let tensor = |name: String| -> Result<Tensor<1>> {
                let (dtype, shape, bytes) = tensor(&name)?;
                let dtype = from_st_dtype(dtype)?;
                let numel: usize = shape.iter().product();
                let data = TensorData::from_bytes_vec(bytes, [numel], dtype);
                Ok(Tensor::from_data(data, (device, dtype)))
            };
            let state = AdamState {
                step,
                exp_avg: tensor(format!("{path}.exp_avg"))?,
                exp_avg_sq: tensor(format!("{path}.exp_avg_sq"))?,
            };
            states.insert(path, state);
        }
        Ok(Self { config, states })
    }

    /// Writes [`to_bytes`](Self::to_bytes) to `path` atomically (a temporary file beside it,
    /// synced, then renamed), streaming each state tensor out of the backend a few megabytes at
    /// a time instead of assembling the file (twice the model's size) in memory.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        use std::io::Write;
        let path = path.as_ref();
        let mut tensors: Vec<(String, &Tensor<1>)> = Vec::with_capacity(2 * self.states.len());
        for (p, s) in &self.states {
            tensors.push((format!("{p}.exp_avg"), &s.exp_avg));
            tensors.push((format!("{p}.exp_avg_sq"), &s.exp_avg_sq));
        }
        let shapes: Vec<[usize; 1]> = tensors.iter().map(|(_, t)| t.dims()).collect();
        let entries: Vec<(&str, SafeDtype, &[usize], usize)> = tensors
            .iter()
            .zip(&shapes)
            .map(|((name, t), shape)| {
                let dtype = t.dtype();
                (
                    name.as_str(),
                    st_dtype(dtype),
                    &shape[..],
                    shape[0] * dtype.size(),
                )
            })
            .collect();
        let (header, order) = safetensors_io::header(&entries, Some(self.metadata()))?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let mut f = tempfile::NamedTempFile::new_in(dir)
            .with_context(|| format!("{}: cannot create a temporary file", dir.display()))?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, f.as_file_mut());
        let mut write = || -> std::io::Result<()> {
            out.write_all(&header)?;
            for &i in &order {
                let (t, n) = (tensors[i].1, shapes[i][0]);
                let step = ((4 << 20) / t.dtype().size()).max(1);
                for start in (0..n).step_by(step) {
                    let piece = t.clone().slice_dim(0, start..(start + step).min(n));
                    out.write_all(piece.into_data().as_bytes())?;
                }
            }
            out.flush()
        };
        write().with_context(|| format!("{}: cannot write", path.display()))?;
        drop(out);
        f.as_file()
            .sync_all()
            .with_context(|| format!("{}: cannot write", path.display()))?;
        f.persist(path)
            .map_err(|e| e.error)
            .with_context(|| format!("{}: cannot write", path.display()))?;
        Ok(())
    }

    /// Reads a state [`save`](Self::save) wrote, each tensor straight from the file into the
    /// buffer it lives in (the file is never held whole in memory).
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        let file = safetensors_io::SafetensorsFile::open(path)
            .map_err(|e| anyhow::anyhow!("not a sepo AdamW state file ({e:#})"))
            .with_context(|| format!("loading AdamW state {}", path.display()))?;
        Self::from_parts(file.metadata(), |name| file.read(name), device)
            .with_context(|| format!("loading AdamW state {}", path.display()))
    }

    /// The header metadata: one key (a HashMap of several would be written in a random order,
    /// and the same state must always give the same bytes).
    fn metadata(&self) -> HashMap<String, String> {
        let steps: BTreeMap<&String, u64> = self.states.iter().map(|(p, s)| (p, s.step)).collect();
        let meta = serde_json::json!({"format": FORMAT, "config": self.config, "steps": steps});
        HashMap::from([(META_KEY.to_string(), meta.to_string())])
    }
}

const FORMAT: &str = "sepo-adamw-2";
/// The safetensors metadata key holding format, configuration and steps (as one JSON object).
const META_KEY: &str = "sepo_adamw";

struct Raw {
    bytes: Vec<u8>,
    dtype: SafeDtype,
    numel: usize,
}

fn raw(t: &Tensor<1>) -> Raw {
    let data = t.to_data();
    let dtype = st_dtype(data.dtype());
    Raw {
        numel: data.num_elements(),
        bytes: data.as_bytes().to_vec(),
        dtype,
    }
}

fn st_dtype(d: DType) -> SafeDtype {
    match d {
        DType::F64 => SafeDtype::F64,
        DType::F32 => SafeDtype::F32,
        DType::F16 => SafeDtype::F16,
        DType::BF16 => SafeDtype::BF16,
        other => panic!("AdamW state of dtype {other:?} cannot be saved"),
    }
}

fn from_st_dtype(d: SafeDtype) -> Result<DType> {
    Ok(match d {
        SafeDtype::F64 => DType::F64,
        SafeDtype::F32 => DType::F32,
        SafeDtype::F16 => DType::F16,
        SafeDtype::BF16 => DType::BF16,
        other => bail!("AdamW state of dtype {other:?} is not supported"),
    })
}

struct AdamWMapper<'a> {
    path: Vec<String>,
    lr: f64,
    config: &'a AdamWConfig,
    states: &'a mut BTreeMap<String, AdamState>,
    grads: BTreeMap<String, Tensor<1>>,
}

impl ModuleMapper for AdamWMapper<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let path = self.path.join(".");
        let Some(grad) = self.grads.remove(&path) else {
            return param;
        };
        let (id, tensor, mapper) = param.consume();
        let shape = tensor.shape();
        let n = shape.num_elements();
        assert_eq!(
            grad.dims()[0],
            n,
            "AdamW::step: gradient of {path} has {} values, parameter {n}",
            grad.dims()[0]
        );

        // The autodiff settings the parameter carries, to put back on the updated value.
        let was_autodiff = tensor.is_autodiff();
        let require_grad = tensor.is_require_grad();
        let checkpointing = tensor.gradient_checkpointing_strategy();

        let p = tensor.inner().reshape([n]);
        let device = p.device();
        let g = if grad.device() != device {
            grad.to_device(&device)
        } else {
            grad
        }
        .inner();

        let state = match self.states.remove(&path) {
            Some(s) if s.exp_avg.device() != device => AdamState {
                step: s.step,
                exp_avg: s.exp_avg.to_device(&device).inner(),
                exp_avg_sq: s.exp_avg_sq.to_device(&device).inner(),
            },
            Some(s) => AdamState {
                step: s.step,
                exp_avg: s.exp_avg.inner(),
                exp_avg_sq: s.exp_avg_sq.inner(),
            },
            None => AdamState {
                step: 0,
                exp_avg: p.zeros_like(),
                exp_avg_sq: p.zeros_like(),
            },
        };
        let (p, state) = adamw_update(self.config, self.lr, D, p, g, state);
        self.states.insert(path, state);

        let mut updated = p.reshape(shape);
        if was_autodiff {
            updated = Tensor::from_inner(updated);
            if let Some(strategy) = checkpointing {
                updated = updated.with_gradient_checkpointing_strategy(strategy);
            }
            if require_grad {
                updated = updated.require_grad();
            }
        }
        Param::from_mapped_value(id, updated, mapper)
    }
}

/// One torch AdamW update of a flattened parameter (see [`AdamW`]); the element-wise work is
/// one backend operation ([`update`]: torch's in-place kernels on LibTorch).
fn adamw_update(
    c: &AdamWConfig,
    lr: f64,
    rank: usize,
    p: Tensor<1>,
    g: Tensor<1>,
    s: AdamState,
) -> (Tensor<1>, AdamState) {
    let step = s.step + 1;
    let decays = match c.decay {
        DecayScope::All => true,
        DecayScope::MatricesOnly => rank >= 2,
    };
    let t = step as f64;
    let coefs = update::Coefs {
        decay: (c.weight_decay != 0.0 && decays).then_some(1.0 - lr * c.weight_decay),
        beta1: c.beta1,
        beta2: c.beta2,
        step_size: lr / (1.0 - c.beta1.powf(t)),
        bias_correction2_sqrt: (1.0 - c.beta2.powf(t)).powf(0.5),
        eps: c.eps,
    };
    let (p, exp_avg, exp_avg_sq) = update::adamw_update(p, g, s.exp_avg, s.exp_avg_sq, coefs);
    (
        p,
        AdamState {
            step,
            exp_avg,
            exp_avg_sq,
        },
    )
}

// ------------------------------------------------------------------------------------------------
// module weights
// ------------------------------------------------------------------------------------------------

/// Saves the module's parameters to a burnpack file (burn's `Module::save_file`: raw tensor bytes
/// keyed by parameter path, plus the `ParamId`s; written atomically). Bit-exact on reload. A path
/// without an extension gets `.bpk` appended (burn's choice; [`load_module`] does the same).
pub fn save_module<M: Module>(module: &M, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    module
        .clone()
        .save_file(path)
        .map_err(|e| anyhow::anyhow!("saving {}: {e}", path.display()))
}

/// Loads parameters saved by [`save_module`] into `module` (same architecture). The tensors are
/// created on each parameter's current device and keep its trainability.
pub fn load_module<M: Module>(module: M, path: impl AsRef<Path>) -> Result<M> {
    let path = path.as_ref();
    module
        .try_load_file(path)
        .map_err(|e| anyhow::anyhow!("loading {}: {e}", path.display()))
}

mod update;

#[cfg(test)]
mod tests;
