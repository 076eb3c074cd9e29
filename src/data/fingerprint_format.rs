//! The dataset fingerprint as nnU-Net writes it (`dataset_fingerprint.json`): the facts about a
//! dataset that experiment planning needs. Axis order everywhere is nnU-Net's with its default
//! SimpleITK reader: slowest axis first, (z, y, x).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Fingerprint {
    /// Voxel spacing of every training case, (z, y, x), in case order.
    pub spacings: Vec<[f64; 3]>,
    /// Shape of every training case after cropping to its nonzero region, (z, y, x).
    pub shapes_after_crop: Vec<[usize; 3]>,
    /// Foreground (label > 0) intensity statistics per channel, keyed "0", "1", ...
    pub foreground_intensity_properties_per_channel: BTreeMap<String, IntensityStats>,
    /// Median over cases of (voxels after crop / voxels before crop).
    pub median_relative_size_after_cropping: f64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct IntensityStats {
    pub mean: f64,
    pub median: f64,
    pub std: f64,
    pub min: f64,
    pub max: f64,
    pub percentile_99_5: f64,
    pub percentile_00_5: f64,
}
