use super::*;
use burn::tensor::{DType, Device, TensorData};
use serde_json::Value;

const FIXTURE: &str = include_str!("../../../tests/fixtures/losses.json");
const TOL: f64 = 1e-5;

fn fixture() -> Value {
    serde_json::from_str(FIXTURE).expect("losses.json parses")
}

fn device() -> Device {
    Device::default().autodiff()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("a list")
        .iter()
        .map(|x| x.as_f64().expect("a number"))
        .collect()
}

fn t1(v: &Value, dtype: DType, dev: &Device) -> Tensor<1> {
    let xs = floats(v);
    let n = xs.len();
    Tensor::from_data(TensorData::new(xs, [n]), (dev, dtype))
}

/// A ragged list of rows as a right-padded `[B, T]` tensor (padding 0.0) and its validity
/// mask (1.0 on real positions).
fn padded(v: &Value, dtype: DType, dev: &Device) -> (Tensor<2>, Tensor<2>, Vec<usize>) {
    let rows: Vec<Vec<f64>> = v.as_array().unwrap().iter().map(floats).collect();
    let t = rows.iter().map(Vec::len).max().unwrap();
    let b = rows.len();
    let mut vals = vec![0.0; b * t];
    let mut mask = vec![0.0; b * t];
    for (i, r) in rows.iter().enumerate() {
        for (j, x) in r.iter().enumerate() {
            vals[i * t + j] = *x;
            mask[i * t + j] = 1.0;
        }
    }
    let lens = rows.iter().map(Vec::len).collect();
    (
        Tensor::from_data(TensorData::new(vals, [b, t]), (dev, dtype)),
        Tensor::from_data(TensorData::new(mask, [b, t]), (dev, dtype)),
        lens,
    )
}

/// A ragged list of bool rows as a right-padded 0/1 `[B, T]` float mask.
fn bool_mask(v: &Value, t: usize, dtype: DType, dev: &Device) -> Tensor<2> {
    let rows = v.as_array().unwrap();
    let b = rows.len();
    let mut mask = vec![0.0f64; b * t];
    for (i, r) in rows.iter().enumerate() {
        for (j, x) in r.as_array().unwrap().iter().enumerate() {
            if x.as_bool().unwrap() {
                mask[i * t + j] = 1.0;
            }
        }
    }
    Tensor::from_data(TensorData::new(mask, [b, t]), (dev, dtype))
}

fn vec_of<const D: usize>(t: &Tensor<D>) -> Vec<f64> {
    t.to_data().convert::<f64>().try_to_vec::<f64>().unwrap()
}

#[track_caller]
fn close(what: &str, got: &[f64], want: &[f64], tol: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = 0.0f64;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs();
        assert!(
            d <= tol,
            "{what}[{i}]: got {g}, want {w} (|diff| {d:e} > {tol:e})"
        );
        worst = worst.max(d);
    }
    eprintln!("max |diff| {worst:.2e}  {what}");
    worst
}

/// Compares the valid (unpadded) entries of a `[B, T]` gradient with a ragged fixture.
#[track_caller]
fn close_ragged(what: &str, got: &Tensor<2>, want: &Value, lens: &[usize]) -> f64 {
    let [_, t] = got.dims();
    let g = vec_of(got);
    let mut worst = 0.0f64;
    for (i, row) in want.as_array().unwrap().iter().enumerate() {
        let w = floats(row);
        assert_eq!(w.len(), lens[i]);
        worst = worst.max(close(
            &format!("{what} row {i}"),
            &g[i * t..i * t + lens[i]],
            &w,
            TOL,
        ));
        for (j, x) in g[i * t + lens[i]..(i + 1) * t].iter().enumerate() {
            assert_eq!(
                *x,
                0.0,
                "{what}: padding [{i}, {}] got gradient {x}",
                lens[i] + j
            );
        }
    }
    worst
}

struct Inputs {
    pc: Tensor<1>,
    pr: Tensor<1>,
    rc: Tensor<1>,
    rr: Tensor<1>,
    nc: Tensor<1>,
    nr: Tensor<1>,
}

fn inputs(fx: &Value, dtype: DType, dev: &Device) -> Inputs {
    let i = &fx["inputs"];
    Inputs {
        pc: t1(&i["pc"], dtype, dev).require_grad(),
        pr: t1(&i["pr"], dtype, dev).require_grad(),
        rc: t1(&i["rc"], dtype, dev),
        rr: t1(&i["rr"], dtype, dev),
        nc: t1(&i["nc"], dtype, dev),
        nr: t1(&i["nr"], dtype, dev),
    }
}

fn metrics_match(what: &str, m: &PairMetrics, case: &Value) {
    let mean = |v: &Value| {
        let xs = floats(v);
        xs.iter().sum::<f64>() / xs.len() as f64
    };
    let c = mean(&case["chosen_rewards"]);
    let r = mean(&case["rejected_rewards"]);
    close(
        &format!("{what} reward_chosen"),
        &[m.reward_chosen],
        &[c],
        TOL,
    );
    close(
        &format!("{what} reward_rejected"),
        &[m.reward_rejected],
        &[r],
        TOL,
    );
    close(
        &format!("{what} reward_margin"),
        &[m.reward_margin],
        &[c - r],
        TOL,
    );
    if let Some(acc) = case.get("reward_accuracy") {
        assert_eq!(m.reward_accuracy, acc.as_f64().unwrap(), "{what} accuracy");
    }
    close(
        &format!("{what} loss (metrics)"),
        &[m.loss],
        &[case["loss"].as_f64().unwrap()],
        TOL,
    );
}

#[test]
fn dpo_matches_fixture_loss_rewards_and_gradients() {
    let fx = fixture();
    let dev = device();
    for (k, case) in fx["dpo"].as_array().unwrap().iter().enumerate() {
        let x = inputs(&fx, DType::F32, &dev);
        let beta = case["beta"].as_f64().unwrap();
        let ls = case["label_smoothing"].as_f64().unwrap();
        let out = dpo(x.pc.clone(), x.pr.clone(), x.rc, x.rr, beta, ls);
        let what = format!("dpo[{k}] beta {beta} ls {ls}");
        close(
            &what,
            &vec_of(&out.loss),
            &[case["loss"].as_f64().unwrap()],
            TOL,
        );
        close(
            &format!("{what} chosen_rewards"),
            &vec_of(&out.chosen_reward),
            &floats(&case["chosen_rewards"]),
            TOL,
        );
        close(
            &format!("{what} rejected_rewards"),
            &vec_of(&out.rejected_reward),
            &floats(&case["rejected_rewards"]),
            TOL,
        );
        close(
            &format!("{what} reward_margin_mean"),
            &[out.metrics().reward_margin],
            &[case["reward_margin_mean"].as_f64().unwrap()],
            TOL,
        );
        metrics_match(&what, &out.metrics(), case);
        let grads = out.loss.backward();
        close(
            &format!("{what} grad_pc"),
            &vec_of(&x.pc.grad(&grads).unwrap()),
            &floats(&case["grad_pc"]),
            TOL,
        );
        close(
            &format!("{what} grad_pr"),
            &vec_of(&x.pr.grad(&grads).unwrap()),
            &floats(&case["grad_pr"]),
            TOL,
        );
    }
    // The recorded single-coordinate check: d loss / d pc[0] (beta 0.1, ls 0).
    let gc = &fx["dpo_grad_check"];
    let x = inputs(&fx, DType::F32, &dev);
    let out = dpo(x.pc.clone(), x.pr, x.rc, x.rr, 0.1, 0.0);
    let g = vec_of(&x.pc.grad(&out.loss.backward()).unwrap())[0];
    close(
        "dpo_grad_check autograd",
        &[g],
        &[gc["autograd"].as_f64().unwrap()],
        TOL,
    );
    close(
        "dpo_grad_check closed form",
        &[g],
        &[gc["closed_form"].as_f64().unwrap()],
        TOL,
    );
}

#[test]
fn ipo_matches_fixture() {
    let fx = fixture();
    let dev = device();
    let case = &fx["ipo"][0];
    let x = inputs(&fx, DType::F32, &dev);
    let beta = case["beta"].as_f64().unwrap();
    let out = ipo(x.pc, x.pr, x.rc.clone(), x.rr.clone(), x.nc, x.nr, beta);
    close(
        "ipo loss",
        &vec_of(&out.loss),
        &[case["loss"].as_f64().unwrap()],
        TOL,
    );
    // Rewards are beta * (policy - reference) on average log-probs (TRL's IPO convention).
    let i = &fx["inputs"];
    let (pc, rc, nc) = (floats(&i["pc"]), floats(&i["rc"]), floats(&i["nc"]));
    let (pr, rr, nr) = (floats(&i["pr"]), floats(&i["rr"]), floats(&i["nr"]));
    let want_c: Vec<f64> = (0..4)
        .map(|k| beta * (pc[k] / nc[k] - rc[k] / nc[k]))
        .collect();
    let want_r: Vec<f64> = (0..4)
        .map(|k| beta * (pr[k] / nr[k] - rr[k] / nr[k]))
        .collect();
    close(
        "ipo chosen_reward",
        &vec_of(&out.chosen_reward),
        &want_c,
        TOL,
    );
    close(
        "ipo rejected_reward",
        &vec_of(&out.rejected_reward),
        &want_r,
        TOL,
    );
    // The per-pair logits recorded in the fixture are chosen - rejected reward, over beta.
    let logits = floats(&case["logits"]);
    let m = out.metrics();
    close(
        "ipo margin",
        &[m.reward_margin],
        &[beta * logits.iter().sum::<f64>() / 4.0],
        TOL,
    );
}

#[test]
fn simpo_matches_fixture() {
    let fx = fixture();
    let dev = device();
    let case = &fx["simpo"][0];
    let x = inputs(&fx, DType::F32, &dev);
    let beta = case["beta"].as_f64().unwrap();
    let margin = case["margin"].as_f64().unwrap();
    let out = simpo(x.pc.clone(), x.pr.clone(), x.nc, x.nr, beta, margin);
    close(
        "simpo loss",
        &vec_of(&out.loss),
        &[case["loss"].as_f64().unwrap()],
        TOL,
    );
    let i = &fx["inputs"];
    let (pc, nc, pr, nr) = (
        floats(&i["pc"]),
        floats(&i["nc"]),
        floats(&i["pr"]),
        floats(&i["nr"]),
    );
    let want_c: Vec<f64> = (0..4).map(|k| beta * pc[k] / nc[k]).collect();
    let want_r: Vec<f64> = (0..4).map(|k| beta * pr[k] / nr[k]).collect();
    close(
        "simpo chosen_reward",
        &vec_of(&out.chosen_reward),
        &want_c,
        TOL,
    );
    close(
        "simpo rejected_reward",
        &vec_of(&out.rejected_reward),
        &want_r,
        TOL,
    );
    let grads = out.loss.backward();
    close(
        "simpo grad_pc",
        &vec_of(&x.pc.grad(&grads).unwrap()),
        &floats(&case["grad_pc"]),
        TOL,
    );
    close(
        "simpo grad_pr",
        &vec_of(&x.pr.grad(&grads).unwrap()),
        &floats(&case["grad_pr"]),
        TOL,
    );
}

#[test]
fn sepo_matches_fixture_loss_u_and_token_gradients() {
    let fx = fixture();
    let dev = device();
    let i = &fx["inputs"];
    for (k, case) in fx["sepo"].as_array().unwrap().iter().enumerate() {
        let (lc, _, lens_c) = padded(&i["policy_chosen_token_logps"], DType::F32, &dev);
        let (lr, _, lens_r) = padded(&i["policy_rejected_token_logps"], DType::F32, &dev);
        let lc = lc.require_grad();
        let lr = lr.require_grad();
        let mc = bool_mask(&i["chosen_mask"], lc.dims()[1], DType::F32, &dev);
        let mr = bool_mask(&i["rejected_mask"], lr.dims()[1], DType::F32, &dev);
        let gamma = case["gamma"].as_f64().unwrap();
        let margin = case["margin"].as_f64().unwrap();
        let out = sepo(lc.clone(), mc, lr.clone(), mr, gamma, margin);
        let what = format!("sepo[{k}] gamma {gamma} margin {margin}");
        close(
            &what,
            &vec_of(&out.loss),
            &[case["loss"].as_f64().unwrap()],
            TOL,
        );
        close(
            &format!("{what} u_chosen"),
            &vec_of(&out.chosen_reward),
            &floats(&case["u_chosen"]),
            TOL,
        );
        close(
            &format!("{what} u_rejected"),
            &vec_of(&out.rejected_reward),
            &floats(&case["u_rejected"]),
            TOL,
        );
        let grads = out.loss.backward();
        close_ragged(
            &format!("{what} grad chosen"),
            &lc.grad(&grads).unwrap(),
            &case["grad_policy_chosen_token_logps"],
            &lens_c,
        );
        close_ragged(
            &format!("{what} grad rejected"),
            &lr.grad(&grads).unwrap(),
            &case["grad_policy_rejected_token_logps"],
            &lens_r,
        );
    }
}

#[test]
fn sft_is_token_weighted_and_matches_fixture() {
    let fx = fixture();
    let dev = device();
    let (lc, mask, lens) = padded(&fx["inputs"]["policy_chosen_token_logps"], DType::F32, &dev);
    let lc = lc.require_grad();
    let loss = sft(lc.clone(), mask);
    let want = fx["sft"]["loss"].as_f64().unwrap();
    close("sft loss", &vec_of(&loss), &[want], TOL);
    let contrast = fx["sft"]["loss_sequence_mean_for_contrast"]
        .as_f64()
        .unwrap();
    assert!(
        (vec_of(&loss)[0] - contrast).abs() > 1e-2,
        "sft must not be the per-sequence mean"
    );
    let grads = loss.backward();
    close_ragged(
        "sft grad",
        &lc.grad(&grads).unwrap(),
        &fx["sft"]["grad_policy_chosen_token_logps"],
        &lens,
    );
}

/// Central finite differences, in float64, of the SePO loss with respect to one chosen and one
/// rejected key-token log-prob, against burn's autodiff gradient.
#[test]
fn sepo_autodiff_gradient_matches_finite_difference() {
    let fx = fixture();
    let dev = device();
    let i = &fx["inputs"];
    let (gamma, margin) = (2.0, 0.3);
    let (lc0, _, _) = padded(&i["policy_chosen_token_logps"], DType::F64, &dev);
    let (lr0, _, _) = padded(&i["policy_rejected_token_logps"], DType::F64, &dev);
    let [b, tc] = lc0.dims();
    let tr = lr0.dims()[1];
    let mc = bool_mask(&i["chosen_mask"], tc, DType::F64, &dev);
    let mr = bool_mask(&i["rejected_mask"], tr, DType::F64, &dev);
    let base_c = vec_of(&lc0);
    let base_r = vec_of(&lr0);
    let loss_at = |c: &[f64], r: &[f64]| -> f64 {
        let c = Tensor::<2>::from_data(TensorData::new(c.to_vec(), [b, tc]), (&dev, DType::F64));
        let r = Tensor::<2>::from_data(TensorData::new(r.to_vec(), [b, tr]), (&dev, DType::F64));
        vec_of(&sepo(c, mc.clone(), r, mr.clone(), gamma, margin).loss)[0]
    };
    let lc = lc0.require_grad();
    let lr = lr0.require_grad();
    let out = sepo(
        lc.clone(),
        mc.clone(),
        lr.clone(),
        mr.clone(),
        gamma,
        margin,
    );
    assert_eq!(out.loss.dtype(), DType::F64);
    let grads = out.loss.backward();
    let gc = vec_of(&lc.grad(&grads).unwrap());
    let gr = vec_of(&lr.grad(&grads).unwrap());
    let h = 1e-6;
    // chosen row 0 token 1 and rejected row 3 token 2 are key tokens in the fixture masks.
    for (is_chosen, idx) in [(true, 1usize), (false, 3 * tr + 2)] {
        let (mut plus_c, mut plus_r) = (base_c.clone(), base_r.clone());
        let (mut minus_c, mut minus_r) = (base_c.clone(), base_r.clone());
        if is_chosen {
            plus_c[idx] += h;
            minus_c[idx] -= h;
        } else {
            plus_r[idx] += h;
            minus_r[idx] -= h;
        }
        let fd = (loss_at(&plus_c, &plus_r) - loss_at(&minus_c, &minus_r)) / (2.0 * h);
        let ad = if is_chosen { gc[idx] } else { gr[idx] };
        assert!(
            ad.abs() > 1e-3,
            "pick a coordinate with a real gradient (got {ad})"
        );
        assert!(
            (fd - ad).abs() < 1e-7,
            "finite difference {fd} vs autodiff {ad}"
        );
    }
}

/// Extreme logits stay finite, and the gradient at logits = 0 (policy == reference, DPO's first
/// step) is sigmoid(0) = 0.5 per unit, not a kink artefact.
#[test]
fn log_sigmoid_is_stable_and_smooth_at_zero() {
    let dev = device();
    let big = Tensor::<1>::from_floats([200.0f32, -200.0, 0.0, 1e-3], &dev).require_grad();
    let zero = Tensor::<1>::zeros([4], &dev);
    let out = dpo(big.clone(), zero.clone(), zero.clone(), zero, 1.0, 0.0);
    let l = vec_of(&out.loss)[0];
    assert!(l.is_finite(), "loss {l}");
    // losses: ~0, 200, ln 2, ~ln 2 - 5e-4
    close(
        "extreme dpo loss",
        &[l],
        &[(0.0 + 200.0 + 2f64.ln() + (2f64.ln() - 5e-4)) / 4.0],
        1e-4,
    );
    let g = vec_of(&big.grad(&out.loss.backward()).unwrap());
    assert!(g.iter().all(|x| x.is_finite()));
    close("grad at 0", &[g[2]], &[-0.5 / 4.0], 1e-7);
    close("grad at +200", &[g[0]], &[0.0], 1e-7);
    close("grad at -200", &[g[1]], &[-1.0 / 4.0], 1e-7);
}

/// The reference log-probs come from a model without autodiff (`reference.valid()`): mixing
/// them with the policy's autodiff tensors treats them as constants, and gives the same loss
/// and gradients as the all-autodiff fixture run.
#[test]
fn reference_without_autodiff_mixes_with_policy() {
    let fx = fixture();
    let dev = device();
    let x = inputs(&fx, DType::F32, &dev);
    let rc = x.rc.clone().inner();
    let rr = x.rr.clone().inner();
    assert!(!rc.is_autodiff() && x.pc.is_autodiff());
    let out = dpo(x.pc.clone(), x.pr.clone(), rc, rr, 0.1, 0.0);
    let case = &fx["dpo"][0];
    close(
        "dpo, plain reference",
        &vec_of(&out.loss),
        &[case["loss"].as_f64().unwrap()],
        TOL,
    );
    let grads = out.loss.backward();
    close(
        "dpo, plain reference, grad_pc",
        &vec_of(&x.pc.grad(&grads).unwrap()),
        &floats(&case["grad_pc"]),
        TOL,
    );
}

/// A padding position holding -inf (an underflowed log-softmax) must not poison the row.
#[test]
fn masked_positions_may_hold_non_finite_values() {
    let dev = device();
    let logps = Tensor::<2>::from_floats(
        [[-1.0f32, -2.0, f32::NEG_INFINITY], [-0.5, -0.25, -4.0]],
        &dev,
    );
    let mask = Tensor::<2>::from_floats([[1.0f32, 1.0, 0.0], [0.0, 1.0, 1.0]], &dev);
    close(
        "masked_sum",
        &vec_of(&masked_sum(logps.clone(), mask.clone())),
        &[-3.0, -4.25],
        0.0,
    );
    close(
        "masked_count",
        &vec_of(&masked_count(mask.clone())),
        &[2.0, 2.0],
        0.0,
    );
    close("sft", &vec_of(&sft(logps, mask)), &[7.25 / 4.0], 1e-7);
}

/// Bradley-Terry (TRL's RewardTrainer): the loss, its gradients `-sigmoid(-z_i) / B` and
/// `+sigmoid(-z_i) / B`, and the rewards are the scores, against the formula in f64.
#[test]
fn bradley_terry_matches_its_formula() {
    let dev = device();
    let (c, r) = ([1.5f64, -0.25, 2.0, -3.0], [0.5f64, 0.75, 2.0, 4.0]);
    let tc = Tensor::<1>::from_floats(c.map(|x| x as f32), &dev).require_grad();
    let tr = Tensor::<1>::from_floats(r.map(|x| x as f32), &dev).require_grad();
    let out = bradley_terry(tc.clone(), tr.clone());
    let sigmoid = |z: f64| 1.0 / (1.0 + (-z).exp());
    let z: Vec<f64> = c.iter().zip(&r).map(|(a, b)| a - b).collect();
    let want = z.iter().map(|&z| -sigmoid(z).ln()).sum::<f64>() / 4.0;
    close("bradley-terry loss", &vec_of(&out.loss), &[want], 1e-6);
    let grads = out.loss.backward();
    let gc: Vec<f64> = z.iter().map(|&z| -sigmoid(-z) / 4.0).collect();
    let gr: Vec<f64> = gc.iter().map(|g| -g).collect();
    close("d/d chosen", &vec_of(&tc.grad(&grads).unwrap()), &gc, 1e-6);
    close(
        "d/d rejected",
        &vec_of(&tr.grad(&grads).unwrap()),
        &gr,
        1e-6,
    );
    let m = out.metrics();
    close("reward_chosen", &[m.reward_chosen], &[0.0625], 1e-6);
    close("reward_margin", &[m.reward_margin], &[-1.75], 1e-6);
    // Strictly greater, as TRL: the tie (2.0 vs 2.0) is not a win.
    close("reward_accuracy", &[m.reward_accuracy], &[0.25], 0.0);
}

/// A side with no key token (`select`'s `chosen_ratio: 0` or `rejected_ratio: 0`, or a
/// threshold nothing passes) contributes nothing: its `u` is 0, so the pair's loss is the other
/// side's alone, and its tokens get exactly zero gradient. Nothing is NaN, even with `-inf`
/// log-probs at positions no mask counts.
#[test]
fn sepo_side_without_key_tokens_contributes_nothing() {
    let dev = device();
    let ninf = f64::NEG_INFINITY;
    let t2 = |v: Vec<f64>| Tensor::<2>::from_data(TensorData::new(v, [2, 3]), (&dev, DType::F64));
    // Pair 0 keeps chosen tokens 0 and 1 and no rejected token; pair 1 the reverse, one rejected.
    let lc = t2(vec![-1.0, -2.0, ninf, -0.5, -1.5, ninf]).require_grad();
    let mc = t2(vec![1.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
    let lr = t2(vec![-2.5, ninf, -1.2, -0.9, -4.0, ninf]).require_grad();
    let mr = t2(vec![0.0, 0.0, 0.0, 1.0, 0.0, 0.0]);
    let (gamma, margin) = (2.0, 0.3);
    let out = sepo(lc.clone(), mc, lr.clone(), mr, gamma, margin);
    let sigmoid = |z: f64| 1.0 / (1.0 + (-z).exp());
    // u_w = 2 * mean(-1, -2) = -3 and u_l = 0; then u_w = 0 and u_l = 2 * -0.9 = -1.8.
    let z = [-3.0 - 0.0 - margin, 0.0 - -1.8 - margin];
    let want = z.iter().map(|&z| -sigmoid(z).ln()).sum::<f64>() / 2.0;
    close("loss", &vec_of(&out.loss), &[want], 1e-12);
    close("u_chosen", &vec_of(&out.chosen_reward), &[-3.0, 0.0], 1e-12);
    close(
        "u_rejected",
        &vec_of(&out.rejected_reward),
        &[0.0, -1.8],
        1e-12,
    );
    let grads = out.loss.backward();
    let gc = vec_of(&lc.grad(&grads).unwrap());
    let gr = vec_of(&lr.grad(&grads).unwrap());
    // d loss / d z_i = -sigmoid(-z_i) / B; a key token's d z / d logp is +-gamma / (key count).
    let g0 = -sigmoid(-z[0]) / 2.0 * gamma / 2.0;
    let g1 = -sigmoid(-z[1]) / 2.0 * -gamma;
    close("grad chosen", &gc, &[g0, g0, 0.0, 0.0, 0.0, 0.0], 1e-12);
    close("grad rejected", &gr, &[0.0, 0.0, 0.0, g1, 0.0, 0.0], 1e-12);
    assert!(gc.iter().chain(&gr).all(|g| g.is_finite()));
}

// ---------------------------------------------------------------------------------------------
// tests/fixtures/token_losses.json (scripts/make_token_fixtures.py): token-weighted SePO,
// weighted DPO, IPO on summed log-probs, RRHF. Each runs in f32 (training's dtype) and in f64.
// ---------------------------------------------------------------------------------------------

const TOKEN_FIXTURE: &str = include_str!("../../../tests/fixtures/token_losses.json");
const DTYPES: [DType; 2] = [DType::F32, DType::F64];

fn token_fixture() -> Value {
    serde_json::from_str(TOKEN_FIXTURE).expect("token_losses.json parses")
}

fn f64_of(v: &Value) -> f64 {
    v.as_f64().expect("a number")
}

/// The per-token inputs of token_losses.json on one device and dtype.
struct TokenInputs {
    /// policy log-probs (leaves that require grad), `[B, T]` right-padded
    lc: Tensor<2>,
    lr: Tensor<2>,
    /// reference log-probs, no grad
    rc: Tensor<2>,
    rr: Tensor<2>,
    /// 1.0 on each response's real positions
    valid_c: Tensor<2>,
    valid_r: Tensor<2>,
    /// real-valued token weights (0.0 on padding)
    wc: Tensor<2>,
    wr: Tensor<2>,
    /// 0/1 key-token masks
    mc: Tensor<2>,
    mr: Tensor<2>,
    lens_c: Vec<usize>,
    lens_r: Vec<usize>,
}

fn token_inputs(fx: &Value, dtype: DType, dev: &Device) -> TokenInputs {
    let i = &fx["inputs"];
    let (lc, valid_c, lens_c) = padded(&i["policy_chosen_token_logps"], dtype, dev);
    let (lr, valid_r, lens_r) = padded(&i["policy_rejected_token_logps"], dtype, dev);
    let (rc, _, _) = padded(&i["reference_chosen_token_logps"], dtype, dev);
    let (rr, _, _) = padded(&i["reference_rejected_token_logps"], dtype, dev);
    let (wc, _, lens_wc) = padded(&i["chosen_weights"], dtype, dev);
    let (wr, _, lens_wr) = padded(&i["rejected_weights"], dtype, dev);
    assert_eq!((&lens_wc, &lens_wr), (&lens_c, &lens_r));
    let mc = bool_mask(&i["chosen_mask"], lc.dims()[1], dtype, dev);
    let mr = bool_mask(&i["rejected_mask"], lr.dims()[1], dtype, dev);
    TokenInputs {
        lc: lc.require_grad(),
        lr: lr.require_grad(),
        rc,
        rr,
        valid_c,
        valid_r,
        wc,
        wr,
        mc,
        mr,
        lens_c,
        lens_r,
    }
}

/// Loss, per-pair rewards (under the fixture's `chosen_key` / `rejected_key`) and the per-token
/// policy gradients of one objective against one fixture case. Returns those gradients
/// (`[B, T]` row-major, chosen then rejected).
#[track_caller]
fn check_token_case(
    what: &str,
    out: PairLoss,
    x: &TokenInputs,
    case: &Value,
    (chosen_key, rejected_key): (&str, &str),
) -> (Vec<f64>, Vec<f64>) {
    close(
        &format!("{what} loss"),
        &vec_of(&out.loss),
        &[f64_of(&case["loss"])],
        TOL,
    );
    close(
        &format!("{what} {chosen_key}"),
        &vec_of(&out.chosen_reward),
        &floats(&case[chosen_key]),
        TOL,
    );
    close(
        &format!("{what} {rejected_key}"),
        &vec_of(&out.rejected_reward),
        &floats(&case[rejected_key]),
        TOL,
    );
    let grads = out.loss.backward();
    let gc = x.lc.grad(&grads).unwrap();
    let gr = x.lr.grad(&grads).unwrap();
    close_ragged(
        &format!("{what} grad chosen"),
        &gc,
        &case["grad_policy_chosen_token_logps"],
        &x.lens_c,
    );
    close_ragged(
        &format!("{what} grad rejected"),
        &gr,
        &case["grad_policy_rejected_token_logps"],
        &x.lens_r,
    );
    (vec_of(&gc), vec_of(&gr))
}

/// Loss, per-pair rewards and the gradients w.r.t. the summed log-probs `pc`, `pr` of a
/// sequence-level objective against one fixture case; returns the loss.
#[track_caller]
fn check_sequence_case(what: &str, out: PairLoss, x: &Inputs, case: &Value) -> f64 {
    let loss = vec_of(&out.loss)[0];
    close(
        &format!("{what} loss"),
        &[loss],
        &[f64_of(&case["loss"])],
        TOL,
    );
    for (name, got) in [
        ("chosen_rewards", &out.chosen_reward),
        ("rejected_rewards", &out.rejected_reward),
    ] {
        close(
            &format!("{what} {name}"),
            &vec_of(got),
            &floats(&case[name]),
            TOL,
        );
    }
    let grads = out.loss.backward();
    for (name, leaf) in [("grad_pc", &x.pc), ("grad_pr", &x.pr)] {
        close(
            &format!("{what} {name}"),
            &vec_of(&leaf.grad(&grads).unwrap()),
            &floats(&case[name]),
            TOL,
        );
    }
    loss
}

/// SePO with real-valued token weights: u is the weighted mean `sum w logp / sum w`, also when
/// the weights sum to less than 1 (pair 2's rejected side, 0.6), and 0 with zero gradient when
/// they are all 0 (pair 1's chosen side). The 0/1-mask cases of the same fixture give the same
/// numbers as before (`sepo_matches_fixture_loss_u_and_token_gradients` covers losses.json).
#[test]
fn sepo_with_token_weights_matches_fixture() {
    let fx = token_fixture();
    let dev = device();
    for dtype in DTYPES {
        for (k, case) in fx["sepo_weighted"].as_array().unwrap().iter().enumerate() {
            let x = token_inputs(&fx, dtype, &dev);
            let gamma = f64_of(&case["gamma"]);
            let margin = f64_of(&case["margin"]);
            let real = case["weights"]
                .as_str()
                .unwrap()
                .starts_with("chosen_weights");
            let (wc, wr) = if real {
                (x.wc.clone(), x.wr.clone())
            } else {
                (x.mc.clone(), x.mr.clone())
            };
            let out = sepo(x.lc.clone(), wc, x.lr.clone(), wr, gamma, margin);
            let what = format!(
                "sepo_weighted[{k}] {dtype:?} {} gamma {gamma} margin {margin}",
                if real { "weights" } else { "0/1 mask" }
            );
            assert!(vec_of(&out.loss)[0].is_finite());
            // Pair 1 has no chosen weight at all: u_w = 0 there.
            assert_eq!(vec_of(&out.chosen_reward)[1], 0.0, "{what}: u_w of pair 1");
            check_token_case(&what, out, &x, case, ("u_chosen", "u_rejected"));
        }
    }
    // The weights of pair 2's rejected answer sum to 0.6: a count clamped to 1 (the former
    // denominator) would have given u = gamma * sum w logp instead of the weighted mean.
    let case = &fx["sepo_weighted"][0];
    let w = floats(&fx["inputs"]["rejected_weights"][2]);
    let l = floats(&fx["inputs"]["policy_rejected_token_logps"][2]);
    let total: f64 = w.iter().sum();
    assert!(total > 0.0 && total < 1.0, "{total}");
    let weighted: f64 = w.iter().zip(&l).map(|(a, b)| a * b).sum();
    let u = floats(&case["u_rejected"])[2];
    assert!((u - weighted / total).abs() < 1e-12);
    assert!(
        (u - weighted).abs() > 1e-2,
        "the fixture must tell the two apart"
    );
}

/// Weighted DPO (TIS-DPO / critical-token DPO): `dpo` on `masked_sum(logps, weights)` of the
/// policy and the reference, with the same weights on both.
#[test]
fn weighted_dpo_is_dpo_on_weighted_sums() {
    let fx = token_fixture();
    let dev = device();
    for dtype in DTYPES {
        for (k, case) in fx["wdpo"].as_array().unwrap().iter().enumerate() {
            let x = token_inputs(&fx, dtype, &dev);
            let beta = f64_of(&case["beta"]);
            let ls = f64_of(&case["label_smoothing"]);
            let what = format!("wdpo[{k}] {dtype:?} beta {beta} ls {ls}");
            let pc = masked_sum(x.lc.clone(), x.wc.clone());
            let pr = masked_sum(x.lr.clone(), x.wr.clone());
            let rc = masked_sum(x.rc.clone(), x.wc.clone());
            let rr = masked_sum(x.rr.clone(), x.wr.clone());
            for (name, t) in [("pc", &pc), ("pr", &pr), ("rc", &rc), ("rr", &rr)] {
                close(
                    &format!("{what} weighted {name}"),
                    &vec_of(t),
                    &floats(&case[format!("weighted_{name}").as_str()]),
                    TOL,
                );
            }
            let out = dpo(pc, pr, rc, rr, beta, ls);
            metrics_match(&what, &out.metrics(), case);
            check_token_case(&what, out, &x, case, ("chosen_rewards", "rejected_rewards"));
        }
    }
}

/// IPO on summed log-probs (OpenRLHF) against the fixture, and against TRL's averaged IPO on the
/// same inputs, which is a different loss.
#[test]
fn ipo_sum_matches_fixture_and_differs_from_averaged_ipo() {
    let fx = token_fixture();
    let dev = device();
    for dtype in DTYPES {
        for (k, case) in fx["ipo_sum"]["cases"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            let beta = f64_of(&case["beta"]);
            let what = format!("ipo_sum[{k}] {dtype:?} beta {beta}");
            let x = inputs(&fx["ipo_sum"], dtype, &dev);
            let out = ipo_sum(x.pc.clone(), x.pr.clone(), x.rc.clone(), x.rr.clone(), beta);
            let loss_sum = check_sequence_case(&what, out, &x, case);
            let what = format!("ipo (averaged) [{k}] {dtype:?} beta {beta}");
            let x = inputs(&fx["ipo_sum"], dtype, &dev);
            let out = ipo(
                x.pc.clone(),
                x.pr.clone(),
                x.rc.clone(),
                x.rr.clone(),
                x.nc.clone(),
                x.nr.clone(),
                beta,
            );
            let loss_avg = check_sequence_case(&what, out, &x, &case["ipo_averaged"]);
            assert!(
                (loss_sum - loss_avg).abs() > 1.0,
                "{what}: summed {loss_sum} vs averaged {loss_avg} should differ"
            );
        }
    }
}

/// RRHF on whole responses: loss, rewards (the mean token log-probs) and per-token gradients. On
/// a pair whose chosen average is already above the rejected one the hinge is 0, so the rejected
/// tokens get exactly no gradient and each chosen token exactly the SFT term's `-1 / (B * nc)`.
#[test]
fn rrhf_matches_fixture() {
    let fx = token_fixture();
    let dev = device();
    for dtype in DTYPES {
        for (k, case) in fx["rrhf"].as_array().unwrap().iter().enumerate() {
            let x = token_inputs(&fx, dtype, &dev);
            let rank_weight = f64_of(&case["rank_weight"]);
            let what = format!("rrhf[{k}] {dtype:?} rank_weight {rank_weight}");
            let pc = masked_sum(x.lc.clone(), x.valid_c.clone());
            let pr = masked_sum(x.lr.clone(), x.valid_r.clone());
            let nc = masked_count(x.valid_c.clone());
            let nr = masked_count(x.valid_r.clone());
            let out = rrhf(pc, pr, nc, nr, rank_weight);
            let (gc, gr) =
                check_token_case(&what, out, &x, case, ("chosen_rewards", "rejected_rewards"));
            let [b, tc] = x.lc.dims();
            let tr = x.lr.dims()[1];
            let hinge_zero: Vec<bool> = case["hinge_zero"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_bool().unwrap())
                .collect();
            assert!(hinge_zero.contains(&true) && hinge_zero.contains(&false));
            for (i, &zero) in hinge_zero.iter().enumerate() {
                let row_r = &gr[i * tr..i * tr + x.lens_r[i]];
                if zero {
                    assert!(
                        row_r.iter().all(|g| *g == 0.0),
                        "{what} pair {i}: {row_r:?}"
                    );
                    let sft_only = -1.0 / (b as f64 * x.lens_c[i] as f64);
                    close(
                        &format!("{what} pair {i} chosen grad (sft only)"),
                        &gc[i * tc..i * tc + x.lens_c[i]],
                        &vec![sft_only; x.lens_c[i]],
                        1e-7,
                    );
                } else {
                    let want = rank_weight / (b as f64 * x.lens_r[i] as f64);
                    close(
                        &format!("{what} pair {i} rejected grad (rank)"),
                        row_r,
                        &vec![want; x.lens_r[i]],
                        1e-7,
                    );
                }
            }
        }
    }
}

/// RRHF's edge cases against its formula in f64: a tie (p_c == p_r) adds no rank term and no rank
/// gradient (the original's strict `diff < 0`), and a zero count is clamped to 1.
#[test]
fn rrhf_tie_and_empty_response() {
    let dev = device();
    let t =
        |v: [f64; 2]| Tensor::<1>::from_data(TensorData::new(v.to_vec(), [2]), (&dev, DType::F64));
    // pair 0: p_c = -6/3 = -2 = p_r = -4/2 (a tie); pair 1: nothing counted on either side.
    let pc = t([-6.0, 0.0]).require_grad();
    let pr = t([-4.0, 0.0]).require_grad();
    let out = rrhf(pc.clone(), pr.clone(), t([3.0, 0.0]), t([2.0, 0.0]), 1.0);
    close(
        "rrhf tie loss",
        &vec_of(&out.loss),
        &[(2.0 + 0.0) / 2.0],
        0.0,
    );
    close(
        "rrhf tie p_c",
        &vec_of(&out.chosen_reward),
        &[-2.0, 0.0],
        0.0,
    );
    let grads = out.loss.backward();
    close(
        "rrhf tie grad pc",
        &vec_of(&pc.grad(&grads).unwrap()),
        &[-1.0 / 6.0, -0.5],
        1e-15,
    );
    close(
        "rrhf tie grad pr",
        &vec_of(&pr.grad(&grads).unwrap()),
        &[0.0, 0.0],
        0.0,
    );
}
