//! nnU-Net's final validation of a training: the held-out cases predicted whole, exported to
//! their images, scored against the raw labels, plus the cascade's inputs for the next stage.

use std::path::Path;
use std::time::Instant;

use nnflow::data::case_store::read_case;
use nnflow::data::dataset::Dataset;
use nnflow::data::{nifti, npy};
use nnflow::evaluate::folder::{evaluate_pair, evaluation_targets, foreground_dice, summary_json};
use nnflow::inference::export::{export_case, segmentation_on_grid, write_segmentation, RegionInfo};
use nnflow::train::job::{FoldInfo, TrainJob};
use nnflow::train::previous_stage::{next_stage_shape, prediction_path, with_previous_stage};
use nnflow::train::setup::{read_previous_stage, Setup};

use crate::predictor::Predictor;
use crate::trainer::Logger;

/// nnU-Net's final validation: every held-out case predicted whole (sliding window, mirroring),
/// exported to its original image (resampled back, un-cropped, un-transposed) as
/// `validation/<case><ending>` with its probabilities (`<case>.npy`, classes x z x y x, for
/// ensembling) and compared with the raw reference label: `validation/summary.json` in nnU-Net's
/// layout, and `fold.json` naming the configuration, fold and validation cases.
pub fn validate_held_out(
    job: &TrainJob,
    setup: &Setup,
    predictor: &Predictor,
    log: &mut Logger,
) -> Result<(), String> {
    let params = &job.params;
    let dataset = Dataset::open(Path::new(&params.dataset)).map_err(|e| e.to_string())?;
    let regions = RegionInfo::from_dataset(&dataset)?;
    let targets = evaluation_targets(&dataset);
    let ignore = dataset.ignore_label.map(|l| l as i32);
    let out = job.out_dir.join("validation");
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let mut results = Vec::new();
    for id in &setup.split.val {
        let started = Instant::now();
        let case = read_case(Path::new(&params.preprocessed), id).map_err(|e| e.to_string())?;
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
            let shape = next_stage_shape(&case.properties, next).map_err(|e| format!("case {id}: {e}"))?;
            let seg = segmentation_on_grid(logits.view(), shape, &setup.configuration, regions.as_ref())
                .map_err(|e| format!("case {id}: {e}"))?;
            let path = prediction_path(&job.out_dir, &next.configuration.name, id);
            std::fs::create_dir_all(path.parent().expect("a folder")).map_err(|e| e.to_string())?;
            npy::write(&path, seg.insert_axis(ndarray::Axis(0)).view())
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        let exported = export_case(
            logits.view(),
            &case.properties,
            &setup.configuration,
            regions.as_ref(),
            params.save_probabilities,
        )
        .map_err(|e| format!("case {id}: {e}"))?;
        let file = format!("{id}{}", dataset.file_ending);
        write_segmentation(&out.join(&file), &exported.segmentation, &case.properties)?;
        if let Some(probabilities) = &exported.probabilities {
            npy::write(&out.join(format!("{id}.npy")), probabilities.view())
                .map_err(|e| format!("case {id}: {e}"))?;
        }
        let reference_path = dataset
            .case(id)
            .map(|c| c.label.clone())
            .ok_or_else(|| format!("case {id} is not in the dataset's training cases"))?;
        let (reference, _) = nifti::read_integer_labels(&reference_path).map_err(|e| e.to_string())?;
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
    nnflow::atomic_file::write_json(&out.join("summary.json"), &summary).map_err(|e| e.to_string())?;
    let fold = FoldInfo {
        configuration: params.configuration.clone(),
        fold: params.fold.text(),
        validation_cases: setup.split.val.clone(),
        file_ending: dataset.file_ending.clone(),
        probabilities: params.save_probabilities,
    };
    nnflow::atomic_file::write_json(&job.out_dir.join("fold.json"), &fold).map_err(|e| e.to_string())
}
