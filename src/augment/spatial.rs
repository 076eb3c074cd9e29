//! `spatial`: rotation and scaling about the patch centre, sampled into the final patch size, or a plain
//! centre crop when neither is drawn (batchgeneratorsv2 `SpatialTransform` as nnU-Net configures it:
//! `random_crop=False`, no elastic deformation, bilinear image sampling with zero padding, segmentation
//! by per-label bilinear scores with padding label -1, argmax, ties to the nearest neighbour).
//!
//! Geometry (align_corners=False): output voxel `i` sits at `x = i - (out - 1) / 2` relative to the patch
//! centre and samples the input at `A x + (in - 1) / 2`, with `A = Rz Ry Rx S` (3D, angles about axes
//! 0, 1, 2) or `R S` in the (y, x) plane (2D). A scale above 1 samples a larger region, so objects shrink.

use ndarray::{s, Array4, ArrayView4, Axis};
use serde::{Deserialize, Serialize};

use super::{check_prob, check_range, sample_range, AugmentError, Sample, SampleRng};

/// batchgeneratorsv2 scores each label as float16 of `1000 * interpolated indicator`; the coarse float16
/// grid turns near-ties into exact ties, which the nearest neighbour then settles. We reproduce that.
const SEG_SCORE_SCALE: f32 = 1000.0;

fn yes() -> bool {
    true
}

/// `spatial` parameters; nnU-Net's defaults except `patch_size` (from the plans, required).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpatialParams {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Probability of running at all; below 1 some samples keep the loader's enlarged patch size.
    pub p: f64,
    /// Final patch: (z, y, x), or (y, x) for 2D and dummy-2D (then every z slice is transformed alike).
    pub patch_size: Vec<usize>,
    /// Rotation range in degrees, drawn independently per axis (nnU-Net's radians converted).
    pub rotation_deg: [f64; 2],
    pub p_rotation: f64,
    /// Probability that a drawn angle is kept per axis (nnU-Net: 1).
    pub p_rot_per_axis: f64,
    pub scaling: [f64; 2],
    pub p_scaling: f64,
    /// Probability that one scale is shared by all axes (nnU-Net: 1).
    pub p_synchronize_scaling_across_axes: f64,
    /// Elastic deformation is off in nnU-Net v2 and not implemented here; must stay 0.
    pub p_elastic_deform: f64,
    /// Segmentation label outside the input (nnU-Net: -1, later turned into 0 by `remove_label`).
    pub padding_value_seg: i16,
}

impl Default for SpatialParams {
    fn default() -> Self {
        Self {
            enabled: true,
            p: 1.0,
            patch_size: Vec::new(),
            rotation_deg: [-30.0, 30.0],
            p_rotation: 0.2,
            p_rot_per_axis: 1.0,
            scaling: [0.7, 1.4],
            p_scaling: 0.2,
            p_synchronize_scaling_across_axes: 1.0,
            p_elastic_deform: 0.0,
            padding_value_seg: -1,
        }
    }
}

/// 3x3 matrix acting on (z, y, x) column vectors.
pub type Affine = [[f64; 3]; 3];

impl SpatialParams {
    pub fn validate(&self) -> Result<(), AugmentError> {
        const T: &str = "spatial";
        let invalid = |message: String| {
            Err(AugmentError::Invalid {
                transform: T,
                message,
            })
        };
        check_prob(T, "p", self.p)?;
        check_prob(T, "p_rotation", self.p_rotation)?;
        check_prob(T, "p_rot_per_axis", self.p_rot_per_axis)?;
        check_prob(T, "p_scaling", self.p_scaling)?;
        check_prob(
            T,
            "p_synchronize_scaling_across_axes",
            self.p_synchronize_scaling_across_axes,
        )?;
        check_range(T, "rotation_deg", self.rotation_deg)?;
        check_range(T, "scaling", self.scaling)?;
        if !(self.patch_size.len() == 2 || self.patch_size.len() == 3) || self.patch_size.contains(&0) {
            return invalid(format!(
                "`patch_size` needs 2 or 3 non-zero entries, got {:?}",
                self.patch_size
            ));
        }
        if self.scaling[0] <= 0.0 {
            return invalid("`scaling` must be > 0".into());
        }
        if self.p_elastic_deform != 0.0 {
            return invalid("elastic deformation is not implemented; `p_elastic_deform` must be 0".into());
        }
        Ok(())
    }

    /// Draws rotation / scaling in batchgeneratorsv2's order; `None` means "centre crop only".
    pub fn draw(&self, rng: &mut SampleRng) -> Option<Affine> {
        let dim = self.patch_size.len();
        let do_rotation = rng.bernoulli(self.p_rotation);
        let do_scale = rng.bernoulli(self.p_scaling);
        let _do_deform = rng.bernoulli(self.p_elastic_deform);
        let mut angles = [0.0; 3];
        if do_rotation {
            for a in angles.iter_mut().take(dim) {
                *a = sample_range(rng, self.rotation_deg).to_radians();
            }
            if self.p_rot_per_axis < 1.0 {
                for a in angles.iter_mut().take(dim) {
                    if rng.next_f64() > self.p_rot_per_axis {
                        *a = 0.0;
                    }
                }
            }
        }
        let mut scales = [1.0; 3];
        if do_scale {
            if rng.next_f64() <= self.p_synchronize_scaling_across_axes {
                scales = [sample_range(rng, self.scaling); 3];
            } else {
                for s in scales.iter_mut().take(dim) {
                    *s = sample_range(rng, self.scaling);
                }
            }
        }
        if !(do_rotation || do_scale) {
            return None;
        }
        Some(if dim == 3 {
            affine_3d(angles, scales)
        } else {
            // 2D uses the last drawn angle, as batchgeneratorsv2 does (angles[-1])
            affine_2d(angles[dim - 1], [scales[0], scales[1]])
        })
    }

    /// The output spatial shape for an input of spatial shape `input`.
    pub fn output_shape(&self, input: [usize; 3]) -> [usize; 3] {
        match self.patch_size[..] {
            [z, y, x] => [z, y, x],
            [y, x] => [input[0], y, x],
            _ => input,
        }
    }

    pub fn apply(&self, sample: &mut Sample, rng: &mut SampleRng) {
        let affine = self.draw(rng);
        let (_, z, y, x) = sample.data.dim();
        let out = self.output_shape([z, y, x]);
        *sample = match affine {
            None => center_crop(sample, out, self.padding_value_seg),
            Some(a) => resample_affine(sample, &a, out, self.padding_value_seg),
        };
    }
}

fn matmul(a: &Affine, b: &Affine) -> Affine {
    let mut m = [[0.0; 3]; 3];
    for (i, row) in m.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = (0..3).map(|k| a[i][k] * b[k][j]).sum();
        }
    }
    m
}

/// `create_affine_matrix_3d`: `Rz @ Ry @ Rx @ diag(scales)`, angles in radians.
pub fn affine_3d(angles: [f64; 3], scales: [f64; 3]) -> Affine {
    let (s0, c0) = angles[0].sin_cos();
    let (s1, c1) = angles[1].sin_cos();
    let (s2, c2) = angles[2].sin_cos();
    let rx = [[1.0, 0.0, 0.0], [0.0, c0, -s0], [0.0, s0, c0]];
    let ry = [[c1, 0.0, s1], [0.0, 1.0, 0.0], [-s1, 0.0, c1]];
    let rz = [[c2, -s2, 0.0], [s2, c2, 0.0], [0.0, 0.0, 1.0]];
    let sc = [
        [scales[0], 0.0, 0.0],
        [0.0, scales[1], 0.0],
        [0.0, 0.0, scales[2]],
    ];
    matmul(&rz, &matmul(&ry, &matmul(&rx, &sc)))
}

/// `create_affine_matrix_2d` in the (y, x) plane, identity along z.
pub fn affine_2d(angle: f64, scales: [f64; 2]) -> Affine {
    let (s, c) = angle.sin_cos();
    [
        [1.0, 0.0, 0.0],
        [0.0, c * scales[0], -s * scales[1]],
        [0.0, s * scales[0], c * scales[1]],
    ]
}

/// batchgeneratorsv2's `crop_tensor` around `floor(in / 2)`: integer crop, padding outside with 0
/// (image) and `pad_seg` (segmentation).
pub fn center_crop(sample: &Sample, out: [usize; 3], pad_seg: i16) -> Sample {
    let (c, dz, dy, dx) = sample.data.dim();
    let input = [dz, dy, dx];
    let start = [0, 1, 2].map(|a| (input[a] / 2) as isize - (out[a] / 2) as isize);
    let mut data = Array4::<f32>::zeros((c, out[0], out[1], out[2]));
    let mut seg = Array4::<i16>::from_elem((sample.seg.len_of(Axis(0)), out[0], out[1], out[2]), pad_seg);
    // overlap of [start, start + out) with [0, input) per axis, in output coordinates
    let lo = [0, 1, 2].map(|a| (-start[a]).clamp(0, out[a] as isize) as usize);
    let hi = [0, 1, 2].map(|a| (input[a] as isize - start[a]).clamp(0, out[a] as isize) as usize);
    if (0..3).all(|a| lo[a] < hi[a]) {
        let src = |a: usize| (lo[a] as isize + start[a]) as usize..(hi[a] as isize + start[a]) as usize;
        data.slice_mut(s![.., lo[0]..hi[0], lo[1]..hi[1], lo[2]..hi[2]])
            .assign(&sample.data.slice(s![.., src(0), src(1), src(2)]));
        seg.slice_mut(s![.., lo[0]..hi[0], lo[1]..hi[1], lo[2]..hi[2]])
            .assign(&sample.seg.slice(s![.., src(0), src(1), src(2)]));
    }
    Sample { data, seg }
}

/// Rounds a non-negative score to float16 precision (round half to even, normal range only: scores
/// below float16's normal range can never be the maximum).
fn to_f16_precision(x: f32) -> f32 {
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

/// Samples image (bilinear, zeros outside) and segmentation (per-label bilinear score argmax, padding
/// label outside, ties to the nearest neighbour, lowest label otherwise) on the rotated/scaled grid.
pub fn resample_affine(sample: &Sample, a: &Affine, out: [usize; 3], pad_seg: i16) -> Sample {
    let (c, dz, dy, dx) = sample.data.dim();
    let input = [dz, dy, dx];
    let n_seg = sample.seg.len_of(Axis(0));
    let mut data = Array4::<f32>::zeros((c, out[0], out[1], out[2]));
    let mut seg = Array4::<i16>::zeros((n_seg, out[0], out[1], out[2]));
    let c_out = out.map(|o| (o as f64 - 1.0) / 2.0);
    let c_in = input.map(|i| (i as f64 - 1.0) / 2.0);
    let (src, src_seg) = (sample.data.view(), sample.seg.view());
    for z in 0..out[0] {
        for y in 0..out[1] {
            for x in 0..out[2] {
                let v = [z as f64 - c_out[0], y as f64 - c_out[1], x as f64 - c_out[2]];
                let taps = [0, 1, 2].map(|d| {
                    let p = a[d][0] * v[0] + a[d][1] * v[1] + a[d][2] * v[2] + c_in[d];
                    axis_taps(p, input[d])
                });
                sample_voxel(&src, &src_seg, &taps, pad_seg, [z, y, x], &mut data, &mut seg);
            }
        }
    }
    Sample { data, seg }
}

/// One output voxel of every data and seg channel from the product of the three axes' taps.
fn sample_voxel(
    src: &ArrayView4<f32>,
    src_seg: &ArrayView4<i16>,
    taps: &[AxisTaps; 3],
    pad_seg: i16,
    at: [usize; 3],
    data: &mut Array4<f32>,
    seg: &mut Array4<i16>,
) {
    // corners: (in-bounds index or None, weight)
    let mut corners: [(Option<[usize; 3]>, f32); 8] = [(None, 0.0); 8];
    let mut n = 0;
    for i in 0..taps[0].n {
        for j in 0..taps[1].n {
            for k in 0..taps[2].n {
                let w = taps[0].w[i] * taps[1].w[j] * taps[2].w[k];
                let idx = match (taps[0].idx[i], taps[1].idx[j], taps[2].idx[k]) {
                    (Some(a), Some(b), Some(c)) => Some([a, b, c]),
                    _ => None,
                };
                corners[n] = (idx, w);
                n += 1;
            }
        }
    }
    let corners = &corners[..n];
    for ch in 0..src.len_of(Axis(0)) {
        let acc: f32 = corners
            .iter()
            .filter_map(|(i, w)| i.map(|[a, b, c]| src[[ch, a, b, c]] * w))
            .sum();
        data[[ch, at[0], at[1], at[2]]] = acc;
    }
    let nearest = match (taps[0].nearest, taps[1].nearest, taps[2].nearest) {
        (Some(a), Some(b), Some(c)) => Some([a, b, c]),
        _ => None,
    };
    for ch in 0..src_seg.len_of(Axis(0)) {
        let label_of = |i: Option<[usize; 3]>| i.map_or(pad_seg, |[a, b, c]| src_seg[[ch, a, b, c]]);
        let mut scores: [(i16, f32); 8] = [(0, 0.0); 8];
        let mut m = 0;
        for &(i, w) in corners.iter().filter(|(_, w)| *w > 0.0) {
            let l = label_of(i);
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
        let nn = label_of(nearest);
        let nn_is_best = scores.iter().any(|&(l, s)| l == nn && s == best);
        seg[[ch, at[0], at[1], at[2]]] = if nn_is_best { nn } else { lowest_best };
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
    fn pure_rotations_are_orthonormal() {
        let a = affine_3d([0.3, -0.5, 1.1], [1.0; 3]);
        for i in 0..3 {
            for j in 0..3 {
                let dot: f64 = (0..3).map(|k| a[k][i] * a[k][j]).sum();
                assert!((dot - if i == j { 1.0 } else { 0.0 }).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn validation_rejects_elastic_and_bad_patch() {
        let p = SpatialParams {
            patch_size: vec![8, 8, 8],
            ..Default::default()
        };
        assert!(p.validate().is_ok());
        assert!(SpatialParams {
            p_elastic_deform: 0.1,
            ..p.clone()
        }
        .validate()
        .is_err());
        assert!(SpatialParams {
            patch_size: vec![8],
            ..p
        }
        .validate()
        .is_err());
    }
}
