use super::*;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Distribution, TensorData};
use serde_json::Value;

const FIXTURE: &str = include_str!("../../../tests/fixtures/optim.json");

fn device() -> Device {
    Device::default().autodiff()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn vec_of<const D: usize>(t: &Tensor<D>) -> Vec<f32> {
    t.to_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

#[track_caller]
fn close(what: &str, got: &[f32], want: &[f32], tol: f32) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = 0.0f32;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs();
        assert!(
            d <= tol,
            "{what}[{i}]: got {g}, want {w} (|diff| {d:e} > {tol:e})"
        );
        worst = worst.max(d);
    }
    worst
}

/// torch stores Linear.weight as [out, in]; burn's Linear (row layout) as [in, out].
fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; w.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = w[r * cols + c];
        }
    }
    t
}

fn linear_from_torch(w: &[f32], b: &[f32], dev: &Device) -> Linear {
    Linear {
        weight: Param::from_tensor(Tensor::from_data(
            TensorData::new(transpose(w, 3, 4), [4, 3]),
            dev,
        )),
        bias: Some(Param::from_tensor(Tensor::from_data(
            TensorData::new(b.to_vec(), [3]),
            dev,
        ))),
    }
}

fn mse(lin: &Linear, x: &Tensor<2>, y: &Tensor<2>) -> Tensor<1> {
    (lin.forward(x.clone()) - y.clone()).square().mean()
}

/// 3 steps of torch.optim.AdamW (lr 1e-2, weight decay 0.1, betas/eps default) on a Linear(4, 3),
/// plain, with clip_grad_norm_(0.5) before each step, and with the bias excluded from decay.
#[test]
fn adamw_matches_torch_three_steps() {
    let fx: Value = serde_json::from_str(FIXTURE).unwrap();
    let a = &fx["adamw"];
    let dev = device();
    let x = Tensor::<2>::from_data(TensorData::new(floats(&a["x"]), [5, 4]), &dev);
    let y = Tensor::<2>::from_data(TensorData::new(floats(&a["y"]), [5, 3]), &dev);
    let lr = a["lr"].as_f64().unwrap();
    let wd = a["weight_decay"].as_f64().unwrap();
    let mut worst_param = 0.0f32;
    for case in a["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let decay = if case["decay_bias"].as_bool().unwrap() {
            DecayScope::All
        } else {
            DecayScope::MatricesOnly
        };
        let max_norm = case["max_grad_norm"].as_f64();
        let mut lin = linear_from_torch(&floats(&a["weight0"]), &floats(&a["bias0"]), &dev);
        let mut opt = AdamWConfig::default()
            .with_weight_decay(wd)
            .with_decay(decay)
            .init();
        assert_eq!(
            (opt.config().beta1, opt.config().beta2, opt.config().eps),
            (0.9, 0.999, 1e-8)
        );
        for (k, st) in case["steps"].as_array().unwrap().iter().enumerate() {
            let what = format!("{name} step {}", k + 1);
            let loss = mse(&lin, &x, &y);
            close(
                &format!("{what} loss"),
                &vec_of(&loss),
                &[st["loss"].as_f64().unwrap() as f32],
                1e-6,
            );
            let mut grads = ParamGrads::from_backward(&lin, loss.backward());
            assert_eq!(grads.paths().collect::<Vec<_>>(), ["bias", "weight"]);
            let gw = vec_of(grads.get("weight").unwrap());
            close(
                &format!("{what} grad weight"),
                &transpose(&gw, 4, 3),
                &floats(&st["grad_weight"]),
                1e-6,
            );
            close(
                &format!("{what} grad bias"),
                &vec_of(grads.get("bias").unwrap()),
                &floats(&st["grad_bias"]),
                1e-6,
            );
            if let Some(m) = max_norm {
                let norm = grads.clip_total_norm(m);
                close(
                    &format!("{what} grad_norm"),
                    &[norm as f32],
                    &[st["grad_norm"].as_f64().unwrap() as f32],
                    1e-6,
                );
            }
            lin = opt.step(lr, lin, grads);
            let w = transpose(&vec_of(&lin.weight.val()), 4, 3);
            worst_param = worst_param.max(close(
                &format!("{what} weight"),
                &w,
                &floats(&st["weight"]),
                1e-6,
            ));
            let b = vec_of(&lin.bias.as_ref().unwrap().val());
            worst_param = worst_param.max(close(
                &format!("{what} bias"),
                &b,
                &floats(&st["bias"]),
                1e-6,
            ));
        }
        assert_eq!(opt.steps(), 3);
    }
    eprintln!("adamw vs torch: worst parameter |diff| after up to 3 steps = {worst_param:e}");
}

/// clip_total_norm is ONE norm over all tensors: every gradient gets the same factor, and the total
/// norm afterwards is max_norm. (burn's GradientClipping::Norm would instead bring each tensor to
/// max_norm separately.)
#[test]
fn clipping_is_global_not_per_tensor() {
    let dev = device();
    let mut g = ParamGrads::new();
    g.grads
        .insert("a".into(), Tensor::from_floats([3.0f32, 4.0], &dev)); // norm 5
    g.grads
        .insert("b".into(), Tensor::from_floats([12.0f32], &dev)); // norm 12
    let before = g.clip_total_norm(1.0);
    assert!((before - 13.0).abs() < 1e-5);
    let coef = 1.0f32 / (13.0 + 1e-6);
    close(
        "a",
        &vec_of(g.get("a").unwrap()),
        &[3.0 * coef, 4.0 * coef],
        1e-7,
    );
    close("b", &vec_of(g.get("b").unwrap()), &[12.0 * coef], 1e-7);
    assert!((g.total_norm() - 1.0).abs() < 1e-6);
    // Below the threshold nothing changes, and the norm is still reported.
    let mut h = ParamGrads::new();
    h.grads
        .insert("a".into(), Tensor::from_floats([0.3f32, 0.4], &dev));
    assert!((h.clip_total_norm(1.0) - 0.5).abs() < 1e-7);
    assert_eq!(vec_of(h.get("a").unwrap()), vec![0.3, 0.4]);
    // max_norm 0 only measures.
    assert!((g.clip_total_norm(0.0) - 1.0).abs() < 1e-6);
    assert!((g.total_norm() - 1.0).abs() < 1e-6);
    assert_eq!(ParamGrads::new().clip_total_norm(1.0), 0.0);
}

// ---------------------------------------------------------------------------------------------
// checkpoint / resume
// ---------------------------------------------------------------------------------------------

#[derive(Module, Debug)]
struct Block {
    proj: Linear,
    scale: Param<Tensor<1>>,
}

#[derive(Module, Debug)]
struct TinyNet {
    blocks: Vec<Block>,
    head: Linear,
}

impl TinyNet {
    fn new(dev: &Device) -> Self {
        let block = |d| Block {
            proj: LinearConfig::new(d, 6).init(dev),
            scale: Param::from_tensor(Tensor::random([6], Distribution::Normal(1.0, 0.1), dev)),
        };
        Self {
            blocks: vec![block(4), block(6)],
            head: LinearConfig::new(6, 3).init(dev),
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let mut h = x;
        for b in &self.blocks {
            h = burn::tensor::activation::gelu(b.proj.forward(h)) * b.scale.val().unsqueeze::<2>();
        }
        self.head.forward(h)
    }
}

fn batch(step: usize, micro: usize, dev: &Device) -> (Tensor<2>, Tensor<2>) {
    // Deterministic data that depends on the step (not on any RNG state).
    let x: Vec<f32> = (0..8 * 4)
        .map(|i| (((i + 7 * step + 3 * micro) as f32) * 0.37).sin())
        .collect();
    let y: Vec<f32> = (0..8 * 3)
        .map(|i| (((i + 5 * step + micro) as f32) * 0.11).cos())
        .collect();
    (
        Tensor::from_data(TensorData::new(x, [8, 4]), dev),
        Tensor::from_data(TensorData::new(y, [8, 3]), dev),
    )
}

/// One training step as the loop would do it: 2 micro-batches, clipping, scheduled lr.
fn train_step(model: TinyNet, opt: &mut AdamW, step: usize, dev: &Device) -> TinyNet {
    let mut grads = ParamGrads::new();
    for micro in 0..2 {
        let (x, y) = batch(step, micro, dev);
        let loss = (model.forward(x) - y).square().mean().div_scalar(2.0);
        grads.accumulate(&model, &mut loss.backward());
    }
    assert_eq!(grads.len(), 2 * 3 + 2);
    let norm = grads.clip_total_norm(0.05);
    assert!(norm.is_finite() && norm > 0.0);
    let lr = crate::train::schedule::lr_at(step as u64, 4, 5e-2, 0.25);
    opt.step(lr, model, grads)
}

fn param_bytes<M: Module>(m: &M) -> Vec<(String, Vec<u8>)> {
    struct V {
        path: Vec<String>,
        out: Vec<(String, Vec<u8>)>,
    }
    impl ModuleVisitor for V {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.into());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
            self.out
                .push((self.path.join("."), p.val().to_data().as_bytes().to_vec()));
        }
    }
    let mut v = V {
        path: vec![],
        out: vec![],
    };
    m.visit(&mut v);
    v.out
}

#[test]
fn resume_from_checkpoint_is_bit_exact() {
    let dev = device();
    let dir = tempfile::tempdir().unwrap();
    let config = AdamWConfig::default().with_weight_decay(0.01);

    let init = TinyNet::new(&dev);
    save_module(&init, dir.path().join("init.bpk")).unwrap();

    // 4 steps straight.
    let mut straight = init.clone();
    let mut opt = config.clone().init();
    for step in 0..4 {
        straight = train_step(straight, &mut opt, step, &dev);
    }

    // 2 steps, checkpoint, fresh objects (a differently initialised model), 2 more steps.
    let mut first = load_module(TinyNet::new(&dev), dir.path().join("init.bpk")).unwrap();
    assert_eq!(param_bytes(&first), param_bytes(&init));
    let mut opt1 = config.clone().init();
    for step in 0..2 {
        first = train_step(first, &mut opt1, step, &dev);
    }
    save_module(&first, dir.path().join("ckpt.bpk")).unwrap();
    opt1.save(dir.path().join("ckpt.adamw")).unwrap();
    drop((first, opt1));

    let fresh = TinyNet::new(&dev);
    assert_ne!(param_bytes(&fresh), param_bytes(&init));
    let mut resumed = load_module(fresh, dir.path().join("ckpt.bpk")).unwrap();
    let mut opt2 = AdamW::load(dir.path().join("ckpt.adamw"), &dev).unwrap();
    assert_eq!(opt2.steps(), 2);
    assert_eq!(opt2.num_states(), 8);
    assert_eq!(opt2.config(), &config);
    for step in 2..4 {
        resumed = train_step(resumed, &mut opt2, step, &dev);
    }

    let a = param_bytes(&straight);
    let b = param_bytes(&resumed);
    assert_eq!(a.len(), 8);
    for ((pa, ba), (pb, bb)) in a.iter().zip(&b) {
        assert_eq!(pa, pb);
        assert!(ba == bb, "{pa}: parameter bytes differ after resume");
    }
    // and the optimizer state is the same too
    assert_eq!(opt.to_bytes(), opt2.to_bytes());
    // while a run whose optimizer state is lost (fresh AdamW) would differ
    let mut lost = load_module(TinyNet::new(&dev), dir.path().join("ckpt.bpk")).unwrap();
    let mut opt3 = config.init();
    for step in 2..4 {
        lost = train_step(lost, &mut opt3, step, &dev);
    }
    assert_ne!(param_bytes(&lost), a);
}

#[test]
fn adamw_state_bytes_round_trip_and_reject_garbage() {
    let dev = device();
    let model = TinyNet::new(&dev);
    let mut opt = AdamWConfig::default().init();
    let (x, y) = batch(0, 0, &dev);
    let loss = (model.forward(x) - y).square().mean();
    let _model = opt.step(
        1e-3,
        model.clone(),
        ParamGrads::from_backward(&model, loss.backward()),
    );
    let bytes = opt.to_bytes();
    let back = AdamW::from_bytes(&bytes, &dev).unwrap();
    assert_eq!(back.to_bytes(), bytes);
    assert!(AdamW::from_bytes(b"nope", &dev).is_err());
    assert!(AdamW::from_bytes(&bytes[..bytes.len() - 3], &dev).is_err());
}

/// Parameters without a gradient (frozen, or unused by the loss) are left untouched and get no
/// state, as torch skips parameters whose .grad is None.
#[test]
fn parameters_without_gradients_are_skipped() {
    let dev = device();
    let model = TinyNet::new(&dev);
    let before = param_bytes(&model);
    let (x, y) = batch(0, 0, &dev);
    // Only block 0's projection (through a detached rest) gets a gradient.
    let h = model.blocks[0].proj.forward(x);
    let loss = (h.slice([0..8, 0..3]) - y).square().mean();
    let grads = ParamGrads::from_backward(&model, loss.backward());
    assert_eq!(
        grads.paths().collect::<Vec<_>>(),
        ["blocks.0.proj.bias", "blocks.0.proj.weight"]
    );
    let mut opt = AdamWConfig::default().init();
    let after = opt.step(1e-2, model, grads);
    assert_eq!(opt.num_states(), 2);
    for ((p, a), (_, b)) in before.iter().zip(&param_bytes(&after)) {
        assert_eq!(a == b, !p.starts_with("blocks.0.proj"), "{p}");
    }
}

/// `valid()` gives a copy without autodiff for inference: same outputs, nothing tracked; the
/// training model is unaffected and still trains.
#[test]
fn valid_copy_for_no_grad_inference() {
    let dev = device();
    let model = TinyNet::new(&dev);
    let (x, _) = batch(0, 0, &dev);
    let eval = model.valid();
    let out = eval.forward(x.clone().inner());
    assert!(!out.is_autodiff());
    assert_eq!(vec_of(&out), vec_of(&model.forward(x.clone())));
    let loss = model.forward(x).mean();
    assert_eq!(ParamGrads::from_backward(&model, loss.backward()).len(), 8);
}

/// weight decay scope: MatricesOnly leaves rank-1 parameters (biases, norm weights) undecayed.
#[test]
fn decay_scope_matrices_only() {
    let dev = device();
    let lin = linear_from_torch(&[0.5; 12], &[0.5; 3], &dev);
    let mut grads = ParamGrads::new();
    grads
        .grads
        .insert("weight".into(), Tensor::zeros([12], &dev));
    grads.grads.insert("bias".into(), Tensor::zeros([3], &dev));
    let mut opt = AdamWConfig::default().with_weight_decay(0.5).init();
    let lin = opt.step(0.1, lin, grads);
    // zero gradient: only the decay moves the weights: 0.5 * (1 - 0.1 * 0.5)
    assert!(
        vec_of(&lin.weight.val())
            .iter()
            .all(|w| (w - 0.475).abs() < 1e-7)
    );
    assert!(
        vec_of(&lin.bias.as_ref().unwrap().val())
            .iter()
            .all(|b| *b == 0.5)
    );
}
