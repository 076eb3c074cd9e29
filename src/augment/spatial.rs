//! `spatial`: elastic deformation, rotation and scaling about the patch centre, sampled into the final
//! patch size, or a plain centre crop when none is drawn (batchgeneratorsv2 `SpatialTransform` with
//! `random_crop=False`, as nnU-Net configures it: bilinear image sampling with zero padding, segmentation
//! by per-label bilinear scores with padding label -1, argmax, ties to the nearest neighbour; elastic
//! deformation is available but off, as in nnU-Net v2).
//!
//! Geometry (align_corners=False): output voxel `i` sits at `x = i - (out - 1) / 2` relative to the patch
//! centre, is displaced by the elastic offset `o(i)` (see [`super::elastic`]) and samples the input at
//! `A (x + o) + (in - 1) / 2`, with `A = Rz Ry Rx S` (3D, angles about axes 0, 1, 2) or `R S` in the
//! (y, x) plane (2D). A scale above 1 samples a larger region, so objects shrink. The sampling itself is
//! in [`super::resample`].

use ndarray::{s, Array4, Axis};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::elastic::Displacement;
use super::resample::{resample, Affine};
use super::{check_prob, check_range, sample_range, AugmentError, Sample, SampleRng};

fn yes() -> bool {
    true
}

/// `spatial` parameters; nnU-Net's defaults except `patch_size` (from the plans, required).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
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
    /// Probability of an elastic deformation (nnU-Net v2: 0, off).
    pub p_elastic_deform: f64,
    /// Smoothing sigma of the displacement noise, as a fraction of the patch edge (batchgeneratorsv2's
    /// default (0, 0.2)); larger means coarser deformation. Field `d` uses `scale_d * patch_size[d]`
    /// voxels along every axis.
    pub elastic_deform_scale: [f64; 2],
    /// Largest displacement per axis, in voxels (batchgeneratorsv2's default (0, 0.2)).
    pub elastic_deform_magnitude: [f64; 2],
    /// Probability that one deformation scale is shared by all axes (batchgeneratorsv2: 0).
    pub p_synchronize_def_scale_across_axes: f64,
    /// Re-centre the deformed grid on its mean, so the deformation does not shift the patch (default on).
    pub center_deformation: bool,
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
            elastic_deform_scale: [0.0, 0.2],
            elastic_deform_magnitude: [0.0, 0.2],
            p_synchronize_def_scale_across_axes: 0.0,
            center_deformation: true,
            padding_value_seg: -1,
        }
    }
}

/// No rotation or scaling: the affine of a deformation-only warp.
pub const IDENTITY: Affine = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];

/// One sample's drawn geometry; batchgeneratorsv2 resamples whenever either part is present.
#[derive(Debug, Clone, PartialEq)]
pub struct Warp {
    /// Rotation and scaling, if drawn.
    pub affine: Option<Affine>,
    /// Elastic offsets over the output patch, if drawn.
    pub displacement: Option<Displacement>,
}

/// One sample's rotation and scaling draws. Only the first `dim` entries of `angles_rad` and
/// `scales` are drawn (2 for a 2D or dummy-2D patch); the rest stay 0 and 1.
#[derive(Debug, Clone, PartialEq)]
pub struct SpatialDraw {
    pub rotation: bool,
    pub scaling: bool,
    pub elastic: bool,
    /// Angles about axes (0, 1, 2), or in the plane (the last drawn one counts) for 2D; 0 unless
    /// `rotation`.
    pub angles_rad: [f64; 3],
    pub scales: [f64; 3],
}

impl SpatialDraw {
    /// The rotation-and-scaling matrix, if either fired.
    pub fn affine(&self, dim: usize) -> Option<Affine> {
        (self.rotation || self.scaling).then(|| {
            if dim == 3 {
                affine_3d(self.angles_rad, self.scales)
            } else {
                // 2D uses the last drawn angle, as batchgeneratorsv2 does (angles[-1])
                affine_2d(self.angles_rad[dim - 1], [self.scales[0], self.scales[1]])
            }
        })
    }
}

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
        check_prob(T, "p_elastic_deform", self.p_elastic_deform)?;
        check_prob(
            T,
            "p_synchronize_def_scale_across_axes",
            self.p_synchronize_def_scale_across_axes,
        )?;
        check_range(T, "elastic_deform_scale", self.elastic_deform_scale)?;
        check_range(T, "elastic_deform_magnitude", self.elastic_deform_magnitude)?;
        if !(self.patch_size.len() == 2 || self.patch_size.len() == 3) || self.patch_size.contains(&0) {
            return invalid(format!(
                "`patch_size` needs 2 or 3 non-zero entries, got {:?}",
                self.patch_size
            ));
        }
        if self.scaling[0] <= 0.0 {
            return invalid("`scaling` must be > 0".into());
        }
        // batchgeneratorsv2 would square a negative sigma away and clip a negative magnitude to 1e-8;
        // both are configuration mistakes, not intents
        if self.elastic_deform_scale[0] < 0.0 || self.elastic_deform_magnitude[0] < 0.0 {
            return invalid("`elastic_deform_scale` and `elastic_deform_magnitude` must be >= 0".into());
        }
        Ok(())
    }

    /// Draws rotation, scaling and elastic deformation in batchgeneratorsv2's order; `None` means
    /// "centre crop only".
    pub fn draw(&self, rng: &mut SampleRng) -> Option<Warp> {
        let drawn = self.draw_geometry(rng);
        let affine = drawn.affine(self.patch_size.len());
        let displacement = drawn.elastic.then(|| self.draw_displacement(rng));
        if affine.is_none() && displacement.is_none() {
            return None;
        }
        Some(Warp { affine, displacement })
    }

    /// The first part of [`Self::draw`], batchgeneratorsv2's `get_parameters` before the elastic
    /// noise: which parts fire, the angles and the scales. Observing these costs no resampling.
    pub fn draw_geometry(&self, rng: &mut SampleRng) -> SpatialDraw {
        let dim = self.patch_size.len();
        let rotation = rng.bernoulli(self.p_rotation);
        let scaling = rng.bernoulli(self.p_scaling);
        let elastic = rng.bernoulli(self.p_elastic_deform);
        let mut angles_rad = [0.0; 3];
        if rotation {
            for a in angles_rad.iter_mut().take(dim) {
                *a = sample_range(rng, self.rotation_deg).to_radians();
            }
            if self.p_rot_per_axis < 1.0 {
                for a in angles_rad.iter_mut().take(dim) {
                    if rng.next_f64() > self.p_rot_per_axis {
                        *a = 0.0;
                    }
                }
            }
        }
        let mut scales = [1.0; 3];
        if scaling {
            if rng.next_f64() <= self.p_synchronize_scaling_across_axes {
                scales = [sample_range(rng, self.scaling); 3];
            } else {
                for s in scales.iter_mut().take(dim) {
                    *s = sample_range(rng, self.scaling);
                }
            }
        }
        SpatialDraw {
            rotation,
            scaling,
            elastic,
            angles_rad,
            scales,
        }
    }

    /// batchgeneratorsv2's elastic draws: the shared-scale coin, the scales (fractions of the patch
    /// edge), the magnitudes, then the noise.
    fn draw_displacement(&self, rng: &mut SampleRng) -> Displacement {
        let dim = self.patch_size.len();
        let def_scales: Vec<f64> = if rng.next_f64() <= self.p_synchronize_def_scale_across_axes {
            vec![sample_range(rng, self.elastic_deform_scale); dim]
        } else {
            (0..dim)
                .map(|_| sample_range(rng, self.elastic_deform_scale))
                .collect()
        };
        let sigmas: Vec<f64> = (0..dim)
            .map(|d| def_scales[d] * self.patch_size[d] as f64)
            .collect();
        let magnitudes: Vec<f64> = (0..dim)
            .map(|_| sample_range(rng, self.elastic_deform_magnitude))
            .collect();
        Displacement::draw(
            &self.patch_size,
            &sigmas,
            &magnitudes,
            rng,
            self.center_deformation,
        )
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
        let warp = self.draw(rng);
        let (_, z, y, x) = sample.data.dim();
        let out = self.output_shape([z, y, x]);
        *sample = match warp {
            None => center_crop(sample, out, self.padding_value_seg),
            Some(w) => resample(
                sample,
                &w.affine.unwrap_or(IDENTITY),
                w.displacement.as_ref(),
                out,
                self.padding_value_seg,
            ),
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

/// Samples image and segmentation on the rotated / scaled grid (no elastic offsets).
pub fn resample_affine(sample: &Sample, a: &Affine, out: [usize; 3], pad_seg: i16) -> Sample {
    resample(sample, a, None, out, pad_seg)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn validation_accepts_elastic_probabilities_and_rejects_bad_values() {
        let p = SpatialParams {
            patch_size: vec![8, 8, 8],
            ..Default::default()
        };
        assert!(p.validate().is_ok());
        for ok in [0.0, 0.1, 1.0] {
            let q = SpatialParams {
                p_elastic_deform: ok,
                ..p.clone()
            };
            assert!(q.validate().is_ok(), "{ok}");
        }
        let bad = [
            SpatialParams {
                p_elastic_deform: 1.5,
                ..p.clone()
            },
            SpatialParams {
                p_elastic_deform: -0.1,
                ..p.clone()
            },
            SpatialParams {
                elastic_deform_scale: [0.2, 0.1],
                ..p.clone()
            },
            SpatialParams {
                elastic_deform_magnitude: [-1.0, 0.1],
                ..p.clone()
            },
            SpatialParams {
                p_synchronize_def_scale_across_axes: 2.0,
                ..p.clone()
            },
        ];
        for q in bad {
            assert!(q.validate().is_err(), "{q:?}");
        }
        assert!(SpatialParams {
            patch_size: vec![8],
            ..p
        }
        .validate()
        .is_err());
    }
}
