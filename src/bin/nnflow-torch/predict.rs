//! `nnflow-torch predict JOB.json`: the `predict` stage's work. Per case and configuration: read,
//! transpose, crop, normalize and resample the raw images as in preprocessing, predict with every
//! fold (sliding window, mirroring; logits averaged over folds, as nnU-Net does), export to the
//! input's geometry; an ensemble averages the exported probabilities; then postprocessing, and the
//! NIfTI with exactly the input's geometry. Reading and preprocessing the next case runs on its own
//! thread while the network works on the current one.

use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;

use ndarray::{Array4, ArrayView4};
use nnflow::data::case_store::StoredCase;
use nnflow::data::dataset::{Case, Dataset, DatasetError};
use nnflow::evaluate::postprocess::Postprocessing;
use nnflow::file_error::FileError;
use nnflow::inference::export::{export_case, RegionInfo};
use nnflow::inference::job::{ModelJob, PredictJob};
use nnflow::inference::sliding_window::SlidingWindow;
use nnflow::inference::trainers::is_training_only;
use nnflow::inference::writer::{Predicted, Writer};
use nnflow::inference::InferenceError;
use nnflow::network::architecture::ArchitectureError;
use nnflow::network::Architecture;
use nnflow::plans::{Plans, PlansError};
use nnflow::preprocess::case_io::load_raw;
use nnflow::preprocess::case_steps::{normalize, resample, segmentation_to_grid, PlanView};
use nnflow::preprocess::PreprocessError;
use nnflow::train::previous_stage::with_previous_stage;
use nnflow::train::setup::as_3d;
use tch::nn::VarStore;

use crate::checkpoint::{load_weights, CheckpointError};
use crate::network::Network;
use crate::predictor::{Predictor, PredictorError};
use crate::trainer::{build_network, select_device, NoCudaDevice};

/// Why the worker's prediction failed.
#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    /// Anything that went wrong with one case, named by its id.
    #[error("case {case}: {source}")]
    Case {
        case: String,
        #[source]
        source: Box<PredictError>,
    },
    #[error(transparent)]
    Device(#[from] NoCudaDevice),
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error(transparent)]
    Plans(#[from] PlansError),
    #[error(transparent)]
    File(#[from] FileError),
    /// The network the plan describes cannot be built.
    #[error(transparent)]
    Architecture(#[from] ArchitectureError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(
        "{configuration} needs its previous stage {previous}: its model first, or its \
         segmentations (previous_stage_predictions)"
    )]
    PreviousStageOrder { configuration: String, previous: String },
    #[error("{}: {source}", path.display())]
    PreviousStageFile {
        path: PathBuf,
        source: nnflow::data::image::ImageError,
    },
    #[error("{}: label {value} is outside int16", path.display())]
    PreviousStageLabel { path: PathBuf, value: i32 },
    #[error("{}: {source}", path.display())]
    PreviousStageGrid { path: PathBuf, source: PreprocessError },
    #[error(
        "{configuration}: mirror axes {axes:?} for a network of {dimensions} spatial axes \
         (from {origin})"
    )]
    MirrorAxes {
        configuration: String,
        axes: Vec<usize>,
        dimensions: usize,
        origin: &'static str,
    },
    #[error("a configuration without folds")]
    NoFolds { configuration: String },
    #[error(transparent)]
    Preprocess(#[from] PreprocessError),
    #[error(transparent)]
    Predictor(#[from] PredictorError),
    #[error(transparent)]
    Inference(#[from] InferenceError),
    #[error("the reading thread stopped")]
    ReaderStopped,
    #[error("the writing thread panicked")]
    WriterPanicked,
}

impl PredictError {
    /// For `map_err`: the error of case `id`.
    fn in_case<E: Into<PredictError>>(id: &str) -> impl FnOnce(E) -> PredictError + '_ {
        move |source| PredictError::Case {
            case: id.to_string(),
            source: Box::new(source.into()),
        }
    }
}

/// One configuration: its plan and the networks of its folds.
struct Model {
    plan: PlanView,
    /// The spatial axes test-time mirroring flips (none without mirroring).
    mirror_axes: Vec<usize>,
    nets: Vec<(VarStore, Network)>,
    /// Part of the output, or only the previous stage of a cascade.
    member: bool,
    /// A cascade's second stage: where its previous stage's segmentation comes from, and the
    /// foreground labels, one extra input channel each.
    previous: Option<(PreviousStage, Vec<i16>)>,
}

/// Where a cascade's second stage gets its previous stage's segmentation of a case.
#[derive(Clone)]
enum PreviousStage {
    /// The prediction of an earlier model of the job (its index).
    Model(usize),
    /// `<case><file ending>` in this folder (nnU-Net's `-prev_stage_predictions`).
    Folder(PathBuf),
}

pub fn predict(job: &PredictJob) -> Result<(), PredictError> {
    tch::set_num_threads(job.threads.max(1) as i32);
    let device = select_device(job.device)?;
    let amp = job.amp && device.is_cuda();
    let dataset = Dataset::open(&job.dataset)?;
    let regions = RegionInfo::from_dataset(&dataset)?;
    let job_plans = Plans::read(&job.plans)?;
    let plans_of = |model: &ModelJob| -> Result<Plans, PredictError> {
        match &model.plans {
            Some(path) => Ok(Plans::read(path)?),
            None => Ok(job_plans.clone()),
        }
    };
    let rules = match &job.postprocessing {
        Some(path) => nnflow::atomic_file::read_json::<Postprocessing>(path)?.rules,
        None => Vec::new(),
    };
    let num_classes = dataset.num_segmentation_heads();
    let mut models = Vec::new();
    for model in &job.models {
        let plan = PlanView::new(&plans_of(model)?, &model.configuration)?;
        let previous = match (
            plan.configuration.previous_stage_name(),
            &job.previous_stage_predictions,
        ) {
            // given segmentations replace the previous stage's prediction
            (Some(_), Some(folder)) => {
                Some((PreviousStage::Folder(folder.clone()), dataset.foreground_labels()))
            }
            (Some(name), None) => {
                let index = models
                    .iter()
                    .position(|m: &Model| m.plan.configuration.name == name)
                    .ok_or_else(|| PredictError::PreviousStageOrder {
                        configuration: model.configuration.clone(),
                        previous: name.to_string(),
                    })?;
                Some((PreviousStage::Model(index), dataset.foreground_labels()))
            }
            (None, _) => None,
        };
        let extra_channels = previous.as_ref().map_or(0, |(_, labels)| labels.len());
        let arch = Architecture::from_plan(
            plan.configuration.architecture()?,
            dataset.channels.len() + extra_channels,
            num_classes,
            false,
        )?;
        let mut nets = Vec::new();
        let mut checkpoint_axes = None;
        for checkpoint in &model.checkpoints {
            let (mut vs, net) = build_network(&arch, device, 0);
            let loaded = load_weights(checkpoint, &mut vs)?;
            if let Some(trainer) = loaded.trainer.as_deref().filter(|t| !is_training_only(t)) {
                println!(
                    "{}: trainer {trainer} is none of nnU-Net's that nnflow knows; its weights are \
                     those of the plan's network",
                    checkpoint.display()
                );
            }
            // as nnU-Net's predictor, the first fold's checkpoint says
            checkpoint_axes = checkpoint_axes.or(loaded.mirror_axes);
            nets.push((vs, net));
        }
        let dimensions = arch.spatial_dims;
        let (allowed, origin) = match (&model.mirror_axes, checkpoint_axes) {
            (Some(recorded), _) => (recorded.clone(), "fold.json"),
            (None, Some(from_checkpoint)) => (from_checkpoint, "inference_allowed_mirroring_axes"),
            (None, None) => ((0..dimensions).collect(), "every axis"),
        };
        if allowed.iter().any(|&axis| axis >= dimensions) {
            return Err(PredictError::MirrorAxes {
                configuration: model.configuration.clone(),
                axes: allowed,
                dimensions,
                origin,
            });
        }
        let mirror_axes = if job.mirroring { allowed } else { Vec::new() };
        models.push(Model {
            mirror_axes,
            plan,
            nets,
            member: model.member,
            previous,
        });
    }
    std::fs::create_dir_all(&job.output).map_err(FileError::io(&job.output))?;

    // cases are read and preprocessed (for every configuration) one ahead of the network
    let (sender, receiver) = sync_channel::<Result<(String, Vec<StoredCase>), PredictError>>(1);
    let cases = job.cases.clone();
    // each model's plan, and the folder and labels of segmentations given for its previous stage
    let for_reader: Vec<_> = models
        .iter()
        .map(|m| {
            let folder = match &m.previous {
                Some((PreviousStage::Folder(folder), labels)) => Some((folder.clone(), labels.clone())),
                _ => None,
            };
            (m.plan.clone(), folder)
        })
        .collect();
    let file_ending = dataset.file_ending.clone();
    // each prediction in its input's format (a DICOM series gives NIfTI)
    let output_endings: std::collections::HashMap<String, String> = cases
        .iter()
        .map(|(id, images)| {
            (
                id.clone(),
                nnflow::data::image::prediction_ending(&images[0]).to_string(),
            )
        })
        .collect();
    std::thread::spawn(move || {
        for (id, images) in cases {
            let case = Case {
                id: id.clone(),
                images,
                label: Default::default(),
            };
            let prepared = for_reader
                .iter()
                .map(|(plan, previous)| -> Result<StoredCase, PredictError> {
                    let mut stored = load_raw(&case, false, plan.transpose_forward)?;
                    normalize(&mut stored, plan)?;
                    let mut stored = resample(stored, plan)?;
                    if let Some((folder, labels)) = previous {
                        let path = folder.join(format!("{id}{file_ending}"));
                        let on_grid = previous_stage_on_grid(&path, &stored, plan)?;
                        stored.data = with_previous_stage(stored.data.view(), on_grid.view(), labels);
                    }
                    Ok(stored)
                })
                .collect::<Result<Vec<_>, _>>()
                .map(|stored| (id.clone(), stored))
                .map_err(PredictError::in_case(&id));
            if sender.send(prepared).is_err() {
                return;
            }
        }
    });
    // export, postprocessing and writing run on their own thread, behind the network
    let (to_writer, writer_queue) = sync_channel::<Predicted>(1);
    let writer = {
        let settings = Writer {
            regions: regions.clone(),
            rules,
            output: job.output.clone(),
            save_probabilities: job.save_probabilities,
        };
        std::thread::spawn(move || -> Result<(), InferenceError> {
            for predicted in writer_queue {
                settings.write(predicted)?;
            }
            Ok(())
        })
    };
    let mut network_result = Ok(());
    for _ in 0..job.cases.len() {
        let next = receiver
            .recv()
            .map_err(|_| PredictError::ReaderStopped)
            .and_then(|r| r);
        let (id, prepared) = match next {
            Ok(case) => case,
            Err(e) => {
                network_result = Err(e);
                break;
            }
        };
        let started = std::time::Instant::now();
        let logits = match predict_case(&models, &prepared, job, device, amp, regions.as_ref()) {
            Ok(logits) => logits,
            Err(e) => {
                network_result = Err(PredictError::in_case(&id)(e));
                break;
            }
        };
        let outputs = models
            .iter()
            .zip(logits)
            .zip(prepared)
            .filter(|((model, _), _)| model.member)
            .map(|((model, logits), case)| (logits, case.properties, model.plan.configuration.clone()))
            .collect();
        println!("{id}: predicted in {:.1} s", started.elapsed().as_secs_f64());
        let file_ending = output_endings.get(&id).cloned().unwrap_or_default();
        if to_writer
            .send(Predicted {
                id,
                file_ending,
                outputs,
            })
            .is_err()
        {
            break; // the writer failed; its error is reported below
        }
    }
    drop(to_writer);
    let written = writer.join().map_err(|_| PredictError::WriterPanicked)?;
    network_result.and(written.map_err(PredictError::from))
}

/// A previous stage's segmentation of a case given as a file (the raw image's grid, nnU-Net's
/// `-prev_stage_predictions`), brought onto the case's preprocessed grid as preprocessing treats a
/// label, as nnU-Net's predictor preprocesses `seg_from_prev_stage`.
fn previous_stage_on_grid(
    path: &Path,
    case: &StoredCase,
    plan: &PlanView,
) -> Result<ndarray::Array3<i16>, PredictError> {
    let (labels, _) =
        nnflow::data::image::read_labels(path).map_err(|source| PredictError::PreviousStageFile {
            path: path.to_path_buf(),
            source,
        })?;
    if let Some(&value) = labels.iter().find(|&&v| i16::try_from(v).is_err()) {
        return Err(PredictError::PreviousStageLabel {
            path: path.to_path_buf(),
            value,
        });
    }
    let labels = labels.mapv(|v| v as i16);
    segmentation_to_grid(labels.view(), &case.properties, plan).map_err(|source| {
        PredictError::PreviousStageGrid {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// Every model's logits for one case, in order; a cascade's second stage gets its previous
/// stage's segmentation (exported to the image, then preprocessed like a label, as nnU-Net's
/// predictor does with `seg_from_prev_stage`) as one-hot input channels. Segmentations given as
/// files were added to the case's data by the reader already.
fn predict_case(
    models: &[Model],
    prepared: &[StoredCase],
    job: &PredictJob,
    device: tch::Device,
    amp: bool,
    regions: Option<&RegionInfo>,
) -> Result<Vec<Array4<f32>>, PredictError> {
    let mut all: Vec<Array4<f32>> = Vec::with_capacity(models.len());
    for (model, case) in models.iter().zip(prepared) {
        let logits = match &model.previous {
            Some((PreviousStage::Model(index), labels)) => {
                let previous = &models[*index];
                let exported = export_case(
                    all[*index].view(),
                    &prepared[*index].properties,
                    &previous.plan.configuration,
                    regions,
                    false,
                )?;
                let on_grid =
                    segmentation_to_grid(exported.segmentation.view(), &case.properties, &model.plan)?;
                let input = with_previous_stage(case.data.view(), on_grid.view(), labels);
                fold_average(model, input.view(), job, device, amp)?
            }
            Some((PreviousStage::Folder(_), _)) | None => {
                fold_average(model, case.data.view(), job, device, amp)?
            }
        };
        all.push(logits);
    }
    Ok(all)
}

/// Logits of one preprocessed case, averaged over the configuration's folds.
fn fold_average(
    model: &Model,
    data: ArrayView4<f32>,
    job: &PredictJob,
    device: tch::Device,
    amp: bool,
) -> Result<Array4<f32>, PredictError> {
    let patch = model.plan.configuration.patch_size()?;
    let mut sum: Option<Array4<f32>> = None;
    for (_, net) in &model.nets {
        let predictor = Predictor {
            net,
            device,
            window: SlidingWindow {
                step_size: job.step_size,
                ..SlidingWindow::new(as_3d(patch))
            },
            mirror_axes: model.mirror_axes.clone(),
            amp,
        };
        let logits = predictor.predict_logits(data)?;
        sum = Some(match sum {
            Some(total) => total + logits,
            None => logits,
        });
    }
    let total = sum.ok_or_else(|| PredictError::NoFolds {
        configuration: model.plan.configuration.name.clone(),
    })?;
    Ok(total / model.nets.len() as f32)
}
