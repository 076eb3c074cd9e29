//! The `predict` stage: new images through the selected model or ensemble (all folds of each
//! configuration averaged), exported to each input's geometry, postprocessed, written as NIfTI to
//! the folder the pipeline names. Runs in the `nnflow-torch` worker.

use std::process::Command;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::ensemble_select::Decision;
use super::process::run_logged;
use super::{to_json, Kind, Stage, StageContext, StageError, StageInput};
use crate::data::dataset::Dataset;
use crate::file_error::FileError;
use crate::inference::cases::image_cases;
use crate::inference::job::{ModelJob, PredictJob};
use crate::plans::Plans;
use crate::torch_env::DeviceChoice;
use crate::train::job::FoldInfo;

pub const KIND: Kind = Kind {
    name: "predict",
    version: 1,
    toolchain: super::LIBTORCH,
    schema: |generator| generator.subschema_for::<PredictStage>(),
    build: super::finite::build_finite::<PredictStage>,
};

fn half() -> f64 {
    0.5
}
fn yes() -> bool {
    true
}

/// Predicts a folder of images with trained models.
#[derive(Deserialize, Serialize, JsonSchema, Debug)]
#[serde(deny_unknown_fields)]
pub struct PredictStage {
    /// Images to predict: nnU-Net naming (`<case>_0000.nii.gz`) or, single channel, plain files.
    #[serde(skip_serializing)]
    pub images: String,
    /// Where the predictions go (`<case><file ending>`), relative to the pipeline file.
    #[serde(skip_serializing)]
    pub output: String,
    /// The dataset folder (dataset.json).
    #[serde(skip_serializing)]
    pub dataset: String,
    /// The plan stage's outputs: `${plan.outputs}`.
    #[serde(skip_serializing)]
    pub plan: String,
    /// Every training's outputs: `${train[*].outputs}`.
    #[serde(skip_serializing)]
    pub trainings: Vec<String>,
    /// The `ensemble-select` stage's outputs (`${select.outputs}`); without it, `configuration`.
    #[serde(default, skip_serializing)]
    pub selection: Option<String>,
    /// Predict with this configuration, or this list of configurations as an ensemble (e.g.
    /// `["3d_lowres", "3d_cascade_fullres"]`), instead of the selection.
    #[serde(default)]
    pub configuration: Option<Configurations>,
    /// The `postprocess` stage's outputs (`${postprocess.outputs}`); without it, none.
    #[serde(default, skip_serializing)]
    pub postprocessing: Option<String>,
    /// Sliding-window step as a fraction of the patch.
    #[serde(default = "half")]
    pub step_size: f64,
    /// Mirroring test-time augmentation.
    #[serde(default = "yes")]
    pub mirroring: bool,
    #[serde(default)]
    pub device: DeviceChoice,
    /// fp16 autocast on CUDA.
    #[serde(default = "yes")]
    pub amp: bool,
    /// Also write probabilities (`<case>.npy`).
    #[serde(default)]
    pub save_probabilities: bool,
}

/// What is wrong with the stage's parameters or the trainings they name.
#[derive(Debug, thiserror::Error)]
pub enum PredictStageError {
    #[error("step_size must lie in (0, 1], got {0}")]
    StepSize(f64),
    #[error("`configuration` is an empty list")]
    NoConfigurations,
    #[error("give `selection` (${{select.outputs}}) or `configuration`")]
    NoModelChoice,
    /// `member`: a configuration to predict with, not only the previous stage of a cascade.
    #[error(
        "no training of configuration {configuration} among `trainings`{}",
        if *member { "" } else { " (the previous stage of a cascade to predict with)" }
    )]
    NoTraining { configuration: String, member: bool },
    #[error(transparent)]
    File(#[from] FileError),
}

/// One configuration, or several predicted as an ensemble.
#[derive(Deserialize, Serialize, JsonSchema, Debug, Clone)]
#[serde(untagged)]
pub enum Configurations {
    One(String),
    Ensemble(Vec<String>),
}

impl PredictStage {
    /// The trained folds of a configuration among `trainings`.
    fn model(
        &self,
        root: &std::path::Path,
        configuration: &str,
        member: bool,
    ) -> Result<ModelJob, PredictStageError> {
        let mut checkpoints = Vec::new();
        for training in &self.trainings {
            let folder = root.join(training);
            if !folder.exists() {
                continue; // a training that did not apply (its configuration is not planned)
            }
            let fold: FoldInfo = crate::atomic_file::read_json(&folder.join("fold.json"))?;
            if fold.configuration == configuration {
                checkpoints.push(folder.join("checkpoint_final.safetensors"));
            }
        }
        if checkpoints.is_empty() {
            return Err(PredictStageError::NoTraining {
                configuration: configuration.to_string(),
                member,
            });
        }
        Ok(ModelJob {
            configuration: configuration.to_string(),
            checkpoints,
            member,
        })
    }
}

impl Stage for PredictStage {
    fn inputs(&self) -> Vec<StageInput> {
        vec![
            StageInput {
                name: "images".into(),
                path: self.images.clone(),
            },
            StageInput {
                name: "dataset/dataset.json".into(),
                path: format!("{}/dataset.json", self.dataset),
            },
            StageInput {
                name: "plan".into(),
                path: format!("{}/plans.json", self.plan),
            },
        ]
    }

    fn project_outputs(&self) -> Vec<String> {
        vec![self.output.clone()]
    }

    fn params_json(&self) -> serde_json::Value {
        to_json(self)
    }

    fn run(&self, ctx: &StageContext) -> Result<(), StageError> {
        if !(self.step_size > 0.0 && self.step_size <= 1.0) {
            return Err(PredictStageError::StepSize(self.step_size).into());
        }
        let root = ctx.root;
        let dataset = Dataset::open(&root.join(&self.dataset))?;
        let configurations = match (&self.configuration, &self.selection) {
            (Some(Configurations::One(configuration)), _) => vec![configuration.clone()],
            (Some(Configurations::Ensemble(configurations)), _) if !configurations.is_empty() => {
                configurations.clone()
            }
            (Some(Configurations::Ensemble(_)), _) => return Err(PredictStageError::NoConfigurations.into()),
            (None, Some(selection)) => {
                let decision: Decision =
                    crate::atomic_file::read_json(&root.join(selection).join("decision.json"))?;
                decision.best.configurations
            }
            (None, None) => return Err(PredictStageError::NoModelChoice.into()),
        };
        let plans = Plans::read(&root.join(&self.plan).join("plans.json"))?;
        let mut models: Vec<ModelJob> = Vec::new();
        for configuration in configurations {
            // a cascade needs its previous stage's prediction first
            let resolved = plans.configuration(&configuration)?;
            if let Some(previous) = resolved.previous_stage_name() {
                if !models.iter().any(|m| m.configuration == previous) {
                    models.push(self.model(root, previous, false)?);
                }
            }
            match models.iter_mut().find(|m| m.configuration == configuration) {
                Some(model) => model.member = true,
                None => models.push(self.model(root, &configuration, true)?),
            }
        }
        let cases = image_cases(
            &root.join(&self.images),
            dataset.channels.len(),
            &dataset.file_ending,
        )?;
        let job = PredictJob {
            cases: cases.into_iter().map(|c| (c.id, c.images)).collect(),
            dataset: root.join(&self.dataset),
            plans: root.join(&self.plan).join("plans.json"),
            models,
            postprocessing: self
                .postprocessing
                .as_ref()
                .map(|p| root.join(p).join("postprocessing.json")),
            output: root.join(&self.output),
            step_size: self.step_size,
            mirroring: self.mirroring,
            device: self.device,
            amp: self.amp,
            threads: ctx.threads.max(1) as usize,
            save_probabilities: self.save_probabilities,
        };
        // the job goes with the outputs: it records what was predicted with what
        let job_file = ctx.out_dir.join("predict_job.json");
        crate::atomic_file::write_json(&job_file, &job)?;
        let mut command = Command::new(crate::torch_env::worker_path());
        command.arg("predict").arg(&job_file).current_dir(root);
        Ok(run_logged(command, ctx, "prediction")?)
    }
}
