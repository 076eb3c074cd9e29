//! The `plan` stage: nnU-Net's default experiment planner, or one of its residual-encoder presets,
//! on a fingerprint, or another dataset's plans moved onto this dataset
//! (`nnUNetv2_move_plans_between_datasets`), writing plans.json (with dataset.json and
//! dataset_fingerprint.json beside it, as nnU-Net's preprocessed folder has).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Kind, ParamError, Stage, StageContext, StageError, StageInput};
use crate::data::dataset::{Dataset, DatasetError};
use crate::data::fingerprint_format::Fingerprint;
use crate::file_error::FileError;
use crate::plans::{Plans, PlansError};
use crate::preprocess::plan::{check_configuration_name, plan, PlanError, PlanInputs, PlanSettings, Planner};
use crate::preprocess::plan_transfer::{transfer_plans, TransferError, TransferSource, TransferTarget};

pub const KIND: Kind = Kind {
    name: "plan",
    version: 1,
    toolchain: &[],
    schema: |generator| generator.subschema_for::<PlanStage>(),
    build,
};

/// Plans the configurations (2d, 3d_fullres, 3d_lowres, 3d_cascade_fullres) as nnU-Net's default
/// experiment planner, or one of its residual-encoder presets, does, or takes another dataset's
/// plans (`plans_from`). Every planned value can be overridden.
#[derive(Deserialize, Serialize, JsonSchema, Debug)]
#[serde(deny_unknown_fields)]
pub struct PlanStage {
    /// The dataset folder (its dataset.json is read), relative to the pipeline file or absolute.
    #[serde(skip_serializing)]
    pub dataset: String,
    /// The folder holding dataset_fingerprint.json: `${fingerprint.outputs}`. With `plans_from`
    /// it is only copied beside the plans (nnU-Net keeps it with the model), not planned from.
    #[serde(skip_serializing)]
    pub fingerprint: String,
    /// Another dataset's plans to use for this one instead of planning, as nnU-Net's
    /// `nnUNetv2_move_plans_between_datasets` does (to pretrain on one dataset and fine-tune on the
    /// other with the train stage's `pretrained_weights`): a plans file (a path ending in `.json`,
    /// e.g. nnU-Net's `nnUNet_preprocessed/Dataset001_X/nnUNetPlans.json`) or a folder holding
    /// plans.json, such as another plan stage's `${plan_source.outputs}`. Its contents are keyed.
    /// Everything is kept from those plans: every configuration (architecture, patch and batch
    /// size, spacing, normalization schemes, resampling), the transpose, and the other dataset's
    /// median spacing and shape and `foreground_intensity_properties_per_channel`, so CT
    /// normalization clips and scales with the other dataset's statistics. Only `dataset_name`
    /// (this dataset's folder name), `image_reader_writer` (this dataset's reader, from its
    /// dataset.json), `plans_name` and the `data_identifier`s (see `plans_name`) change. This
    /// dataset's fingerprint does not enter the plans, not even its statistics (nnU-Net keeps the
    /// other dataset's); it is only copied beside them. The plans must normalize as many
    /// channels as this dataset has (another modality is allowed, as in nnU-Net, and noted in
    /// the stage's log).
    /// `planner` and `overwrite_target_spacing` are refused next to it, `gpu_memory_gb` is not used
    /// (the transferred plans were made for their own GPU budget); `overrides` apply.
    #[serde(skip_serializing)]
    pub plans_from: Option<String>,
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
    /// With `plans_from`, nnU-Net's target plans identifier (`-tp`), by default the transferred
    /// plans' own `plans_name`; a different name also renames each `data_identifier` as nnU-Net
    /// does (`nnUNetPlans_3d_fullres` becomes `<name>_3d_fullres`, one not starting with the old
    /// name is prefixed: `<name>_nnUNetPlans_2d`).
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

/// The parameters that choose how to plan, and so do not go with `plans_from`. `gpu_memory_gb` is
/// not among them: nnU-Net's default pipeline sets it for every plan stage, and it only says what
/// GPU the plans are for, which transferred plans already decided.
const PLANNING_PARAMETERS: [&str; 2] = ["planner", "overwrite_target_spacing"];

/// Reads the parameters as every kind does, then refuses planner parameters next to `plans_from`
/// (they would be silently ignored) when the pipeline is loaded.
fn build(params: toml::Value) -> Result<Box<dyn Stage>, ParamError> {
    let stage = super::finite::build_finite::<PlanStage>(params.clone())?;
    let table = params.as_table();
    let given = |key: &str| table.is_some_and(|t| t.contains_key(key));
    if given("plans_from") {
        if let Some(key) = PLANNING_PARAMETERS.into_iter().find(|key| given(key)) {
            return Err(ParamError {
                path: vec![key.to_string()],
                message: format!(
                    "`{key}` chooses how to plan, but with `plans_from` the plans are transferred, \
                     not planned: remove one of the two"
                ),
            });
        }
    }
    Ok(stage)
}

impl PlanStage {
    /// The file `plans_from` names: itself when it ends in `.json`, else the folder's plans.json.
    fn source_plans(&self) -> Option<String> {
        self.plans_from.as_ref().map(|from| {
            if from.ends_with(".json") {
                from.clone()
            } else {
                format!("{}/plans.json", from.trim_end_matches('/'))
            }
        })
    }

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
    /// The `plans_from` file is missing or not JSON.
    #[error("plans_from: {0}")]
    Source(#[source] FileError),
    #[error("plans_from: {0}")]
    Transfer(#[from] TransferError),
}

impl Stage for PlanStage {
    fn inputs(&self) -> Vec<StageInput> {
        let mut inputs = vec![
            StageInput {
                name: "dataset/dataset.json".into(),
                path: format!("{}/dataset.json", self.dataset),
            },
            StageInput {
                name: "fingerprint".into(),
                path: format!("{}/dataset_fingerprint.json", self.fingerprint),
            },
        ];
        if let Some(source) = self.source_plans() {
            inputs.push(StageInput {
                name: "plans_from".into(),
                path: source,
            });
        }
        inputs
    }

    fn params_json(&self) -> Value {
        if self.plans_from.is_some() {
            // The source plans are keyed as an input; the name stays as given (`null`: the
            // source's own), since its default depends on the source's contents.
            return serde_json::json!({
                "plans_from": "transfer",
                "plans_name": self.plans_name,
                "overrides": self.overrides,
            });
        }
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
        let dataset_json_path = dataset_root.join("dataset.json");
        let dataset_json: Value = read_json(&dataset_json_path)?;
        let fingerprint_path = ctx.root.join(&self.fingerprint).join("dataset_fingerprint.json");
        let fingerprint = read_fingerprint(&fingerprint_path)?;
        let dataset_name = dataset_root.canonicalize().unwrap_or(dataset_root.clone());
        let dataset_name = dataset_name
            .file_name()
            .map_or("dataset".into(), |n| n.to_string_lossy().into_owned());
        let mut plans = match self.source_plans() {
            Some(source) => {
                let source_path = ctx.root.join(source);
                let source_plans = read_source_plans(&source_path)?;
                let target = TransferTarget {
                    dataset_name: &dataset_name,
                    channel_names: &dataset.channels,
                    dataset_json: &dataset_json,
                    dataset_json_origin: &dataset_json_path.display().to_string(),
                };
                let source = TransferSource {
                    plans: &source_plans,
                    origin: &source_path.display().to_string(),
                };
                let moved = transfer_plans(source, target, self.plans_name.as_deref())
                    .map_err(PlanStageError::from)?;
                ctx.log(&format!("plans transferred from {}", source_path.display()));
                for note in &moved.notes {
                    ctx.log(note);
                }
                moved.plans
            }
            None => {
                let inputs = PlanInputs {
                    fingerprint: &fingerprint,
                    channel_names: &dataset.channels,
                    labels: dataset_json["labels"].clone(),
                    num_training_cases: dataset.num_training,
                    dataset_name: &dataset_name,
                    file_ending: &dataset.file_ending,
                };
                plan(&inputs, &self.settings()).map_err(PlanStageError::from)?
            }
        };
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

/// Reads the plans `plans_from` names; errors say it is that parameter's file.
fn read_source_plans(path: &Path) -> Result<Value, PlanStageError> {
    let text = std::fs::read(path).map_err(|e| PlanStageError::Source(FileError::io(path)(e)))?;
    serde_json::from_slice(&text).map_err(|e| PlanStageError::Source(FileError::json(path)(e)))
}

fn read_json(path: &Path) -> Result<Value, PlanStageError> {
    let text = std::fs::read(path).map_err(|source| PlanStageError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(serde_json::from_slice(&text).map_err(FileError::json(path))?)
}

fn write_json(path: &Path, value: &Value) -> Result<(), PlanStageError> {
    let sorted = crate::json_sorted::sorted_keys(value);
    let mut text = serde_json::to_vec_pretty(&sorted).map_err(FileError::json(path))?;
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
    fn plans_from_keys_the_source_file_and_only_the_parameters_that_apply() {
        let from_folder = stage("plans_from = \"out/plan_a/\"");
        let input = from_folder.inputs().pop().unwrap();
        assert_eq!(
            (input.name.as_str(), input.path.as_str()),
            ("plans_from", "out/plan_a/plans.json")
        );
        let from_file = stage("plans_from = \"pre/Dataset001_A/nnUNetPlans.json\"");
        assert_eq!(
            from_file.inputs().pop().unwrap().path,
            "pre/Dataset001_A/nnUNetPlans.json"
        );
        // Pinned: the name is keyed as given, its default being the source's own.
        assert_eq!(
            from_file.params_json(),
            serde_json::json!({"plans_from": "transfer", "plans_name": null, "overrides": {}})
        );
        assert_eq!(
            stage("plans_from = \"a.json\"\nplans_name = \"Pre\"").params_json()["plans_name"],
            "Pre"
        );
        assert_eq!(stage("").inputs().len(), 2);
    }

    #[test]
    fn planner_parameters_next_to_plans_from_are_refused() {
        let params = |extra: &str| -> toml::Value {
            toml::from_str(&format!("dataset = \"d\"\nfingerprint = \"f\"\n{extra}")).unwrap()
        };
        let error = build(params("plans_from = \"a.json\"\nplanner = \"ResEncL\"")).unwrap_err();
        assert_eq!(error.path, ["planner"]);
        assert!(
            error
                .message
                .contains("with `plans_from` the plans are transferred"),
            "{}",
            error.message
        );
        assert!(build(params("plans_from = \"a.json\"\nplans_name = \"P\"")).is_ok());
        // the default pipeline sets the GPU budget for every plan stage
        assert!(build(params("plans_from = \"a.json\"\ngpu_memory_gb = 24")).is_ok());
        assert!(build(params("gpu_memory_gb = 24")).is_ok());
    }

    #[test]
    fn an_unknown_planner_is_refused() {
        let text = "dataset = \"d\"\nfingerprint = \"f\"\nplanner = \"ResEncXXL\"";
        let error = toml::from_str::<PlanStage>(text).unwrap_err().to_string();
        assert!(error.contains("unknown variant `ResEncXXL`"), "{error}");
    }
}
