//! Normal draws for fresh weights, the arithmetic of every weight a `model` stage draws from
//! `config:`. Here so that it is optimized in the dev profile too (in the sepo crate, unoptimized,
//! a per-element loop costs more than the draws). The values are exactly those of the definitions
//! below, which the model stage's hash stands for.
//!
//! [`fill_normal`] (`init: ziggurat`, the default): rand_distr's ziggurat (a table lookup and a
//! multiply for 99% of draws, done here on words read a buffer ahead; rand_distr itself for the
//! rest), on independent ChaCha12 streams per block, so any number of threads gives the same
//! values. [`box_muller`] (`init: box-muller`, sepo's first sampler, kept so that models built
//! with it can be rebuilt bit for bit): one sequential stream, and a `ln`, `cos` and `sin` per
//! pair, about five times the cost.

use chacha20::ChaCha12Rng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;

/// Elements per block of [`fill_normal`]: each draws from its own stream.
pub const NORMAL_BLOCK: usize = 1 << 16;

/// Fills `out` with `std`-scaled standard normal draws: block `b` (elements
/// `b * NORMAL_BLOCK..(b + 1) * NORMAL_BLOCK`) takes, in order, rand_distr's `StandardNormal`
/// samples (f64, rounded to f32, then times `std`) from `ChaCha12Rng::seed_from_u64(seed)` set to
/// stream `(tensor << 32) | b`. Blocks run on all threads; the values do not depend on how many.
///
/// # Panics
/// If `out` has `2^32` blocks or more.
pub fn fill_normal(seed: u64, tensor: u32, std: f32, out: &mut [f32]) {
    assert!(
        out.len().div_ceil(NORMAL_BLOCK) <= u32::MAX as usize,
        "fill_normal: {} elements",
        out.len()
    );
    out.par_chunks_mut(NORMAL_BLOCK)
        .enumerate()
        .for_each(|(b, block)| {
            let mut rng = ChaCha12Rng::seed_from_u64(seed);
            rng.set_stream((u64::from(tensor) << 32) | b as u64);
            let mut words = Ahead::new(rng);
            let mut rest = block;
            while !rest.is_empty() {
                let n = words.common_run(std, rest);
                let Some((x, after)) = rest[n..].split_first_mut() else {
                    break;
                };
                let z: f64 = StandardNormal.sample(&mut words);
                *x = z as f32 * std;
                rest = after;
            }
        });
}

/// A ChaCha12 stream read a buffer ahead: the same words, in the same order, as reading the
/// generator itself (rand_core's block generators hand out `next_u32` one word and `next_u64`
/// two, low first, and fill bytes a whole word at a time).
struct Ahead {
    rng: ChaCha12Rng,
    buf: [u32; AHEAD],
    /// The next unread word of `buf`.
    pos: usize,
}

/// Words drawn at a time: four of ChaCha's 64-word buffers.
const AHEAD: usize = 256;

impl Ahead {
    fn new(rng: ChaCha12Rng) -> Self {
        Ahead {
            rng,
            buf: [0; AHEAD],
            pos: AHEAD,
        }
    }

    /// Fills the start of `out` with `StandardNormal` samples times `std` while they are the
    /// ziggurat's common case (a draw inside its layer's rectangle, 99% of draws) and the buffer
    /// lasts; returns how many. The caller draws the next one with rand_distr itself, which reads
    /// the same word pair first, fails the same test (or refills) and goes on from there: the
    /// values and the words consumed are rand_distr's. Its own call costs several times this loop:
    /// it reads the stream one checked `next_u64` at a time, and the draws are most of a fresh
    /// model's `model` stage.
    #[inline(always)]
    fn common_run(&mut self, std: f32, out: &mut [f32]) -> usize {
        if self.pos == AHEAD {
            self.refill();
        }
        let mut n = 0;
        for (o, w) in out.iter_mut().zip(self.buf[self.pos..].chunks_exact(2)) {
            // rand_distr's `ziggurat` for a symmetric distribution: layer `i` from the low 8 bits,
            // and `u` in [-1, 1) from the high 52 bits as a float in [2, 4), minus 3.
            let bits = (u64::from(w[1]) << 32) | u64::from(w[0]);
            let i = (bits & 0xff) as usize;
            let u = f64::from_bits((bits >> 12) | 0x4000_0000_0000_0000) - 3.0;
            let x = u * ZIG_NORM_X[i];
            // rand_distr accepts `x.abs() < x[i + 1]`; `x` is finite, so this is its negation.
            if x.abs() >= ZIG_NORM_X[i + 1] {
                break;
            }
            *o = x as f32 * std;
            n += 1;
        }
        self.pos += 2 * n;
        n
    }

    fn refill(&mut self) {
        // `fill_bytes` writes each word little-endian; `from_le` reads them back on any host
        // (and compiles to nothing on little-endian ones).
        self.rng
            .fill_bytes(bytemuck::cast_slice_mut(self.buf.as_mut_slice()));
        for w in &mut self.buf {
            *w = u32::from_le(*w);
        }
        self.pos = 0;
    }
}

impl rand::TryRng for Ahead {
    type Error = std::convert::Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        if self.pos == AHEAD {
            self.refill();
        }
        self.pos += 1;
        Ok(self.buf[self.pos - 1])
    }

    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let lo = self.try_next_u32()?;
        let hi = self.try_next_u32()?;
        Ok((u64::from(hi) << 32) | u64::from(lo))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        for chunk in dst.chunks_mut(4) {
            let word = self.try_next_u32()?.to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
        Ok(())
    }
}

/// The ziggurat's layer edges for the standard normal: rand_distr 0.6's `ZIG_NORM_X`
/// (`src/ziggurat_tables.rs`, generated by its `ziggurat_tables.py`), which it does not export.
/// `the_layer_table_is_rand_distrs` reads rand_distr's entries back through its sampler.
// As rand_distr writes them: 18 digits, more than f64 holds, parse to the same values.
#[allow(clippy::excessive_precision)]
#[rustfmt::skip]
static ZIG_NORM_X: [f64; 257] = [
    3.910757959537090045, 3.654152885361008796, 3.449278298560964462, 3.320244733839166074,
    3.224575052047029100, 3.147889289517149969, 3.083526132001233044, 3.027837791768635434,
    2.978603279880844834, 2.934366867207854224, 2.894121053612348060, 2.857138730872132548,
    2.822877396825325125, 2.790921174000785765, 2.760944005278822555, 2.732685359042827056,
    2.705933656121858100, 2.680514643284522158, 2.656283037575502437, 2.633116393630324570,
    2.610910518487548515, 2.589575986706995181, 2.569035452680536569, 2.549221550323460761,
    2.530075232158516929, 2.511544441625342294, 2.493583041269680667, 2.476149939669143318,
    2.459208374333311298, 2.442725318198956774, 2.426670984935725972, 2.411018413899685520,
    2.395743119780480601, 2.380822795170626005, 2.366237056715818632, 2.351967227377659952,
    2.337996148795031370, 2.324308018869623016, 2.310888250599850036, 2.297723348901329565,
    2.284800802722946056, 2.272108990226823888, 2.259637095172217780, 2.247375032945807760,
    2.235313384928327984, 2.223443340090905718, 2.211756642882544366, 2.200245546609647995,
    2.188902771624720689, 2.177721467738641614, 2.166695180352645966, 2.155817819875063268,
    2.145083634046203613, 2.134487182844320152, 2.124023315687815661, 2.113687150684933957,
    2.103474055713146829, 2.093379631137050279, 2.083399693996551783, 2.073530263516978778,
    2.063767547809956415, 2.054107931648864849, 2.044547965215732788, 2.035084353727808715,
    2.025713947862032960, 2.016433734904371722, 2.007240830558684852, 1.998132471356564244,
    1.989106007615571325, 1.980158896898598364, 1.971288697931769640, 1.962493064942461896,
    1.953769742382734043, 1.945116560006753925, 1.936531428273758904, 1.928012334050718257,
    1.919557336591228847, 1.911164563769282232, 1.902832208548446369, 1.894558525668710081,
    1.886341828534776388, 1.878180486290977669, 1.870072921069236838, 1.862017605397632281,
    1.854013059758148119, 1.846057850283119750, 1.838150586580728607, 1.830289919680666566,
    1.822474540091783224, 1.814703175964167636, 1.806974591348693426, 1.799287584547580199,
    1.791640986550010028, 1.784033659547276329, 1.776464495522344977, 1.768932414909077933,
    1.761436365316706665, 1.753975320315455111, 1.746548278279492994, 1.739154261283669012,
    1.731792314050707216, 1.724461502945775715, 1.717160915015540690, 1.709889657069006086,
    1.702646854797613907, 1.695431651932238548, 1.688243209434858727, 1.681080704722823338,
    1.673943330923760353, 1.666830296159286684, 1.659740822855789499, 1.652674147080648526,
    1.645629517902360339, 1.638606196773111146, 1.631603456932422036, 1.624620582830568427,
    1.617656869570534228, 1.610711622367333673, 1.603784156023583041, 1.596873794420261339,
    1.589979870021648534, 1.583101723393471438, 1.576238702733332886, 1.569390163412534456,
    1.562555467528439657, 1.555733983466554893, 1.548925085471535512, 1.542128153226347553,
    1.535342571438843118, 1.528567729435024614, 1.521803020758293101, 1.515047842773992404,
    1.508301596278571965, 1.501563685112706548, 1.494833515777718391, 1.488110497054654369,
    1.481394039625375747, 1.474683555695025516, 1.467978458615230908, 1.461278162507407830,
    1.454582081885523293, 1.447889631277669675, 1.441200224845798017, 1.434513276002946425,
    1.427828197027290358, 1.421144398672323117, 1.414461289772464658, 1.407778276843371534,
    1.401094763676202559, 1.394410150925071257, 1.387723835686884621, 1.381035211072741964,
    1.374343665770030531, 1.367648583594317957, 1.360949343030101844, 1.354245316759430606,
    1.347535871177359290, 1.340820365893152122, 1.334098153216083604, 1.327368577624624679,
    1.320630975217730096, 1.313884673146868964, 1.307128989027353860, 1.300363230327433728,
    1.293586693733517645, 1.286798664489786415, 1.279998415710333237, 1.273185207661843732,
    1.266358287014688333, 1.259516886060144225, 1.252660221891297887, 1.245787495544997903,
    1.238897891102027415, 1.231990574742445110, 1.225064693752808020, 1.218119375481726552,
    1.211153726239911244, 1.204166830140560140, 1.197157747875585931, 1.190125515422801650,
    1.183069142678760732, 1.175987612011489825, 1.168879876726833800, 1.161744859441574240,
    1.154581450355851802, 1.147388505416733873, 1.140164844363995789, 1.132909248648336975,
    1.125620459211294389, 1.118297174115062909, 1.110938046009249502, 1.103541679420268151,
    1.096106627847603487, 1.088631390649514197, 1.081114409698889389, 1.073554065787871714,
    1.065948674757506653, 1.058296483326006454, 1.050595664586207123, 1.042844313139370538,
    1.035040439828605274, 1.027181966030751292, 1.019266717460529215, 1.011292417434978441,
    1.003256679539591412, 0.995156999629943084, 0.986990747093846266, 0.978755155288937750,
    0.970447311058864615, 0.962064143217605250, 0.953602409875572654, 0.945058684462571130,
    0.936429340280896860, 0.927710533396234771, 0.918898183643734989, 0.909987953490768997,
    0.900975224455174528, 0.891855070726792376, 0.882622229578910122, 0.873271068082494550,
    0.863795545546826915, 0.854189171001560554, 0.844444954902423661, 0.834555354079518752,
    0.824512208745288633, 0.814306670128064347, 0.803929116982664893, 0.793369058833152785,
    0.782615023299588763, 0.771654424216739354, 0.760473406422083165, 0.749056662009581653,
    0.737387211425838629, 0.725446140901303549, 0.713212285182022732, 0.700661841097584448,
    0.687767892786257717, 0.674499822827436479, 0.660822574234205984, 0.646695714884388928,
    0.632072236375024632, 0.616896989996235545, 0.601104617743940417, 0.584616766093722262,
    0.567338257040473026, 0.549151702313026790, 0.529909720646495108, 0.509423329585933393,
    0.487443966121754335, 0.463634336771763245, 0.437518402186662658, 0.408389134588000746,
    0.375121332850465727, 0.335737519180459465, 0.286174591747260509, 0.215241895913273806,
    0.000000000000000000,
];

/// Fills `out` from `words`: pair `i` takes words `4i..4i + 4` as two u64 `a`, `b` (low word
/// first), `u1 = 1 - (a >> 11) 2^-53`, `u2 = (b >> 11) 2^-53`, and gives `r cos t` then `r sin t`
/// (`r = sqrt(-2 ln u1)`, `t = 2 pi u2`, in f64, rounded to f32) times `std`; an odd `out` ends
/// with a cosine. The same arithmetic, in the same order, as drawing `u1 = 1 - rng.random::<f64>()`
/// and `u2 = rng.random::<f64>()` from rand's generators.
///
/// # Panics
/// If `words` holds fewer than `4 * out.len().div_ceil(2)` words.
pub fn box_muller(words: &[u32], std: f32, out: &mut [f32]) {
    const SCALE: f64 = 1.0 / ((1u64 << 53) as f64);
    let pairs = out.len().div_ceil(2);
    assert!(
        words.len() >= 4 * pairs,
        "box_muller: {} words for {pairs} pairs",
        words.len()
    );
    for (o, w) in out.chunks_mut(2).zip(words.chunks_exact(4)) {
        let a = (u64::from(w[1]) << 32) | u64::from(w[0]);
        let b = (u64::from(w[3]) << 32) | u64::from(w[2]);
        let u1 = 1.0 - SCALE * ((a >> 11) as f64);
        let u2 = SCALE * ((b >> 11) as f64);
        let r = (-2.0 * u1.ln()).sqrt();
        let t = 2.0 * std::f64::consts::PI * u2;
        o[0] = (r * t.cos()) as f32 * std;
        if let Some(s) = o.get_mut(1) {
            *s = (r * t.sin()) as f32 * std;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// rand_distr 0.6's `ZIG_NORM_R`: where the base layer's tail begins.
    const ZIG_NORM_R: f32 = 3.654_152_9;

    #[test]
    fn the_layer_table_is_rand_distrs() {
        // The common case returns `u * x[i]`; with `u = -1/1024` (exact) the draw is the table
        // entry scaled by a power of two, so this reads rand_distr's private table back.
        for i in 0..256u64 {
            // High 52 bits: 2(1 + m 2^-52) - 3 = -2^-10 for m = 2^51 - 2^41.
            let bits = (((1u64 << 51) - (1 << 41)) << 12) | i;
            let mut words = Replay(vec![bits, u64::MAX]);
            let z: f64 = StandardNormal.sample(&mut words);
            assert_eq!(z * -1024.0, ZIG_NORM_X[i as usize], "layer {i}");
        }
        assert_eq!(ZIG_NORM_X[256], 0.0);
    }

    /// Hands out the given u64s in order.
    struct Replay(Vec<u64>);

    impl rand::TryRng for Replay {
        type Error = std::convert::Infallible;
        fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
            unreachable!("the ziggurat reads u64s")
        }
        fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
            Ok(self.0.remove(0))
        }
        fn try_fill_bytes(&mut self, _: &mut [u8]) -> Result<(), Self::Error> {
            unreachable!("the ziggurat reads u64s")
        }
    }

    /// The definition, one block after another on this thread.
    fn sequential(seed: u64, tensor: u32, std: f32, n: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(n);
        for b in 0..n.div_ceil(NORMAL_BLOCK) {
            let mut rng = ChaCha12Rng::seed_from_u64(seed);
            rng.set_stream((u64::from(tensor) << 32) | b as u64);
            for _ in b * NORMAL_BLOCK..((b + 1) * NORMAL_BLOCK).min(n) {
                let z: f64 = StandardNormal.sample(&mut rng);
                out.push(z as f32 * std);
            }
        }
        out
    }

    #[test]
    fn fill_normal_is_its_definition_on_any_number_of_threads() {
        // 16 blocks: about 4,000 draws from each of the ziggurat's 256 layers, and over 200
        // beyond its base layer (the tail), so every table entry and every way out of the common
        // case is compared with rand_distr.
        let n = 16 * NORMAL_BLOCK + 123;
        let want = sequential(7, 5, 0.02, n);
        let tail = want
            .iter()
            .filter(|&&x| (x / 0.02).abs() > ZIG_NORM_R)
            .count();
        assert!(tail > 200, "{tail} draws in the tail");
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut got = vec![0f32; n];
            pool.install(|| fill_normal(7, 5, 0.02, &mut got));
            assert_eq!(got, want, "{threads} threads");
        }
    }

    #[test]
    fn fill_normal_draws_independent_standard_normals() {
        let n = 1 << 20;
        let draw = |seed, tensor| {
            let mut v = vec![0f32; n];
            fill_normal(seed, tensor, 2.0, &mut v);
            v
        };
        let a = draw(1, 0);
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64;
        // Standard errors: 2 / 1024 for the mean, about 4 * sqrt(2 / n) = 0.0055 for the variance.
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 4.0).abs() < 0.03, "variance {var}");
        let beyond = |k: f64| a.iter().filter(|&&x| (x as f64).abs() > 2.0 * k).count() as f64;
        // P(|z| > 1) = 0.3173, P(|z| > 3) = 0.0027: the tails the ziggurat treats apart.
        assert!((beyond(1.0) / n as f64 - 0.3173).abs() < 0.003);
        assert!((beyond(3.0) / n as f64 - 0.0027).abs() < 0.0003);
        // Other blocks, tensors and seeds draw other numbers: no two of these share a value.
        let firsts = |v: &[f32]| [v[0], v[NORMAL_BLOCK], v[2 * NORMAL_BLOCK]];
        let mut seen: Vec<f32> = [a.clone(), draw(1, 1), draw(2, 0)]
            .iter()
            .flat_map(|v| firsts(v))
            .collect();
        seen.sort_by(f32::total_cmp);
        seen.dedup();
        assert_eq!(seen.len(), 9);
    }
}
