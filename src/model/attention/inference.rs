//! The causal attention of no-grad forwards on flex (reference log-probs, `score`, `evaluate`,
//! generation, with or without a KV cache, grouped-query heads as they are) through
//! `sepo_kernels::causal_attention`: each query over only the keys it sees,
//! online softmax over key tiles, vectorized. burn-flex's own attention computes the masked
//! half of the scores too, with a scalar exponential, and was 93% of the score stage.
//!
//! The kernel lives in its own crate so that it is optimized (`opt-level = 3`) in the dev
//! profile, where this crate is not; it is safe Rust (`#![forbid(unsafe_code)]`).

use std::borrow::Cow;

use burn::tensor::{DType, Tensor, TensorData};

/// `softmax(q k^T / sqrt(d)) v` with query `i` at position `past + i` seeing keys `0..=past + i`,
/// through the kernel, or `None` where it does not apply and the caller keeps burn's attention:
/// a device other than flex, an autodiff device (training needs burn's graph), tensors other
/// than f32, an unsupported head width, or a CPU without AVX2 + FMA.
///
/// `q` is `[batch, heads, seq, d]`, `k` and `v` `[batch, kv_heads, past + seq, d]`.
pub(crate) fn causal(
    q: &Tensor<4>,
    k: &Tensor<4>,
    v: &Tensor<4>,
    past: usize,
) -> Option<Tensor<4>> {
    #[cfg(test)]
    if burn_only() {
        return None;
    }
    let [batch, heads, seq, head_dim] = q.dims();
    let [kb, kv_heads, keys, kd] = k.dims();
    let device = q.device();
    // No-grad forwards only: under autodiff the training path (super::qkv) or burn's graph.
    let usable = crate::device::is_flex(&device)
        && !device.is_autodiff()
        && [q.dtype(), k.dtype(), v.dtype()] == [DType::F32; 3]
        && v.dims() == k.dims()
        && (kb, kd, keys) == (batch, head_dim, past + seq)
        && kv_heads > 0
        && heads.is_multiple_of(kv_heads)
        && sepo_kernels::supports(head_dim)
        && sepo_kernels::accelerated();
    if !usable {
        return None;
    }
    // The bytes as f32 without `try_into_vec`, whose element-wise validity check runs
    // unoptimized in this crate (5% of the score stage): a cast where aligned, else one copy.
    let data = [q, k, v].map(|t| t.clone().into_data());
    let [q, k, v] = [&data[0], &data[1], &data[2]].map(f32s);
    let shape = sepo_kernels::AttentionShape {
        batch,
        heads,
        kv_heads,
        seq,
        past,
        head_dim,
    };
    #[cfg(test)]
    count_kernel_call();
    let out = sepo_kernels::causal_attention(&q, &k, &v, shape);
    Some(Tensor::from_data(
        TensorData::new(out, [batch, heads, seq, head_dim]),
        &device,
    ))
}

/// A whole attention layer continuing a key/value cache, from the fused `[q | k | v]`
/// projection `qkv` `[batch, seq, (heads + 2 kv_heads) * d]` (f32, no gradient) at positions
/// `layer`'s length onward, rotated by `cos` and `sin` `[seq, rot]`: what
/// [`super::qkv::attention`] does for a plain causal product, with the cached keys and values in
/// front. `layer` (`[batch, kv_heads, len, d]` each, rotated) is extended by these positions.
/// Returns `[batch, seq, heads * d]`. Only where [`super::qkv::usable`] and without autodiff.
pub(crate) fn qkv_cached(
    qkv: Tensor<3>,
    cos: &Tensor<2>,
    sin: &Tensor<2>,
    heads: usize,
    kv_heads: usize,
    layer: &mut Option<(Tensor<4>, Tensor<4>)>,
) -> Tensor<3> {
    let device = qkv.device();
    let [batch, seq, width] = qkv.dims();
    let head_dim = width / (heads + 2 * kv_heads);
    let split = sepo_kernels::QkvShape {
        batch,
        seq,
        heads,
        kv_heads,
        head_dim,
        rot: cos.dims()[1],
    };
    let data = [
        qkv.into_data(),
        cos.clone().into_data(),
        sin.clone().into_data(),
    ];
    let [qkv, cos, sin] = [&data[0], &data[1], &data[2]].map(f32s);
    let (q, k, v) = sepo_kernels::split_rope(&qkv, &cos, &sin, split);
    let past = layer.as_ref().map_or(0, |(k, _)| k.dims()[2]);
    // Each row's and head's cached positions, then these.
    let join = |cached: Option<&Tensor<4>>, new: Vec<f32>| -> Vec<f32> {
        let Some(cached) = cached.filter(|_| past > 0) else {
            return new;
        };
        let cached = cached.clone().into_data();
        let cached = f32s(&cached);
        if seq == 0 {
            return cached.into_owned();
        }
        let (old, add) = (past * head_dim, seq * head_dim);
        let mut all = Vec::with_capacity(cached.len() + new.len());
        for (o, n) in cached.chunks_exact(old).zip(new.chunks_exact(add)) {
            all.extend_from_slice(o);
            all.extend_from_slice(n);
        }
        all
    };
    let k = join(layer.as_ref().map(|(k, _)| k), k);
    let v = join(layer.as_ref().map(|(_, v)| v), v);
    let shape = sepo_kernels::AttentionShape {
        batch,
        heads,
        kv_heads,
        seq,
        past,
        head_dim,
    };
    #[cfg(test)]
    count_kernel_call();
    let out = sepo_kernels::causal_attention(&q, &k, &v, shape);
    let rows = sepo_kernels::heads_to_rows(&out, batch, heads, seq, head_dim);
    let kv_shape = [batch, kv_heads, past + seq, head_dim];
    *layer = Some((
        Tensor::from_data(TensorData::new(k, kv_shape), &device),
        Tensor::from_data(TensorData::new(v, kv_shape), &device),
    ));
    Tensor::from_data(
        TensorData::new(rows, [batch, seq, heads * head_dim]),
        &device,
    )
}

/// Test hook: whether a test asked for burn's attention only (the reference path).
#[cfg(test)]
pub(super) fn burn_only() -> bool {
    tests::BURN_ONLY.get()
}

/// Test hook: counts a call that ran the kernel crate's attention on this thread.
#[cfg(test)]
pub(super) fn count_kernel_call() {
    tests::KERNEL_CALLS.set(tests::KERNEL_CALLS.get() + 1);
}

/// The bytes of `d` as f32: a cast where aligned, else one copy.
fn f32s(d: &TensorData) -> Cow<'_, [f32]> {
    match bytemuck::try_cast_slice::<u8, f32>(d.as_bytes()) {
        Ok(f) => Cow::Borrowed(f),
        Err(_) => Cow::Owned(bytemuck::pod_collect_to_vec(d.as_bytes())),
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::module::attention_fallback;
    use burn::tensor::ops::AttentionModuleOptions;
    use burn::tensor::{Bool, Device, Tensor, TensorData};

    use std::cell::Cell;

    use super::causal;
    use crate::model::transformer::KvCache;
    use crate::model::{Architecture, CausalLm, ModelConfig};

    thread_local! {
        /// Set by a test: [`causal`] declines, the decoder runs burn's attention (the
        /// reference for the kernel path on whole models).
        pub(super) static BURN_ONLY: Cell<bool> = const { Cell::new(false) };
        /// Calls that ran the kernel on this thread.
        pub(super) static KERNEL_CALLS: Cell<usize> = const { Cell::new(0) };
    }

    fn flex() -> Option<Device> {
        crate::device::parse_device("flex").ok()
    }

    /// Deterministic values in `[-amp, amp]` (xorshift).
    fn random(shape: [usize; 4], seed: u64, amp: f32, device: &Device) -> Tensor<4> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let data: Vec<f32> = (0..shape.iter().product::<usize>())
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp
            })
            .collect();
        Tensor::from_data(TensorData::new(data, shape), device)
    }

    /// burn's decomposed attention under an explicit causal mask (true = hidden), keys and
    /// values repeated to every query head.
    fn reference(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, past: usize) -> Tensor<4> {
        let [batch, heads, seq, _] = q.dims();
        let [_, kv_heads, keys, d] = k.dims();
        let rep = |t: Tensor<4>| {
            t.reshape([batch, kv_heads, 1, keys, d])
                .expand([batch, kv_heads, heads / kv_heads, keys, d])
                .reshape([batch, heads, keys, d])
        };
        let mask: Vec<bool> = (0..seq)
            .flat_map(|i| (0..keys).map(move |j| j > past + i))
            .collect();
        let mask =
            Tensor::<4, Bool>::from_data(TensorData::new(mask, [1, 1, seq, keys]), &q.device())
                .expand([batch, heads, seq, keys]);
        let opts = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: false,
        };
        attention_fallback(q, rep(k), rep(v), Some(mask), None, opts)
    }

    /// The kernel equals burn's decomposed attention within 1e-5: grouped-query heads, cached
    /// keys (`past > 0`, one query as in generation), odd lengths, head widths 8, 64 and 128.
    #[test]
    fn kernel_equals_decomposed_attention() {
        let Some(device) = flex() else { return };
        if !sepo_kernels::accelerated() {
            eprintln!("no AVX2 + FMA here: the decoder keeps burn's attention");
            return;
        }
        // (batch, heads, kv_heads, seq, past, head_dim)
        let shapes = [
            (2, 8, 4, 77, 0, 8),
            (1, 8, 4, 1, 0, 8),
            (3, 4, 1, 129, 0, 8),
            (1, 2, 2, 600, 0, 8),
            (2, 4, 2, 9, 31, 8),
            (1, 8, 8, 1, 200, 8),
            (2, 4, 2, 45, 0, 64),
            (1, 2, 1, 17, 50, 64),
            (1, 2, 2, 66, 0, 128),
            (2, 4, 4, 1, 33, 128),
        ];
        for (n, (batch, heads, kv_heads, seq, past, d)) in shapes.into_iter().enumerate() {
            let seed = 3 * n as u64;
            let q = random([batch, heads, seq, d], seed + 1, 2.0, &device);
            let k = random([batch, kv_heads, past + seq, d], seed + 2, 2.0, &device);
            let v = random([batch, kv_heads, past + seq, d], seed + 3, 1.0, &device);
            let got = causal(&q, &k, &v, past).expect("the kernel applies");
            let want = reference(q, k, v, past);
            let diff = (got - want).abs().max().into_scalar::<f32>();
            let shape = (batch, heads, kv_heads, seq, past, d);
            assert!(diff <= 1e-5, "{shape:?}: differs by {diff}");
        }
    }

    /// A cache holding no positions yet continues like no cache, and an empty step leaves it as
    /// it was.
    #[test]
    fn qkv_cached_takes_empty_caches_and_empty_steps() {
        let Some(device) = flex() else { return };
        let (heads, kv_heads, d, seq) = (4, 2, 8, 5);
        let width = (heads + 2 * kv_heads) * d;
        let qkv = random([1, 1, seq, width], 7, 1.0, &device).reshape([1, seq, width]);
        let table = |v: f32| Tensor::<2>::full([seq, d], v, &device);
        let (cos, sin) = (table(1.0), table(0.0));
        let mut none = None;
        let want = super::qkv_cached(qkv.clone(), &cos, &sin, heads, kv_heads, &mut none);
        let empty = Tensor::<4>::zeros([1, kv_heads, 0, d], &device);
        let mut layer = Some((empty.clone(), empty));
        let got = super::qkv_cached(qkv, &cos, &sin, heads, kv_heads, &mut layer);
        assert_eq!(got.into_data(), want.into_data());
        let (k, _) = layer.clone().unwrap();
        let step = Tensor::<3>::zeros([1, 0, width], &device);
        let no_rows = Tensor::<2>::zeros([0, d], &device);
        let out = super::qkv_cached(step, &no_rows, &no_rows, heads, kv_heads, &mut layer);
        assert_eq!(out.dims(), [1, 0, heads * d]);
        assert_eq!(layer.unwrap().0.into_data(), k.into_data());
    }

    /// Training keeps burn's attention: on an autodiff device (and for a head width the kernel
    /// has no specialization for) the fast path declines.
    #[test]
    fn autodiff_and_odd_widths_keep_burns_attention() {
        let Some(device) = flex() else { return };
        let ad = device.clone().autodiff();
        let qa = random([1, 2, 5, 8], 1, 1.0, &ad);
        assert!(qa.device().is_autodiff());
        assert!(causal(&qa, &qa, &qa, 0).is_none());
        let odd = random([1, 2, 5, 24], 2, 1.0, &device);
        assert!(causal(&odd, &odd, &odd, 0).is_none());
    }

    /// Whole decoders through the kernel equal the same decoders on burn's attention within
    /// 1e-5: llama with grouped-query heads 8 wide (stories260K's), qwen2 with one kv head 16
    /// wide, a mistral sliding window shorter than the rows (burn's masked attention throughout),
    /// gpt_neox 24 wide (no kernel); a right-padded batch of odd lengths, and a cache continued
    /// in chunks (`past > 0`, one token at a time too).
    #[test]
    fn whole_models_equal_burns_attention() {
        let Some(device) = flex() else { return };
        let base = ModelConfig {
            vocab_size: 50,
            hidden_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 8,
            num_key_value_heads: Some(4),
            initializer_range: 0.3,
            ..Default::default()
        };
        let configs = [
            ModelConfig {
                architecture: Architecture::Llama,
                ..base.clone()
            },
            ModelConfig {
                architecture: Architecture::Qwen2,
                num_attention_heads: 4,
                num_key_value_heads: Some(1),
                ..base.clone()
            },
            ModelConfig {
                architecture: Architecture::Mistral,
                num_attention_heads: 2,
                num_key_value_heads: Some(2),
                sliding_window: Some(11),
                ..base.clone()
            },
            ModelConfig {
                architecture: Architecture::GptNeox,
                hidden_size: 48,
                num_attention_heads: 2,
                num_key_value_heads: None,
                partial_rotary_factor: Some(0.25),
                ..base.clone()
            },
        ];
        let ids = |rows: &[Vec<i64>]| {
            let flat: Vec<i64> = rows.iter().flatten().copied().collect();
            Tensor::<2, burn::tensor::Int>::from_data(
                TensorData::new(flat, [rows.len(), rows[0].len()]),
                &device,
            )
        };
        // The largest difference, relative to the largest magnitude (at least 1): the hidden
        // states of these peaky weights reach several units, where f32 rounds at 1e-6.
        let both = |run: &dyn Fn() -> Vec<f32>| {
            BURN_ONLY.set(false);
            let fast = run();
            BURN_ONLY.set(true);
            let burn = run();
            BURN_ONLY.set(false);
            let scale = burn.iter().fold(1f32, |m, b| m.max(b.abs()));
            let d = fast
                .iter()
                .zip(&burn)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            d / scale
        };
        for cfg in configs {
            let lm = CausalLm::init(&cfg, &device, 3).unwrap();
            let dec = &lm.decoder;
            let vocab = lm.vocab_size();
            let rows: Vec<Vec<i64>> = [150usize, 37, 1, 96]
                .iter()
                .enumerate()
                .map(|(b, &n)| {
                    let mut r: Vec<i64> = (0..n)
                        .map(|j| ((7 * j * j + 13 * j + 31 * b) % vocab) as i64)
                        .collect();
                    r.resize(150, 0);
                    r
                })
                .collect();
            let whole = || {
                dec.forward_hidden_padded(ids(&rows), None, None)
                    .try_into_vec_as::<f32>()
                    .unwrap()
            };
            let calls = KERNEL_CALLS.get();
            let d = both(&whole);
            assert!(d <= 1e-5, "{:?}, whole rows: {d}", cfg.architecture);
            // Every layer of llama and qwen2 took the kernel (neither mistral's window nor
            // gpt_neox's width has one).
            let kernel = matches!(cfg.architecture, Architecture::Llama | Architecture::Qwen2);
            let used = KERNEL_CALLS.get() - calls;
            let want = if kernel && sepo_kernels::accelerated() {
                2
            } else {
                0
            };
            assert_eq!(used, want, "{:?}", cfg.architecture);
            let chunks = || {
                let mut cache = KvCache::new();
                let mut out = Vec::new();
                for (a, b) in [(0, 40), (40, 61), (61, 62), (62, 70)] {
                    let part: Vec<Vec<i64>> = rows.iter().map(|r| r[a..b].to_vec()).collect();
                    out.extend(
                        dec.forward_hidden_padded(ids(&part), Some(&mut cache), None)
                            .try_into_vec_as::<f32>()
                            .unwrap(),
                    );
                }
                out
            };
            let d = both(&chunks);
            assert!(d <= 1e-5, "{:?}, cached chunks: {d}", cfg.architecture);
        }
    }
}
