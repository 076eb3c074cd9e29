//! The `plan` stage: nnU-Net's default experiment planner on a fingerprint, writing plans.json
//! (with dataset.json and dataset_fingerprint.json beside it, as nnU-Net's preprocessed folder has).

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
use crate::preprocess::plan::{check_configuration_name, plan, PlanError, PlanInputs, PlanSettings};

pub const KIND: Kind = Kind {
    name: "plan",
    version: 1,
    toolchain: &[],
    schema: |generator| generator.subschema_for::<PlanStage>(),
    build: super::finite::build_finite::<PlanStage>,
};

/// Plans the configurations (2d, 3d_fullres, 3d_lowres, 3d_cascade_fullres) as nnU-Net's default
/// experiment planner does. Every planned value can be overridden.
#[derive(Deserialize, Serialize, JsonSchema, Debug)]
#[serde(deny_unknown_fields)]
pub struct PlanStage {
    /// The dataset folder (its dataset.json is read), relative to the pipeline file or absolute.
    #[serde(skip_serializing)]
    pub dataset: String,
    /// The folder holding dataset_fingerprint.json: `${fingerprint.outputs}`.
    #[serde(skip_serializing)]
    pub fingerprint: String,
    /// GPU memory the plan targets, in GB (nnU-Net's default 8).
    #[serde(default = "eight")]
    pub gpu_memory_gb: f64,
    /// Name of the plans (nnU-Net's `-pl`/plans identifier).
    #[serde(default = "plans_name")]
    pub plans_name: String,
    /// Target spacing (z, y, x) to use instead of the planned one.
    pub overwrite_target_spacing: Option<[f64; 3]>,
    /// Planned values to replace, per configuration, e.g.
    /// `overrides = { "3d_fullres" = { batch_size = 4, patch_size = [96, 160, 160] } }`. Only
    /// configurations the plan produces can be overridden (no new ones).
    #[serde(default, deserialize_with = "planned_overrides")]
    pub overrides: BTreeMap<String, BTreeMap<String, Value>>,
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

fn eight() -> f64 {
    8.0
}

fn plans_name() -> String {
    "nnUNetPlans".to_string()
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
        super::to_json(self)
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
        let settings = PlanSettings {
            gpu_memory_target_gb: self.gpu_memory_gb,
            plans_name: self.plans_name.clone(),
            overwrite_target_spacing: self.overwrite_target_spacing,
            ..PlanSettings::default()
        };
        let mut plans = plan(&inputs, &settings).map_err(PlanStageError::from)?;
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
