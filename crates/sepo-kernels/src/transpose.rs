//! Columns of a row-major matrix as rows: the decoder keeps a linear's weight `[in, out]`,
//! Hugging Face files keep `[out, in]`, so saving a model reads each stored tensor out of the
//! decoder's weight this way, a piece at a time, into a buffer the writer reuses.

use std::ops::Range;

use rayon::prelude::*;

/// Tile side: 64 x 64 values (16 KiB) stay in L1 between reading the source rows and writing
/// the destination rows; measured 4-8 GB/s on a 2-core VM, against 2-2.6 at 16 and 3.5-4 at 32
/// or 128.
const TILE: usize = 64;

/// Writes columns `cols` of the row-major `[rows, width]` matrix `src` as the rows of `dst`
/// (`[cols.len(), rows]`, row-major): `dst[j * rows + i] = src[i * width + cols.start + j]`.
///
/// # Panics
/// If `src` is not `rows * width` long for some `rows`, `cols` is not within `0..width`, or
/// `dst` is not `cols.len() * rows` long.
pub fn transpose_columns(src: &[f32], width: usize, cols: Range<usize>, dst: &mut [f32]) {
    assert!(
        width > 0 && src.len().is_multiple_of(width),
        "source length {} is not a multiple of width {width}",
        src.len()
    );
    assert!(
        cols.start <= cols.end && cols.end <= width,
        "columns {cols:?} of {width}"
    );
    let rows = src.len() / width;
    let n = cols.len();
    assert_eq!(dst.len(), n * rows, "destination length");
    let mut tile = [[0f32; TILE]; TILE];
    for j0 in (0..n).step_by(TILE) {
        let tj = TILE.min(n - j0);
        let c0 = cols.start + j0;
        for i0 in (0..rows).step_by(TILE) {
            let ti = TILE.min(rows - i0);
            // In: `ti` source rows, `tj` values each, one line apiece.
            for (i, t) in tile.iter_mut().enumerate().take(ti) {
                let at = (i0 + i) * width + c0;
                t[..tj].copy_from_slice(&src[at..at + tj]);
            }
            // Out: `tj` destination rows, `ti` values each.
            for j in 0..tj {
                let out = &mut dst[(j0 + j) * rows + i0..][..ti];
                for (i, o) in out.iter_mut().enumerate() {
                    *o = tile[i][j];
                }
            }
        }
    }
}

/// The transpose of the row-major `[rows, width]` matrix `src`: `[width, rows]`, row-major
/// ([`transpose_columns`] of every column, blocks of them on all threads). Loading a model
/// turns each Hugging Face `[out, in]` weight into the decoder's `[in, out]` with it.
///
/// # Panics
/// If `src` is not `rows * width` long for some `rows`.
pub fn transpose(src: &[f32], width: usize) -> Vec<f32> {
    let mut dst = vec![0f32; src.len()];
    if src.is_empty() {
        return dst;
    }
    let rows = src.len() / width.max(1);
    dst.par_chunks_mut(TILE * rows)
        .enumerate()
        .for_each(|(b, out)| {
            let c0 = b * TILE;
            transpose_columns(src, width, c0..c0 + out.len() / rows, out)
        });
    dst
}

#[cfg(test)]
mod tests {
    use super::{transpose, transpose_columns};

    #[test]
    fn transposes_whole_matrices() {
        for (rows, width) in [
            (1, 1),
            (3, 5),
            (64, 64),
            (70, 130),
            (130, 70),
            (1, 200),
            (200, 1),
        ] {
            let src: Vec<f32> = (0..rows * width).map(|x| x as f32).collect();
            let t = transpose(&src, width);
            for i in 0..rows {
                for j in 0..width {
                    assert_eq!(
                        t[j * rows + i],
                        src[i * width + j],
                        "{rows}x{width} ({i}, {j})"
                    );
                }
            }
        }
        assert!(transpose(&[], 4).is_empty());
    }

    /// Column ranges of a few shapes (tile-sized, ragged, one row, one column; every range of
    /// the small ones) give the definition's values.
    #[test]
    fn matches_the_definition() {
        let shapes = [
            (1, 1),
            (3, 5),
            (16, 16),
            (17, 33),
            (40, 7),
            (1, 50),
            (50, 1),
        ];
        type Case = (usize, usize, Vec<(usize, usize)>);
        let every = |w: usize| {
            (0..w)
                .flat_map(move |s| (s..=w).map(move |e| (s, e)))
                .collect()
        };
        let mut cases: Vec<Case> = shapes.iter().map(|&(r, w)| (r, w, every(w))).collect();
        cases.push((
            130,
            200,
            vec![(0, 200), (0, 64), (63, 129), (70, 71), (199, 200)],
        ));
        cases.push((64, 64, vec![(0, 64), (1, 64), (0, 63)]));
        for (rows, width, ranges) in cases {
            let src: Vec<f32> = (0..rows * width).map(|x| x as f32).collect();
            for (start, end) in ranges {
                {
                    let mut dst = vec![f32::NAN; (end - start) * rows];
                    transpose_columns(&src, width, start..end, &mut dst);
                    for j in 0..end - start {
                        for i in 0..rows {
                            assert_eq!(
                                dst[j * rows + i],
                                src[i * width + start + j],
                                "{rows}x{width} cols {start}..{end} at ({j}, {i})"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "destination length")]
    fn checks_the_destination() {
        transpose_columns(&[0.0; 6], 3, 0..2, &mut [0.0; 3]);
    }
}
