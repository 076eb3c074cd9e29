//! `mirror`: flips image and segmentation together along each allowed axis with probability 0.5
//! (batchgeneratorsv2 `MirrorTransform`).

use ndarray::Axis;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{check_axes, check_prob, AugmentError, Sample, SampleRng};

fn yes() -> bool {
    true
}

/// `mirror` parameters. Axes count (z, y, x): nnU-Net's 3D (0, 1, 2); its 2D (0, 1) is (1, 2) here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct MirrorParams {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Probability of considering mirroring at all (nnU-Net: always).
    pub p: f64,
    pub axes: Vec<usize>,
    pub p_per_axis: f64,
}

impl Default for MirrorParams {
    fn default() -> Self {
        Self {
            enabled: true,
            p: 1.0,
            axes: vec![0, 1, 2],
            p_per_axis: 0.5,
        }
    }
}

impl MirrorParams {
    pub fn validate(&self) -> Result<(), AugmentError> {
        const T: &str = "mirror";
        check_prob(T, "p", self.p)?;
        check_prob(T, "p_per_axis", self.p_per_axis)?;
        check_axes(T, "axes", &self.axes)
    }

    /// The axes flipped for one sample.
    pub fn draw(&self, rng: &mut SampleRng) -> Vec<usize> {
        self.axes
            .iter()
            .copied()
            .filter(|_| rng.bernoulli(self.p_per_axis))
            .collect()
    }

    pub fn apply(&self, sample: &mut Sample, rng: &mut SampleRng) {
        flip(sample, &self.draw(rng));
    }
}

/// Flips data and seg along the given spatial axes (0 = z). Only strides change; the pipeline returns
/// standard-layout arrays at the end.
pub fn flip(sample: &mut Sample, axes: &[usize]) {
    for &a in axes {
        sample.data.invert_axis(Axis(a + 1));
        sample.seg.invert_axis(Axis(a + 1));
    }
}
