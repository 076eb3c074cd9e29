//! nnU-Net's resampling (`preprocessing/resampling/default_resampling.py`) as pure functions on arrays.
//!
//! Images are resized like skimage's `resize(order, mode='edge', anti_aliasing=False)`: output voxel `k`
//! samples the input at `(k + 0.5) * in / out - 0.5` (the half-pixel grid of `scipy.ndimage.zoom` with
//! `grid_mode=True`), with a B-spline of order 0..=3, and the result is clipped to the input's range.
//! Segmentations are resized per label (batchgenerators >= 0.25.5: the label with the largest interpolated
//! indicator wins, exact ties go to the nearest-neighbour label). Anisotropic cases are resampled in-plane
//! per slice and then along the low-resolution axis with `order_z` ("separate z").
//!
//! Everything here is separable: a 3D resize is three 1D passes, one per axis, each computed in f64.

use ndarray::{Array2, Array3, Array4, ArrayView2, ArrayView3, ArrayView4, ArrayViewMut3, Axis, Zip};
use rayon::prelude::*;
use thiserror::Error;

// The options are part of a plan (its `resampling_fn_*_kwargs`), so they are defined with it.
pub use crate::plans::{ResampleOptions, ANISO_THRESHOLD};

/// Highest spline order supported (nnU-Net uses 0, 1 and 3).
pub const MAX_ORDER: usize = 3;

/// scipy pads with edge values by this much before the spline prefilter of mode 'nearest', so that the
/// prefilter's mirror boundary is far from the samples (`_prepad_for_spline_filter`).
const SPLINE_PAD: usize = 12;

/// Below this many elements a pass runs on the calling thread.
const PAR_MIN_ELEMENTS: usize = 1 << 15;

#[derive(Debug, Error, PartialEq)]
pub enum ResampleError {
    #[error("spline order {0} is not supported (0..={MAX_ORDER})")]
    UnsupportedOrder(usize),
    #[error("cannot resample shape {from:?} to {to:?}: every axis must be non-empty")]
    EmptyShape { from: Vec<usize>, to: Vec<usize> },
    #[error("spacing {0:?} must be finite and positive")]
    InvalidSpacing([f64; 3]),
}

/// nnU-Net's `compute_new_shape`: `round(old_spacing / new_spacing * old_shape)` per axis.
pub fn compute_new_shape(old_shape: [usize; 3], old_spacing: [f64; 3], new_spacing: [f64; 3]) -> [usize; 3] {
    // Python's round() is half-to-even, like f64::round_ties_even.
    std::array::from_fn(|a| {
        (old_spacing[a] / new_spacing[a] * old_shape[a] as f64).round_ties_even() as usize
    })
}

/// True when `max(spacing) / min(spacing) > threshold` (`get_do_separate_z`).
pub fn is_anisotropic(spacing: [f64; 3], threshold: f64) -> bool {
    let max = spacing.iter().cloned().fold(f64::MIN, f64::max);
    let min = spacing.iter().cloned().fold(f64::MAX, f64::min);
    max / min > threshold
}

/// The axes whose spacing equals the largest one (`get_lowres_axis`).
fn lowres_axes(spacing: [f64; 3]) -> Vec<usize> {
    let max = spacing.iter().cloned().fold(f64::MIN, f64::max);
    (0..3).filter(|&a| max / spacing[a] == 1.0).collect()
}

/// nnU-Net's `determine_do_sep_z_and_axis`: the axis to resample separately, if any. The current spacing
/// is looked at first, then the target spacing; two or three equally coarse axes mean no separate axis.
pub fn separate_z_axis(
    force_separate_z: Option<bool>,
    current_spacing: [f64; 3],
    new_spacing: [f64; 3],
    threshold: f64,
) -> Option<usize> {
    let axes = match force_separate_z {
        Some(false) => return None,
        Some(true) => lowres_axes(current_spacing),
        None if is_anisotropic(current_spacing, threshold) => lowres_axes(current_spacing),
        None if is_anisotropic(new_spacing, threshold) => lowres_axes(new_spacing),
        None => return None,
    };
    match axes.as_slice() {
        [axis] => Some(*axis),
        _ => None,
    }
}

/// skimage `resize(data, new_shape, order, mode='edge', anti_aliasing=False)` of a float volume.
pub fn resize(
    data: ArrayView3<f32>,
    new_shape: [usize; 3],
    order: usize,
) -> Result<Array3<f32>, ResampleError> {
    check(data.shape(), new_shape, order)?;
    let mut out = resize_axes(data.mapv(|v| v as f64), new_shape, order, [true; 3]);
    clip_to_range(&data, &mut out, None);
    Ok(out.mapv(|v| v as f32))
}

/// batchgenerators' `resize_segmentation(seg, new_shape, order)`: order 0 is nearest neighbour; higher
/// orders interpolate each label's indicator and keep, per voxel, the label with the largest score. Where
/// the nearest-neighbour label shares that score it wins; other ties go to the smallest label. Negative
/// labels (nnU-Net's -1 outside the nonzero mask) are labels like any other.
pub fn resize_segmentation(
    seg: ArrayView3<i32>,
    new_shape: [usize; 3],
    order: usize,
) -> Result<Array3<i32>, ResampleError> {
    check(seg.shape(), new_shape, order)?;
    Ok(resize_labels(seg, new_shape, order, [true; 3], None))
}

/// `resample_data_or_seg_to_shape(data, new_shape, current_spacing, new_spacing, is_seg=False, ...)` for a
/// (C, z, y, x) image.
pub fn resample_data_to_shape(
    data: ArrayView4<f32>,
    new_shape: [usize; 3],
    current_spacing: [f64; 3],
    new_spacing: [f64; 3],
    options: &ResampleOptions,
) -> Result<Array4<f32>, ResampleError> {
    let axis = prepare(data.shape(), new_shape, current_spacing, new_spacing, options)?;
    let channels: Vec<Array3<f32>> = data
        .outer_iter()
        .map(|channel| match axis {
            Some(axis) => resize_separate_z(channel, new_shape, axis, options),
            None => resize(channel, new_shape, options.order),
        })
        .collect::<Result<_, _>>()?;
    Ok(stack(&channels, new_shape))
}

/// `resample_data_or_seg_to_shape(seg, ..., is_seg=True, ...)` for a (C, z, y, x) label map.
pub fn resample_seg_to_shape(
    seg: ArrayView4<i32>,
    new_shape: [usize; 3],
    current_spacing: [f64; 3],
    new_spacing: [f64; 3],
    options: &ResampleOptions,
) -> Result<Array4<i32>, ResampleError> {
    let axis = prepare(seg.shape(), new_shape, current_spacing, new_spacing, options)?;
    let channels: Vec<Array3<i32>> = seg
        .outer_iter()
        .map(|channel| match axis {
            Some(axis) => seg_separate_z(channel, new_shape, axis, options),
            None => resize_segmentation(channel, new_shape, options.order),
        })
        .collect::<Result<_, _>>()?;
    Ok(stack(&channels, new_shape))
}

/// Validates a 4D resampling request and returns the separate-z axis.
fn prepare(
    shape: &[usize],
    new_shape: [usize; 3],
    current_spacing: [f64; 3],
    new_spacing: [f64; 3],
    options: &ResampleOptions,
) -> Result<Option<usize>, ResampleError> {
    for spacing in [current_spacing, new_spacing] {
        if spacing.iter().any(|s| !s.is_finite() || *s <= 0.0) {
            return Err(ResampleError::InvalidSpacing(spacing));
        }
    }
    check(&shape[1..], new_shape, options.order.max(options.order_z))?;
    Ok(separate_z_axis(
        options.force_separate_z,
        current_spacing,
        new_spacing,
        options.anisotropy_threshold,
    ))
}

fn check(shape: &[usize], new_shape: [usize; 3], order: usize) -> Result<(), ResampleError> {
    if order > MAX_ORDER {
        return Err(ResampleError::UnsupportedOrder(order));
    }
    if shape.contains(&0) || new_shape.contains(&0) {
        return Err(ResampleError::EmptyShape {
            from: shape.to_vec(),
            to: new_shape.to_vec(),
        });
    }
    Ok(())
}

fn stack<T: Copy + Default>(channels: &[Array3<T>], shape: [usize; 3]) -> Array4<T> {
    let mut out = Array4::from_elem((channels.len(), shape[0], shape[1], shape[2]), T::default());
    for (mut dst, src) in out.outer_iter_mut().zip(channels) {
        dst.assign(src);
    }
    out
}

/// The two axes other than `axis`, marked for resampling.
fn in_plane(axis: usize) -> [bool; 3] {
    std::array::from_fn(|a| a != axis)
}

/// Separate-z image path: every slice across `axis` resized in-plane (clipped to that slice's range, as
/// skimage does per 2D call), then `order_z` along `axis` without clipping (`map_coordinates`).
fn resize_separate_z(
    data: ArrayView3<f32>,
    new_shape: [usize; 3],
    axis: usize,
    options: &ResampleOptions,
) -> Result<Array3<f32>, ResampleError> {
    let mut plane_shape = new_shape;
    plane_shape[axis] = data.len_of(Axis(axis));
    let mut out = resize_axes(
        data.mapv(|v| v as f64),
        plane_shape,
        options.order,
        in_plane(axis),
    );
    clip_to_range(&data, &mut out, Some(axis));
    let out = resample_axis(&out, axis, new_shape[axis], options.order_z);
    Ok(out.mapv(|v| v as f32))
}

/// Separate-z label path: per-slice `resize_segmentation` in-plane, then along `axis` nearest neighbour
/// for `order_z == 0`, else per label (ascending) "interpolated indicator > 0.5 takes the label".
fn seg_separate_z(
    seg: ArrayView3<i32>,
    new_shape: [usize; 3],
    axis: usize,
    options: &ResampleOptions,
) -> Result<Array3<i32>, ResampleError> {
    let mut plane_shape = new_shape;
    plane_shape[axis] = seg.len_of(Axis(axis));
    let planar = resize_labels(seg, plane_shape, options.order, in_plane(axis), Some(axis));
    if plane_shape[axis] == new_shape[axis] {
        return Ok(planar);
    }
    if options.order_z == 0 {
        let mut along = [false; 3];
        along[axis] = true;
        return Ok(nearest(planar.view(), new_shape, along));
    }
    let mut out = Array3::<i32>::zeros(new_shape);
    for label in sorted_labels(planar.view()) {
        let indicator = planar.mapv(|v| f64::from(u8::from(v == label)));
        let score = resample_axis(&indicator, axis, new_shape[axis], options.order_z);
        Zip::from(&mut out).and(&score).for_each(|o, &s| {
            // nnU-Net tests np.round(score) > 0.5, which holds exactly when score > 0.5 (0.5 rounds to 0).
            if s > 0.5 {
                *o = label;
            }
        });
    }
    Ok(out)
}

fn sorted_labels(seg: ArrayView3<i32>) -> Vec<i32> {
    let mut labels: Vec<i32> = seg.iter().copied().collect();
    labels.par_sort_unstable();
    labels.dedup();
    labels
}

/// Label resize along the marked axes. `clip_axis` clips each slice across that axis separately, as the
/// per-slice skimage calls of the separate-z path do.
fn resize_labels(
    seg: ArrayView3<i32>,
    new_shape: [usize; 3],
    order: usize,
    axes: [bool; 3],
    clip_axis: Option<usize>,
) -> Array3<i32> {
    if order == 0 {
        return nearest(seg, new_shape, axes);
    }
    let labels = sorted_labels(seg);
    if let [only] = labels.as_slice() {
        return Array3::from_elem(new_shape, *only);
    }
    let nn = nearest(seg, new_shape, axes);
    let mut best = Array3::<f64>::from_elem(new_shape, f64::NEG_INFINITY);
    let mut nn_score = Array3::<f64>::zeros(new_shape);
    let mut winner = Array3::<i32>::zeros(new_shape);
    for &label in &labels {
        let indicator = seg.mapv(|v| f64::from(u8::from(v == label)));
        let mut score = resize_axes(indicator.clone(), new_shape, order, axes);
        clip_to_range(&indicator.view(), &mut score, clip_axis);
        Zip::from(&mut best)
            .and(&mut winner)
            .and(&mut nn_score)
            .and(&nn)
            .and(&score)
            .for_each(|best, winner, nn_score, &nn, &s| {
                // A strict '>' keeps the smallest of equally scored labels.
                if s > *best {
                    *best = s;
                    *winner = label;
                }
                if nn == label {
                    *nn_score = s;
                }
            });
    }
    Zip::from(&mut winner)
        .and(&nn)
        .and(&nn_score)
        .and(&best)
        .for_each(|winner, &nn, &nn_score, &best| {
            if nn_score == best && best > 0.0 {
                *winner = nn;
            }
        });
    winner
}

/// Nearest-neighbour resize along the marked axes (order 0: index `floor(c + 0.5)` of the half-pixel grid).
fn nearest<T: Copy + Send + Sync>(data: ArrayView3<T>, new_shape: [usize; 3], axes: [bool; 3]) -> Array3<T> {
    let maps: [Vec<usize>; 3] = std::array::from_fn(|a| {
        let len = data.len_of(Axis(a));
        if !axes[a] || len == new_shape[a] {
            return (0..len).collect();
        }
        let plan = AxisPlan::new(len, new_shape[a], 0);
        plan.start
            .iter()
            .map(|&s| s.clamp(0, len as isize - 1) as usize)
            .collect()
    });
    let shape = [maps[0].len(), maps[1].len(), maps[2].len()];
    Array3::from_shape_fn(shape, |(i, j, k)| data[[maps[0][i], maps[1][j], maps[2][k]]])
}

/// skimage's `clip=True`: clamp `out` to the min/max of `input`, globally or per slice across `axis`.
fn clip_to_range<T: Copy + Into<f64>>(input: &ArrayView3<T>, out: &mut Array3<f64>, axis: Option<usize>) {
    let range = |view: ArrayView3<T>| {
        view.iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
                let v: f64 = v.into();
                (lo.min(v), hi.max(v))
            })
    };
    match axis {
        None => {
            let (lo, hi) = range(input.view());
            out.mapv_inplace(|v| v.clamp(lo, hi));
        }
        Some(axis) => {
            for (i, mut slice) in out.axis_iter_mut(Axis(axis)).enumerate() {
                let (lo, hi) = range(input.slice_axis(Axis(axis), (i..=i).into()));
                slice.mapv_inplace(|v| v.clamp(lo, hi));
            }
        }
    }
}

/// Resize along every marked axis whose length changes, one separable pass per axis.
fn resize_axes(mut data: Array3<f64>, new_shape: [usize; 3], order: usize, axes: [bool; 3]) -> Array3<f64> {
    for axis in 0..3 {
        if axes[axis] && data.len_of(Axis(axis)) != new_shape[axis] {
            data = resample_axis(&data, axis, new_shape[axis], order);
        }
    }
    data
}

/// Where output sample `k` reads its input along one axis: the first input index of its spline support
/// (possibly outside the input) and the weights of the `order + 1` supporting samples.
struct AxisPlan {
    start: Vec<isize>,
    weights: Vec<[f64; MAX_ORDER + 1]>,
}

impl AxisPlan {
    /// `pad` is added to the coordinates, for samples taken from a pre-padded coefficient line.
    fn new(in_len: usize, out_len: usize, order: usize) -> Self {
        let pad = if order > 1 { SPLINE_PAD as f64 } else { 0.0 };
        let zoom = in_len as f64 / out_len as f64;
        let (start, weights) = (0..out_len)
            .map(|k| {
                // The operations in scipy's order, so that ties of order 0 round the same way.
                let c = (k as f64 + 0.5) * zoom - 0.5 + pad;
                let first = if order % 2 == 1 {
                    c.floor()
                } else {
                    (c + 0.5).floor()
                };
                (first as isize - (order / 2) as isize, spline_weights(c, order))
            })
            .unzip();
        Self { start, weights }
    }
}

/// B-spline interpolation weights of the `order + 1` samples around coordinate `x` (scipy's
/// `get_spline_interpolation_weights`; the last weight is one minus the others).
fn spline_weights(x: f64, order: usize) -> [f64; MAX_ORDER + 1] {
    let mut w = [0.0; MAX_ORDER + 1];
    let x = x - if order % 2 == 1 {
        x.floor()
    } else {
        (x + 0.5).floor()
    };
    match order {
        0 => {}
        1 => w[0] = 1.0 - x,
        2 => {
            w[1] = 0.75 - x * x;
            let y = 0.5 - x;
            w[0] = 0.5 * y * y;
        }
        _ => {
            let z = 1.0 - x;
            w[1] = (x * x * (x - 2.0) * 3.0 + 4.0) / 6.0;
            w[2] = (z * z * (z - 2.0) * 3.0 + 4.0) / 6.0;
            w[0] = z * z * z / 6.0;
        }
    }
    w[order] = 1.0 - w[..order].iter().sum::<f64>();
    w
}

/// One separable pass: resample `data` along `axis` to `out_len` samples.
fn resample_axis(data: &Array3<f64>, axis: usize, out_len: usize, order: usize) -> Array3<f64> {
    let shape = data.shape();
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let len = shape[axis];
    let data = data.as_standard_layout();
    let input = data
        .view()
        .into_shape_with_order((outer, len, inner))
        .expect("standard layout");
    let mut out = Array3::<f64>::zeros((outer, out_len, inner));
    let plan = AxisPlan::new(len, out_len, order);
    for_blocks(input, out.view_mut(), &|inp, out| {
        resample_block(inp, out, &plan, order)
    });
    let mut out_shape = [shape[0], shape[1], shape[2]];
    out_shape[axis] = out_len;
    out.into_shape_with_order(out_shape)
        .expect("same number of elements")
}

/// Splits an (outer, len, columns) block pair into disjoint pieces, outer rows first, then columns, and
/// runs `f` on them in parallel.
fn for_blocks<F>(inp: ArrayView3<f64>, mut out: ArrayViewMut3<f64>, f: &F)
where
    F: Fn(ArrayView3<f64>, ArrayViewMut3<f64>) + Sync,
{
    let (outer, _, cols) = inp.dim();
    if inp.len() + out.len() < PAR_MIN_ELEMENTS || (outer < 2 && cols < 128) {
        return f(inp, out);
    }
    let (split_axis, mid) = if outer >= 2 {
        (Axis(0), outer / 2)
    } else {
        (Axis(2), cols / 2)
    };
    let (in_a, in_b) = inp.split_at(split_axis, mid);
    let (out_a, out_b) = out.view_mut().split_at(split_axis, mid);
    rayon::join(|| for_blocks(in_a, out_a, f), || for_blocks(in_b, out_b, f));
}

/// Interpolates each (len, columns) plane of `inp` into the (out_len, columns) plane of `out`, working on
/// whole rows so that the inner loops run over contiguous columns.
fn resample_block(inp: ArrayView3<f64>, mut out: ArrayViewMut3<f64>, plan: &AxisPlan, order: usize) {
    let cols = inp.len_of(Axis(2));
    let mut row = vec![0.0; cols];
    for (plane, mut out_plane) in inp.outer_iter().zip(out.outer_iter_mut()) {
        // Orders above 1 sample the spline coefficients of the edge-padded line instead of the samples.
        let coefficients = (order > 1).then(|| spline_coefficients(plane, order));
        let source = coefficients.as_ref().map_or(plane, |c| c.view());
        let last = source.nrows() as isize - 1;
        for (k, mut out_row) in out_plane.outer_iter_mut().enumerate() {
            row.fill(0.0);
            for t in 0..=order {
                // Indices past the ends repeat the edge sample (mode 'nearest').
                let src = source.row((plan.start[k] + t as isize).clamp(0, last) as usize);
                let w = if order == 0 { 1.0 } else { plan.weights[k][t] };
                Zip::from(&mut row).and(&src).for_each(|acc, &v| *acc += w * v);
            }
            out_row.iter_mut().zip(&row).for_each(|(o, &v)| *o = v);
        }
    }
}

/// B-spline coefficients along the rows of `plane` after padding it by `SPLINE_PAD` edge rows on both
/// ends (scipy's `spline_filter1d` with mode 'nearest', which filters the padded line with mirror
/// boundary initialization).
fn spline_coefficients(plane: ArrayView2<f64>, order: usize) -> Array2<f64> {
    let len = plane.nrows();
    let mut c = Array2::<f64>::zeros((len + 2 * SPLINE_PAD, plane.ncols()));
    for (r, mut row) in c.outer_iter_mut().enumerate() {
        row.assign(&plane.row(r.saturating_sub(SPLINE_PAD).min(len - 1)));
    }
    let pole = match order {
        2 => 8f64.sqrt() - 3.0,
        _ => 3f64.sqrt() - 2.0,
    };
    let gain = (1.0 - pole) * (1.0 - 1.0 / pole);
    c.mapv_inplace(|v| v * gain);
    filter_rows(&mut c, pole);
    c
}

/// One causal and one anticausal recursive pass of pole `z` down the rows of `c`, initialized for a
/// mirror-symmetric extension (scipy's `_init_causal_mirror` / `_init_anticausal_mirror`).
fn filter_rows(c: &mut Array2<f64>, z: f64) {
    let n = c.nrows();
    let z_n_1 = z.powi(n as i32 - 1);
    let mut first = c.row(0).to_owned();
    first.scaled_add(z_n_1, &c.row(n - 1));
    let mut z_i = z;
    for i in 1..n - 1 {
        Zip::from(&mut first)
            .and(c.row(i))
            .and(c.row(n - 1 - i))
            .for_each(|f, &a, &b| *f += z_i * (a + z_n_1 * b));
        z_i *= z;
    }
    first.mapv_inplace(|v| v / (1.0 - z_n_1 * z_n_1));
    c.row_mut(0).assign(&first);
    for i in 1..n {
        let (prev, mut rest) = c.view_mut().split_at(Axis(0), i);
        rest.row_mut(0).scaled_add(z, &prev.row(i - 1));
    }
    let (head, mut tail) = c.view_mut().split_at(Axis(0), n - 1);
    Zip::from(tail.row_mut(0))
        .and(head.row(n - 2))
        .for_each(|l, &p| *l = (z * p + *l) * z / (z * z - 1.0));
    for i in (0..n - 1).rev() {
        let (mut head, tail) = c.view_mut().split_at(Axis(0), i + 1);
        Zip::from(head.row_mut(i))
            .and(tail.row(0))
            .for_each(|c, &next| *c = z * (next - *c));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array3;

    #[test]
    fn spline_weights_sum_to_one() {
        for order in 0..=MAX_ORDER {
            for x in [0.0, 0.25, 0.5, 0.9, 3.7, -0.3] {
                let w = spline_weights(x, order);
                assert!(
                    (w.iter().sum::<f64>() - 1.0).abs() < 1e-12,
                    "order {order} at {x}"
                );
            }
        }
    }

    #[test]
    fn new_shape_rounds_half_to_even_like_python() {
        assert_eq!(
            compute_new_shape([10, 5, 7], [1.0, 1.0, 1.0], [0.5, 2.0, 2.0]),
            [20, 2, 4]
        );
        assert_eq!(
            compute_new_shape([100, 100, 30], [0.7, 0.7, 5.0], [1.0, 1.0, 1.0]),
            [70, 70, 150]
        );
    }

    #[test]
    fn separate_z_follows_nnunet_rules() {
        assert_eq!(
            separate_z_axis(None, [5.0, 1.0, 1.0], [1.0, 1.0, 1.0], 3.0),
            Some(0)
        );
        // the target spacing is looked at when the current one is isotropic
        assert_eq!(
            separate_z_axis(None, [1.0, 1.0, 1.0], [1.0, 1.0, 4.0], 3.0),
            Some(2)
        );
        assert_eq!(separate_z_axis(None, [3.0, 1.0, 1.0], [1.0, 1.0, 1.0], 3.0), None);
        // two equally coarse axes: no separate axis
        assert_eq!(
            separate_z_axis(None, [0.24, 1.25, 1.25], [1.0, 1.0, 1.0], 3.0),
            None
        );
        assert_eq!(
            separate_z_axis(Some(true), [1.0, 2.0, 1.0], [1.0, 1.0, 1.0], 3.0),
            Some(1)
        );
        assert_eq!(
            separate_z_axis(Some(false), [5.0, 1.0, 1.0], [1.0, 1.0, 1.0], 3.0),
            None
        );
    }

    #[test]
    fn bad_requests_are_errors() {
        let data = Array3::<f32>::zeros((2, 2, 2));
        assert_eq!(
            resize(data.view(), [3, 3, 3], 4),
            Err(ResampleError::UnsupportedOrder(4))
        );
        assert!(matches!(
            resize(data.view(), [0, 3, 3], 1),
            Err(ResampleError::EmptyShape { .. })
        ));
        let data4 = data.insert_axis(Axis(0));
        let bad = resample_data_to_shape(
            data4.view(),
            [2, 2, 2],
            [0.0, 1.0, 1.0],
            [1.0; 3],
            &ResampleOptions::data(),
        );
        assert!(matches!(bad, Err(ResampleError::InvalidSpacing(_))));
    }

    #[test]
    fn constant_volume_stays_constant_and_same_shape_is_identity() {
        let data = Array3::from_elem((3, 4, 5), 7.5f32);
        for order in 0..=MAX_ORDER {
            let out = resize(data.view(), [5, 2, 9], order).unwrap();
            assert!(out.iter().all(|&v| (v - 7.5).abs() < 1e-5), "order {order}");
        }
        let ramp = Array3::from_shape_fn((3, 4, 5), |(i, j, k)| (i * 20 + j * 5 + k) as f32);
        assert_eq!(resize(ramp.view(), [3, 4, 5], 3).unwrap(), ramp);
    }

    #[test]
    fn cubic_overshoot_is_clipped_to_the_input_range() {
        let step = Array3::from_shape_fn((1, 1, 8), |(_, _, k)| if k < 4 { 0.0f32 } else { 1.0 });
        let out = resize(step.view(), [1, 1, 21], 3).unwrap();
        assert!(out.iter().all(|&v| (0.0..=1.0).contains(&v)));
        assert!(out.iter().any(|&v| v > 0.0 && v < 1.0));
    }

    #[test]
    fn single_label_segmentation_is_filled() {
        let seg = Array3::from_elem((2, 3, 4), -1);
        let out = resize_segmentation(seg.view(), [4, 5, 6], 1).unwrap();
        assert!(out.iter().all(|&v| v == -1));
    }

    #[test]
    fn halving_ties_go_to_the_nearest_label() {
        // [a, b] halves to one sample exactly between them; nearest neighbour picks index floor(0.5+0.5) = 1.
        let seg = Array3::from_shape_vec((1, 1, 2), vec![5, 2]).unwrap();
        assert_eq!(
            resize_segmentation(seg.view(), [1, 1, 1], 1).unwrap()[[0, 0, 0]],
            2
        );
        let seg = Array3::from_shape_vec((1, 1, 2), vec![2, 5]).unwrap();
        assert_eq!(
            resize_segmentation(seg.view(), [1, 1, 1], 1).unwrap()[[0, 0, 0]],
            5
        );
    }

    #[test]
    fn parallel_split_matches_serial() {
        // big enough to be split across threads along both the outer axis and the columns
        let data = Array3::from_shape_fn((3, 40, 300), |(i, j, k)| ((i * 7 + j * 3 + k) % 17) as f64);
        let serial = {
            let mut out = Array3::<f64>::zeros((1, 23, 40 * 300));
            let inp = data.view().into_shape_with_order((3, 40 * 300)).unwrap();
            let inp = inp.insert_axis(Axis(0));
            resample_block(inp, out.view_mut(), &AxisPlan::new(3, 23, 3), 3);
            out.into_shape_with_order((23, 40, 300)).unwrap()
        };
        assert_eq!(resample_axis(&data, 0, 23, 3), serial);
    }
}
