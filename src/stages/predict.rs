//! The `predict` stage: new images through the selected model or ensemble (all folds of each
//! configuration averaged), exported to each input's geometry, postprocessed, written as NIfTI to
//! the folder the pipeline names. Runs in the `nnflow-torch` worker.

use std::path::{Path, PathBuf};
use std::process::Command;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::ensemble_select::Decision;
use super::process::run_logged;
use super::{to_json, Kind, Stage, StageContext, StageError, StageInput};
use crate::data::dataset::{Dataset, DatasetError};
use crate::file_error::FileError;
use crate::inference::cases::image_cases;
use crate::inference::job::{ModelJob, PredictJob};
use crate::inference::model::{
    extract_zip, FoldSelection, ModelError, ModelSource, TrainedModel, DEFAULT_CHECKPOINT,
};
use crate::network::Architecture;
use crate::plans::{Plans, PlansError};
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
    /// The dataset folder (dataset.json). Not needed with `models`, which bring their own.
    #[serde(default, skip_serializing)]
    pub dataset: Option<String>,
    /// The plan stage's outputs: `${plan.outputs}`. With `models`, only for nnflow trainings
    /// among them (they were trained with this plan; its folder holds dataset.json too).
    #[serde(default, skip_serializing)]
    pub plan: Option<String>,
    /// Every training's outputs: `${train[*].outputs}`.
    #[serde(default, skip_serializing)]
    pub trainings: Vec<String>,
    /// Models trained by nnU-Net v2, as its users have them: a results folder
    /// (`<trainer>__<plans>__<configuration>` holding `plans.json`, `dataset.json` and
    /// `fold_N/`), a folder above such folders, or a zip made by `nnUNetv2_export_model_to_zip`;
    /// or nnflow trainings (folders holding fold.json, or a folder above them), with `plan`.
    /// Several models are predicted as an ensemble (probabilities averaged). Their files are
    /// inputs of the stage; instead of `trainings`, `dataset` and `configuration`.
    #[serde(default, skip_serializing)]
    pub models: Vec<String>,
    /// With `models`: the folds to predict with (`["0", "1"]`, `["all"]`); every numbered fold
    /// that has the checkpoint when absent (nnU-Net's `-f` default).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub folds: Vec<String>,
    /// With `models`: each fold's checkpoint file (nnU-Net's `-chk`); `checkpoint_final.pth` when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
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
    /// A cascade's second stage (`3d_cascade_fullres`) on segmentations of its previous stage
    /// made elsewhere (nnU-Net's `-prev_stage_predictions`): a folder holding `<case><file
    /// ending>` for every image, on the image's grid. They become the extra one-hot input
    /// channels, resampled to the cascade's grid as nnU-Net's predictor does, instead of a
    /// prediction of the previous stage. Required for an nnU-Net cascade model; for nnflow's
    /// trainings it replaces the previous stage's prediction. The folder's contents are inputs
    /// of the stage. An error when no configuration predicted is a cascade.
    #[serde(default, skip_serializing)]
    pub previous_stage_predictions: Option<String>,
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
    #[error("`models` names no model")]
    NoModels,
    #[error("give `dataset` and `plan` (or `models`, which bring their own)")]
    NoPlan,
    #[error("`models` replaces `trainings`, `selection` and `configuration`: give one or the other")]
    ModelsAndTrainings,
    #[error(
        "{model} holds nnflow trainings, which bring no plan: give the plan stage's outputs they \
         were trained with (`plan`, nnflow predict's --plan), or export them (nnflow export-model)"
    )]
    NnflowWithoutPlan { model: PathBuf },
    #[error(
        "{model} is a cascade's second stage ({configuration}): it needs the segmentations of its \
         previous stage {previous} (`previous_stage_predictions`, nnflow predict's \
         --prev-stage-predictions)"
    )]
    Cascade {
        model: PathBuf,
        configuration: String,
        previous: String,
    },
    #[error(
        "`previous_stage_predictions` ({folder}) is for a cascade's second stage, but none of the \
         configurations predicted ({}) has a previous stage",
        configurations.join(", ")
    )]
    NotACascade {
        folder: PathBuf,
        configurations: Vec<String>,
    },
    #[error("case {case}: no previous-stage segmentation {file} in {}", folder.display())]
    MissingPreviousStage {
        case: String,
        file: String,
        folder: PathBuf,
    },
    #[error("{model}: {source}")]
    Trainer {
        model: PathBuf,
        source: crate::inference::trainers::RefusedTrainer,
    },
    #[error("{model} ({configuration}): {source}")]
    Architecture {
        model: PathBuf,
        configuration: String,
        source: crate::network::architecture::ArchitectureError,
    },
    #[error("the models to ensemble have different labels: {first} and {other}")]
    DifferentLabels { first: PathBuf, other: PathBuf },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Plans(#[from] PlansError),
    #[error(transparent)]
    Dataset(#[from] DatasetError),
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
    /// The job's dataset folder, plans.json and models: from `models`, or from `dataset`, `plan`
    /// and the trainings of the chosen configurations.
    fn models(&self, ctx: &StageContext) -> Result<(PathBuf, PathBuf, Vec<ModelJob>), StageError> {
        let root = ctx.root;
        if !self.models.is_empty() {
            if !self.trainings.is_empty() || self.selection.is_some() || self.configuration.is_some() {
                return Err(PredictStageError::ModelsAndTrainings.into());
            }
            return Ok(self.nnunet_models(ctx)?);
        }
        let (Some(dataset), Some(plan)) = (&self.dataset, &self.plan) else {
            return Err(PredictStageError::NoPlan.into());
        };
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
        let plans_file = root.join(plan).join("plans.json");
        let plans = Plans::read(&plans_file)?;
        let mut models: Vec<ModelJob> = Vec::new();
        let mut cascades = 0;
        for configuration in &configurations {
            let resolved = plans.configuration(configuration)?;
            if let Some(previous) = resolved.previous_stage_name() {
                cascades += 1;
                // a cascade needs its previous stage's prediction first, unless it is given
                if self.previous_stage_predictions.is_none()
                    && !models.iter().any(|m| m.configuration == previous)
                {
                    models.push(self.model(root, previous, false)?);
                }
            }
            match models.iter_mut().find(|m| &m.configuration == configuration) {
                Some(model) => model.member = true,
                None => models.push(self.model(root, configuration, true)?),
            }
        }
        self.check_cascades(ctx, cascades, configurations)?;
        Ok((root.join(dataset), plans_file, models))
    }

    /// `models`: every model each entry holds, its selected folds' checkpoints and its own plan.
    /// The first model's dataset.json describes the images and labels; the others must agree.
    fn nnunet_models(
        &self,
        ctx: &StageContext,
    ) -> Result<(PathBuf, PathBuf, Vec<ModelJob>), PredictStageError> {
        let folds = FoldSelection::parse(&self.folds)?;
        let checkpoint = self.checkpoint.as_deref().unwrap_or(DEFAULT_CHECKPOINT);
        let mut first: Option<(PathBuf, PathBuf, Dataset)> = None;
        let mut jobs = Vec::new();
        let (mut cascades, mut configurations) = (0, Vec::new());
        for model in open_models(ctx, &self.models)? {
            // nnU-Net's models bring their plan and dataset.json; nnflow's trainings take the
            // plan stage's outputs, which hold both
            let (plans, dataset_dir) = match &model.source {
                ModelSource::Nnunet { plans, trainer, .. } => {
                    // what the worker would refuse, said before it starts and naming the model
                    crate::inference::trainers::check_trainer(trainer).map_err(|source| {
                        PredictStageError::Trainer {
                            model: model.dir.clone(),
                            source,
                        }
                    })?;
                    (plans.clone(), model.dir.clone())
                }
                ModelSource::Nnflow => {
                    let Some(plan) = &self.plan else {
                        return Err(PredictStageError::NnflowWithoutPlan { model: model.dir });
                    };
                    let plan = ctx.root.join(plan);
                    (plan.join("plans.json"), plan)
                }
            };
            let plans = &plans;
            let configuration = Plans::read(plans)?.configuration(&model.configuration)?;
            let architecture = configuration.architecture()?;
            if let Err(source) = Architecture::from_plan(architecture, 1, 2, false) {
                return Err(PredictStageError::Architecture {
                    model: model.dir.clone(),
                    configuration: model.configuration.clone(),
                    source,
                });
            }
            configurations.push(model.configuration.clone());
            if let Some(previous) = configuration.previous_stage_name() {
                cascades += 1;
                if self.previous_stage_predictions.is_none() {
                    return Err(PredictStageError::Cascade {
                        model: model.dir.clone(),
                        configuration: model.configuration.clone(),
                        previous: previous.to_string(),
                    });
                }
            }
            let labels = Dataset::open(&dataset_dir)?;
            match &first {
                None => first = Some((dataset_dir.clone(), plans.clone(), labels)),
                Some((first_dir, _, first_labels)) if first_labels.labels != labels.labels => {
                    return Err(PredictStageError::DifferentLabels {
                        first: first_dir.join("dataset.json"),
                        other: dataset_dir.join("dataset.json"),
                    })
                }
                Some(_) => {}
            }
            let checkpoints: Vec<PathBuf> = model
                .select(&folds, checkpoint)?
                .into_iter()
                .map(|c| c.path)
                .collect();
            // nnU-Net's checkpoints say; nnflow's trainings, the first fold's fold.json
            let mirror_axes = match (&model.source, checkpoints.first()) {
                (ModelSource::Nnflow, Some(first)) => {
                    let fold = first.parent().unwrap_or(Path::new(".")).join("fold.json");
                    crate::atomic_file::read_json::<FoldInfo>(&fold)?.mirror_axes
                }
                _ => None,
            };
            jobs.push(ModelJob {
                configuration: model.configuration.clone(),
                plans: Some(plans.clone()),
                checkpoints,
                mirror_axes,
                member: true,
            });
        }
        let Some((dataset_dir, plans, _)) = first else {
            return Err(PredictStageError::NoModels);
        };
        self.check_cascades(ctx, cascades, configurations)?;
        Ok((dataset_dir, plans, jobs))
    }

    /// `previous_stage_predictions` needs a cascade among the configurations predicted.
    fn check_cascades(
        &self,
        ctx: &StageContext,
        cascades: usize,
        configurations: Vec<String>,
    ) -> Result<(), PredictStageError> {
        match &self.previous_stage_predictions {
            Some(folder) if cascades == 0 => Err(PredictStageError::NotACascade {
                folder: ctx.root.join(folder),
                configurations,
            }),
            _ => Ok(()),
        }
    }

    /// The trained folds of a configuration among `trainings`.
    fn model(
        &self,
        root: &std::path::Path,
        configuration: &str,
        member: bool,
    ) -> Result<ModelJob, PredictStageError> {
        let mut checkpoints = Vec::new();
        let mut mirror_axes = None;
        for training in &self.trainings {
            let folder = root.join(training);
            if !folder.exists() {
                continue; // a training that did not apply (its configuration is not planned)
            }
            let fold: FoldInfo = crate::atomic_file::read_json(&folder.join("fold.json"))?;
            if fold.configuration == configuration {
                checkpoints.push(folder.join("checkpoint_final.safetensors"));
                // as nnU-Net's predictor, the first fold's say; none recorded: every axis
                if checkpoints.len() == 1 {
                    mirror_axes = fold.mirror_axes;
                }
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
            plans: None,
            checkpoints,
            mirror_axes,
            member,
        })
    }
}

impl Stage for PredictStage {
    fn inputs(&self) -> Vec<StageInput> {
        let mut inputs = vec![StageInput {
            name: "images".into(),
            path: self.images.clone(),
        }];
        if let Some(dataset) = &self.dataset {
            inputs.push(StageInput {
                name: "dataset/dataset.json".into(),
                path: format!("{dataset}/dataset.json"),
            });
        }
        if let Some(plan) = &self.plan {
            inputs.push(StageInput {
                name: "plan".into(),
                path: format!("{plan}/plans.json"),
            });
        }
        // the segmentations are read whole: their contents are keyed, not where they lie
        if let Some(folder) = &self.previous_stage_predictions {
            inputs.push(StageInput {
                name: "previous_stage_predictions".into(),
                path: folder.clone(),
            });
        }
        // a model is read whole (its plans, dataset.json and checkpoints): all of it is keyed
        inputs.extend(self.models.iter().enumerate().map(|(i, model)| StageInput {
            name: format!("models/{i}"),
            path: model.clone(),
        }));
        inputs
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
        let (dataset_dir, plans, models) = self.models(ctx)?;
        let dataset = Dataset::open(&dataset_dir)?;
        let cases = image_cases(
            &root.join(&self.images),
            dataset.channels.len(),
            &dataset.file_ending,
        )?;
        let previous_stage_predictions = self.previous_stage_predictions.as_ref().map(|f| root.join(f));
        if let Some(folder) = &previous_stage_predictions {
            // nnU-Net names them after the case, with the dataset's file ending
            for case in &cases {
                let file = format!("{}{}", case.id, dataset.file_ending);
                if !folder.join(&file).is_file() {
                    return Err(PredictStageError::MissingPreviousStage {
                        case: case.id.clone(),
                        file,
                        folder: folder.clone(),
                    }
                    .into());
                }
            }
        }
        let job = PredictJob {
            cases: cases.into_iter().map(|c| (c.id, c.images)).collect(),
            dataset: dataset_dir,
            plans,
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
            previous_stage_predictions,
        };
        // the job goes with the outputs: it records what was predicted with what
        let job_file = ctx.out_dir.join("predict_job.json");
        crate::atomic_file::write_json(&job_file, &job)?;
        let mut command = Command::new(crate::torch_env::worker_path());
        command.arg("predict").arg(&job_file).current_dir(root);
        Ok(run_logged(command, ctx, "prediction")?)
    }
}

/// Opens every model the entries of `models` hold. A zip is extracted once into the instance's
/// resume folder (kept between runs, never cached), under the digest of its contents; folders of
/// zips no longer named are removed.
fn open_models(ctx: &StageContext, models: &[String]) -> Result<Vec<TrainedModel>, PredictStageError> {
    let extracted = ctx.resume_dir.join("models");
    let mut in_use = Vec::new();
    let mut opened = Vec::new();
    for model in models {
        let path = ctx.root.join(model);
        if !(path.is_file() && path.extension().is_some_and(|e| e == "zip")) {
            opened.extend(TrainedModel::open_all(&path)?);
            continue;
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update_mmap_rayon(&path).map_err(FileError::io(&path))?;
        let folder = extracted.join(&hasher.finalize().to_hex()[..32]);
        if !folder.exists() {
            // extracted beside it first: a killed extraction never looks complete
            let partial = folder.with_extension("partial");
            remove_folder(&partial)?;
            extract_zip(&path, &partial)?;
            std::fs::rename(&partial, &folder).map_err(FileError::io(&folder))?;
        }
        opened.extend(TrainedModel::open_all(&folder)?);
        in_use.push(folder);
    }
    if let Ok(entries) = std::fs::read_dir(&extracted) {
        for entry in entries.flatten() {
            if !in_use.contains(&entry.path()) {
                remove_folder(&entry.path())?;
            }
        }
    }
    Ok(opened)
}

fn remove_folder(path: &Path) -> Result<(), FileError> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(FileError::io(path)(e)),
        _ => Ok(()),
    }
}
