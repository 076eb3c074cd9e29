//! The `plan` stage: nnU-Net's default experiment planner, or one of its residual-encoder presets,
//! on a fingerprint, writing plans.json (with dataset.json and dataset_fingerprint.json beside it,
//! as nnU-Net's preprocessed folder has).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Kind, Stage, StageContext, StageError, StageInput};
use crate::data::dataset::{Dataset, DatasetError};
use crate::data::fingerprint_format::Fingerprint;
use crate::file_error::FileError;
use crate::plans::{Plans, PlansError};
use crate::preprocess::plan::{check_configuration_name, plan, PlanError, PlanInputs, PlanSettings, Planner};

pub const KIND: Kind = Kind {
    name: "plan",
    version: 1,
    toolchain: &[],
    schema: |generator| generator.subschema_for::<PlanStage>(),
    build: super::finite::build_finite::<PlanStage>,
};

/// Plans the configurations (2d, 3d_fullres, 3d_lowres, 3d_cascade_fullres) as nnU-Net's default
/// experiment planner, or one of its residual-encoder presets, does. Every planned value can be
/// overridden.
#[derive(Deserialize, Serialize, JsonSchema, Debug)]
#[serde(deny_unknown_fields)]
pub struct PlanStage {
    /// The dataset folder (its dataset.json is read), relative to the pipeline file or absolute.
    #[serde(skip_serializing)]
    pub dataset: String,
    /// The folder holding dataset_fingerprint.json: `${fingerprint.outputs}`.
    #[serde(skip_serializing)]
    pub fingerprint: String,
    /// Which of nnU-Net's experiment planners to reproduce: `default` (`ExperimentPlanner`, a
    /// PlainConvUNet) or a residual-encoder preset planning a ResidualEncoderUNet for a bigger GPU
    /// (`ResEncM`, `ResEncL`, `ResEncXL`: nnU-Net's `-pl nnUNetPlannerResEncM` etc.).
    #[serde(default, skip_serializing_if = "is_default_planner")]
    pub planner: PlannerChoice,
    /// GPU memory the plan targets, in GB. Default: the planner's reference GPU (8 for `default`
    /// and `ResEncM`, 24 for `ResEncL`, 40 for `ResEncXL`); the planner scales its memory budget
    /// by this over the reference.
    pub gpu_memory_gb: Option<f64>,
    /// Name of the plans (nnU-Net's `-pl`/plans identifier). Default: the planner's
    /// (`nnUNetPlans`, `nnUNetResEncUNetMPlans`, `nnUNetResEncUNetLPlans`, `nnUNetResEncUNetXLPlans`).
    pub plans_name: Option<String>,
    /// Target spacing (z, y, x) to use instead of the planned one.
    pub overwrite_target_spacing: Option<[f64; 3]>,
    /// Planned values to replace, per configuration, e.g.
    /// `overrides = { "3d_fullres" = { batch_size = 4, patch_size = [96, 160, 160] } }`. Only
    /// configurations the plan produces can be overridden (no new ones).
    #[serde(default, deserialize_with = "planned_overrides")]
    pub overrides: BTreeMap<String, BTreeMap<String, Value>>,
}

/// The `planner` parameter: nnU-Net's experiment planner classes nnflow reproduces.
#[derive(Deserialize, Serialize, JsonSchema, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PlannerChoice {
    /// `ExperimentPlanner`: a PlainConvUNet for 8 GB of GPU memory.
    #[default]
    #[serde(rename = "default", alias = "ExperimentPlanner")]
    Default,
    /// `nnUNetPlannerResEncM`: a ResidualEncoderUNet for 8 GB (uses ~9-11 GB).
    #[serde(alias = "nnUNetPlannerResEncM")]
    ResEncM,
    /// `nnUNetPlannerResEncL`: a ResidualEncoderUNet for 24 GB.
    #[serde(alias = "nnUNetPlannerResEncL")]
    ResEncL,
    /// `nnUNetPlannerResEncXL`: a ResidualEncoderUNet for 40 GB.
    #[serde(alias = "nnUNetPlannerResEncXL")]
    ResEncXL,
}

impl From<PlannerChoice> for Planner {
    fn from(choice: PlannerChoice) -> Planner {
        match choice {
            PlannerChoice::Default => Planner::Default,
            PlannerChoice::ResEncM => Planner::ResEncM,
            PlannerChoice::ResEncL => Planner::ResEncL,
            PlannerChoice::ResEncXL => Planner::ResEncXL,
        }
    }
}

fn is_default_planner(choice: &PlannerChoice) -> bool {
    *choice == PlannerChoice::Default
}

impl PlanStage {
    /// The planner's settings: the preset's defaults where a parameter is not given.
    fn settings(&self) -> PlanSettings {
        let mut settings = PlanSettings::for_planner(self.planner.into());
        if let Some(gb) = self.gpu_memory_gb {
            settings.gpu_memory_target_gb = gb;
        }
        if let Some(name) = &self.plans_name {
            settings.plans_name = name.clone();
        }
        settings.overwrite_target_spacing = self.overwrite_target_spacing;
        settings
    }
}

/// The overrides, refusing a configuration name nnU-Net never plans (a misspelling), so that it
/// fails when the pipeline is loaded.
fn planned_overrides<'de, D>(deserializer: D) -> Result<BTreeMap<String, BTreeMap<String, Value>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let overrides = BTreeMap::<String, BTreeMap<String, Value>>::deserialize(deserializer)?;
    for name in overrides.keys() {
        check_configuration_name(name).map_err(serde::de::Error::custom)?;
    }
    Ok(overrides)
}

#[derive(Debug, thiserror::Error)]
pub enum PlanStageError {
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
    /// Not JSON, or not the expected JSON.
    #[error(transparent)]
    File(#[from] FileError),
    #[error(
        "{}: `{field}` is null, not a number (a NaN or infinite value: check the dataset's images \
         with `nnflow check` and fingerprint it again)",
        path.display()
    )]
    NullInFingerprint { path: PathBuf, field: String },
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("overrides: the plan has no configuration `{configuration}`")]
    UnplannedOverride { configuration: String },
    /// An override that makes plans.json unreadable (a value of the wrong type).
    #[error("overrides: {0}")]
    InvalidOverride(#[source] PlansError),
}

impl Stage for PlanStage {
    fn inputs(&self) -> Vec<StageInput> {
        vec![
            StageInput {
                name: "dataset/dataset.json".into(),
                path: format!("{}/dataset.json", self.dataset),
            },
            StageInput {
                name: "fingerprint".into(),
                path: format!("{}/dataset_fingerprint.json", self.fingerprint),
            },
        ]
    }

    fn params_json(&self) -> Value {
        // The resolved GPU target and plans name, as the parameters were before `planner` came:
        // an omitted value and the planner's default share a key, and the default planner's keys
        // are unchanged.
        let settings = self.settings();
        let mut params = super::to_json(self);
        params["gpu_memory_gb"] = settings.gpu_memory_target_gb.into();
        params["plans_name"] = settings.plans_name.into();
        params
    }

    fn run(&self, ctx: &StageContext) -> Result<(), StageError> {
        let dataset_root = ctx.root.join(&self.dataset);
        let dataset = Dataset::open(&dataset_root).map_err(PlanStageError::from)?;
        let dataset_json: Value = read_json(&dataset_root.join("dataset.json"))?;
        let fingerprint_path = ctx.root.join(&self.fingerprint).join("dataset_fingerprint.json");
        let fingerprint = read_fingerprint(&fingerprint_path)?;
        let dataset_name = dataset_root.canonicalize().unwrap_or(dataset_root.clone());
        let dataset_name = dataset_name
            .file_name()
            .map_or("dataset".into(), |n| n.to_string_lossy().into_owned());
        let inputs = PlanInputs {
            fingerprint: &fingerprint,
            channel_names: &dataset.channels,
            labels: dataset_json["labels"].clone(),
            num_training_cases: dataset.num_training,
            dataset_name: &dataset_name,
            file_ending: &dataset.file_ending,
        };
        let mut plans = plan(&inputs, &self.settings()).map_err(PlanStageError::from)?;
        apply_overrides(&mut plans, &self.overrides)?;
        // Every later stage reads the plan through `Plans`: refuse one it could not read (an
        // override of the wrong type) here, naming the key. The JSON is written as it is, so the
        // file keeps the planner's (and the overrides') numbers exactly.
        Plans::from_json(&plans, "plans.json").map_err(PlanStageError::InvalidOverride)?;
        write_json(&ctx.out_dir.join("plans.json"), &plans)?;
        write_json(&ctx.out_dir.join("dataset.json"), &dataset_json)?;
        std::fs::copy(&fingerprint_path, ctx.out_dir.join("dataset_fingerprint.json"))
            .map_err(FileError::io(&fingerprint_path))?;
        Ok(())
    }
}

/// Sets the overridden keys in the planned JSON (any key: nnU-Net's configurations may carry keys
/// nnflow does not read, and they are kept).
fn apply_overrides(
    plans: &mut Value,
    overrides: &BTreeMap<String, BTreeMap<String, Value>>,
) -> Result<(), PlanStageError> {
    for (configuration, values) in overrides {
        let Some(target) = plans["configurations"]
            .get_mut(configuration)
            .and_then(Value::as_object_mut)
        else {
            return Err(PlanStageError::UnplannedOverride {
                configuration: configuration.clone(),
            });
        };
        for (key, value) in values {
            target.insert(key.clone(), value.clone());
        }
    }
    Ok(())
}

/// Reads dataset_fingerprint.json; a `null` where a number belongs (a non-finite value written
/// by an older nnflow, or a hand-made file) is named rather than reported as a type error.
fn read_fingerprint(path: &Path) -> Result<Fingerprint, PlanStageError> {
    let value = read_json(path)?;
    if let Some(field) = crate::json_numbers::first_null(&value) {
        return Err(PlanStageError::NullInFingerprint {
            path: path.to_path_buf(),
            field,
        });
    }
    Ok(serde_json::from_value(value).map_err(FileError::json(path))?)
}

fn read_json(path: &Path) -> Result<Value, PlanStageError> {
    let text = std::fs::read(path).map_err(|source| PlanStageError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(serde_json::from_slice(&text).map_err(FileError::json(path))?)
}

fn write_json(path: &Path, value: &Value) -> Result<(), PlanStageError> {
    let mut text = serde_json::to_vec_pretty(value).map_err(FileError::json(path))?;
    text.push(b'\n');
    std::fs::write(path, text).map_err(|source| PlanStageError::Write {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(extra: &str) -> PlanStage {
        let text = format!("dataset = \"d\"\nfingerprint = \"f\"\n{extra}");
        toml::from_str(&text).expect("plan parameters")
    }

    #[test]
    fn default_planner_keeps_its_cache_key_parameters() {
        // The parameters as they were before `planner` existed, so existing caches stay valid.
        assert_eq!(
            stage("").params_json(),
            serde_json::json!({
                "gpu_memory_gb": 8.0,
                "plans_name": "nnUNetPlans",
                "overwrite_target_spacing": null,
                "overrides": {}
            })
        );
        assert_eq!(
            stage("planner = \"default\"\ngpu_memory_gb = 8.0").params_json(),
            stage("").params_json()
        );
    }

    #[test]
    fn a_preset_brings_its_gpu_target_and_plans_name() {
        let resenc_l = stage("planner = \"ResEncL\"");
        let settings = resenc_l.settings();
        assert_eq!(settings.planner, Planner::ResEncL);
        assert_eq!(settings.gpu_memory_target_gb, 24.0);
        assert_eq!(settings.plans_name, "nnUNetResEncUNetLPlans");
        let params = resenc_l.params_json();
        assert_eq!(params["planner"], "ResEncL");
        assert_eq!(params["gpu_memory_gb"], 24.0);
        assert_eq!(params["plans_name"], "nnUNetResEncUNetLPlans");

        // nnU-Net's class names are accepted too; explicit values win over the preset's.
        let xl = stage("planner = \"nnUNetPlannerResEncXL\"\ngpu_memory_gb = 80\nplans_name = \"big\"");
        let settings = xl.settings();
        assert_eq!(settings.planner, Planner::ResEncXL);
        assert_eq!(settings.gpu_memory_target_gb, 80.0);
        assert_eq!(settings.plans_name, "big");
    }

    #[test]
    fn an_unknown_planner_is_refused() {
        let text = "dataset = \"d\"\nfingerprint = \"f\"\nplanner = \"ResEncXXL\"";
        let error = toml::from_str::<PlanStage>(text).unwrap_err().to_string();
        assert!(error.contains("unknown variant `ResEncXXL`"), "{error}");
    }
}
