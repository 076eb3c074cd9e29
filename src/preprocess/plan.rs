//! Experiment planning: turns a dataset fingerprint into nnU-Net's `plans.json` (nnU-Net v2.8.1
//! `ExperimentPlanner`, the default PlainConvUNet planner, or one of its residual-encoder presets
//! `nnUNetPlannerResEncM/L/XL`, see [`Planner`] and `plan_resenc`).
//!
//! The planner picks a target spacing and an axis transpose, then for each configuration (`2d`,
//! `3d_fullres`, and `3d_lowres` + `3d_cascade_fullres` for large images) grows a patch from the
//! spacing's aspect ratio, shrinks it until the network's feature maps fit the VRAM budget, and
//! derives the batch size. Everything here is pure: no files are read or written.
//!
//! Floating-point steps follow numpy's exact formulas (linear percentile, median, round half to
//! even) so that decisions taken on rounded values match nnU-Net bit for bit.

use serde_json::{json, Map, Value};
use thiserror::Error;

use crate::data::fingerprint_format::Fingerprint;
use crate::preprocess::plan_resenc::{self, Reference};
use crate::preprocess::topology::{conv_feature_map_size, pool_and_conv_props, Topology};

/// An axis is anisotropic when its spacing is more than this many times the others' (nnU-Net's
/// `ANISO_THRESHOLD`).
const ANISOTROPY_THRESHOLD: f64 = 3.0;
const BASE_FEATURES: usize = 32;
const MAX_FEATURES_2D: usize = 512;
const MAX_FEATURES_3D: usize = 320;
/// Feature-map volumes that fit the reference GPU (8 GB) at the reference batch sizes. nnU-Net
/// tuned them to reproduce its v1 configurations.
const DEFAULT_REFERENCE: Reference = Reference {
    volume_3d: 560_000_000.0,
    volume_2d: 85_000_000.0,
    gpu_gb: 8.0,
};
const REFERENCE_BATCH_3D: f64 = 2.0;
const REFERENCE_BATCH_2D: f64 = 12.0;
const MIN_FEATURE_MAP_EDGE: usize = 4;
const MAX_POOLS: u32 = 999_999;
const CONVS_PER_STAGE: usize = 2;
const MIN_BATCH_SIZE: usize = 2;
/// A batch may cover at most this fraction of the dataset's voxels (overfitting precaution).
const MAX_DATASET_COVERED: f64 = 0.05;
/// A lowres configuration is searched when the fullres patch covers less than this fraction of the
/// median image.
const LOWRES_CREATION_THRESHOLD: f64 = 0.25;
const LOWRES_SPACING_STEP: f64 = 1.03;
/// The lowres search grows the spacing by 3% per step; far more steps than any real dataset needs.
const MAX_LOWRES_STEPS: usize = 10_000;
/// Initial patch volumes before clipping and shrinking: 256^3 voxels (3D) and 2048^2 pixels (2D).
const INITIAL_PATCH_EDGE_3D: f64 = 256.0;
const INITIAL_PATCH_EDGE_2D: f64 = 2048.0;

/// Every configuration nnU-Net's default planner can produce, in nnU-Net's order. A plan holds a
/// subset (3d_fullres only for 3D images; 3d_lowres and 3d_cascade_fullres only for large ones);
/// the plan stage's `overrides` change planned configurations and cannot add others.
pub const CONFIGURATIONS: [&str; 4] = ["2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"];

/// Why `name` can never be planned, or `Ok` for one of [`CONFIGURATIONS`]. Lists the valid names,
/// with a suggestion for a near miss.
pub fn check_configuration_name(name: &str) -> Result<(), String> {
    if CONFIGURATIONS.contains(&name) {
        return Ok(());
    }
    let suggestion = CONFIGURATIONS
        .iter()
        .map(|c| (edit_distance(name, c), c))
        .filter(|&(d, _)| d <= 2)
        .min()
        .map(|(_, c)| format!(" (did you mean `{c}`?)"))
        .unwrap_or_default();
    Err(format!(
        "unknown configuration `{name}`{suggestion}: nnU-Net plans only {}",
        CONFIGURATIONS.join(", ")
    ))
}

/// Reads a configuration name with serde, refusing one the planner can never produce
/// (`#[serde(deserialize_with = ...)]`), so that a misspelt name fails when the pipeline is loaded
/// instead of being skipped as "not planned".
pub fn deserialize_configuration<'de, D>(deserializer: D) -> Result<String, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let name = <String as serde::Deserialize>::deserialize(deserializer)?;
    check_configuration_name(&name).map_err(serde::de::Error::custom)?;
    Ok(name)
}

/// Levenshtein distance (names are short).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

const NETWORK_CLASS: &str = "dynamic_network_architectures.architectures.unet.PlainConvUNet";
const RESAMPLING_FN: &str = "resample_data_or_seg_to_shape";

/// Which of nnU-Net v2.8.1's experiment planners [`plan`] reproduces. The presets plan a
/// `ResidualEncoderUNet` for a bigger GPU with the default planner's search.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Planner {
    /// `ExperimentPlanner`: PlainConvUNet for 8 GB.
    #[default]
    Default,
    /// `nnUNetPlannerResEncM`: ResidualEncoderUNet for 8 GB (uses ~9-11 GB).
    ResEncM,
    /// `nnUNetPlannerResEncL`: ResidualEncoderUNet for 24 GB.
    ResEncL,
    /// `nnUNetPlannerResEncXL`: ResidualEncoderUNet for 40 GB.
    ResEncXL,
}

impl Planner {
    /// nnU-Net's class name, written as `experiment_planner_used`.
    pub fn class_name(self) -> &'static str {
        match self {
            Planner::Default => "ExperimentPlanner",
            Planner::ResEncM => "nnUNetPlannerResEncM",
            Planner::ResEncL => "nnUNetPlannerResEncL",
            Planner::ResEncXL => "nnUNetPlannerResEncXL",
        }
    }

    /// The planner's default `plans_name`.
    pub fn default_plans_name(self) -> &'static str {
        match self {
            Planner::Default => "nnUNetPlans",
            Planner::ResEncM => "nnUNetResEncUNetMPlans",
            Planner::ResEncL => "nnUNetResEncUNetLPlans",
            Planner::ResEncXL => "nnUNetResEncUNetXLPlans",
        }
    }

    /// The planner's default GPU memory target in GB (its reference GPU).
    pub fn default_gpu_memory_gb(self) -> f64 {
        self.reference().gpu_gb
    }

    fn reference(self) -> Reference {
        match self {
            Planner::Default => DEFAULT_REFERENCE,
            Planner::ResEncM => plan_resenc::RESENC_M,
            Planner::ResEncL => plan_resenc::RESENC_L,
            Planner::ResEncXL => plan_resenc::RESENC_XL,
        }
    }

    fn is_residual(self) -> bool {
        self != Planner::Default
    }

    /// The data identifier of a configuration. The presets preprocess 2d and 3d_fullres exactly
    /// as the default planner does and name them like it, so the data can be shared.
    fn data_identifier(self, plans_name: &str, configuration: &str) -> String {
        let shared = self.is_residual() && matches!(configuration, "2d" | "3d_fullres");
        let prefix = if shared {
            Planner::Default.default_plans_name()
        } else {
            plans_name
        };
        format!("{prefix}_{configuration}")
    }
}

/// What the planner knows about the dataset.
#[derive(Clone, Debug)]
pub struct PlanInputs<'a> {
    pub fingerprint: &'a Fingerprint,
    /// dataset.json `channel_names` values, in channel order ("CT", "T2", ...).
    pub channel_names: &'a [String],
    /// dataset.json `labels` as given; only the number of entries matters to the default planner.
    pub labels: Value,
    /// dataset.json `numTraining`.
    pub num_training_cases: usize,
    /// Folder name of the dataset, e.g. "Dataset001_Heart".
    pub dataset_name: &'a str,
    /// dataset.json `file_ending`, used to name the image reader (".nii.gz" -> "SimpleITKIO").
    pub file_ending: &'a str,
}

/// Planner options; `Default` gives nnU-Net's defaults, [`PlanSettings::for_planner`] a preset's.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanSettings {
    pub planner: Planner,
    /// GPU memory the plans should fit, in GB (nnU-Net `-gpu_memory_target`; default 8, the
    /// presets' 8, 24 and 40).
    pub gpu_memory_target_gb: f64,
    /// Name of the plans (default "nnUNetPlans", the presets' "nnUNetResEncUNet{M,L,XL}Plans");
    /// prefixes the data identifiers (the presets' 3d_lowres only).
    pub plans_name: String,
    pub preprocessor_name: String,
    /// Replaces the computed fullres target spacing, (z, y, x) before transposing.
    pub overwrite_target_spacing: Option<[f64; 3]>,
    /// Keep the axis order instead of moving the coarsest axis first.
    pub suppress_transpose: bool,
    /// dataset.json `overwrite_image_reader_writer`; `None` derives the reader from the file ending.
    pub image_reader_writer: Option<String>,
}

impl Default for PlanSettings {
    fn default() -> Self {
        PlanSettings::for_planner(Planner::Default)
    }
}

impl PlanSettings {
    /// nnU-Net's defaults for `planner`.
    pub fn for_planner(planner: Planner) -> Self {
        PlanSettings {
            planner,
            gpu_memory_target_gb: planner.default_gpu_memory_gb(),
            plans_name: planner.default_plans_name().into(),
            preprocessor_name: "DefaultPreprocessor".into(),
            overwrite_target_spacing: None,
            suppress_transpose: false,
            image_reader_writer: None,
        }
    }
}

#[derive(Debug, Error, PartialEq)]
pub enum PlanError {
    #[error("the fingerprint lists no cases")]
    NoCases,
    #[error("the fingerprint lists {spacings} spacings but {shapes} shapes")]
    CaseCountMismatch { spacings: usize, shapes: usize },
    #[error("spacing must be > 0 on every axis, got {0:?}")]
    NonPositiveSpacing(Vec<f64>),
    #[error("shape after cropping must be > 0 on every axis, got {0:?}")]
    EmptyShape([usize; 3]),
    #[error("dataset.json lists no channels")]
    NoChannels,
    #[error("dataset.json `labels` must be a non-empty object")]
    BadLabels,
    #[error("numTraining must be > 0")]
    NoTrainingCases,
    #[error("gpu memory target must be > 0 GB, got {0}")]
    BadGpuMemoryTarget(f64),
    #[error("no image reader handles file ending {0:?}")]
    UnknownFileEnding(String),
    #[error("cannot fit a {config} patch into {gpu_gb} GB")]
    PatchDoesNotFit { config: String, gpu_gb: f64 },
    #[error("the 3d_lowres search did not converge")]
    LowresDidNotConverge,
}

/// Plans a dataset: returns plans.json as nnU-Net writes it (with serde_json's `preserve_order`
/// feature the keys also come out in nnU-Net's order).
pub fn plan(inputs: &PlanInputs, settings: &PlanSettings) -> Result<Value, PlanError> {
    validate(inputs, settings)?;
    let fp = inputs.fingerprint;
    let num_classes = inputs.labels.as_object().map_or(0, Map::len);
    let budget = Budget {
        planner: settings.planner,
        gpu_gb: settings.gpu_memory_target_gb,
        num_classes,
    };

    let target = fullres_target_spacing(fp, settings.overwrite_target_spacing);
    let (forward, backward) = if settings.suppress_transpose {
        ([0, 1, 2], [0, 1, 2])
    } else {
        transpose(&target)
    };
    let spacing_t: Vec<f64> = forward.iter().map(|&a| target[a]).collect();

    let resampled_shapes: Vec<[f64; 3]> = fp
        .spacings
        .iter()
        .zip(&fp.shapes_after_crop)
        .map(|(sp, sh)| std::array::from_fn(|a| (sp[a] / target[a] * sh[a] as f64).round_ties_even()))
        .collect();
    let median_resampled = column_medians(&resampled_shapes);
    let median_t: Vec<f64> = forward.iter().map(|&a| median_resampled[a]).collect();
    let n_train = inputs.num_training_cases as f64;
    let dataset_voxels = product(&median_t) * n_train;

    let norm = normalization(inputs.channel_names, fp.median_relative_size_after_cropping);
    let config_json = |name: &str, c: &ConfigPlan, median_json: Value| {
        let id = settings.planner.data_identifier(&settings.plans_name, name);
        configuration_json(
            settings.planner,
            &id,
            &settings.preprocessor_name,
            c,
            median_json,
            &norm,
        )
    };

    let mut configurations = Map::new();
    let mut lowres_and_fullres = None;
    let mut fullres_only = None;
    if median_t[0] != 1.0 {
        let fullres = plan_configuration(&spacing_t, &median_t, dataset_voxels, &budget, "3d_fullres")?;
        let lowres = plan_lowres(&fullres, &median_t, n_train, &budget)?;
        let mut fullres_json = config_json("3d_fullres", &fullres, json!(median_t));
        match lowres {
            Some(lowres) => {
                let median_lowres: Vec<i64> = lowres.median_shape.iter().map(|&v| v as i64).collect();
                let mut lowres_json = config_json("3d_lowres", &lowres, json!(median_lowres));
                lowres_json["batch_dice"] = json!(false);
                lowres_json["next_stage"] = json!("3d_cascade_fullres");
                fullres_json["batch_dice"] = json!(true);
                lowres_and_fullres = Some((lowres_json, fullres_json));
            }
            None => {
                fullres_json["batch_dice"] = json!(false);
                fullres_only = Some(fullres_json);
            }
        }
    }

    let plan_2d = plan_configuration(&spacing_t[1..], &median_t[1..], dataset_voxels, &budget, "2d")?;
    let mut json_2d = config_json("2d", &plan_2d, json!(median_t[1..]));
    json_2d["batch_dice"] = json!(true);
    configurations.insert("2d".into(), json_2d);
    if let Some((lowres_json, fullres_json)) = lowres_and_fullres {
        configurations.insert("3d_lowres".into(), lowres_json);
        configurations.insert("3d_fullres".into(), fullres_json);
        configurations.insert(
            "3d_cascade_fullres".into(),
            json!({"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}),
        );
    } else if let Some(fullres_json) = fullres_only {
        configurations.insert("3d_fullres".into(), fullres_json);
    }

    let median_spacing = column_medians(&fp.spacings);
    let median_shape = column_medians(
        &fp.shapes_after_crop
            .iter()
            .map(|s| s.map(|v| v as f64))
            .collect::<Vec<_>>(),
    );
    let reader = match &settings.image_reader_writer {
        Some(r) => r.clone(),
        None => reader_writer_for_ending(inputs.file_ending)
            .ok_or_else(|| PlanError::UnknownFileEnding(inputs.file_ending.to_string()))?
            .to_string(),
    };

    let mut plans = Map::new();
    plans.insert("dataset_name".into(), json!(inputs.dataset_name));
    plans.insert("plans_name".into(), json!(settings.plans_name));
    plans.insert(
        "original_median_spacing_after_transp".into(),
        json!(forward.iter().map(|&a| median_spacing[a]).collect::<Vec<_>>()),
    );
    plans.insert(
        "original_median_shape_after_transp".into(),
        json!(forward
            .iter()
            .map(|&a| median_shape[a].round_ties_even() as i64)
            .collect::<Vec<_>>()),
    );
    plans.insert("image_reader_writer".into(), json!(reader));
    plans.insert("transpose_forward".into(), json!(forward));
    plans.insert("transpose_backward".into(), json!(backward));
    plans.insert("configurations".into(), Value::Object(configurations));
    plans.insert(
        "experiment_planner_used".into(),
        json!(settings.planner.class_name()),
    );
    plans.insert("label_manager".into(), json!("LabelManager"));
    plans.insert(
        "foreground_intensity_properties_per_channel".into(),
        json!(fp.foreground_intensity_properties_per_channel),
    );
    Ok(Value::Object(plans))
}

fn validate(inputs: &PlanInputs, settings: &PlanSettings) -> Result<(), PlanError> {
    let fp = inputs.fingerprint;
    if fp.spacings.is_empty() {
        return Err(PlanError::NoCases);
    }
    if fp.spacings.len() != fp.shapes_after_crop.len() {
        return Err(PlanError::CaseCountMismatch {
            spacings: fp.spacings.len(),
            shapes: fp.shapes_after_crop.len(),
        });
    }
    let mut spacings = fp
        .spacings
        .iter()
        .copied()
        .chain(settings.overwrite_target_spacing);
    if let Some(bad) = spacings.find(|s| s.iter().any(|&v| !(v > 0.0 && v.is_finite()))) {
        return Err(PlanError::NonPositiveSpacing(bad.to_vec()));
    }
    if let Some(bad) = fp.shapes_after_crop.iter().find(|s| s.contains(&0)) {
        return Err(PlanError::EmptyShape(*bad));
    }
    if inputs.channel_names.is_empty() {
        return Err(PlanError::NoChannels);
    }
    if inputs.labels.as_object().is_none_or(Map::is_empty) {
        return Err(PlanError::BadLabels);
    }
    if inputs.num_training_cases == 0 {
        return Err(PlanError::NoTrainingCases);
    }
    let gb = settings.gpu_memory_target_gb;
    if !(gb > 0.0 && gb.is_finite()) {
        return Err(PlanError::BadGpuMemoryTarget(gb));
    }
    Ok(())
}

/// The fullres spacing, (z, y, x) before transposing: the per-axis median, except that a strongly
/// anisotropic axis with few voxels takes the 10th percentile of its spacings (less interpolation
/// from thick slices), but never finer than the other axes.
pub fn fullres_target_spacing(fp: &Fingerprint, overwrite: Option<[f64; 3]>) -> [f64; 3] {
    if let Some(spacing) = overwrite {
        return spacing;
    }
    let sizes: Vec<[f64; 3]> = fp.shapes_after_crop.iter().map(|s| s.map(|v| v as f64)).collect();
    let mut target: [f64; 3] = std::array::from_fn(|a| percentile(fp.spacings.iter().map(|s| s[a]), 50.0));
    let target_size: [f64; 3] = std::array::from_fn(|a| percentile(sizes.iter().map(|s| s[a]), 50.0));

    let worst = argmax(&target);
    let others: Vec<usize> = (0..3).filter(|&a| a != worst).collect();
    let max_other_spacing = others
        .iter()
        .map(|&a| target[a])
        .fold(f64::NEG_INFINITY, f64::max);
    let min_other_size = others
        .iter()
        .map(|&a| target_size[a])
        .fold(f64::INFINITY, f64::min);
    let aniso_spacing = target[worst] > ANISOTROPY_THRESHOLD * max_other_spacing;
    let aniso_voxels = target_size[worst] * ANISOTROPY_THRESHOLD < min_other_size;
    if aniso_spacing && aniso_voxels {
        let mut axis_target = percentile(fp.spacings.iter().map(|s| s[worst]), 10.0);
        if axis_target < max_other_spacing {
            // nnU-Net nudges the axis just above the others so it stays the coarsest one.
            axis_target = max_other_spacing.max(axis_target) + 1e-5;
        }
        target[worst] = axis_target;
    }
    target
}

/// Axis order that puts the coarsest axis first, and its inverse.
pub fn transpose(target_spacing: &[f64; 3]) -> ([usize; 3], [usize; 3]) {
    let first = argmax(target_spacing);
    let rest: Vec<usize> = (0..3).filter(|&a| a != first).collect();
    let forward = [first, rest[0], rest[1]];
    let backward = std::array::from_fn(|a| forward.iter().position(|&f| f == a).unwrap_or(a));
    (forward, backward)
}

/// Normalization scheme per channel (by channel name, case-insensitive; unknown names get z-score)
/// and whether it is restricted to the nonzero mask. Only z-score uses the mask, and only when
/// cropping removed a lot (median relative size after cropping < 3/4).
pub fn normalization(channel_names: &[String], median_relative_size: f64) -> (Vec<&'static str>, Vec<bool>) {
    let schemes: Vec<&'static str> = channel_names
        .iter()
        .map(|name| match name.to_lowercase().as_str() {
            "ct" => "CTNormalization",
            "nonorm" => "NoNormalization",
            "rescale_to_0_1" => "RescaleTo01Normalization",
            "rgb_to_0_1" => "RGBTo01Normalization",
            _ => "ZScoreNormalization",
        })
        .collect();
    let crop_matters = median_relative_size < 0.75;
    let masks = schemes
        .iter()
        .map(|&s| crop_matters && s == "ZScoreNormalization")
        .collect();
    (schemes, masks)
}

/// The first nnU-Net reader (in its registry order) that claims the file ending. The detached
/// headers `.nhdr` and `.mhd`, which no nnU-Net reader claims, get SimpleITKIO: it reads them.
pub fn reader_writer_for_ending(file_ending: &str) -> Option<&'static str> {
    match file_ending.to_lowercase().as_str() {
        ".png" | ".bmp" | ".tif" => Some("NaturalImage2DIO"),
        ".nii.gz" | ".nrrd" | ".mha" | ".gipl" | ".nhdr" | ".mhd" => Some("SimpleITKIO"),
        ".tiff" => Some("Tiff3DIO"),
        ".nii" => Some("NibabelIO"),
        _ => None,
    }
}

/// One planned configuration, before it is written out.
#[derive(Clone, Debug)]
struct ConfigPlan {
    spacing: Vec<f64>,
    median_shape: Vec<f64>,
    batch_size: usize,
    topology: Topology,
    features: Vec<usize>,
}

/// What the VRAM estimate needs besides the patch.
struct Budget {
    planner: Planner,
    gpu_gb: f64,
    num_classes: usize,
}

/// Patch size, topology and batch size for one spacing (2 or 3 axes) and median image shape.
fn plan_configuration(
    spacing: &[f64],
    median_shape: &[f64],
    dataset_voxels: f64,
    budget: &Budget,
    config: &str,
) -> Result<ConfigPlan, PlanError> {
    let is_3d = spacing.len() == 3;
    let model = budget.planner.reference();
    let (max_features, ref_volume, ref_batch, edge) = if is_3d {
        (
            MAX_FEATURES_3D,
            model.volume_3d,
            REFERENCE_BATCH_3D,
            INITIAL_PATCH_EDGE_3D,
        )
    } else {
        (
            MAX_FEATURES_2D,
            model.volume_2d,
            REFERENCE_BATCH_2D,
            INITIAL_PATCH_EDGE_2D,
        )
    };
    let reference = ref_volume * (budget.gpu_gb / model.gpu_gb);
    let initial = initial_patch(spacing, median_shape, edge);
    let mut topology = pool_and_conv_props(spacing, &initial, MIN_FEATURE_MAP_EDGE, MAX_POOLS);
    let estimate_of = |t: &Topology| estimate_volume(budget.planner, t, max_features, budget.num_classes);
    let mut estimate = estimate_of(&topology);

    // The default planner demands room for a batch of 2 even where the reference batch differs;
    // the presets only room for the reference batch.
    let too_large = |estimate: f64| {
        if budget.planner.is_residual() {
            estimate > reference
        } else {
            estimate / ref_batch * 2.0 > reference
        }
    };
    while too_large(estimate) {
        topology =
            shrink_patch(spacing, median_shape, &topology).ok_or_else(|| PlanError::PatchDoesNotFit {
                config: config.into(),
                gpu_gb: budget.gpu_gb,
            })?;
        estimate = estimate_of(&topology);
    }

    let patch_voxels = topology.patch_size.iter().map(|&v| v as f64).product::<f64>();
    let by_memory = (reference / estimate * ref_batch).round_ties_even();
    let max_covered = if budget.planner.is_residual() {
        plan_resenc::MAX_DATASET_COVERED
    } else {
        MAX_DATASET_COVERED
    };
    let by_dataset = (dataset_voxels * max_covered / patch_voxels).round_ties_even();
    let batch_size = by_memory.min(by_dataset).max(MIN_BATCH_SIZE as f64) as usize;
    let features = features_per_stage(topology.n_stages(), max_features);
    Ok(ConfigPlan {
        spacing: spacing.to_vec(),
        median_shape: median_shape.to_vec(),
        batch_size,
        topology,
        features,
    })
}

/// A patch with the aspect ratio of 1/spacing and the volume of `edge^dim`, rounded half to even
/// and clipped to the (possibly fractional) median shape.
fn initial_patch(spacing: &[f64], median_shape: &[f64], edge: f64) -> Vec<f64> {
    let dim = spacing.len() as f64;
    let inverse: Vec<f64> = spacing.iter().map(|s| 1.0 / s).collect();
    let scale = (edge.powi(spacing.len() as i32) / product(&inverse)).powf(1.0 / dim);
    inverse
        .iter()
        .zip(median_shape)
        .map(|(&v, &m)| (v * scale).round_ties_even().min(m))
        .collect()
}

/// Shrinks the axis that is largest relative to the median shape by one step of its current
/// divisibility, then recomputes the topology. nnU-Net first subtracts the current step, recomputes
/// the step for that tentative size and subtracts that instead, so valid sizes such as 224 (between
/// 256 and 192) are not skipped. Returns `None` once the axis cannot shrink any further.
fn shrink_patch(spacing: &[f64], median_shape: &[f64], topology: &Topology) -> Option<Topology> {
    let patch = &topology.patch_size;
    let ratios: Vec<f64> = patch
        .iter()
        .zip(median_shape)
        .map(|(&p, &m)| p as f64 / m)
        .collect();
    let axis = last_argmax(&ratios);
    let step = topology.divisible_by[axis];
    if patch[axis] <= step {
        return None;
    }
    let mut tentative: Vec<f64> = patch.iter().map(|&v| v as f64).collect();
    tentative[axis] -= step as f64;
    let step = pool_and_conv_props(spacing, &tentative, MIN_FEATURE_MAP_EDGE, MAX_POOLS).divisible_by[axis];
    let mut shrunk: Vec<f64> = patch.iter().map(|&v| v as f64).collect();
    shrunk[axis] -= step as f64;
    Some(pool_and_conv_props(
        spacing,
        &shrunk,
        MIN_FEATURE_MAP_EDGE,
        MAX_POOLS,
    ))
}

fn estimate_volume(planner: Planner, topology: &Topology, max_features: usize, num_classes: usize) -> f64 {
    let n = topology.n_stages();
    if planner.is_residual() {
        return plan_resenc::residual_feature_map_size(
            &topology.patch_size,
            &topology.strides,
            &features_per_stage(n, max_features),
            num_classes,
        ) as f64;
    }
    conv_feature_map_size(
        &topology.patch_size,
        &topology.strides,
        &features_per_stage(n, max_features),
        &vec![CONVS_PER_STAGE; n],
        &vec![CONVS_PER_STAGE; n.saturating_sub(1)],
        num_classes,
    ) as f64
}

fn features_per_stage(n_stages: usize, max_features: usize) -> Vec<usize> {
    (0..n_stages)
        .map(|i| (BASE_FEATURES << i.min(20)).min(max_features))
        .collect()
}

/// Searches a coarser spacing whose patch covers at least a quarter of the (shrunken) median image:
/// the spacing grows 3% per step, only the fine axes while some axis is more than 2x coarser than
/// them. Returns `None` when no search was needed or when the result is less than 2x smaller (in
/// voxels) than fullres.
fn plan_lowres(
    fullres: &ConfigPlan,
    median_shape: &[f64],
    n_train: f64,
    budget: &Budget,
) -> Result<Option<ConfigPlan>, PlanError> {
    let fullres_voxels = product(median_shape);
    let mut median_voxels = fullres_voxels;
    let mut patch_voxels = fullres
        .topology
        .patch_size
        .iter()
        .map(|&v| v as f64)
        .product::<f64>();
    let mut spacing = fullres.spacing.clone();
    let mut lowres = None;
    let mut steps = 0;
    while patch_voxels / median_voxels < LOWRES_CREATION_THRESHOLD {
        steps += 1;
        if steps > MAX_LOWRES_STEPS {
            return Err(PlanError::LowresDidNotConverge);
        }
        let max_spacing = spacing.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let fine: Vec<bool> = spacing.iter().map(|&s| max_spacing / s > 2.0).collect();
        let any_fine = fine.contains(&true);
        for (s, &is_fine) in spacing.iter_mut().zip(&fine) {
            if is_fine || !any_fine {
                *s *= LOWRES_SPACING_STEP;
            }
        }
        let shape: Vec<f64> = fullres
            .spacing
            .iter()
            .zip(&spacing)
            .zip(median_shape)
            .map(|((&f, &l), &m)| f / l * m)
            .collect();
        median_voxels = product(&shape);
        let rounded: Vec<f64> = shape.iter().map(|v| v.round_ties_even()).collect();
        let plan = plan_configuration(&spacing, &rounded, median_voxels * n_train, budget, "3d_lowres")?;
        patch_voxels = plan
            .topology
            .patch_size
            .iter()
            .map(|&v| v as f64)
            .product::<f64>();
        lowres = Some(plan);
    }
    if fullres_voxels / median_voxels < 2.0 {
        return Ok(None);
    }
    Ok(lowres)
}

fn configuration_json(
    planner: Planner,
    data_identifier: &str,
    preprocessor_name: &str,
    c: &ConfigPlan,
    median_shape: Value,
    (schemes, masks): &(Vec<&'static str>, Vec<bool>),
) -> Value {
    let dim = c.spacing.len();
    let (conv_op, norm_op) = if dim == 3 {
        (
            "torch.nn.modules.conv.Conv3d",
            "torch.nn.modules.instancenorm.InstanceNorm3d",
        )
    } else {
        (
            "torch.nn.modules.conv.Conv2d",
            "torch.nn.modules.instancenorm.InstanceNorm2d",
        )
    };
    let resampling_kwargs = |is_seg: bool, order: u32| json!({"is_seg": is_seg, "order": order, "order_z": 0, "force_separate_z": null});
    let (network_class, arch_kwargs) = if planner.is_residual() {
        (
            plan_resenc::NETWORK_CLASS,
            plan_resenc::arch_kwargs(&c.topology, &c.features, conv_op, norm_op),
        )
    } else {
        (NETWORK_CLASS, plain_arch_kwargs(c, conv_op, norm_op))
    };

    let mut architecture = Map::new();
    architecture.insert("network_class_name".into(), json!(network_class));
    architecture.insert("arch_kwargs".into(), arch_kwargs);
    architecture.insert(
        "_kw_requires_import".into(),
        json!(["conv_op", "norm_op", "dropout_op", "nonlin"]),
    );

    let mut config = Map::new();
    config.insert("data_identifier".into(), json!(data_identifier));
    config.insert("preprocessor_name".into(), json!(preprocessor_name));
    config.insert("batch_size".into(), json!(c.batch_size));
    config.insert("patch_size".into(), json!(c.topology.patch_size));
    config.insert("median_image_size_in_voxels".into(), median_shape);
    config.insert("spacing".into(), json!(c.spacing));
    config.insert("normalization_schemes".into(), json!(schemes));
    config.insert("use_mask_for_norm".into(), json!(masks));
    config.insert("resampling_fn_data".into(), json!(RESAMPLING_FN));
    config.insert("resampling_fn_seg".into(), json!(RESAMPLING_FN));
    config.insert("resampling_fn_data_kwargs".into(), resampling_kwargs(false, 3));
    config.insert("resampling_fn_seg_kwargs".into(), resampling_kwargs(true, 1));
    config.insert("resampling_fn_probabilities".into(), json!(RESAMPLING_FN));
    config.insert(
        "resampling_fn_probabilities_kwargs".into(),
        resampling_kwargs(false, 1),
    );
    config.insert("architecture".into(), Value::Object(architecture));
    Value::Object(config)
}

/// `arch_kwargs` of a PlainConvUNet configuration, in nnU-Net's key order.
fn plain_arch_kwargs(c: &ConfigPlan, conv_op: &str, norm_op: &str) -> Value {
    let n = c.topology.n_stages();
    let mut arch_kwargs = Map::new();
    arch_kwargs.insert("n_stages".into(), json!(n));
    arch_kwargs.insert("features_per_stage".into(), json!(c.features));
    arch_kwargs.insert("conv_op".into(), json!(conv_op));
    arch_kwargs.insert("kernel_sizes".into(), json!(c.topology.kernel_sizes));
    arch_kwargs.insert("strides".into(), json!(c.topology.strides));
    arch_kwargs.insert("n_conv_per_stage".into(), json!(vec![CONVS_PER_STAGE; n]));
    arch_kwargs.insert(
        "n_conv_per_stage_decoder".into(),
        json!(vec![CONVS_PER_STAGE; n.saturating_sub(1)]),
    );
    arch_kwargs.insert("conv_bias".into(), json!(true));
    arch_kwargs.insert("norm_op".into(), json!(norm_op));
    arch_kwargs.insert("norm_op_kwargs".into(), json!({"eps": 1e-5, "affine": true}));
    arch_kwargs.insert("dropout_op".into(), Value::Null);
    arch_kwargs.insert("dropout_op_kwargs".into(), Value::Null);
    arch_kwargs.insert("nonlin".into(), json!("torch.nn.LeakyReLU"));
    arch_kwargs.insert("nonlin_kwargs".into(), json!({"inplace": true}));
    Value::Object(arch_kwargs)
}

/// numpy's default ("linear") percentile, with its exact interpolation formula.
fn percentile(values: impl Iterator<Item = f64>, percent: f64) -> f64 {
    let mut sorted: Vec<f64> = values.collect();
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted.sort_by(f64::total_cmp);
    let q = percent / 100.0;
    let index = (sorted.len() - 1) as f64 * q;
    let below = index.floor();
    let t = index - below;
    let a = sorted[below as usize];
    let b = sorted[(below as usize + 1).min(sorted.len() - 1)];
    let diff = b - a;
    // numpy interpolates from the nearer end to limit rounding error.
    if t >= 0.5 {
        b - diff * (1.0 - t)
    } else {
        a + diff * t
    }
}

/// numpy's median per axis: the middle value, or the mean of the two middle values.
fn column_medians(rows: &[[f64; 3]]) -> [f64; 3] {
    std::array::from_fn(|a| {
        let mut column: Vec<f64> = rows.iter().map(|r| r[a]).collect();
        column.sort_by(f64::total_cmp);
        let n = column.len();
        if n == 0 {
            f64::NAN
        } else if n % 2 == 1 {
            column[n / 2]
        } else {
            (column[n / 2 - 1] + column[n / 2]) / 2.0
        }
    })
}

fn product(values: &[f64]) -> f64 {
    values.iter().product()
}

/// First index of the maximum (numpy `argmax`).
fn argmax(values: &[f64]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

/// Last index of the maximum: what nnU-Net's `np.argsort(...)[-1]` yields on ties.
fn last_argmax(values: &[f64]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v >= values[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_names_are_nnunets_and_near_misses_get_a_suggestion() {
        for name in CONFIGURATIONS {
            assert_eq!(check_configuration_name(name), Ok(()));
        }
        let error = check_configuration_name("3d_fulres").unwrap_err();
        assert_eq!(
            error,
            "unknown configuration `3d_fulres` (did you mean `3d_fullres`?): nnU-Net plans only 2d, \
             3d_fullres, 3d_lowres, 3d_cascade_fullres"
        );
        let error = check_configuration_name("unet").unwrap_err();
        assert!(
            error.starts_with("unknown configuration `unet`: nnU-Net plans only 2d,"),
            "{error}"
        );
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "2d"), 2);
    }

    #[test]
    fn percentile_matches_numpy_linear() {
        // np.percentile([1, 2, 3, 4], 50) == 2.5; np.percentile([1, 2, 3, 4, 10], 10) == 1.4
        assert_eq!(percentile([4.0, 1.0, 3.0, 2.0].into_iter(), 50.0), 2.5);
        assert!((percentile([1.0, 2.0, 3.0, 4.0, 10.0].into_iter(), 10.0) - 1.4).abs() < 1e-15);
    }

    #[test]
    fn transpose_moves_coarsest_axis_first() {
        assert_eq!(transpose(&[1.0, 5.0, 1.0]), ([1, 0, 2], [1, 0, 2]));
        assert_eq!(transpose(&[1.0, 1.0, 5.0]), ([2, 0, 1], [1, 2, 0]));
        assert_eq!(transpose(&[1.0, 1.0, 1.0]), ([0, 1, 2], [0, 1, 2]));
    }

    #[test]
    fn normalization_by_channel_name() {
        let names = vec!["CT".to_string(), "T2".to_string(), "noNorm".to_string()];
        let (schemes, masks) = normalization(&names, 0.5);
        assert_eq!(
            schemes,
            vec!["CTNormalization", "ZScoreNormalization", "NoNormalization"]
        );
        assert_eq!(masks, vec![false, true, false]);
        assert_eq!(normalization(&names, 0.9).1, vec![false, false, false]);
    }

    #[test]
    fn shrinking_breaks_ties_towards_the_last_axis() {
        // numpy: np.argsort([1., 1., 1.])[-1] == 2. 128 - 32 = 96 needs only 4 pools (step 16), so
        // the last axis goes to 112 rather than 96.
        let spacing = [1.0, 1.0, 1.0];
        let start = pool_and_conv_props(&spacing, &[128.0, 128.0, 128.0], MIN_FEATURE_MAP_EDGE, MAX_POOLS);
        let shrunk = shrink_patch(&spacing, &[181.0, 181.0, 181.0], &start).unwrap();
        assert_eq!(shrunk.patch_size, vec![128, 128, 112]);
    }

    #[test]
    fn anisotropic_axis_takes_tenth_percentile_spacing() {
        // z median 5 > 3 * 0.7 and 20 * 3 < 300: z gets the 10th percentile of [3, 4, 5, 6, 7] = 3.4.
        let fp = Fingerprint {
            spacings: (3..8).map(|z| [z as f64, 0.7, 0.7]).collect(),
            shapes_after_crop: vec![[20, 300, 300]; 5],
            foreground_intensity_properties_per_channel: Default::default(),
            median_relative_size_after_cropping: 1.0,
        };
        let target = fullres_target_spacing(&fp, None);
        assert!((target[0] - 3.4).abs() < 1e-12, "{target:?}");
        assert_eq!(&target[1..], &[0.7, 0.7]);
    }

    #[test]
    fn rejects_empty_fingerprint() {
        let fp = Fingerprint {
            spacings: vec![],
            shapes_after_crop: vec![],
            foreground_intensity_properties_per_channel: Default::default(),
            median_relative_size_after_cropping: 1.0,
        };
        let names = vec!["CT".to_string()];
        let inputs = PlanInputs {
            fingerprint: &fp,
            channel_names: &names,
            labels: json!({"background": 0, "a": 1}),
            num_training_cases: 1,
            dataset_name: "Dataset001_X",
            file_ending: ".nii.gz",
        };
        assert_eq!(plan(&inputs, &PlanSettings::default()), Err(PlanError::NoCases));
    }
}
