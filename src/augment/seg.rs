//! Segmentation housekeeping at the end of nnU-Net's pipeline: `mask_image` (MaskImageTransform: zero
//! the image outside the nonzero mask for channels normalised with the mask), `remove_label`
//! (RemoveLabelTransform: -1 -> 0), and deep-supervision targets ([`downsample_seg`], the trainer's
//! DownsampleSegForDSTransform, nearest-exact).

use ndarray::{Array4, ArrayView4, Axis, Zip};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{check_prob, AugmentError, Sample, SampleRng};

fn yes() -> bool {
    true
}

/// `mask_image` parameters: which image channels to zero where `seg < 0` (nnU-Net: the channels with
/// `use_mask_for_norm`; none by default, which makes the transform a no-op).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct MaskImageParams {
    #[serde(default = "yes")]
    pub enabled: bool,
    pub p: f64,
    pub channels: Vec<usize>,
    pub set_outside_to: f32,
}

impl Default for MaskImageParams {
    fn default() -> Self {
        Self {
            enabled: true,
            p: 1.0,
            channels: Vec::new(),
            set_outside_to: 0.0,
        }
    }
}

impl MaskImageParams {
    pub fn validate(&self) -> Result<(), AugmentError> {
        check_prob("mask_image", "p", self.p)
    }

    /// Channels beyond the sample's channel count are skipped.
    pub fn apply(&self, sample: &mut Sample, _rng: &mut SampleRng) {
        let n = sample.data.len_of(Axis(0));
        let outside = sample.seg.index_axis(Axis(0), 0);
        for &c in self.channels.iter().filter(|&&c| c < n) {
            Zip::from(sample.data.index_axis_mut(Axis(0), c))
                .and(&outside)
                .for_each(|v, &s| {
                    if s < 0 {
                        *v = self.set_outside_to;
                    }
                });
        }
    }
}

/// `remove_label` parameters (nnU-Net: -1 -> 0 on every seg channel).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct RemoveLabelParams {
    #[serde(default = "yes")]
    pub enabled: bool,
    pub p: f64,
    pub label: i16,
    pub set_to: i16,
}

impl Default for RemoveLabelParams {
    fn default() -> Self {
        Self {
            enabled: true,
            p: 1.0,
            label: -1,
            set_to: 0,
        }
    }
}

impl RemoveLabelParams {
    pub fn validate(&self) -> Result<(), AugmentError> {
        check_prob("remove_label", "p", self.p)
    }

    pub fn apply(&self, sample: &mut Sample, _rng: &mut SampleRng) {
        sample
            .seg
            .mapv_inplace(|v| if v == self.label { self.set_to } else { v });
    }
}

/// Deep-supervision targets: for each per-axis scale (z, y, x), the segmentation resized with torch's
/// 'nearest-exact' to `round(size * scale)` (half to even). All-ones scales return a copy.
pub fn downsample_seg(seg: ArrayView4<i16>, scales: &[[f64; 3]]) -> Vec<Array4<i16>> {
    scales.iter().map(|s| downsample_one(seg, *s)).collect()
}

fn downsample_one(seg: ArrayView4<i16>, scale: [f64; 3]) -> Array4<i16> {
    let (c, dz, dy, dx) = seg.dim();
    let src = [dz, dy, dx];
    let dst = [0, 1, 2].map(|a| ((src[a] as f64 * scale[a]).round_ties_even() as usize).max(1));
    let index = |a: usize| -> Vec<usize> {
        let ratio = src[a] as f32 / dst[a] as f32;
        (0..dst[a])
            .map(|d| (((d as f32 + 0.5) * ratio).floor() as usize).min(src[a] - 1))
            .collect()
    };
    let (iz, iy, ix) = (index(0), index(1), index(2));
    Array4::from_shape_fn((c, dst[0], dst[1], dst[2]), |(ch, z, y, x)| {
        seg[[ch, iz[z], iy[y], ix[x]]]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remove_label_and_mask() {
        let seg = Array4::from_shape_vec((1, 1, 1, 4), vec![-1i16, 0, 2, -1]).unwrap();
        let data = Array4::from_elem((2, 1, 1, 4), 5.0f32);
        let mut s = Sample { data, seg };
        let mut rng = SampleRng::new(0, 0, 0);
        MaskImageParams {
            channels: vec![1, 7],
            ..Default::default()
        }
        .apply(&mut s, &mut rng);
        assert_eq!(
            s.data.index_axis(Axis(0), 1).iter().copied().collect::<Vec<_>>(),
            vec![0.0, 5.0, 5.0, 0.0]
        );
        assert!(s.data.index_axis(Axis(0), 0).iter().all(|&v| v == 5.0));
        RemoveLabelParams::default().apply(&mut s, &mut rng);
        assert_eq!(s.seg.iter().copied().collect::<Vec<_>>(), vec![0, 0, 2, 0]);
    }

    #[test]
    fn downsample_shapes_and_identity() {
        let seg = Array4::from_shape_fn((1, 8, 10, 12), |(_, z, y, x)| ((z + y + x) % 3) as i16);
        let out = downsample_seg(seg.view(), &[[1.0; 3], [0.5; 3], [1.0, 0.25, 0.25]]);
        assert_eq!(out[0], seg);
        assert_eq!(out[1].dim(), (1, 4, 5, 6));
        assert_eq!(out[2].dim(), (1, 8, 2, 3));
        assert_eq!(out[1][[0, 1, 1, 1]], seg[[0, 2, 2, 2]]);
    }
}
