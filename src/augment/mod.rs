//! Training-time data augmentation, as nnU-Net v2.8.1 configures batchgeneratorsv2 in
//! `nnUNetTrainer.get_training_transforms`, written as pure functions on arrays.
//!
//! A [`Sample`] holds `data: (C, z, y, x)` f32 and `seg: (1, z, y, x)` i16 (`-1` = outside the nonzero
//! mask; a second seg channel in cascaded configurations, see below). Two-dimensional configurations store their slices with `z = 1`: the spatial transform then
//! works in the (y, x) plane (its `patch_size` has two entries), and blur / low-resolution treat an axis of
//! length 1 as absent, exactly as if the array had no z axis. Axis indices in every parameter struct count
//! the spatial axes of the 4D array (0 = z, 1 = y, 2 = x), so nnU-Net's 2D mirror axes (0, 1) are (1, 2)
//! here. nnU-Net's "dummy 2D" augmentation of anisotropic 3D patches is the same 2D spatial transform
//! applied to every z slice with one set of parameters (batchgeneratorsv2 folds z into channels for it).
//!
//! Module map: [`rng`] (seeded per-sample randomness), [`pipeline`] (registry, config, ordering, batch),
//! [`da_config`] (nnU-Net's rotation / dummy-2D / initial patch size decisions), one module per transform
//! family ([`spatial`], [`intensity`], [`blur`], [`low_resolution`], [`mirror`], [`seg`], and
//! [`cascade`] for the previous stage's segmentation with its [`cascade::morphology`]), and the
//! spatial transform's parts ([`elastic`] displacement fields, [`resample`] grid sampling).
//!
//! Cascaded configurations carry the previous stage's segmentation as a label map in seg channel 1
//! (`seg: (2, z, y, x)`); every transform moves it with the target, [`cascade`]'s transforms perturb
//! it, and [`cascade::move_previous_stage_to_data`] turns it into one-hot image channels afterwards.

pub mod blur;
pub mod cascade;
pub mod da_config;
pub mod elastic;
pub mod intensity;
pub mod low_resolution;
pub mod mirror;
pub mod pipeline;
pub mod resample;
pub mod rng;
pub mod seg;
pub mod spatial;

use ndarray::Array4;

pub use da_config::DaConfig;
pub use pipeline::{Pipeline, TransformSpec};
pub use rng::SampleRng;

/// One training sample: image `(C, z, y, x)` and segmentation `(1, z, y, x)` (`(2, z, y, x)` with the
/// previous stage's segmentation in a cascade).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub data: Array4<f32>,
    pub seg: Array4<i16>,
}

/// Everything that can go wrong when configuring or applying augmentation.
#[derive(Debug, thiserror::Error)]
pub enum AugmentError {
    /// The pipeline is not the JSON of a transform list.
    #[error("invalid augmentation config: {0}")]
    Json(#[source] serde_json::Error),
    /// Every problem of the config, joined.
    #[error("invalid augmentation config: {0}")]
    Config(String),
    #[error("transform `{transform}`: {message}")]
    Invalid {
        transform: &'static str,
        message: String,
    },
    #[error("sample shape mismatch: data {data:?} vs seg {seg:?} (spatial shapes must agree, seg has 1+ channels)")]
    Shape { data: Vec<usize>, seg: Vec<usize> },
}

/// Draws from `[lo, hi]` like batchgeneratorsv2's `sample_scalar` (a degenerate range returns `lo`).
pub(crate) fn sample_range(rng: &mut SampleRng, range: [f64; 2]) -> f64 {
    if range[0] == range[1] {
        range[0]
    } else {
        rng.uniform(range[0], range[1])
    }
}

/// batchgeneratorsv2's `BGContrast`: with probability 0.5 (and only if the range reaches below 1) draw
/// from `[lo, 1)`, otherwise from `[max(lo, 1), hi)`, so shrinking and growing are equally likely even
/// for asymmetric ranges such as (0.7, 1.5).
pub(crate) fn sample_bg_contrast(rng: &mut SampleRng, range: [f64; 2]) -> f64 {
    if rng.next_f64() < 0.5 && range[0] < 1.0 {
        rng.uniform(range[0], 1.0)
    } else {
        rng.uniform(range[0].max(1.0), range[1])
    }
}

/// Checks `lo <= hi` and finiteness of a range parameter.
pub(crate) fn check_range(transform: &'static str, field: &str, r: [f64; 2]) -> Result<(), AugmentError> {
    if !(r[0].is_finite() && r[1].is_finite() && r[0] <= r[1]) {
        return Err(AugmentError::Invalid {
            transform,
            message: format!("`{field}` must be a finite [low, high] with low <= high, got {r:?}"),
        });
    }
    Ok(())
}

/// Checks that a probability lies in [0, 1].
pub(crate) fn check_prob(transform: &'static str, field: &str, p: f64) -> Result<(), AugmentError> {
    if !(0.0..=1.0).contains(&p) {
        return Err(AugmentError::Invalid {
            transform,
            message: format!("`{field}` must be a probability in [0, 1], got {p}"),
        });
    }
    Ok(())
}

/// Checks that axis indices address (z, y, x).
pub(crate) fn check_axes(transform: &'static str, field: &str, axes: &[usize]) -> Result<(), AugmentError> {
    if let Some(a) = axes.iter().find(|&&a| a > 2) {
        return Err(AugmentError::Invalid {
            transform,
            message: format!("`{field}` holds axis {a}; axes are 0 = z, 1 = y, 2 = x"),
        });
    }
    Ok(())
}
