//! The dataset fingerprint, as nnU-Net's `DatasetFingerprintExtractor` computes it: per case,
//! crop to the nonzero region and record spacing, shape after crop and the fraction of voxels
//! kept, and sample foreground (label > 0) intensities of every channel; then pool the samples
//! into per-channel intensity statistics.
//!
//! Sampling reproduces nnU-Net's numbers exactly: every case draws `int(10e7 // n_cases)`
//! samples per channel with replacement from a fresh `RandomState(1234)` (channels in order from
//! the same stream), so every case weighs the same however large its foreground is.
//!
//! Memory: cases run in parallel on a pool of `threads` workers; a worker holds one case's voxels
//! at a time and keeps only its samples.

use std::collections::BTreeMap;
use std::path::PathBuf;

use ndarray::{Array3, ArrayView3, Zip};
use rayon::prelude::*;

use crate::data::dataset::{Case, Dataset};
use crate::data::fingerprint_format::{Fingerprint, IntensityStats};
use crate::data::image::{self, ImageError};
use crate::data::integrity::{non_finite, non_finite_problem, NonFinite};
use crate::preprocess::crop::nonzero_bounding_box;
use crate::preprocess::numpy_random::RandomState;

/// Foreground samples per channel over the whole dataset (nnU-Net's
/// `num_foreground_voxels_for_intensitystats`, `10e7`).
pub const FOREGROUND_SAMPLES_TOTAL: usize = 100_000_000;
/// Seed of every case's `RandomState` (nnU-Net's `collect_foreground_intensities` default).
pub const SAMPLING_SEED: u64 = 1234;

#[derive(Debug, thiserror::Error)]
pub enum FingerprintError {
    #[error("the dataset has no training cases")]
    NoCases,
    #[error("the dataset has no channels")]
    NoChannels,
    #[error("case {case}: {source}")]
    Read { case: String, source: ImageError },
    #[error("case {case}: {what} {}: shape (z, y, x) {found:?} differs from channel 0's {expected:?}",
            file.display())]
    ShapeMismatch {
        case: String,
        what: &'static str,
        file: PathBuf,
        found: [usize; 3],
        expected: [usize; 3],
    },
    #[error("case {case}: channel {channel} has spacing {found:?}, channel 0 has {expected:?}")]
    SpacingMismatch {
        case: String,
        channel: usize,
        found: [f64; 3],
        expected: [f64; 3],
    },
    /// NaN, +Inf or -Inf voxels: the intensity statistics would be NaN or infinite, which the
    /// fingerprint (JSON) cannot hold.
    #[error("{}", non_finite_problem(case, *channel, found, file))]
    NonFinite {
        case: String,
        channel: usize,
        file: PathBuf,
        found: NonFinite,
    },
    #[error(
        "no case has foreground (label > 0) inside its nonzero region; intensity statistics of \
             channel {channel} are undefined"
    )]
    NoForeground { channel: usize },
    #[error("cannot start {threads} worker threads: {source}")]
    ThreadPool {
        threads: usize,
        source: rayon::ThreadPoolBuildError,
    },
}

/// What one case contributes to the fingerprint.
#[derive(Clone, Debug, PartialEq)]
pub struct CaseFingerprint {
    /// Voxel spacing, (z, y, x).
    pub spacing: [f64; 3],
    pub shape_before_crop: [usize; 3],
    pub shape_after_crop: [usize; 3],
    /// Voxels after crop / voxels before crop.
    pub relative_size_after_crop: f64,
    /// Per channel: sampled foreground intensities (empty if the case has no foreground).
    pub foreground_samples: Vec<Vec<f32>>,
}

/// Crops one case and samples `samples_per_case` foreground intensities per channel, with
/// replacement, from `RandomState(seed)`, in C order of the cropped foreground (as numpy's
/// boolean indexing lists it). numpy seeds are 32-bit: higher bits of `seed` are ignored.
///
/// Panics if images and segmentation differ in shape (see [`dataset_fingerprint`], which checks).
pub fn case_fingerprint(
    images: Vec<Array3<f32>>,
    seg: Array3<i32>,
    spacing: [f64; 3],
    samples_per_case: usize,
    seed: u64,
) -> CaseFingerprint {
    // Only the crop box matters here (foreground is `seg > 0`, whatever the filled mask says), so
    // no cropped copies and no hole filling.
    assert_eq!(
        seg.shape(),
        images[0].shape(),
        "segmentation must have the image's shape"
    );
    let shape_before_crop: [usize; 3] = seg.shape().try_into().expect("3D");
    let bbox = nonzero_bounding_box(&images);
    let shape_after_crop = bbox.shape();
    let seg = bbox.cut(&seg);
    let mut rng = RandomState::new(seed as u32);
    let foreground_samples = images
        .iter()
        .map(|channel| {
            let foreground = foreground_values(bbox.cut(channel), seg);
            sample_with_replacement(&foreground, samples_per_case, &mut rng)
        })
        .collect();
    CaseFingerprint {
        spacing,
        shape_before_crop,
        shape_after_crop,
        relative_size_after_crop: voxels(shape_after_crop) as f64 / voxels(shape_before_crop) as f64,
        foreground_samples,
    }
}

fn voxels(shape: [usize; 3]) -> usize {
    shape.iter().product()
}

/// Values of `channel` where `seg > 0`, in C order.
fn foreground_values(channel: ArrayView3<f32>, seg: ArrayView3<i32>) -> Vec<f32> {
    let mut values = Vec::new();
    Zip::from(channel).and(seg).for_each(|&v, &label| {
        if label > 0 {
            values.push(v);
        }
    });
    values
}

/// nnU-Net samples nothing (and draws no random numbers) from an empty foreground.
fn sample_with_replacement(population: &[f32], count: usize, rng: &mut RandomState) -> Vec<f32> {
    if population.is_empty() {
        return Vec::new();
    }
    (0..count)
        .map(|_| population[rng.below(population.len() as u64) as usize])
        .collect()
}

/// The fingerprint of `dataset`'s training cases with nnU-Net's sample budget.
pub fn dataset_fingerprint(dataset: &Dataset, threads: usize) -> Result<Fingerprint, FingerprintError> {
    dataset_fingerprint_with_budget(dataset, threads, FOREGROUND_SAMPLES_TOTAL)
}

/// Like [`dataset_fingerprint`] with `samples_total` foreground samples per channel split evenly
/// over the cases (`samples_total / n_cases` each, rounded down as nnU-Net does).
pub fn dataset_fingerprint_with_budget(
    dataset: &Dataset,
    threads: usize,
    samples_total: usize,
) -> Result<Fingerprint, FingerprintError> {
    if dataset.cases.is_empty() {
        return Err(FingerprintError::NoCases);
    }
    if dataset.channels.is_empty() {
        return Err(FingerprintError::NoChannels);
    }
    let samples_per_case = samples_total / dataset.cases.len();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|source| FingerprintError::ThreadPool { threads, source })?;
    let cases: Vec<CaseFingerprint> = pool.install(|| {
        dataset
            .cases
            .par_iter()
            .map(|case| analyze_case(case, samples_per_case))
            .collect::<Result<_, _>>()
    })?;
    aggregate(cases, dataset.channels.len())
}

/// Reads one case, checks that its files agree, and fingerprints it.
fn analyze_case(case: &Case, samples_per_case: usize) -> Result<CaseFingerprint, FingerprintError> {
    let read_error = |source| FingerprintError::Read {
        case: case.id.clone(),
        source,
    };
    let mut images: Vec<Array3<f32>> = Vec::with_capacity(case.images.len());
    let mut spacing = [0.0; 3];
    for path in &case.images {
        // A file may hold several channels (RGB pictures, 4D NIfTI).
        let decoded = image::read(path).map_err(read_error)?;
        let file_spacing = decoded.geometry.spacing_zyx();
        for data in decoded.channels {
            let channel = images.len();
            if channel == 0 {
                spacing = file_spacing;
            } else {
                check_shape(case, "channel image", path, data.dim(), images[0].dim())?;
                if file_spacing != spacing {
                    return Err(FingerprintError::SpacingMismatch {
                        case: case.id.clone(),
                        channel,
                        found: file_spacing,
                        expected: spacing,
                    });
                }
            }
            if let Some(found) = non_finite(&data) {
                return Err(FingerprintError::NonFinite {
                    case: case.id.clone(),
                    channel,
                    file: path.clone(),
                    found,
                });
            }
            images.push(data);
        }
    }
    let (seg, _) = image::read_labels(&case.label).map_err(read_error)?;
    check_shape(case, "label", &case.label, seg.dim(), images[0].dim())?;
    Ok(case_fingerprint(
        images,
        seg,
        spacing,
        samples_per_case,
        SAMPLING_SEED,
    ))
}

fn check_shape(
    case: &Case,
    what: &'static str,
    file: &std::path::Path,
    found: (usize, usize, usize),
    expected: (usize, usize, usize),
) -> Result<(), FingerprintError> {
    if found == expected {
        return Ok(());
    }
    Err(FingerprintError::ShapeMismatch {
        case: case.id.clone(),
        what,
        file: file.to_path_buf(),
        found: found.into(),
        expected: expected.into(),
    })
}

/// Pools the cases (in case order) into the fingerprint. Consumes the samples channel by channel
/// so that at most one channel's pooled samples exist besides the per-case ones.
pub fn aggregate(mut cases: Vec<CaseFingerprint>, channels: usize) -> Result<Fingerprint, FingerprintError> {
    let mut stats = BTreeMap::new();
    for channel in 0..channels {
        let mut pooled = Vec::with_capacity(cases.iter().map(|c| c.foreground_samples[channel].len()).sum());
        for case in &mut cases {
            pooled.append(&mut case.foreground_samples[channel]);
            case.foreground_samples[channel].shrink_to_fit();
        }
        let channel_stats = intensity_stats(&mut pooled).ok_or(FingerprintError::NoForeground { channel })?;
        stats.insert(channel.to_string(), channel_stats);
    }
    let mut relative_sizes: Vec<f64> = cases.iter().map(|c| c.relative_size_after_crop).collect();
    Ok(Fingerprint {
        spacings: cases.iter().map(|c| c.spacing).collect(),
        shapes_after_crop: cases.iter().map(|c| c.shape_after_crop).collect(),
        foreground_intensity_properties_per_channel: stats,
        median_relative_size_after_cropping: median(&mut relative_sizes),
    })
}

/// nnU-Net's pooled statistics: mean, population std, min, max and numpy's default (linear)
/// percentiles 0.5 / 50 / 99.5. Reorders `samples`; `None` if empty. Samples must be finite (the
/// callers reject NaN and ±Inf images), so every statistic is finite.
pub fn intensity_stats(samples: &mut [f32]) -> Option<IntensityStats> {
    if samples.is_empty() {
        return None;
    }
    let n = samples.len() as f64;
    let mean = samples.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let variance = samples
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n;
    let (min, max) = samples
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    Some(IntensityStats {
        mean,
        median: percentile(samples, 50.0),
        std: variance.sqrt(),
        min: f64::from(min),
        max: f64::from(max),
        percentile_99_5: percentile(samples, 99.5),
        percentile_00_5: percentile(samples, 0.5),
    })
}

/// numpy's `percentile(..., method="linear")` by selection (O(n), no full sort). Non-empty input.
fn percentile(samples: &mut [f32], q: f64) -> f64 {
    let rank = q / 100.0 * (samples.len() - 1) as f64;
    let below = rank.floor() as usize;
    let (_, &mut low, above) = samples.select_nth_unstable_by(below, f32::total_cmp);
    let low = f64::from(low);
    let fraction = rank - below as f64;
    if fraction == 0.0 {
        return low;
    }
    let high = f64::from(above.iter().copied().fold(f32::INFINITY, f32::min));
    lerp(low, high, fraction)
}

/// numpy's `_lerp`: interpolates from the nearer end so the result stays within [a, b].
fn lerp(a: f64, b: f64, t: f64) -> f64 {
    if t >= 0.5 {
        b - (b - a) * (1.0 - t)
    } else {
        a + (b - a) * t
    }
}

/// numpy's median (mean of the two middle values for an even count). Non-empty input.
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_follow_numpys_linear_method() {
        // np.percentile([4, 1, 3, 2, 10], [0.5, 50, 99.5]) = [1.02, 3.0, 9.88]
        let mut values = [4.0f32, 1.0, 3.0, 2.0, 10.0];
        assert!((percentile(&mut values, 0.5) - 1.02).abs() < 1e-9);
        assert_eq!(percentile(&mut values, 50.0), 3.0);
        assert!((percentile(&mut values, 99.5) - 9.88).abs() < 1e-9);
        assert_eq!(percentile(&mut [7.0], 99.5), 7.0);
    }

    #[test]
    fn stats_are_population_statistics() {
        let mut values = [1.0f32, 2.0, 3.0, 4.0];
        let stats = intensity_stats(&mut values).unwrap();
        assert_eq!(stats.mean, 2.5);
        assert_eq!(stats.median, 2.5);
        assert!((stats.std - 1.25f64.sqrt()).abs() < 1e-12);
        assert_eq!((stats.min, stats.max), (1.0, 4.0));
        assert!(intensity_stats(&mut []).is_none());
    }

    #[test]
    fn case_samples_only_foreground_inside_the_crop() {
        let mut image = Array3::<f32>::zeros((3, 4, 4));
        image.slice_mut(ndarray::s![1, 1..3, 1..3]).fill(7.0);
        image[(1, 1, 1)] = 9.0;
        let mut seg = Array3::<i32>::zeros((3, 4, 4));
        seg[(1, 1, 1)] = 1;
        seg[(1, 2, 2)] = 2;
        seg[(0, 0, 0)] = 1; // outside the crop box: dropped, as in nnU-Net
        let case = case_fingerprint(vec![image.clone(), image], seg, [3.0, 1.0, 1.0], 50, 1234);
        assert_eq!(case.shape_after_crop, [1, 2, 2]);
        assert_eq!(case.shape_before_crop, [3, 4, 4]);
        assert_eq!(case.relative_size_after_crop, 4.0 / 48.0);
        assert_eq!(case.foreground_samples.len(), 2);
        for samples in &case.foreground_samples {
            assert_eq!(samples.len(), 50);
            assert!(samples.iter().all(|&v| v == 7.0 || v == 9.0));
            assert!(samples.contains(&7.0) && samples.contains(&9.0));
        }
    }

    #[test]
    fn no_foreground_anywhere_is_an_error_not_a_fingerprint_without_statistics() {
        let case = |samples: Vec<f32>| CaseFingerprint {
            spacing: [1.0; 3],
            shape_before_crop: [2, 2, 2],
            shape_after_crop: [2, 2, 2],
            relative_size_after_crop: 1.0,
            foreground_samples: vec![samples],
        };
        let error = aggregate(vec![case(Vec::new()), case(Vec::new())], 1).unwrap_err();
        assert!(
            matches!(error, FingerprintError::NoForeground { channel: 0 }),
            "{error:?}"
        );
        // One case with foreground is enough; the statistics are numbers.
        let fingerprint = aggregate(vec![case(Vec::new()), case(vec![1.0, 3.0])], 1).unwrap();
        let json = serde_json::to_string(&fingerprint).unwrap();
        assert!(!json.contains("null"), "{json}");
        assert_eq!(
            fingerprint.foreground_intensity_properties_per_channel["0"].mean,
            2.0
        );
    }

    #[test]
    fn median_of_even_count_is_the_mean_of_the_middle_pair() {
        assert_eq!(median(&mut [0.5, 0.1, 0.9, 0.3]), 0.4);
        assert_eq!(median(&mut [0.5]), 0.5);
    }
}
