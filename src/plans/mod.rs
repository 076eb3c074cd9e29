//! plans.json, nnU-Net's experiment plan, as types: the top level ([`Plans`]), one configuration
//! ([`Configuration`]) and its network ([`architecture`]). Every reader of a plan goes through
//! these types, so a malformed plans.json fails once, when it is read, with the file and the field.
//!
//! The types mirror what nnU-Net v2 writes (`experiment_planners/default_experiment_planner.py`)
//! and read it the way nnU-Net's `PlansManager`/`ConfigurationManager`
//! (`utilities/plans_handling/plans_handler.py`) do, `inherits_from` included
//! ([`Plans::configuration`]). Keys nnflow does not know are kept (`extra` maps), and numbers keep
//! their JSON kind (a median image size may be `53` or `53.0`), so a plan read and written back is
//! the same JSON value.

pub mod architecture;
mod resampling;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};
use thiserror::Error;

pub use architecture::{
    ArchitecturePlan, DropoutOpKwargs, NetworkKwargs, NonlinKwargs, NormOpKwargs, PlainConvUNetKwargs,
    ResidualEncoderUNetKwargs,
};

use crate::data::fingerprint_format::IntensityStats;
pub use resampling::{ResampleOptions, ResamplingKwargs, ANISO_THRESHOLD};

#[derive(Debug, Error)]
pub enum PlansError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// Not JSON, or a key missing or of the wrong type. `field` is the dotted path to the key
    /// (`configurations.3d_fullres.patch_size[1]`); empty for the top level.
    #[error("{origin}: {}{message}", field_prefix(.field))]
    Invalid {
        origin: String,
        field: String,
        message: String,
    },
    #[error("the plan has no configuration `{name}` (planned: {planned:?})")]
    UnknownConfiguration { name: String, planned: Vec<String> },
    /// nnU-Net refuses the same (`RuntimeError: Circular dependency detected`).
    #[error("configuration {name}: `inherits_from` is circular ({})", .chain.join(" -> "))]
    CircularInheritance { name: String, chain: Vec<String> },
    /// A key the configuration needs is absent from it and from the ones it inherits from.
    #[error("configuration {configuration}: `{field}` is missing")]
    Missing {
        configuration: String,
        field: &'static str,
    },
}

fn field_prefix(field: &str) -> String {
    if field.is_empty() {
        String::new()
    } else {
        format!("`{field}`: ")
    }
}

/// The whole plans.json. Fields in nnU-Net's order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plans {
    /// The dataset folder's name, e.g. `Dataset001_Heart`.
    pub dataset_name: String,
    /// The plans identifier (`nnUNetPlans`); every `data_identifier` starts with it.
    pub plans_name: String,
    /// Median spacing of the training cases, transposed (slowest axis first).
    pub original_median_spacing_after_transp: Vec<f64>,
    /// Median shape after cropping, transposed, rounded to whole voxels.
    pub original_median_shape_after_transp: Vec<usize>,
    /// The image reader's class name (`SimpleITKIO`, `NibabelIO`, ...).
    pub image_reader_writer: String,
    /// The axis order the plan works in: preprocessed axis `i` is raw (z, y, x) axis
    /// `transpose_forward[i]`.
    pub transpose_forward: [usize; 3],
    /// The inverse permutation, used at export.
    pub transpose_backward: [usize; 3],
    /// The planned configurations by name, as stored (see [`Plans::configuration`] for one with
    /// `inherits_from` resolved).
    pub configurations: BTreeMap<String, Configuration>,
    pub experiment_planner_used: String,
    /// The label manager's class name (`LabelManager`).
    pub label_manager: String,
    /// Foreground intensity statistics per channel, keyed `"0"`, `"1"`, ... (CT normalization
    /// uses them).
    pub foreground_intensity_properties_per_channel: BTreeMap<String, IntensityProperties>,
    /// Keys nnflow does not read, kept as they are.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One channel's foreground intensity statistics, as the fingerprint computed them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IntensityProperties {
    #[serde(flatten)]
    pub stats: IntensityStats,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One entry of `configurations` as stored. A configuration that `inherits_from` another holds
/// only what it changes (the cascade's `3d_cascade_fullres` holds `inherits_from` and
/// `previous_stage`), so every key is optional here; [`ResolvedConfiguration`] says which ones a
/// reader needs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Configuration {
    /// The configuration whose keys this one starts from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inherits_from: Option<String>,
    /// The preprocessed data's folder name (`nnUNetPlans_3d_fullres`); configurations with the
    /// same identifier share their preprocessing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_identifier: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preprocessor_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// Two entries (y, x) for 2D configurations, three (z, y, x) for 3D.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch_size: Option<Vec<usize>>,
    /// nnU-Net writes whole numbers for some configurations and floats for others; both kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub median_image_size_in_voxels: Option<Vec<Number>>,
    /// Target spacing: two entries (y, x) for 2D configurations (the slice spacing is kept),
    /// three (z, y, x) for 3D.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spacing: Option<Vec<f64>>,
    /// Per channel, the normalization class name (`ZScoreNormalization`, `CTNormalization`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub normalization_schemes: Option<Vec<String>>,
    /// Per channel, whether z-score normalization is restricted to the nonzero mask.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub use_mask_for_norm: Option<Vec<bool>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resampling_fn_data: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resampling_fn_seg: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resampling_fn_data_kwargs: Option<ResamplingKwargs>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resampling_fn_seg_kwargs: Option<ResamplingKwargs>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resampling_fn_probabilities: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resampling_fn_probabilities_kwargs: Option<ResamplingKwargs>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub architecture: Option<ArchitecturePlan>,
    /// Dice over the whole batch rather than per sample.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_dice: Option<bool>,
    /// The cascade: the configuration(s) that take this one's predictions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_stage: Option<StageNames>,
    /// The cascade: the configuration whose predictions this one takes as input.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_stage: Option<String>,
    /// Keys nnflow does not read, kept as they are.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `next_stage`: nnU-Net writes one name; its `ConfigurationManager` also accepts a list.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StageNames {
    One(String),
    Many(Vec<String>),
}

impl Plans {
    /// Reads plans.json; errors name the file and, for a key of the wrong type or a missing one,
    /// the key's path.
    pub fn read(path: &Path) -> Result<Plans, PlansError> {
        let text = std::fs::read_to_string(path).map_err(|source| PlansError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let origin = path.display().to_string();
        let deserializer = &mut serde_json::Deserializer::from_str(&text);
        serde_path_to_error::deserialize(deserializer).map_err(|e| invalid(&origin, e))
    }

    /// Reads a plan held as JSON (one being written, say); `origin` names it in errors.
    pub fn from_json(value: &Value, origin: &str) -> Result<Plans, PlansError> {
        serde_path_to_error::deserialize(value).map_err(|e| invalid(origin, e))
    }

    /// The configuration `name` as nnU-Net's `PlansManager.get_configuration` gives it: the keys
    /// of the configuration it `inherits_from` (recursively), updated with its own (a shallow
    /// update: a key it sets replaces the inherited one whole).
    pub fn configuration(&self, name: &str) -> Result<ResolvedConfiguration, PlansError> {
        let values = self.resolve(name, &mut Vec::new())?;
        Ok(ResolvedConfiguration {
            name: name.to_string(),
            values,
        })
    }

    fn resolve(&self, name: &str, visited: &mut Vec<String>) -> Result<Configuration, PlansError> {
        let own = self
            .configurations
            .get(name)
            .ok_or_else(|| PlansError::UnknownConfiguration {
                name: name.to_string(),
                planned: self.configurations.keys().cloned().collect(),
            })?;
        let Some(parent) = &own.inherits_from else {
            return Ok(own.clone());
        };
        visited.push(name.to_string());
        if visited.contains(parent) {
            let mut chain = visited.clone();
            chain.push(parent.clone());
            return Err(PlansError::CircularInheritance {
                name: visited[0].clone(),
                chain,
            });
        }
        Ok(self.resolve(parent, visited)?.updated_with(own))
    }

    /// Foreground intensity statistics by channel index (`None` for a channel the plan lacks).
    pub fn intensity_properties(&self) -> Vec<Option<IntensityStats>> {
        let properties = &self.foreground_intensity_properties_per_channel;
        (0..properties.len())
            .map(|c| properties.get(&c.to_string()).map(|p| p.stats.clone()))
            .collect()
    }
}

fn invalid<E: std::fmt::Display>(origin: &str, error: serde_path_to_error::Error<E>) -> PlansError {
    let path = error.path().to_string();
    PlansError::Invalid {
        origin: origin.to_string(),
        field: if path == "." { String::new() } else { path },
        message: error.inner().to_string(),
    }
}

impl Configuration {
    /// Python's `dict.update`: `child`'s keys replace this configuration's, the others stay.
    pub fn updated_with(&self, child: &Configuration) -> Configuration {
        // Destructured without `..`: a new field does not compile until it is merged here too.
        let Configuration {
            inherits_from,
            data_identifier,
            preprocessor_name,
            batch_size,
            patch_size,
            median_image_size_in_voxels,
            spacing,
            normalization_schemes,
            use_mask_for_norm,
            resampling_fn_data,
            resampling_fn_seg,
            resampling_fn_data_kwargs,
            resampling_fn_seg_kwargs,
            resampling_fn_probabilities,
            resampling_fn_probabilities_kwargs,
            architecture,
            batch_dice,
            next_stage,
            previous_stage,
            extra,
        } = child.clone();
        let base = self.clone();
        let mut merged_extra = base.extra;
        merged_extra.extend(extra);
        Configuration {
            inherits_from: inherits_from.or(base.inherits_from),
            data_identifier: data_identifier.or(base.data_identifier),
            preprocessor_name: preprocessor_name.or(base.preprocessor_name),
            batch_size: batch_size.or(base.batch_size),
            patch_size: patch_size.or(base.patch_size),
            median_image_size_in_voxels: median_image_size_in_voxels.or(base.median_image_size_in_voxels),
            spacing: spacing.or(base.spacing),
            normalization_schemes: normalization_schemes.or(base.normalization_schemes),
            use_mask_for_norm: use_mask_for_norm.or(base.use_mask_for_norm),
            resampling_fn_data: resampling_fn_data.or(base.resampling_fn_data),
            resampling_fn_seg: resampling_fn_seg.or(base.resampling_fn_seg),
            resampling_fn_data_kwargs: resampling_fn_data_kwargs.or(base.resampling_fn_data_kwargs),
            resampling_fn_seg_kwargs: resampling_fn_seg_kwargs.or(base.resampling_fn_seg_kwargs),
            resampling_fn_probabilities: resampling_fn_probabilities.or(base.resampling_fn_probabilities),
            resampling_fn_probabilities_kwargs: resampling_fn_probabilities_kwargs
                .or(base.resampling_fn_probabilities_kwargs),
            architecture: architecture.or(base.architecture),
            batch_dice: batch_dice.or(base.batch_dice),
            next_stage: next_stage.or(base.next_stage),
            previous_stage: previous_stage.or(base.previous_stage),
            extra: merged_extra,
        }
    }
}

/// A configuration with `inherits_from` resolved ([`Plans::configuration`]), nnU-Net's
/// `ConfigurationManager`: its accessors answer what a reader needs, and name the configuration
/// and the key when one is missing.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedConfiguration {
    pub name: String,
    pub values: Configuration,
}

impl ResolvedConfiguration {
    fn required<'a, T>(&self, value: &'a Option<T>, field: &'static str) -> Result<&'a T, PlansError> {
        value.as_ref().ok_or_else(|| PlansError::Missing {
            configuration: self.name.clone(),
            field,
        })
    }

    pub fn spacing(&self) -> Result<&[f64], PlansError> {
        self.required(&self.values.spacing, "spacing").map(Vec::as_slice)
    }

    pub fn patch_size(&self) -> Result<&[usize], PlansError> {
        self.required(&self.values.patch_size, "patch_size")
            .map(Vec::as_slice)
    }

    pub fn batch_size(&self) -> Result<usize, PlansError> {
        self.required(&self.values.batch_size, "batch_size").copied()
    }

    pub fn normalization_schemes(&self) -> Result<&[String], PlansError> {
        self.required(&self.values.normalization_schemes, "normalization_schemes")
            .map(Vec::as_slice)
    }

    /// Absent: no channel uses the mask.
    pub fn use_mask_for_norm(&self) -> &[bool] {
        self.values.use_mask_for_norm.as_deref().unwrap_or_default()
    }

    pub fn architecture(&self) -> Result<&ArchitecturePlan, PlansError> {
        self.required(&self.values.architecture, "architecture")
    }

    /// Absent: per-sample Dice.
    pub fn batch_dice(&self) -> bool {
        self.values.batch_dice.unwrap_or(false)
    }

    /// nnU-Net's `next_stage_names`: the configurations that take this one's predictions.
    pub fn next_stage_names(&self) -> Vec<String> {
        match &self.values.next_stage {
            None => Vec::new(),
            Some(StageNames::One(name)) => vec![name.clone()],
            Some(StageNames::Many(names)) => names.clone(),
        }
    }

    /// nnU-Net's `previous_stage_name`: the configuration whose predictions this one takes.
    pub fn previous_stage_name(&self) -> Option<&str> {
        self.values.previous_stage.as_deref()
    }

    /// `resampling_fn_data_kwargs`, with the defaults of image resampling.
    pub fn data_resampling(&self) -> ResampleOptions {
        ResamplingKwargs::options(
            self.values.resampling_fn_data_kwargs.as_ref(),
            ResampleOptions::data(),
        )
    }

    /// `resampling_fn_seg_kwargs`, with the defaults of segmentation resampling.
    pub fn seg_resampling(&self) -> ResampleOptions {
        ResamplingKwargs::options(
            self.values.resampling_fn_seg_kwargs.as_ref(),
            ResampleOptions::seg(),
        )
    }

    /// `resampling_fn_probabilities_kwargs`, with the defaults of logit resampling at export.
    pub fn probabilities_resampling(&self) -> ResampleOptions {
        ResamplingKwargs::options(
            self.values.resampling_fn_probabilities_kwargs.as_ref(),
            ResampleOptions::probabilities(),
        )
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn plans(configurations: Value) -> Plans {
        let value = json!({
            "dataset_name": "Dataset001_X", "plans_name": "nnUNetPlans",
            "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
            "original_median_shape_after_transp": [10, 10, 10],
            "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "configurations": configurations,
            "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {}
        });
        Plans::from_json(&value, "test").unwrap()
    }

    #[test]
    fn inheritance_is_a_shallow_update_and_cycles_are_refused() {
        let p = plans(json!({
            "a": {"batch_size": 2, "spacing": [1.0, 2.0, 3.0], "resampling_fn_seg_kwargs": {"order": 0}, "x": 1},
            "b": {"inherits_from": "a", "batch_size": 4, "resampling_fn_seg_kwargs": {"order_z": 1}, "y": 2},
            "c": {"inherits_from": "b", "previous_stage": "a"},
            "loop1": {"inherits_from": "loop2"},
            "loop2": {"inherits_from": "loop1"},
            "self": {"inherits_from": "self"},
            "orphan": {"inherits_from": "missing"}
        }));
        let c = p.configuration("c").unwrap();
        assert_eq!(c.batch_size().unwrap(), 4);
        assert_eq!(c.spacing().unwrap(), [1.0, 2.0, 3.0]);
        assert_eq!(c.previous_stage_name(), Some("a"));
        assert_eq!(c.values.inherits_from.as_deref(), Some("b"));
        // The kwargs are replaced whole, not merged key by key.
        assert_eq!(c.seg_resampling().order, ResampleOptions::seg().order);
        assert_eq!(c.seg_resampling().order_z, 1);
        assert_eq!(
            serde_json::to_value(&c.values.extra).unwrap(),
            json!({"x": 1, "y": 2})
        );
        let loop_error = p.configuration("loop1").unwrap_err().to_string();
        assert_eq!(
            loop_error,
            "configuration loop1: `inherits_from` is circular (loop1 -> loop2 -> loop1)"
        );
        assert!(matches!(
            p.configuration("self"),
            Err(PlansError::CircularInheritance { .. })
        ));
        assert_eq!(
            p.configuration("orphan").unwrap_err().to_string(),
            "the plan has no configuration `missing` (planned: [\"a\", \"b\", \"c\", \"loop1\", \"loop2\", \"orphan\", \"self\"])"
        );
        assert_eq!(
            p.configuration("a")
                .unwrap()
                .patch_size()
                .unwrap_err()
                .to_string(),
            "configuration a: `patch_size` is missing"
        );
    }

    #[test]
    fn stage_names_are_one_or_a_list() {
        let p = plans(json!({
            "one": {"next_stage": "3d_cascade_fullres"},
            "many": {"next_stage": ["a", "b"]},
            "none": {}
        }));
        let names = |n: &str| p.configuration(n).unwrap().next_stage_names();
        assert_eq!(names("one"), ["3d_cascade_fullres"]);
        assert_eq!(names("many"), ["a", "b"]);
        assert!(names("none").is_empty());
    }

    #[test]
    fn resampling_kwargs_fall_back_to_the_defaults() {
        let p = plans(json!({"c": {
            "resampling_fn_data_kwargs": {"is_seg": false, "order": 1, "order_z": 2, "force_separate_z": true,
                                          "separate_z_anisotropy_threshold": 2.5},
            "resampling_fn_probabilities_kwargs": {"force_separate_z": null}
        }}));
        let c = p.configuration("c").unwrap();
        let data = c.data_resampling();
        assert_eq!(
            (
                data.order,
                data.order_z,
                data.force_separate_z,
                data.anisotropy_threshold
            ),
            (1, 2, Some(true), 2.5)
        );
        let defaults = ResampleOptions::probabilities();
        let probabilities = c.probabilities_resampling();
        assert_eq!(
            (probabilities.order, probabilities.force_separate_z),
            (defaults.order, None)
        );
        assert_eq!(c.seg_resampling().order, ResampleOptions::seg().order);
    }
}
