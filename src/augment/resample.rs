//! Trilinear resampling of a sample on a warped grid, as batchgeneratorsv2's `SpatialTransform` does it
//! with `grid_sample(align_corners=False)`: the image bilinearly with zeros outside, the segmentation by
//! per-label bilinear scores with the padding label outside, argmax with ties to the nearest neighbour.
//!
//! Output voxel `i` sits at `v = i - (out - 1) / 2 + offset(i)` relative to the patch centre (the offset is
//! the elastic displacement, if any) and samples the input at `A v + (in - 1) / 2`.
//!
//! Nearly every sample point of a rotated / scaled patch has all eight neighbours inside the input and
//! falls strictly between grid planes; those take a flat-index fast path, computed row by row in two
//! passes (geometry, then one tight gather loop per channel). Points entirely outside get the padding
//! directly. Everything else (the border, exact grid positions, where torch drops the zero-weight tap)
//! takes the general path. All paths add the same products in the same order, so the fast paths change
//! no result value (fully outside voxels read +0.0 where the general path's empty sum gives -0.0).

use ndarray::{Array4, Axis};

use super::elastic::Displacement;
use super::Sample;

/// 3x3 matrix acting on (z, y, x) column vectors.
pub type Affine = [[f64; 3]; 3];

/// batchgeneratorsv2 scores each label as float16 of `1000 * interpolated indicator`; the coarse float16
/// grid turns near-ties into exact ties, which the nearest neighbour then settles. We reproduce that.
const SEG_SCORE_SCALE: f32 = 1000.0;

/// Rounds a non-negative score to float16 precision (round half to even, normal range only: scores
/// below float16's normal range can never be the maximum).
pub(crate) fn to_f16_precision(x: f32) -> f32 {
    let bits = x.to_bits();
    let lsb = (bits >> 13) & 1;
    f32::from_bits((bits + 0x0FFF + lsb) & !0x1FFF)
}

/// Linear taps of one coordinate along one axis: (index, weight), `None` index when outside.
#[derive(Clone, Copy)]
struct AxisTaps {
    idx: [Option<usize>; 2],
    w: [f32; 2],
    n: usize,
    nearest: Option<usize>,
}

fn axis_taps(p: f64, len: usize) -> AxisTaps {
    let inside = |i: f64| (i >= 0.0 && i < len as f64).then_some(i as usize);
    let f = p.floor();
    let frac = p - f;
    let nearest = inside(p.round_ties_even());
    if frac == 0.0 {
        // exact grid position: the upper tap has weight 0 and, as in torch, contributes nothing
        AxisTaps {
            idx: [inside(f), None],
            w: [1.0, 0.0],
            n: 1,
            nearest,
        }
    } else {
        let w1 = frac as f32;
        AxisTaps {
            idx: [inside(f), inside(f + 1.0)],
            w: [1.0 - w1, w1],
            n: 2,
            nearest,
        }
    }
}

/// The segmentation label of one voxel from its corners' (label, weight) in corner order: the top
/// float16 score, ties to the nearest neighbour's label `nn` if it is among the best, else the lowest.
fn settle_label(corners: &[(i16, f32)], nn: i16, pad_seg: i16) -> i16 {
    let mut scores: [(i16, f32); 8] = [(0, 0.0); 8];
    let mut m = 0;
    for &(l, w) in corners.iter().filter(|(_, w)| *w > 0.0) {
        match scores[..m].iter_mut().find(|(sl, _)| *sl == l) {
            Some(entry) => entry.1 += w,
            None => {
                scores[m] = (l, w);
                m += 1;
            }
        }
    }
    let scores = &mut scores[..m];
    for entry in scores.iter_mut() {
        entry.1 = to_f16_precision(entry.1 * SEG_SCORE_SCALE);
    }
    let best = scores.iter().map(|s| s.1).fold(f32::NEG_INFINITY, f32::max);
    let lowest_best = scores
        .iter()
        .filter(|s| s.1 == best)
        .map(|s| s.0)
        .min()
        .unwrap_or(pad_seg);
    let nn_is_best = scores.iter().any(|&(l, s)| l == nn && s == best);
    if nn_is_best {
        nn
    } else {
        lowest_best
    }
}

/// Flat input layout shared by both paths.
struct Input<'a> {
    data: &'a [f32],
    seg: &'a [i16],
    shape: [usize; 3],
    /// `shape - 1` as f64: the fast path's exclusive upper bound on a coordinate (a u64 to f64
    /// conversion per voxel and axis was measurable).
    last: [f64; 3],
    /// Strides of z and y (x is 1).
    sz: usize,
    sy: usize,
    vol: usize,
}

/// Output buffers, with channel counts kept apart (a division per voxel was measurable).
struct Output<'a> {
    data: &'a mut [f32],
    seg: &'a mut [i16],
    vol: usize,
    data_channels: usize,
    seg_channels: usize,
}

/// Samples image and segmentation on the grid `A (v + offset) + centre` (see the module docs).
/// `disp` holds per-voxel offsets over the output patch, (z, y, x) or, for 2D, (y, x) shared by all z.
pub fn resample(
    sample: &Sample,
    a: &Affine,
    disp: Option<&Displacement>,
    out: [usize; 3],
    pad_seg: i16,
) -> Sample {
    let (c, dz, dy, dx) = sample.data.dim();
    let n_seg = sample.seg.len_of(Axis(0));
    let (data_in, seg_in) = (sample.data.as_standard_layout(), sample.seg.as_standard_layout());
    let input = Input {
        data: data_in.as_slice().expect("standard layout"),
        seg: seg_in.as_slice().expect("standard layout"),
        shape: [dz, dy, dx],
        last: [dz, dy, dx].map(|n| n as f64 - 1.0),
        sz: dy * dx,
        sy: dx,
        vol: dz * dy * dx,
    };
    let out_vol = out.iter().product::<usize>();
    let mut data = vec![0f32; c * out_vol];
    let mut seg = vec![0i16; n_seg * out_vol];
    let mut output = Output {
        data: &mut data,
        seg: &mut seg,
        vol: out_vol,
        data_channels: c,
        seg_channels: n_seg,
    };
    let c_out = out.map(|o| (o as f64 - 1.0) / 2.0);
    let c_in = input.shape.map(|i| (i as f64 - 1.0) / 2.0);
    let mut cells: Vec<Cell> = Vec::with_capacity(out[2]);
    // Output rows in (z, y) tiles: a tile's rows read neighbouring input lines, which keeps the input
    // a tile touches small (a few hundred KiB); a modest gain over plain row order at large scalings.
    for z0 in (0..out[0]).step_by(TILE) {
        for y0 in (0..out[1]).step_by(TILE) {
            for z in z0..(z0 + TILE).min(out[0]) {
                for y in y0..(y0 + TILE).min(out[1]) {
                    let row = (z * out[1] + y) * out[2];
                    let (v0, v1) = (z as f64 - c_out[0], y as f64 - c_out[1]);
                    cells.clear();
                    let mut sample_at =
                        |x: usize, p: [f64; 3]| visit(&input, p, row + x, pad_seg, &mut cells, &mut output);
                    match disp {
                        None => {
                            // the row-constant part of A v, summed in the same order as below
                            let r = [0, 1, 2].map(|d| a[d][0] * v0 + a[d][1] * v1);
                            for x in 0..out[2] {
                                let v2 = x as f64 - c_out[2];
                                let p = [0, 1, 2].map(|d| r[d] + a[d][2] * v2 + c_in[d]);
                                sample_at(x, p);
                            }
                        }
                        Some(d) => {
                            // a 2D field covers (y, x) and repeats for every z
                            let start = if d.fields.len() == 3 { row } else { y * out[2] };
                            let first_axis = 3 - d.fields.len();
                            for x in 0..out[2] {
                                let mut v = [v0, v1, x as f64 - c_out[2]];
                                for (k, field) in d.fields.iter().enumerate() {
                                    v[first_axis + k] += field[start + x] as f64;
                                }
                                let p = [0, 1, 2]
                                    .map(|d| a[d][0] * v[0] + a[d][1] * v[1] + a[d][2] * v[2] + c_in[d]);
                                sample_at(x, p);
                            }
                        }
                    }
                    gather(&input, &cells, pad_seg, &mut output);
                }
            }
        }
    }
    let shape = |ch: usize| (ch, out[0], out[1], out[2]);
    Sample {
        data: Array4::from_shape_vec(shape(c), data).expect("sized above"),
        seg: Array4::from_shape_vec(shape(n_seg), seg).expect("sized above"),
    }
}

/// Edge of the (z, y) output tiles.
const TILE: usize = 16;

/// An interior sample point: all eight neighbours inside, strictly between grid planes on every axis.
struct Cell {
    /// Flat output index.
    at: usize,
    /// Flat input index of the lower corner.
    base: usize,
    /// Corner weights in (z, y, x) lexicographic order, as the general path visits them.
    w: [f32; 8],
    /// Offset of the nearest neighbour from `base`.
    nearest: usize,
}

/// The fast path's geometry for point `p`, or `None` where the general rules apply.
#[inline(always)]
fn interior_cell(input: &Input, p: [f64; 3], at: usize) -> Option<Cell> {
    let mut f = [0usize; 3];
    let mut w = [[0f32; 2]; 3];
    let mut upper = [0usize; 3];
    for d in 0..3 {
        // 0 <= floor(p) and floor(p) + 1 < len; NaN fails too
        if !(p[d] >= 0.0 && p[d] < input.last[d]) {
            return None;
        }
        // truncation is the floor for p >= 0, and a plain conversion instead of a libm call
        let t = p[d] as i64;
        if t as f64 == p[d] {
            return None;
        }
        f[d] = t as usize;
        let frac = p[d] - t as f64;
        let w1 = frac as f32;
        w[d] = [1.0 - w1, w1];
        // round half to even, relative to the cell: the upper corner past .5, at .5 if f is odd
        upper[d] = (frac > 0.5 || (frac == 0.5 && f[d] % 2 == 1)) as usize;
    }
    let (sz, sy) = (input.sz, input.sy);
    Some(Cell {
        at,
        base: f[0] * sz + f[1] * sy + f[2],
        w: std::array::from_fn(|n| w[0][n >> 2] * w[1][(n >> 1) & 1] * w[2][n & 1]),
        nearest: upper[0] * sz + upper[1] * sy + upper[2],
    })
}

/// Queues an interior point for [`gather`], or samples a border point right away.
#[inline(always)]
fn visit(input: &Input, p: [f64; 3], at: usize, pad_seg: i16, cells: &mut Vec<Cell>, out: &mut Output) {
    match interior_cell(input, p, at) {
        Some(cell) => cells.push(cell),
        None => sample_border(input, p, at, pad_seg, out),
    }
}

/// Samples a row's interior cells, one channel at a time: tight loops of independent loads, which
/// the CPU overlaps far better than one long loop body doing image and labels per voxel.
fn gather(input: &Input, cells: &[Cell], pad_seg: i16, out: &mut Output) {
    let (sz, sy) = (input.sz, input.sy);
    let offs = [0, 1, sy, sy + 1, sz, sz + 1, sz + sy, sz + sy + 1];
    let span = sz + sy + 2;
    for ch in 0..out.data_channels {
        let (src, dst) = (&input.data[ch * input.vol..], &mut out.data[ch * out.vol..]);
        for cell in cells {
            let v = &src[cell.base..][..span];
            dst[cell.at] = (0..8).map(|n| v[offs[n]] * cell.w[n]).sum();
        }
    }
    for ch in 0..out.seg_channels {
        let (src, dst) = (&input.seg[ch * input.vol..], &mut out.seg[ch * out.vol..]);
        for cell in cells {
            let v = &src[cell.base..][..span];
            let labels: [i16; 8] = std::array::from_fn(|n| v[offs[n]]);
            dst[cell.at] = if labels.iter().all(|&l| l == labels[0]) {
                labels[0]
            } else {
                let corners: [(i16, f32); 8] = std::array::from_fn(|n| (labels[n], cell.w[n]));
                settle_label(&corners, v[cell.nearest], pad_seg)
            };
        }
    }
}

/// A point off the fast path: all padding if both taps of some axis are outside (large scalings sample
/// far past the input; these would otherwise be the general path's bulk), else the general path.
#[inline(never)]
fn sample_border(input: &Input, p: [f64; 3], at: usize, pad_seg: i16, out: &mut Output) {
    let outside = (0..3).any(|d| p[d] < -1.0 || p[d] >= input.shape[d] as f64);
    if outside {
        for ch in 0..out.data_channels {
            out.data[ch * out.vol + at] = 0.0;
        }
        for ch in 0..out.seg_channels {
            out.seg[ch * out.vol + at] = pad_seg;
        }
    } else {
        sample_general(input, p, at, pad_seg, out);
    }
}

/// The general path: any point, with taps outside the input reading 0 (image) or `pad_seg`.
fn sample_general(input: &Input, p: [f64; 3], at: usize, pad_seg: i16, out: &mut Output) {
    let taps = [0, 1, 2].map(|d| axis_taps(p[d], input.shape[d]));
    let flat = |a: usize, b: usize, c: usize| a * input.sz + b * input.sy + c;
    // corners: (in-bounds flat index or None, weight)
    let mut corners: [(Option<usize>, f32); 8] = [(None, 0.0); 8];
    let mut n = 0;
    for i in 0..taps[0].n {
        for j in 0..taps[1].n {
            for k in 0..taps[2].n {
                let w = taps[0].w[i] * taps[1].w[j] * taps[2].w[k];
                let idx = match (taps[0].idx[i], taps[1].idx[j], taps[2].idx[k]) {
                    (Some(a), Some(b), Some(c)) => Some(flat(a, b, c)),
                    _ => None,
                };
                corners[n] = (idx, w);
                n += 1;
            }
        }
    }
    let corners = &corners[..n];
    for ch in 0..out.data_channels {
        let src = &input.data[ch * input.vol..][..input.vol];
        out.data[ch * out.vol + at] = corners.iter().filter_map(|(i, w)| i.map(|i| src[i] * w)).sum();
    }
    let nearest = match (taps[0].nearest, taps[1].nearest, taps[2].nearest) {
        (Some(a), Some(b), Some(c)) => Some(flat(a, b, c)),
        _ => None,
    };
    for ch in 0..out.seg_channels {
        let src = &input.seg[ch * input.vol..][..input.vol];
        let label_of = |i: Option<usize>| i.map_or(pad_seg, |i| src[i]);
        let mut labelled: [(i16, f32); 8] = [(0, 0.0); 8];
        for (slot, &(i, w)) in labelled.iter_mut().zip(corners) {
            *slot = (label_of(i), w);
        }
        out.seg[ch * out.vol + at] = settle_label(&labelled[..n], label_of(nearest), pad_seg);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_rounding() {
        assert_eq!(to_f16_precision(500.0), 500.0);
        assert_eq!(to_f16_precision(500.1), 500.0);
        assert_eq!(to_f16_precision(499.9), 500.0);
        assert_eq!(to_f16_precision(500.2), 500.25);
        assert_eq!(to_f16_precision(1000.0), 1000.0);
    }

    #[test]
    fn settling_prefers_the_nearest_among_tied_labels() {
        // two labels at half weight each: a tie that the nearest neighbour settles either way
        let tie = [(2, 0.25), (5, 0.25), (2, 0.25), (5, 0.25)];
        assert_eq!(settle_label(&tie, 5, -1), 5);
        assert_eq!(settle_label(&tie, 2, -1), 2);
        // a nearest neighbour that lost does not win; the lowest of the tied labels does
        let three = [(1, 0.4), (3, 0.4), (7, 0.2)];
        assert_eq!(settle_label(&three, 7, -1), 1);
    }
}
