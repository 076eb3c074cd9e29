//! nnU-Net's training patch sampler (`nnUNetDataLoader`) over preprocessed cases
//! ([`CaseReader`]: each crop reads only the chunks it touches).
//!
//! A batch picks `batch_size` cases uniformly with replacement. Sample `j` is forced to contain
//! foreground when `j >= round(batch_size * (1 - oversample))` (the last third by default): it is
//! centred on a stored location of a randomly chosen class present in the case. Other samples are
//! placed uniformly, allowing the patch to hang over the border by half the padding nnU-Net
//! computes (`need_to_pad`). The crop is the enlarged patch the spatial augmentation needs; outside
//! the image, data is 0 and the segmentation -1. Two-dimensional configurations sample one slice
//! (patch depth 1). The randomness comes from the sample's own stream, so a batch depends only on
//! (seed, epoch, iteration), never on thread timing.

use std::collections::BTreeMap;

use rayon::prelude::*;

use crate::augment::{Sample, SampleRng};
use crate::train::TrainError;

use crate::train::case_reader::CaseReader;

pub struct PatchSampler {
    pub cases: Vec<CaseReader>,
    /// The crop size (nnU-Net's `patch_size` of the loader: the enlarged patch for training).
    pub crop_size: [usize; 3],
    /// The network's patch; `crop_size - patch_size` is the padding allowance.
    pub patch_size: [usize; 3],
    pub batch_size: usize,
    pub oversample_foreground: f64,
    pub has_ignore_label: bool,
}

impl PatchSampler {
    /// Whether sample `j` of a batch must contain foreground.
    pub fn force_foreground(&self, j: usize) -> bool {
        let random_count = (self.batch_size as f64 * (1.0 - self.oversample_foreground)).round_ties_even();
        (j as f64) >= random_count
    }

    /// One batch of crops (before augmentation), read in parallel (each decodes its chunks).
    /// `rng` is the batch's own stream.
    pub fn draw(&self, rng: &mut SampleRng) -> Result<Vec<(usize, Sample)>, TrainError> {
        self.place(rng)
            .into_par_iter()
            .map(|(case_index, placement)| {
                let crop = self.cases[case_index].crop(placement.lower, self.crop_size)?;
                Ok((case_index, crop))
            })
            .collect()
    }

    /// Where [`Self::draw`] crops, from the same stream: per sample the case index and placement.
    pub fn place(&self, rng: &mut SampleRng) -> Vec<(usize, Placement<'_>)> {
        (0..self.batch_size)
            .map(|j| {
                let case_index = (rng.next_u64() % self.cases.len() as u64) as usize;
                let placement = self.placement(&self.cases[case_index], self.force_foreground(j), rng);
                (case_index, placement)
            })
            .collect()
    }

    /// nnU-Net's `get_bbox`: the lower corner of the crop.
    pub fn bbox_lower(&self, case: &CaseReader, force_fg: bool, rng: &mut SampleRng) -> [i64; 3] {
        self.placement(case, force_fg, rng).lower
    }

    /// nnU-Net's `get_bbox` with the class-locations key it centred the crop on, if any.
    pub fn placement<'a>(&self, case: &'a CaseReader, force_fg: bool, rng: &mut SampleRng) -> Placement<'a> {
        let shape = [case.shape[1], case.shape[2], case.shape[3]];
        let mut lbs = [0i64; 3];
        let mut ubs = [0i64; 3];
        for d in 0..3 {
            let mut need = self.crop_size[d] as i64 - self.patch_size[d] as i64;
            if need + (shape[d] as i64) < self.crop_size[d] as i64 {
                need = self.crop_size[d] as i64 - shape[d] as i64;
            }
            // Python's `-need // 2` floors the negated value
            lbs[d] = (-need).div_euclid(2);
            ubs[d] = shape[d] as i64 + need / 2 + need % 2 - self.crop_size[d] as i64;
        }
        let uniform = |rng: &mut SampleRng| -> [i64; 3] {
            [0, 1, 2].map(|d| lbs[d] + (rng.next_u64() % (ubs[d] - lbs[d] + 1) as u64) as i64)
        };
        let random = |rng: &mut SampleRng| Placement {
            lower: uniform(rng),
            class: None,
        };
        if !force_fg && !self.has_ignore_label {
            return random(rng);
        }
        let annotated = |key: &str| key.starts_with("[-1");
        let eligible: Vec<&(String, Vec<[usize; 4]>)> = if force_fg {
            let fg: Vec<_> = case
                .class_locations
                .iter()
                .filter(|(k, _)| !annotated(k))
                .collect();
            // only the annotated-voxels key left: nnU-Net then samples from it
            if fg.is_empty() {
                case.class_locations.iter().collect()
            } else {
                fg
            }
        } else {
            case.class_locations
                .iter()
                .filter(|(k, _)| annotated(k))
                .collect()
        };
        if eligible.is_empty() {
            return random(rng);
        }
        let (class, voxels) = eligible[(rng.next_u64() % eligible.len() as u64) as usize];
        let voxel = voxels[(rng.next_u64() % voxels.len() as u64) as usize];
        Placement {
            lower: [0, 1, 2].map(|d| lbs[d].max(voxel[d + 1] as i64 - (self.crop_size[d] / 2) as i64)),
            class: Some(class.as_str()),
        }
    }
}

/// Where one crop goes.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement<'a> {
    /// The crop's lower corner (z, y, x); negative or past the end where it hangs over the border.
    pub lower: [i64; 3],
    /// The class-locations key whose stored voxel the crop is centred on; `None` for a uniform
    /// placement.
    pub class: Option<&'a str>,
}

/// Per-class location counts of the cases, for the log.
pub fn class_location_summary(cases: &[CaseReader]) -> BTreeMap<String, usize> {
    let mut summary = BTreeMap::new();
    for case in cases {
        for (key, voxels) in &case.class_locations {
            *summary.entry(key.clone()).or_default() += voxels.len();
        }
    }
    summary
}
