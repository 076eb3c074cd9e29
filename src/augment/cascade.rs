//! The cascade's augmentation of the previous stage's segmentation (nnU-Net 2.8.1
//! `get_training_transforms` with `is_cascaded`): `random_binary_operator`
//! (`ApplyRandomBinaryOperatorTransform`: dilate, erode, open or close one label with a random ball) and
//! `remove_random_component` (`RemoveRandomConnectedComponentFromOneHotEncodingTransform`), plus the
//! one-hot encoding that turns that segmentation into extra input channels
//! (`MoveSegAsOneHotToDataTransform`, see [`move_previous_stage_to_data`]).
//!
//! nnU-Net moves the segmentation (seg channel 1) into the image as one-hot channels first and perturbs
//! those. Here both transforms act on the label map in seg channel 1 and the one-hot step comes after
//! the pipeline; the result is the same because nnU-Net's channels stay mutually exclusive: voxels an
//! operator adds to label `a` are cleared in the other channels (here: become `a`), voxels it takes
//! away end up in no channel (here: become background 0), and a removed component is cleared (or,
//! with `fill_with_other_class_p`, moved to one other label).
//!
//! A sample with one z plane is a 2D sample: nnU-Net then sees 2D arrays and uses `disk` instead of
//! `ball`, and 8- instead of 26-connectivity.

pub mod morphology;

use ndarray::{concatenate, Array3, Array4, ArrayView3, ArrayViewMut3, Axis, Zip};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use self::morphology::{ball, disk, BinaryOperator, Footprint};
use super::{check_prob, check_range, sample_range, AugmentError, Sample, SampleRng};
use crate::kernels::connected_components::{label_components, Connectivity};

/// The seg channel holding the previous stage's segmentation (nnU-Net's `source_channel_idx=1`).
pub const PREVIOUS_STAGE_CHANNEL: usize = 1;

fn yes() -> bool {
    true
}

/// `random_binary_operator` parameters (defaults: nnU-Net's cascade).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct RandomBinaryOperatorParams {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Probability of applying the transform to a sample.
    pub p: f64,
    /// Probability that each label is perturbed; labels are visited in random order and each sees the
    /// result of the ones before it.
    pub p_per_label: f64,
    /// Range of the footprint radius (a float: skimage's `ball` / `disk` of non-integer radius).
    pub strel_size: [f64; 2],
    /// The dataset's foreground labels; empty (the default) makes the transform a no-op until the
    /// trainer fills them in.
    pub labels: Vec<i16>,
}

impl Default for RandomBinaryOperatorParams {
    fn default() -> Self {
        Self {
            enabled: true,
            p: 0.4,
            p_per_label: 0.5,
            strel_size: [1.0, 8.0],
            labels: Vec::new(),
        }
    }
}

impl RandomBinaryOperatorParams {
    pub fn validate(&self) -> Result<(), AugmentError> {
        const T: &str = "random_binary_operator";
        check_prob(T, "p", self.p)?;
        check_prob(T, "p_per_label", self.p_per_label)?;
        check_range(T, "strel_size", self.strel_size)?;
        if self.strel_size[0] < 0.0 {
            return Err(AugmentError::Invalid {
                transform: T,
                message: "`strel_size` must be >= 0".into(),
            });
        }
        check_labels(T, &self.labels)
    }

    /// Draws in batchgeneratorsv2's order (label order, the per-label coin flips, then every chosen
    /// label's operator, then every radius) and applies the steps one after another.
    pub fn apply(&self, sample: &mut Sample, rng: &mut SampleRng) {
        let Some(mut seg) = previous_stage_mut(sample) else {
            return;
        };
        let chosen = choose_labels(rng, &self.labels, self.p_per_label);
        let operators: Vec<BinaryOperator> = chosen
            .iter()
            .map(|_| BinaryOperator::ALL[below(rng, BinaryOperator::ALL.len())])
            .collect();
        let radii: Vec<f64> = chosen
            .iter()
            .map(|_| sample_range(rng, self.strel_size))
            .collect();
        for ((&label, &operator), &radius) in chosen.iter().zip(&operators).zip(&radii) {
            apply_binary_operator(seg.view_mut(), label, operator, radius);
        }
    }
}

/// `remove_random_component` parameters (defaults: nnU-Net's cascade).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct RemoveRandomComponentParams {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Probability of applying the transform to a sample.
    pub p: f64,
    /// Probability that each label loses one component; labels are visited in random order.
    pub p_per_label: f64,
    /// Only components smaller than this fraction of the patch's voxels may be removed
    /// (batchgeneratorsv2's `dont_do_if_covers_more_than_x_percent`, a fraction despite its name).
    pub max_fraction: f64,
    /// Probability that a removed component is given to another foreground label (chosen uniformly)
    /// instead of background.
    pub fill_with_other_class_p: f64,
    /// The dataset's foreground labels; empty (the default) makes the transform a no-op until the
    /// trainer fills them in.
    pub labels: Vec<i16>,
}

impl Default for RemoveRandomComponentParams {
    fn default() -> Self {
        Self {
            enabled: true,
            p: 0.2,
            p_per_label: 0.5,
            max_fraction: 0.15,
            fill_with_other_class_p: 0.0,
            labels: Vec::new(),
        }
    }
}

impl RemoveRandomComponentParams {
    pub fn validate(&self) -> Result<(), AugmentError> {
        const T: &str = "remove_random_component";
        check_prob(T, "p", self.p)?;
        check_prob(T, "p_per_label", self.p_per_label)?;
        check_prob(T, "fill_with_other_class_p", self.fill_with_other_class_p)?;
        if !(self.max_fraction.is_finite() && self.max_fraction >= 0.0) {
            return Err(AugmentError::Invalid {
                transform: T,
                message: format!(
                    "`max_fraction` must be a finite fraction >= 0, got {}",
                    self.max_fraction
                ),
            });
        }
        check_labels(T, &self.labels)
    }

    /// For each chosen label present in the patch: one eligible component, drawn uniformly, becomes
    /// background (or another label, with `fill_with_other_class_p`).
    pub fn apply(&self, sample: &mut Sample, rng: &mut SampleRng) {
        let Some(mut seg) = previous_stage_mut(sample) else {
            return;
        };
        for label in choose_labels(rng, &self.labels, self.p_per_label) {
            let (components, eligible) = removable_components(seg.view(), label, self.max_fraction);
            if eligible.is_empty() {
                continue;
            }
            let removed = eligible[below(rng, eligible.len())];
            let mut fill = 0;
            if rng.bernoulli(self.fill_with_other_class_p) {
                let others: Vec<i16> = self.labels.iter().copied().filter(|&l| l != label).collect();
                if !others.is_empty() {
                    fill = others[below(rng, others.len())];
                }
            }
            replace_component(seg.view_mut(), &components, removed, fill);
        }
    }
}

/// One step of `random_binary_operator`: `operator` with a footprint of `radius` on the voxels of
/// `label`. Voxels it adds become `label` (whatever they were), voxels it removes become 0.
pub fn apply_binary_operator(mut seg: ArrayViewMut3<i16>, label: i16, operator: BinaryOperator, radius: f64) {
    let before = seg.map(|&v| v == label);
    let after = operator.apply(before.view(), &footprint(radius, seg.dim().0));
    Zip::from(&mut seg)
        .and(&before)
        .and(&after)
        .for_each(|v, &was, &is| match (was, is) {
            (false, true) => *v = label,
            (true, false) => *v = 0,
            _ => {}
        });
}

/// skimage's footprint for a patch: `disk` when the patch has one z plane (nnU-Net's 2D arrays),
/// `ball` otherwise.
pub fn footprint(radius: f64, depth: usize) -> Footprint {
    if depth == 1 {
        disk(radius)
    } else {
        ball(radius)
    }
}

/// The connected components of `label` (full connectivity, numbered as skimage numbers them) and the
/// ids of those smaller than `max_fraction` of the patch's voxel count, in increasing order.
pub fn removable_components(seg: ArrayView3<i16>, label: i16, max_fraction: f64) -> (Array3<u32>, Vec<u32>) {
    let mask = seg.map(|&v| v == label);
    let (components, sizes) = label_components(mask.view(), Connectivity::Full);
    let limit = seg.len() as f64 * max_fraction;
    let eligible = (1..=sizes.len() as u32)
        .filter(|&id| (sizes[id as usize - 1] as f64) < limit)
        .collect();
    (components, eligible)
}

/// Sets the voxels of component `id` to `fill`.
pub fn replace_component(mut seg: ArrayViewMut3<i16>, components: &Array3<u32>, id: u32, fill: i16) {
    Zip::from(&mut seg).and(components).for_each(|v, &c| {
        if c == id {
            *v = fill;
        }
    });
}

/// `MoveSegAsOneHotToDataTransform`'s encoding: one `(z, y, x)` channel per label, 1 where `seg`
/// equals it (values outside `labels`, background included, are 0 in every channel).
pub fn previous_stage_one_hot(seg: ArrayView3<i16>, labels: &[i16]) -> Array4<f32> {
    let (nz, ny, nx) = seg.dim();
    let mut out = Array4::zeros((labels.len(), nz, ny, nx));
    for (mut channel, &label) in out.outer_iter_mut().zip(labels) {
        Zip::from(&mut channel).and(&seg).for_each(|o, &v| {
            if v == label {
                *o = 1.0;
            }
        });
    }
    out
}

/// `MoveSegAsOneHotToDataTransform(source_channel_idx=1, remove_channel_from_source=True)`: the image
/// gains one channel per label after its own, and seg channel 1 is dropped.
pub fn move_previous_stage_to_data(sample: Sample, labels: &[i16]) -> Result<Sample, AugmentError> {
    let channels = sample.seg.len_of(Axis(0));
    if channels <= PREVIOUS_STAGE_CHANNEL {
        return Err(AugmentError::Invalid {
            transform: "previous_stage_one_hot",
            message: format!("the sample has {channels} seg channel(s); the previous stage's is channel 1"),
        });
    }
    let one_hot = previous_stage_one_hot(sample.seg.index_axis(Axis(0), PREVIOUS_STAGE_CHANNEL), labels);
    let data = concatenate(Axis(0), &[sample.data.view(), one_hot.view()]).expect("same spatial shape");
    let keep: Vec<usize> = (0..channels).filter(|&c| c != PREVIOUS_STAGE_CHANNEL).collect();
    let seg = sample.seg.select(Axis(0), &keep);
    Ok(Sample { data, seg })
}

/// Seg channel 1, if the sample has one.
fn previous_stage_mut(sample: &mut Sample) -> Option<ArrayViewMut3<'_, i16>> {
    (sample.seg.len_of(Axis(0)) > PREVIOUS_STAGE_CHANNEL)
        .then(|| sample.seg.index_axis_mut(Axis(0), PREVIOUS_STAGE_CHANNEL))
}

/// The labels in a random order (batchgeneratorsv2 shuffles its channel list every call), then kept
/// with probability `p_per_label` each.
fn choose_labels(rng: &mut SampleRng, labels: &[i16], p_per_label: f64) -> Vec<i16> {
    let mut order = labels.to_vec();
    // Fisher-Yates
    for i in (1..order.len()).rev() {
        order.swap(i, below(rng, i + 1));
    }
    order.into_iter().filter(|_| rng.bernoulli(p_per_label)).collect()
}

/// Uniform in `0..n` (n > 0), as the patch sampler draws indices.
fn below(rng: &mut SampleRng, n: usize) -> usize {
    (rng.next_u64() % n as u64) as usize
}

fn check_labels(transform: &'static str, labels: &[i16]) -> Result<(), AugmentError> {
    let mut seen = labels.to_vec();
    seen.sort_unstable();
    seen.dedup();
    if seen.len() != labels.len() || seen.first().is_some_and(|&l| l <= 0) {
        return Err(AugmentError::Invalid {
            transform,
            message: format!("`labels` must be distinct foreground labels (> 0), got {labels:?}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_with_previous_stage(previous: Array3<i16>) -> Sample {
        let (nz, ny, nx) = previous.dim();
        let mut seg = Array4::zeros((2, nz, ny, nx));
        seg.index_axis_mut(Axis(0), 1).assign(&previous);
        Sample {
            data: Array4::zeros((1, nz, ny, nx)),
            seg,
        }
    }

    #[test]
    fn binary_operator_keeps_labels_exclusive_and_only_touches_its_label() {
        let mut seg = Array3::zeros((1, 7, 7));
        seg[[0, 3, 3]] = 1;
        seg[[0, 3, 4]] = 2;
        seg[[0, 0, 0]] = 3;
        apply_binary_operator(seg.view_mut(), 1, BinaryOperator::Dilation, 1.0);
        // the disk of radius 1 around (3, 3) overwrites label 2 but not the far label 3
        assert_eq!(seg[[0, 3, 4]], 1);
        assert_eq!(seg[[0, 2, 3]], 1);
        assert_eq!(seg[[0, 2, 2]], 0);
        assert_eq!(seg[[0, 0, 0]], 3);
        apply_binary_operator(seg.view_mut(), 1, BinaryOperator::Erosion, 1.0);
        assert_eq!(seg.iter().filter(|&&v| v == 1).count(), 1);
        assert_eq!(seg[[0, 3, 3]], 1);
    }

    #[test]
    fn no_second_seg_channel_or_no_labels_is_a_no_op() {
        let mut rng = SampleRng::new(0, 0, 0);
        let op = RandomBinaryOperatorParams {
            p_per_label: 1.0,
            labels: vec![1],
            ..Default::default()
        };
        let mut single = Sample {
            data: Array4::zeros((1, 2, 3, 4)),
            seg: Array4::ones((1, 2, 3, 4)),
        };
        let before = single.clone();
        op.apply(&mut single, &mut rng);
        assert_eq!(single, before);
        let mut s = sample_with_previous_stage(Array3::ones((2, 3, 4)));
        let before = s.clone();
        RandomBinaryOperatorParams {
            p_per_label: 1.0,
            ..Default::default()
        }
        .apply(&mut s, &mut rng);
        assert_eq!(s, before);
    }

    #[test]
    fn validation_rejects_bad_labels_and_fractions() {
        let bad = RandomBinaryOperatorParams {
            labels: vec![1, 1],
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        let bad = RemoveRandomComponentParams {
            labels: vec![0, 1],
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        let bad = RemoveRandomComponentParams {
            max_fraction: -0.1,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        assert!(RemoveRandomComponentParams::default().validate().is_ok());
        assert!(RandomBinaryOperatorParams::default().validate().is_ok());
    }

    #[test]
    fn shuffle_visits_every_order() {
        let mut rng = SampleRng::new(3, 0, 0);
        let mut orders = std::collections::BTreeSet::new();
        for _ in 0..200 {
            orders.insert(choose_labels(&mut rng, &[1, 2, 3], 1.0));
        }
        assert_eq!(orders.len(), 6);
    }

    #[test]
    fn one_hot_moves_channel_one_into_the_image() {
        let mut previous = Array3::zeros((1, 2, 3));
        previous[[0, 0, 1]] = 2;
        previous[[0, 1, 2]] = 5; // not a foreground label: no channel
        let s = move_previous_stage_to_data(sample_with_previous_stage(previous), &[1, 2]).unwrap();
        assert_eq!(s.data.dim(), (3, 1, 2, 3));
        assert_eq!(s.seg.dim(), (1, 1, 2, 3));
        assert!(s.data.index_axis(Axis(0), 1).iter().all(|&v| v == 0.0));
        assert_eq!(s.data.index_axis(Axis(0), 2).sum(), 1.0);
        assert_eq!(s.data[[2, 0, 0, 1]], 1.0);
        let single = Sample {
            data: Array4::zeros((1, 1, 1, 1)),
            seg: Array4::zeros((1, 1, 1, 1)),
        };
        assert!(move_previous_stage_to_data(single, &[1]).is_err());
    }
}
