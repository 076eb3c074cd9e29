//! nnU-Net's final validation of a training: the held-out cases predicted whole, exported to
//! their images, scored against the raw labels, plus the cascade's inputs for the next stage.

use std::path::Path;
use std::time::Instant;

use nnflow::data::case_store::{read_case, write_labels, CaseStoreError};
use nnflow::data::chunked::ChunkedError;
use nnflow::data::dataset::{Dataset, DatasetError};
use nnflow::data::image::{self, ImageError};
use nnflow::data::npy::{self, NpyError};
use nnflow::evaluate::folder::{evaluate_pair, evaluation_targets, foreground_dice, summary_json};
use nnflow::evaluate::EvaluateError;
use nnflow::file_error::FileError;
use nnflow::inference::export::{export_case, segmentation_on_grid, write_segmentation, RegionInfo};
use nnflow::inference::InferenceError;
use nnflow::preprocess::PreprocessError;
use nnflow::train::job::{FoldInfo, TrainJob};
use nnflow::train::previous_stage::{next_stage_shape, prediction_path, with_previous_stage};
use nnflow::train::setup::{read_previous_stage, Setup};
use nnflow::train::TrainError;

use crate::predictor::{Predictor, PredictorError};
use crate::trainer::Logger;

/// Why the final validation failed.
#[derive(Debug, thiserror::Error)]
pub enum HeldOutError {
    /// What went wrong with one held-out case, named by its id.
    #[error("case {case}: {source}")]
    Case {
        case: String,
        #[source]
        source: Box<HeldOutError>,
    },
    #[error("case {case} is not in the dataset's training cases")]
    NotInDataset { case: String },
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error(transparent)]
    CaseStore(#[from] CaseStoreError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Preprocess(#[from] PreprocessError),
    #[error(transparent)]
    Predictor(#[from] PredictorError),
    #[error(transparent)]
    Inference(#[from] InferenceError),
    #[error(transparent)]
    Npy(#[from] NpyError),
    #[error(transparent)]
    Chunked(#[from] ChunkedError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Evaluate(#[from] EvaluateError),
}

impl HeldOutError {
    /// For `map_err`: the error of case `id`.
    fn in_case<E: Into<HeldOutError>>(id: &str) -> impl FnOnce(E) -> HeldOutError + '_ {
        move |source| HeldOutError::Case {
            case: id.to_string(),
            source: Box::new(source.into()),
        }
    }
}

/// nnU-Net's final validation: every held-out case predicted whole (sliding window, mirroring),
/// exported to its original image (resampled back, un-cropped, un-transposed) as
/// `validation/<case><ending>` with its probabilities (`<case>.npy`, classes x z x y x, for
/// ensembling) and compared with the raw reference label: `validation/summary.json` in nnU-Net's
/// layout, and `fold.json` naming the configuration, fold, validation cases and the axes
/// prediction may mirror.
pub fn validate_held_out(
    job: &TrainJob,
    setup: &Setup,
    predictor: &Predictor,
    log: &mut Logger,
) -> Result<(), HeldOutError> {
    let params = &job.params;
    let dataset = Dataset::open(Path::new(&params.dataset))?;
    let regions = RegionInfo::from_dataset(&dataset)?;
    let targets = evaluation_targets(&dataset);
    let ignore = dataset.ignore_label.map(|l| l as i32);
    let out = job.out_dir.join("validation");
    std::fs::create_dir_all(&out).map_err(FileError::io(&out))?;
    let mut results = Vec::new();
    for id in &setup.split.val {
        let started = Instant::now();
        let case = read_case(Path::new(&params.preprocessed), id)?;
        let logits = match &setup.previous_stage {
            Some(previous) => {
                let seg = read_previous_stage(previous, id)?;
                predictor.predict_logits(
                    with_previous_stage(case.data.view(), seg.view(), &previous.labels).view(),
                )?
            }
            None => predictor.predict_logits(case.data.view())?,
        };
        for next in &setup.next_stages {
            // nnU-Net's `resample_and_save`: the cascade's input for this case
            let shape = next_stage_shape(&case.properties, next).map_err(HeldOutError::in_case(id))?;
            let seg = segmentation_on_grid(logits.view(), shape, &setup.configuration, regions.as_ref())
                .map_err(HeldOutError::in_case(id))?;
            let path = prediction_path(&job.out_dir, &next.configuration.name, id);
            // chunked for the next stage's patches, which its training crops
            let patch = next.configuration.patch_size().map_err(TrainError::PlanEntry)?;
            write_labels(&path, seg.insert_axis(ndarray::Axis(0)).view(), patch)?;
        }
        let exported = export_case(
            logits.view(),
            &case.properties,
            &setup.configuration,
            regions.as_ref(),
            params.save_probabilities,
        )
        .map_err(HeldOutError::in_case(id))?;
        let file = format!("{id}{}", dataset.file_ending);
        write_segmentation(&out.join(&file), &exported.segmentation, &case.properties)?;
        if let Some(probabilities) = &exported.probabilities {
            npy::write(&out.join(format!("{id}.npy")), probabilities.view())
                .map_err(HeldOutError::in_case(id))?;
        }
        let reference_path = dataset
            .case(id)
            .map(|c| c.label.clone())
            .ok_or_else(|| HeldOutError::NotInDataset { case: id.clone() })?;
        let (reference, _) = image::read_labels(&reference_path)?;
        let result = evaluate_pair(
            &file,
            &reference,
            &exported.segmentation.mapv(i32::from),
            &targets,
            ignore,
        )?;
        log.line(&format!(
            "validation {id}: Dice {} ({:.1} s)",
            result
                .metrics
                .iter()
                .map(|(k, m)| format!("{k}={:.4}", m.dice))
                .collect::<Vec<_>>()
                .join(" "),
            started.elapsed().as_secs_f64()
        ));
        results.push(result);
    }
    let summary = summary_json(&results, &targets);
    log.line(&format!(
        "validation foreground mean Dice: {:.4}",
        foreground_dice(&summary)
    ));
    nnflow::atomic_file::write_json(&out.join("summary.json"), &summary)?;
    let fold = FoldInfo {
        configuration: params.configuration.clone(),
        fold: params.fold.text(),
        validation_cases: setup.split.val.clone(),
        file_ending: dataset.file_ending.clone(),
        probabilities: params.save_probabilities,
        mirror_axes: Some(setup.mirror_axes.clone()),
    };
    Ok(nnflow::atomic_file::write_json(
        &job.out_dir.join("fold.json"),
        &fold,
    )?)
}
