//! The plots: a train stage's `loss.svg` and the evaluate report's figures, drawn by `plotters`
//! into SVG strings.
//!
//! SVG because its text stays `<text>` for the viewer to render: no font files are read and no
//! glyphs rasterized, so the same numbers always give the same bytes (artifacts are
//! content-hashed) on every machine. plotters lays text out with its font-free size estimate
//! and writes every coordinate as an integer pixel, with no ids or timestamps in the document.
//!
//! Inputs are data from a run, so nothing here trusts them: non-finite values are skipped, empty
//! or constant data still get a (padded) axis, and long labels are shortened.

use std::ops::Range;

use anyhow::{Result, anyhow, bail};
use plotters::coord::Shift;
use plotters::prelude::*;

/// Labels longer than this are cut (with an ellipsis) so the plot area keeps its width; the
/// report's tables carry the full names.
const MAX_LABEL: usize = 36;
const FONT: &str = "sans-serif";
const WIDTH: u32 = 640;
const BAR_COLOR: RGBColor = RGBColor(31, 119, 180);
const REF_COLOR: RGBColor = RGBColor(214, 39, 40);

/// Loss against step, one line per `(name, [(step, loss)])` series, with a legend: one series
/// for a train stage's `loss.svg`, one per policy in the evaluate report. Non-finite points are
/// left out; a series with a single point is drawn as a dot.
pub fn loss_curves(title: &str, series: &[(String, Vec<(f64, f64)>)]) -> Result<String> {
    let series: Vec<(String, Vec<(f64, f64)>)> = series
        .iter()
        .map(|(name, points)| {
            let points: Vec<(f64, f64)> = points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect();
            let name = if points.is_empty() {
                format!("{} (no data)", short(name))
            } else {
                short(name)
            };
            (name, points)
        })
        .collect();
    let xs = padded(series.iter().flat_map(|(_, p)| p.iter().map(|p| p.0)))?;
    let ys = padded(series.iter().flat_map(|(_, p)| p.iter().map(|p| p.1)))?;
    render((WIDTH, 400), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(short(title), (FONT, 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(xs, ys)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .x_label_formatter(&|v| number(*v))
            .max_light_lines(0)
            .label_style((FONT, 15))
            .axis_desc_style((FONT, 16))
            .draw()?;
        for (i, (name, points)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let line = color.stroke_width(2);
            chart
                .draw_series(LineSeries::new(points.iter().copied(), line))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], line));
            // A line through one point draws nothing.
            if points.len() == 1 {
                chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
            }
        }
        if !series.is_empty() {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font((FONT, 13))
                .draw()?;
        }
        Ok(())
    })
}

/// Win rate (0..1) per `(method, win_rate, standard_error)` as horizontal bars, each with a
/// ±1.96·stderr error bar (clamped to 0..1), and a dashed reference line at 0.5 (a tie with the
/// opponent). A non-finite rate leaves its row empty; a non-finite or negative stderr leaves out
/// the error bar.
pub fn win_rates(title: &str, bars: &[(String, f64, f64)]) -> Result<String> {
    let labels: Vec<String> = bars.iter().map(|(name, _, _)| short(name)).collect();
    let rows = labels.len().max(1);
    // The first method on top: row 0 is the bottom of the axis.
    let row = |i: usize| (rows - 1 - i) as f64;
    let height = 110 + 34 * rows as u32;
    render((WIDTH, height), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(short(title), (FONT, 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(label_area(&labels))
            .build_cartesian_2d(0f64..1f64, rows_axis(rows))?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .x_max_light_lines(0)
            .label_style((FONT, 15))
            .axis_desc_style((FONT, 16))
            .y_labels(rows)
            .y_label_formatter(&|v| row_label(&labels, *v))
            .x_desc("win rate (error bars: ±1.96 standard errors)")
            .draw()?;
        let clamp = |v: f64| v.clamp(0.0, 1.0);
        chart.draw_series(
            bars.iter()
                .enumerate()
                .filter(|(_, (_, rate, _))| rate.is_finite())
                .map(|(i, &(_, rate, _))| {
                    Rectangle::new(
                        [(0.0, row(i) - 0.35), (clamp(rate), row(i) + 0.35)],
                        BAR_COLOR.mix(0.7).filled(),
                    )
                }),
        )?;
        chart.draw_series(
            bars.iter()
                .enumerate()
                .filter(|(_, (_, rate, se))| rate.is_finite() && se.is_finite() && *se >= 0.0)
                .map(|(i, &(_, rate, se))| {
                    ErrorBar::new_horizontal(
                        row(i),
                        clamp(rate - 1.96 * se),
                        clamp(rate),
                        clamp(rate + 1.96 * se),
                        BLACK.stroke_width(2),
                        10,
                    )
                }),
        )?;
        chart.draw_series(DashedLineSeries::new(
            [(0.5, -0.5), (0.5, rows as f64 - 0.5)],
            6,
            4,
            REF_COLOR.stroke_width(2),
        ))?;
        Ok(())
    })
}

/// Response lengths per `(method, lengths)` as horizontal box plots, `n` in each label: the box
/// spans the quartiles with a line at the median, the whiskers reach the furthest lengths within
/// 1.5·IQR of the box (Tukey's rule, matplotlib's default), lengths beyond are circles, and the
/// mean is a cross. Non-finite lengths are left out; a method with none keeps an empty row.
pub fn lengths(title: &str, groups: &[(String, Vec<f64>)]) -> Result<String> {
    let groups: Vec<(String, Vec<f64>)> = groups
        .iter()
        .map(|(name, values)| {
            let values: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
            (format!("{} (n={})", short(name), values.len()), values)
        })
        .collect();
    // plotters' quartiles come back as f32.
    if groups
        .iter()
        .flat_map(|(_, v)| v)
        .any(|v| v.abs() > f64::from(f32::MAX) / 4.0)
    {
        bail!("plot {title:?}: a response length is too large to draw");
    }
    let boxes: Vec<Option<BoxStats>> = groups.iter().map(|(_, v)| BoxStats::of(v)).collect();
    let labels: Vec<String> = groups.iter().map(|(name, _)| name.clone()).collect();
    let range = padded(groups.iter().flat_map(|(_, v)| v.iter().copied()))?;
    let rows = labels.len().max(1);
    // The first method on top: row 0 is the bottom of the axis.
    let row = |i: usize| (rows - 1 - i) as f64;
    let height = 110 + 40 * rows as u32;
    render((WIDTH, height), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(short(title), (FONT, 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(label_area(&labels))
            .build_cartesian_2d(range, rows_axis(rows))?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .x_max_light_lines(0)
            .label_style((FONT, 15))
            .axis_desc_style((FONT, 16))
            .y_labels(rows)
            .y_label_formatter(&|v| row_label(&labels, *v))
            .x_label_formatter(&|v| number(*v))
            // The key in the axis title: a legend box would cover the top row's box.
            .x_desc("response length (whiskers within 1.5 IQR, ○ beyond, × mean)")
            .draw()?;
        // plotters' own `Boxplot` puts the whiskers at the 1.5·IQR fences themselves, which can
        // reach past the data (below zero for lengths); its rectangles and paths draw Tukey's.
        let (half, cap) = (0.3, 0.15);
        for (i, b) in boxes.iter().enumerate() {
            let Some(b) = b else { continue };
            let y = row(i);
            let line = BAR_COLOR.stroke_width(2);
            chart.draw_series([
                Rectangle::new(
                    [(b.q1, y - half), (b.q3, y + half)],
                    BAR_COLOR.mix(0.25).filled(),
                ),
                Rectangle::new([(b.q1, y - half), (b.q3, y + half)], line),
            ])?;
            chart.draw_series([
                PathElement::new(vec![(b.median, y - half), (b.median, y + half)], line),
                PathElement::new(vec![(b.low, y), (b.q1, y)], line),
                PathElement::new(vec![(b.q3, y), (b.high, y)], line),
                PathElement::new(vec![(b.low, y - cap), (b.low, y + cap)], line),
                PathElement::new(vec![(b.high, y - cap), (b.high, y + cap)], line),
            ])?;
            chart.draw_series(
                b.outliers
                    .iter()
                    .map(|&v| Circle::new((v, y), 3, BLACK.stroke_width(1))),
            )?;
            chart.draw_series([Cross::new((b.mean, y), 4, RED.stroke_width(2))])?;
        }
        Ok(())
    })
}

/// One box of [`lengths`].
struct BoxStats {
    q1: f64,
    median: f64,
    q3: f64,
    /// The whiskers' ends: the extreme values within 1.5·IQR of the box.
    low: f64,
    high: f64,
    /// The distinct values beyond the whiskers (a length cap repeats one value many times).
    outliers: Vec<f64>,
    mean: f64,
}

impl BoxStats {
    /// `None` for no values; `values` are finite.
    fn of(values: &[f64]) -> Option<BoxStats> {
        if values.is_empty() {
            return None;
        }
        // Linear interpolation between order statistics, numpy's (and plotters') default.
        let [_, q1, median, q3, _] = Quartiles::new(values).values().map(f64::from);
        // plotters returns the quartiles as f32: the fences allow for that rounding, or a set of
        // equal non-integer lengths would be all outliers.
        let slack = 1e-6 * q1.abs().max(q3.abs()).max(1.0);
        let (lo_fence, hi_fence) = (q1 - 1.5 * (q3 - q1) - slack, q3 + 1.5 * (q3 - q1) + slack);
        let inside = |v: &&f64| (lo_fence..=hi_fence).contains(*v);
        let (low, high) = min_max(values.iter().filter(inside).copied());
        // A middle order statistic always lies between the quartiles; this keeps whiskers finite
        // should that ever fail.
        let (low, high) = if low > high { (q1, q3) } else { (low, high) };
        let mut outliers: Vec<f64> = values.iter().copied().filter(|v| !inside(&v)).collect();
        outliers.sort_by(f64::total_cmp);
        outliers.dedup();
        Some(BoxStats {
            q1,
            median,
            q3,
            low,
            high,
            outliers,
            mean: values.iter().sum::<f64>() / values.len() as f64,
        })
    }
}

/// Draws onto a fresh white SVG canvas and returns the document.
fn render(
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<SVGBackend, Shift>) -> Result<()>,
) -> Result<String> {
    let mut svg = String::new();
    // plotters asserts on some inputs (Quartiles of nothing, for one); the guards above keep
    // those out, and a plot that slips through still fails with an error, not a panic.
    let drawn = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<()> {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE)?;
        draw(&root)?;
        root.present()?;
        Ok(())
    }));
    match drawn {
        Ok(result) => result.map(|()| svg),
        Err(_) => Err(anyhow!("plotting failed (plotters panicked)")),
    }
}

/// The range of the finite `values`, padded by 5% each side; a constant gets ±1 (or ±10% of
/// its size) so the axis never has zero width, and no values give 0..1.
fn padded(values: impl Iterator<Item = f64>) -> Result<Range<f64>> {
    let (lo, hi) = min_max(values.filter(|v| v.is_finite()));
    if lo > hi {
        return Ok(0.0..1.0);
    }
    let span = hi - lo;
    let pad = if span > f64::EPSILON * lo.abs().max(hi.abs()) {
        span * 0.05
    } else {
        (lo.abs() * 0.1).max(1.0)
    };
    let range = lo - pad..hi + pad;
    if !(range.end - range.start).is_finite() {
        bail!("values from {lo} to {hi} are too far apart to plot");
    }
    Ok(range)
}

/// A tick label: whole numbers (steps, token counts) without plotters' default ".0", and no
/// float noise (1.2000000000000002) on the rest.
fn number(v: f64) -> String {
    if v.abs() >= 1e6 || (v != 0.0 && v.abs() < 1e-3) {
        return format!("{v:.2e}");
    }
    let s = format!("{v:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" { "0".into() } else { s.into() }
}

/// `(min, max)`; `(inf, -inf)` for no values.
fn min_max(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    })
}

fn short(label: &str) -> String {
    if label.chars().count() <= MAX_LABEL {
        label.to_string()
    } else {
        let cut: String = label.chars().take(MAX_LABEL - 1).collect();
        format!("{cut}…")
    }
}

/// Room for the longest category label beside the y axis (about 7 px a character at the
/// default label size).
fn label_area(labels: &[String]) -> u32 {
    let longest = labels.iter().map(|l| l.chars().count()).max().unwrap_or(0);
    (longest as u32 * 7 + 16).clamp(40, 280)
}

/// The axis of the category rows 0..`rows`, one per method. Asked for `rows` labels, plotters
/// ticks it at each whole number (its steps are 1, 2 or 5 times a power of ten, and a step of
/// 0.5 would need twice as many).
fn rows_axis(rows: usize) -> Range<f64> {
    -0.5..rows as f64 - 0.5
}

/// The label of the row at `y`, rows counted from the top (see `row` above).
fn row_label(labels: &[String], y: f64) -> String {
    let r = y.round();
    if (y - r).abs() > 1e-6 || r < 0.0 || r as usize >= labels.len() {
        return String::new();
    }
    labels[labels.len() - 1 - r as usize].clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(svg: &str) -> roxmltree::Document<'_> {
        roxmltree::Document::parse(svg).expect("well-formed SVG")
    }

    fn texts(svg: &str) -> Vec<String> {
        parse(svg)
            .descendants()
            .filter(|n| n.has_tag_name("text"))
            .filter_map(|n| n.text().map(|t| t.trim().to_string()))
            .collect()
    }

    fn count(svg: &str, tag: &str, pred: impl Fn(roxmltree::Node) -> bool) -> usize {
        parse(svg)
            .descendants()
            .filter(|n| n.has_tag_name(tag) && pred(*n))
            .count()
    }

    fn curve(n: usize, f: impl Fn(f64) -> f64) -> Vec<(f64, f64)> {
        (1..=n).map(|i| (i as f64, f(i as f64))).collect()
    }

    #[test]
    fn loss_curves_draw_one_line_and_legend_entry_per_series() {
        let series = vec![
            ("sepo".to_string(), curve(20, |s| 0.7 / s)),
            ("dpo".to_string(), curve(20, |s| 0.69 - 0.01 * s)),
            ("simpo".to_string(), curve(15, |s| 1.0 + s.sin())),
        ];
        let svg = loss_curves("loss <& \"quoted\">", &series).unwrap();
        let texts = texts(&svg);
        for (name, _) in &series {
            assert_eq!(texts.iter().filter(|t| *t == name).count(), 1, "{name}");
        }
        assert!(texts.contains(&"loss <& \"quoted\">".to_string()));
        // Each series: its line and its legend sample, in its own colour.
        for i in 0..series.len() {
            let RGBAColor(r, g, b, _) = Palette99::pick(i).to_rgba();
            let stroke = format!("#{r:02X}{g:02X}{b:02X}");
            let lines = count(&svg, "polyline", |n| n.attribute("stroke") == Some(&stroke));
            assert_eq!(lines, 2, "series {i} ({stroke})");
        }
    }

    #[test]
    fn loss_curves_survive_degenerate_input() {
        let long = "a-policy-name-that-goes-on-and-on-and-on-and-on-and-on".to_string();
        type Series = (String, Vec<(f64, f64)>);
        let cases: Vec<Vec<Series>> = vec![
            vec![],
            vec![("empty".into(), vec![])],
            vec![("one".into(), vec![(1.0, 0.5)])],
            vec![("flat".into(), curve(10, |_| 0.0))],
            vec![("flat".into(), curve(10, |_| 1e9))],
            vec![(
                "nan".into(),
                vec![(1.0, f64::NAN), (2.0, f64::INFINITY), (f64::NAN, 1.0)],
            )],
            vec![(
                "some nan".into(),
                vec![(1.0, 0.7), (2.0, f64::NAN), (3.0, 0.6)],
            )],
            vec![(long.clone(), curve(3, |s| s))],
            vec![("tiny".into(), curve(5, |s| 1.0 + s * 1e-15))],
        ];
        for case in cases {
            let svg = loss_curves("t", &case).unwrap();
            parse(&svg);
        }
        let svg = loss_curves("t", &[("one".into(), vec![(3.0, 0.5)])]).unwrap();
        assert_eq!(count(&svg, "circle", |_| true), 1, "a lone point is a dot");
        let svg = loss_curves("t", &[("empty".into(), vec![(1.0, f64::NAN)])]).unwrap();
        assert!(texts(&svg).contains(&"empty (no data)".to_string()));
        let svg = loss_curves("t", &[(long, curve(3, |s| s))]).unwrap();
        assert!(texts(&svg).iter().any(|t| t.ends_with('…')));
        assert!(
            loss_curves("t", &[("far".into(), vec![(1.0, -1e308), (2.0, 1e308)])]).is_err(),
            "a range wider than f64 is an error"
        );
    }

    #[test]
    fn win_rates_draw_a_bar_and_error_bar_per_method_and_the_even_line() {
        let bars = vec![
            ("sepo".to_string(), 0.62, 0.03),
            ("dpo".to_string(), 0.55, 0.04),
            ("simpo".to_string(), 0.41, 0.05),
            ("sft".to_string(), 0.5, 0.0),
        ];
        let svg = win_rates("win rate vs reference", &bars).unwrap();
        let fill = format!("#{:02X}{:02X}{:02X}", BAR_COLOR.0, BAR_COLOR.1, BAR_COLOR.2);
        assert_eq!(
            count(&svg, "rect", |n| n.attribute("fill") == Some(&fill)),
            4
        );
        let texts = texts(&svg);
        for (name, _, _) in &bars {
            assert_eq!(texts.iter().filter(|t| *t == name).count(), 1, "{name}");
        }
        // An error bar is three black lines (the span and its two ends).
        let black = count(&svg, "line", |n| n.attribute("stroke") == Some("#000000"));
        assert!(black >= 3 * bars.len(), "{black} black lines");
        let reference = count(&svg, "line", |n| n.attribute("stroke") == Some("#D62728"))
            + count(&svg, "polyline", |n| {
                n.attribute("stroke") == Some("#D62728")
            });
        assert!(reference > 0, "the 0.5 line is drawn");
    }

    #[test]
    fn win_rates_survive_degenerate_input() {
        let long = "x".repeat(300);
        let cases: Vec<Vec<(String, f64, f64)>> = vec![
            vec![],
            vec![("one".into(), 0.5, 0.1)],
            vec![("nan".into(), f64::NAN, 0.1), ("ok".into(), 0.6, f64::NAN)],
            vec![("inf".into(), f64::INFINITY, f64::INFINITY)],
            vec![("out".into(), 1.4, 0.5), ("neg".into(), -0.2, -0.1)],
            vec![(long, 0.3, 0.01)],
        ];
        for case in cases {
            parse(&win_rates("t", &case).unwrap());
        }
        let svg = win_rates(
            "t",
            &[("nan".into(), f64::NAN, 0.1), ("ok".into(), 0.6, 0.1)],
        )
        .unwrap();
        let fill = format!("#{:02X}{:02X}{:02X}", BAR_COLOR.0, BAR_COLOR.1, BAR_COLOR.2);
        assert_eq!(
            count(&svg, "rect", |n| n.attribute("fill") == Some(&fill)),
            1
        );
        assert!(
            texts(&svg).contains(&"nan".to_string()),
            "its row stays labelled"
        );
    }

    #[test]
    fn lengths_draw_a_box_per_method() {
        let groups = vec![
            (
                "sepo".to_string(),
                (0..50).map(|i| 40.0 + i as f64).collect(),
            ),
            (
                "dpo".to_string(),
                (0..30).map(|i| 80.0 + 2.0 * i as f64).collect(),
            ),
            ("sft".to_string(), vec![12.0, 12.0, 13.0]),
        ];
        let svg = lengths("response lengths", &groups).unwrap();
        let texts = texts(&svg);
        for label in ["sepo (n=50)", "dpo (n=30)", "sft (n=3)"] {
            assert_eq!(texts.iter().filter(|t| *t == label).count(), 1, "{label}");
        }
        // A box is one outlined rect in the box colour.
        let stroke = format!("#{:02X}{:02X}{:02X}", BAR_COLOR.0, BAR_COLOR.1, BAR_COLOR.2);
        assert_eq!(
            count(&svg, "rect", |n| n.attribute("stroke") == Some(&stroke)),
            3
        );
        // Nothing lies beyond the whiskers here.
        assert_eq!(count(&svg, "circle", |_| true), 0);
    }

    #[test]
    fn lengths_mark_what_lies_beyond_the_whiskers() {
        // Quartiles 2 and 4, fences -1 and 7: whiskers reach 1 and 4, 100 (twice) is one circle.
        let b = BoxStats::of(&[1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 100.0, 100.0, 4.0]).unwrap();
        assert_eq!((b.q1, b.median, b.q3), (2.0, 3.0, 4.0));
        assert_eq!((b.low, b.high), (1.0, 4.0));
        assert_eq!(b.outliers, vec![100.0]);
        let svg = lengths(
            "t",
            &[(
                "a".into(),
                vec![1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 100.0, 100.0, 4.0],
            )],
        )
        .unwrap();
        assert_eq!(count(&svg, "circle", |_| true), 1);
        // Equal non-integer lengths (not exact in f32) are all inside.
        let b = BoxStats::of(&[0.1; 5]).unwrap();
        assert!(b.outliers.is_empty());
        assert_eq!((b.low, b.high), (0.1, 0.1));
    }

    #[test]
    fn lengths_survive_degenerate_input() {
        let cases: Vec<Vec<(String, Vec<f64>)>> = vec![
            vec![],
            vec![("empty".into(), vec![])],
            vec![("one".into(), vec![7.0])],
            vec![
                ("same".into(), vec![64.0; 20]),
                ("zero".into(), vec![0.0; 3]),
            ],
            vec![("nan".into(), vec![f64::NAN, f64::INFINITY, 3.0])],
            vec![
                ("allnan".into(), vec![f64::NAN]),
                ("ok".into(), vec![1.0, 2.0]),
            ],
            vec![("y".repeat(200), vec![1.0, 100.0])],
        ];
        for case in cases {
            parse(&lengths("t", &case).unwrap());
        }
        let svg = lengths("t", &[("allnan".into(), vec![f64::NAN])]).unwrap();
        assert!(texts(&svg).contains(&"allnan (n=0)".to_string()));
        assert!(lengths("t", &[("huge".into(), vec![1e300])]).is_err());
    }

    #[test]
    fn same_input_gives_the_same_bytes() {
        let series = vec![("a".to_string(), curve(30, |s| (s * 0.3).cos()))];
        let bars = vec![("a".to_string(), 0.6, 0.02), ("b".to_string(), 0.4, 0.03)];
        let groups = vec![("a".to_string(), vec![3.0, 9.0, 4.0, 12.0, 40.0])];
        let draw = || {
            [
                loss_curves("t", &series).unwrap(),
                win_rates("t", &bars).unwrap(),
                lengths("t", &groups).unwrap(),
            ]
        };
        let first = draw();
        assert_eq!(first, draw());
        // Nothing generated per document (ids, as some SVG writers make) that could differ
        // between processes.
        for svg in &first {
            let doc = parse(svg);
            let ids = doc
                .descendants()
                .filter(|n| n.attribute("id").is_some())
                .count();
            assert_eq!(ids, 0);
        }
    }
}
