//! `loss.png` beside `metrics.parquet`: loss per step (and reward accuracy for pairwise
//! objectives), drawn with a tiny built-in raster and font so the bytes depend on the numbers
//! alone — no system fonts, no rendering library.

use std::path::Path;

use anyhow::Result;

use super::trainer::StepMetrics;

const W: usize = 640;
const H: usize = 400;
const LEFT: usize = 70;
const RIGHT: usize = 20;
const TOP: usize = 40;
const BOTTOM: usize = 50;

struct Canvas {
    px: Vec<[u8; 3]>,
}

impl Canvas {
    fn new() -> Canvas {
        Canvas {
            px: vec![[255, 255, 255]; W * H],
        }
    }

    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < W && (y as usize) < H {
            self.px[y as usize * W + x as usize] = c;
        }
    }

    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: [u8; 3], thick: i64) {
        let steps = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
        for i in 0..=steps {
            let t = i as f64 / steps as f64;
            let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
            for dx in 0..thick {
                for dy in 0..thick {
                    self.set(x.round() as i64 + dx, y.round() as i64 + dy, c);
                }
            }
        }
    }

    /// Text in a 3x5 pixel font, scaled by 2.
    fn text(&mut self, x: usize, y: usize, s: &str, c: [u8; 3]) {
        let mut cx = x as i64;
        for ch in s.chars() {
            let g = glyph(ch.to_ascii_lowercase());
            for (row, bits) in g.iter().enumerate() {
                for col in 0..3 {
                    if bits & (0b100 >> col) != 0 {
                        for d in 0..4 {
                            self.set(cx + col * 2 + d % 2, y as i64 + row as i64 * 2 + d / 2, c);
                        }
                    }
                }
            }
            cx += 8;
        }
    }

    fn png(&self, path: &Path) -> Result<()> {
        let file = std::fs::File::create(path)?;
        let mut enc = png::Encoder::new(std::io::BufWriter::new(file), W as u32, H as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header()?;
        let bytes: Vec<u8> = self.px.iter().flatten().copied().collect();
        w.write_image_data(&bytes)?;
        w.finish()?;
        Ok(())
    }
}

fn glyph(c: char) -> [u8; 5] {
    match c {
        '0' => [0b111, 0b101, 0b101, 0b101, 0b111],
        '1' => [0b010, 0b110, 0b010, 0b010, 0b111],
        '2' => [0b111, 0b001, 0b111, 0b100, 0b111],
        '3' => [0b111, 0b001, 0b111, 0b001, 0b111],
        '4' => [0b101, 0b101, 0b111, 0b001, 0b001],
        '5' => [0b111, 0b100, 0b111, 0b001, 0b111],
        '6' => [0b111, 0b100, 0b111, 0b101, 0b111],
        '7' => [0b111, 0b001, 0b010, 0b010, 0b010],
        '8' => [0b111, 0b101, 0b111, 0b101, 0b111],
        '9' => [0b111, 0b101, 0b111, 0b001, 0b111],
        'a' => [0b010, 0b101, 0b111, 0b101, 0b101],
        'b' => [0b110, 0b101, 0b110, 0b101, 0b110],
        'c' => [0b011, 0b100, 0b100, 0b100, 0b011],
        'd' => [0b110, 0b101, 0b101, 0b101, 0b110],
        'e' => [0b111, 0b100, 0b110, 0b100, 0b111],
        'f' => [0b111, 0b100, 0b110, 0b100, 0b100],
        'g' => [0b011, 0b100, 0b101, 0b101, 0b011],
        'h' => [0b101, 0b101, 0b111, 0b101, 0b101],
        'i' => [0b111, 0b010, 0b010, 0b010, 0b111],
        'j' => [0b001, 0b001, 0b001, 0b101, 0b010],
        'k' => [0b101, 0b101, 0b110, 0b101, 0b101],
        'l' => [0b100, 0b100, 0b100, 0b100, 0b111],
        'm' => [0b101, 0b111, 0b111, 0b101, 0b101],
        'n' => [0b110, 0b101, 0b101, 0b101, 0b101],
        'o' => [0b010, 0b101, 0b101, 0b101, 0b010],
        'p' => [0b110, 0b101, 0b110, 0b100, 0b100],
        'q' => [0b010, 0b101, 0b101, 0b110, 0b011],
        'r' => [0b110, 0b101, 0b110, 0b101, 0b101],
        's' => [0b011, 0b100, 0b010, 0b001, 0b110],
        't' => [0b111, 0b010, 0b010, 0b010, 0b010],
        'u' => [0b101, 0b101, 0b101, 0b101, 0b111],
        'v' => [0b101, 0b101, 0b101, 0b101, 0b010],
        'w' => [0b101, 0b101, 0b111, 0b111, 0b101],
        'x' => [0b101, 0b101, 0b010, 0b101, 0b101],
        'y' => [0b101, 0b101, 0b010, 0b010, 0b010],
        'z' => [0b111, 0b001, 0b010, 0b100, 0b111],
        '.' => [0, 0, 0, 0, 0b010],
        ',' => [0, 0, 0, 0b010, 0b100],
        ':' => [0, 0b010, 0, 0b010, 0],
        '-' => [0, 0, 0b111, 0, 0],
        '+' => [0, 0b010, 0b111, 0b010, 0],
        '_' => [0, 0, 0, 0, 0b111],
        '(' => [0b001, 0b010, 0b010, 0b010, 0b001],
        ')' => [0b100, 0b010, 0b010, 0b010, 0b100],
        '/' => [0b001, 0b001, 0b010, 0b100, 0b100],
        '%' => [0b101, 0b001, 0b010, 0b100, 0b101],
        _ => [0, 0, 0, 0, 0],
    }
}

fn fmt(v: f64) -> String {
    if v == 0.0 || (1e-3..1e4).contains(&v.abs()) {
        format!("{v:.3}")
    } else {
        format!("{v:.2e}")
    }
}

/// Draws loss (blue) against step, with reward accuracy (orange, right scale 0..1) when present.
pub fn loss_png(metrics: &[StepMetrics], title: &str, path: &Path) -> Result<()> {
    let mut c = Canvas::new();
    let (x0, x1) = (LEFT as f64, (W - RIGHT) as f64);
    let (y0, y1) = ((H - BOTTOM) as f64, TOP as f64);
    let axis = [90, 90, 90];
    c.line((x0, y0), (x1, y0), axis, 1);
    c.line((x0, y0), (x0, y1), axis, 1);
    c.text(LEFT, 12, title, [0, 0, 0]);
    let losses: Vec<f64> = metrics
        .iter()
        .map(|m| m.loss)
        .filter(|v| v.is_finite())
        .collect();
    if !losses.is_empty() {
        let lo = losses.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = losses.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let span = if hi > lo { hi - lo } else { 1.0 };
        let n = metrics.len().max(2) - 1;
        let px = |i: usize| x0 + (x1 - x0) * i as f64 / n as f64;
        let py = |v: f64, lo: f64, span: f64| y0 - (y0 - y1) * (v - lo) / span;
        for i in 0..=4 {
            let v = lo + span * i as f64 / 4.0;
            let y = py(v, lo, span);
            c.line((x0 - 4.0, y), (x0, y), axis, 1);
            c.text(4, y as usize - 5, &fmt(v), [0, 60, 160]);
        }
        let blue = [31, 119, 180];
        for i in 1..metrics.len() {
            c.line(
                (px(i - 1), py(metrics[i - 1].loss, lo, span)),
                (px(i), py(metrics[i].loss, lo, span)),
                blue,
                2,
            );
        }
        if metrics.len() == 1 {
            c.line(
                (x0, py(metrics[0].loss, lo, span)),
                (x1, py(metrics[0].loss, lo, span)),
                blue,
                2,
            );
        }
        if metrics.iter().all(|m| m.reward_accuracy.is_some()) && metrics.len() > 1 {
            let orange = [255, 127, 14];
            for i in 1..metrics.len() {
                let a = metrics[i - 1].reward_accuracy.unwrap_or(0.0);
                let b = metrics[i].reward_accuracy.unwrap_or(0.0);
                c.line(
                    (px(i - 1), py(a, 0.0, 1.0)),
                    (px(i), py(b, 0.0, 1.0)),
                    orange,
                    1,
                );
            }
            c.text(W - 260, 12, "reward accuracy 0..1", orange);
        }
        c.text(LEFT, H - 30, "1", axis);
        let last = format!("{}", metrics.last().map_or(0, |m| m.step));
        c.text(W - RIGHT - 8 * last.len(), H - 30, &last, axis);
        c.text(W / 2 - 16, H - 30, "step", axis);
        c.text(4, TOP - 14, "loss", [0, 60, 160]);
    }
    c.png(path)
}
