//! nnU-Net's intensity normalization schemes (`preprocessing/normalization/`), chosen per channel by its
//! name in dataset.json, applied to each channel of a cropped case before resampling.
//!
//! Arithmetic is f32 throughout, as nnU-Net's `target_dtype=np.float32`: the statistics that come from
//! the fingerprint (f64) are rounded to f32 before use, as numpy does with Python floats; per-image means
//! and standard deviations are accumulated in f64 and then rounded to f32.

use ndarray::{Array3, ArrayView3, ArrayViewMut3, Zip};
use thiserror::Error;

use crate::data::fingerprint_format::IntensityStats;

/// Smallest divisor for a standard deviation or range (nnU-Net's eps for float32 targets).
const EPS: f32 = 1e-8;

#[derive(Debug, Error, PartialEq)]
pub enum NormalizeError {
    #[error("{0:?} needs the channel's foreground intensity statistics from the fingerprint")]
    MissingIntensityStats(Scheme),
    #[error("the mask for normalization must have the image's shape {image:?}, got {mask:?}")]
    MaskShape { image: Vec<usize>, mask: Vec<usize> },
    #[error("rgb_to_0_1 expects values in [0, 255], found {0}")]
    NotRgb(f32),
    #[error("unknown normalization scheme class {0:?}")]
    UnknownClass(String),
}

/// The normalization schemes of nnU-Net v2.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// `CTNormalization`: clip to the dataset's foreground [p0.5, p99.5], then standardize with the
    /// dataset's foreground mean and std.
    Ct,
    /// `ZScoreNormalization`: standardize with this image's mean and std (inside the mask if used).
    ZScore,
    /// `NoNormalization`: cast only.
    NoNorm,
    /// `RescaleTo01Normalization`: min/max to [0, 1].
    RescaleTo01,
    /// `RGBTo01Normalization`: divide by 255.
    RgbTo01,
}

impl Scheme {
    /// nnU-Net's `get_normalization_scheme`: the channel name, case-folded, looked up among "ct", "nonorm",
    /// "zscore", "rescale_to_0_1" and "rgb_to_0_1"; any other name gets z-scoring.
    pub fn for_channel_name(name: &str) -> Self {
        // Python's casefold() and to_lowercase() agree on these ASCII keys.
        match name.to_lowercase().as_str() {
            "ct" => Self::Ct,
            "nonorm" => Self::NoNorm,
            "rescale_to_0_1" => Self::RescaleTo01,
            "rgb_to_0_1" => Self::RgbTo01,
            _ => Self::ZScore,
        }
    }

    /// The class name that nnU-Net writes into the plans (`normalization_schemes`).
    pub fn class_name(self) -> &'static str {
        match self {
            Self::Ct => "CTNormalization",
            Self::ZScore => "ZScoreNormalization",
            Self::NoNorm => "NoNormalization",
            Self::RescaleTo01 => "RescaleTo01Normalization",
            Self::RgbTo01 => "RGBTo01Normalization",
        }
    }

    /// Parses a class name from nnU-Net plans.
    pub fn from_class_name(name: &str) -> Result<Self, NormalizeError> {
        [
            Self::Ct,
            Self::ZScore,
            Self::NoNorm,
            Self::RescaleTo01,
            Self::RgbTo01,
        ]
        .into_iter()
        .find(|s| s.class_name() == name)
        .ok_or_else(|| NormalizeError::UnknownClass(name.to_string()))
    }

    /// nnU-Net's `leaves_pixels_outside_mask_at_zero_if_use_mask_for_norm_is_true`: only z-scoring can
    /// normalize inside the nonzero mask alone.
    pub fn supports_mask(self) -> bool {
        self == Self::ZScore
    }

    /// The planner's `use_mask_for_norm` for a channel: the mask is used when cropping to the nonzero
    /// region removed more than a quarter of the median case, and the scheme supports it.
    pub fn use_mask_for_norm(self, median_relative_size_after_cropping: f64) -> bool {
        median_relative_size_after_cropping < 0.75 && self.supports_mask()
    }
}

/// Normalizes one channel into a new array. `seg` is the cropped segmentation whose negative values mark
/// the outside of the nonzero mask; it is read only by z-scoring with `use_mask_for_norm`.
pub fn normalize(
    image: ArrayView3<f32>,
    seg: Option<ArrayView3<i32>>,
    scheme: Scheme,
    use_mask_for_norm: bool,
    stats: Option<&IntensityStats>,
) -> Result<Array3<f32>, NormalizeError> {
    let mut out = image.to_owned();
    normalize_in_place(out.view_mut(), seg, scheme, use_mask_for_norm, stats)?;
    Ok(out)
}

/// [`normalize`] without the copy.
pub fn normalize_in_place(
    image: ArrayViewMut3<f32>,
    seg: Option<ArrayView3<i32>>,
    scheme: Scheme,
    use_mask_for_norm: bool,
    stats: Option<&IntensityStats>,
) -> Result<(), NormalizeError> {
    match scheme {
        Scheme::Ct => ct(image, stats.ok_or(NormalizeError::MissingIntensityStats(scheme))?),
        Scheme::ZScore => match (use_mask_for_norm, seg) {
            (true, Some(seg)) => {
                if seg.shape() != image.shape() {
                    return Err(NormalizeError::MaskShape {
                        image: image.shape().to_vec(),
                        mask: seg.shape().to_vec(),
                    });
                }
                zscore_masked(image, seg);
            }
            // nnU-Net asserts a mask is given when use_mask_for_norm is set but, past the assert, falls
            // back to the whole image; the caller always has the cropped seg, so the fallback is kept.
            _ => zscore(image),
        },
        Scheme::NoNorm => {}
        Scheme::RescaleTo01 => rescale_to_01(image),
        Scheme::RgbTo01 => rgb_to_01(image)?,
    }
    Ok(())
}

fn ct(mut image: ArrayViewMut3<f32>, stats: &IntensityStats) {
    let (lo, hi) = (stats.percentile_00_5 as f32, stats.percentile_99_5 as f32);
    let mean = stats.mean as f32;
    let std = (stats.std as f32).max(EPS);
    // max/min rather than clamp: clamp panics if a degenerate fingerprint has lo > hi; numpy's clip
    // then yields hi, and so does this.
    image.mapv_inplace(|v| (v.max(lo).min(hi) - mean) / std);
}

/// Mean and population std of the values, accumulated in f64 and rounded to f32 like numpy's float32
/// `mean()`/`std()`. `None` for no values.
fn mean_std<'a>(values: impl Iterator<Item = &'a f32> + Clone) -> Option<(f32, f32)> {
    let (n, sum) = values
        .clone()
        .fold((0usize, 0.0f64), |(n, s), &v| (n + 1, s + f64::from(v)));
    if n == 0 {
        return None;
    }
    let mean = sum / n as f64;
    let var = values.map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / n as f64;
    Some((mean as f32, var.sqrt() as f32))
}

fn zscore(mut image: ArrayViewMut3<f32>) {
    if let Some((mean, std)) = mean_std(image.iter()) {
        let std = std.max(EPS);
        image.mapv_inplace(|v| (v - mean) / std);
    }
}

fn zscore_masked(mut image: ArrayViewMut3<f32>, seg: ArrayView3<i32>) {
    let inside = image
        .iter()
        .zip(seg.iter())
        .filter(|(_, &s)| s >= 0)
        .map(|(v, _)| v);
    // An empty mask leaves the image as it is (numpy assigns to no element).
    if let Some((mean, std)) = mean_std(inside) {
        let std = std.max(EPS);
        Zip::from(&mut image).and(&seg).for_each(|v, &s| {
            if s >= 0 {
                *v = (*v - mean) / std;
            }
        });
    }
}

fn rescale_to_01(mut image: ArrayViewMut3<f32>) {
    let min = image.iter().cloned().fold(f32::INFINITY, f32::min);
    image.mapv_inplace(|v| v - min);
    let max = image.iter().cloned().fold(f32::NEG_INFINITY, f32::max).max(EPS);
    image.mapv_inplace(|v| v / max);
}

fn rgb_to_01(mut image: ArrayViewMut3<f32>) -> Result<(), NormalizeError> {
    if let Some(&bad) = image.iter().find(|v| !(0.0..=255.0).contains(*v)) {
        return Err(NormalizeError::NotRgb(bad));
    }
    image.mapv_inplace(|v| v / 255.0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array3;

    #[test]
    fn channel_names_map_case_insensitively_with_zscore_default() {
        assert_eq!(Scheme::for_channel_name("CT"), Scheme::Ct);
        assert_eq!(Scheme::for_channel_name("ct"), Scheme::Ct);
        assert_eq!(Scheme::for_channel_name("noNorm"), Scheme::NoNorm);
        assert_eq!(Scheme::for_channel_name("Rescale_To_0_1"), Scheme::RescaleTo01);
        assert_eq!(Scheme::for_channel_name("rgb_to_0_1"), Scheme::RgbTo01);
        assert_eq!(Scheme::for_channel_name("T2"), Scheme::ZScore);
        assert_eq!(Scheme::for_channel_name("MRI"), Scheme::ZScore);
    }

    #[test]
    fn class_names_round_trip() {
        for s in [
            Scheme::Ct,
            Scheme::ZScore,
            Scheme::NoNorm,
            Scheme::RescaleTo01,
            Scheme::RgbTo01,
        ] {
            assert_eq!(Scheme::from_class_name(s.class_name()), Ok(s));
        }
        assert!(Scheme::from_class_name("Foo").is_err());
    }

    #[test]
    fn mask_is_used_only_for_zscore_after_substantial_cropping() {
        assert!(Scheme::ZScore.use_mask_for_norm(0.5));
        assert!(!Scheme::ZScore.use_mask_for_norm(0.75));
        assert!(!Scheme::Ct.use_mask_for_norm(0.5));
    }

    #[test]
    fn masked_zscore_leaves_outside_untouched() {
        let image = Array3::from_shape_vec((1, 1, 4), vec![0.0, 2.0, 4.0, 9.0]).unwrap();
        let seg = Array3::from_shape_vec((1, 1, 4), vec![0, 1, 0, -1]).unwrap();
        let out = normalize(image.view(), Some(seg.view()), Scheme::ZScore, true, None).unwrap();
        let std = (8.0f32 / 3.0).sqrt();
        assert_eq!(out[[0, 0, 3]], 9.0);
        assert!((out[[0, 0, 0]] + 2.0 / std).abs() < 1e-6);
        assert!((out[[0, 0, 1]]).abs() < 1e-6);
    }

    #[test]
    fn constant_image_does_not_divide_by_zero() {
        let image = Array3::from_elem((2, 2, 2), 3.0f32);
        let out = normalize(image.view(), None, Scheme::ZScore, false, None).unwrap();
        assert!(out.iter().all(|&v| v == 0.0));
        let out = normalize(image.view(), None, Scheme::RescaleTo01, false, None).unwrap();
        assert!(out.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn ct_needs_stats_and_rgb_rejects_out_of_range() {
        let image = Array3::from_elem((1, 1, 1), 300.0f32);
        assert_eq!(
            normalize(image.view(), None, Scheme::Ct, false, None),
            Err(NormalizeError::MissingIntensityStats(Scheme::Ct))
        );
        assert_eq!(
            normalize(image.view(), None, Scheme::RgbTo01, false, None),
            Err(NormalizeError::NotRgb(300.0))
        );
    }
}
