//! nnU-Net's cascade on the training side. A low-resolution configuration (`3d_lowres`) names its
//! `next_stage` in plans.json; its trainings store each held-out case's prediction resampled to
//! the next stage's grid (`next_stage/<next>/<case>.zarr`, a chunked `(1, z, y, x)` label array
//! of [`crate::data::case_store::write_labels`]), as nnU-Net's `predicted_next_stage`. The next stage (`3d_cascade_fullres`, whose `previous_stage` names the
//! low-resolution one) reads, for every case, the prediction of the training that held it out and
//! gives the network one 0/1 input channel per foreground label.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ndarray::{concatenate, Array4, ArrayView3, ArrayView4, Axis};

use crate::augment::cascade::previous_stage_one_hot;
use crate::data::case_store::CaseProperties;
use crate::preprocess::case_steps::PlanView;
use crate::preprocess::resample::compute_new_shape;
use crate::preprocess::PreprocessError;
use crate::train::job::FoldInfo;
use crate::train::TrainError;

/// The folder of a training's outputs holding its predictions for next stages.
pub const FOLDER: &str = "next_stage";

/// Where a training of the previous stage keeps its prediction of `case` for `next`.
pub fn prediction_path(training: &Path, next: &str, case: &str) -> PathBuf {
    training.join(FOLDER).join(next).join(format!("{case}.zarr"))
}

/// For every case, the prediction made for `configuration` by the training of `previous` that
/// held the case out. `trainings` are the previous stage's training outputs; each must be a
/// training of `previous`, and together they must have held out every case.
pub fn collect_predictions(
    trainings: &[PathBuf],
    configuration: &str,
    previous: &str,
    cases: &[String],
) -> Result<BTreeMap<String, PathBuf>, TrainError> {
    if trainings.is_empty() {
        return Err(TrainError::NoPreviousStage {
            configuration: configuration.into(),
            previous: previous.into(),
        });
    }
    let mut found = BTreeMap::new();
    for training in trainings {
        let info: FoldInfo = crate::atomic_file::read_json(&training.join("fold.json"))?;
        if info.configuration != previous {
            return Err(TrainError::WrongPreviousStage {
                training: training.clone(),
                trained: info.configuration,
                configuration: configuration.into(),
                previous: previous.into(),
            });
        }
        for case in info.validation_cases {
            let path = prediction_path(training, configuration, &case);
            let old = path.with_extension("npy");
            if !path.exists() && old.is_file() {
                return Err(TrainError::PreviousStageOldLayout {
                    path: old,
                    previous: previous.into(),
                });
            }
            if path.is_dir() {
                found.entry(case).or_insert(path);
            }
        }
    }
    let missing: Vec<String> = cases
        .iter()
        .filter(|c| !found.contains_key(*c))
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(TrainError::PreviousStageIncomplete {
            previous: previous.into(),
            configuration: configuration.into(),
            cases: cases.len(),
            missing,
        });
    }
    Ok(cases.iter().map(|c| (c.clone(), found[c].clone())).collect())
}

/// The image with the previous stage's segmentation appended as one-hot channels.
pub fn with_previous_stage(data: ArrayView4<f32>, seg: ArrayView3<i16>, labels: &[i16]) -> Array4<f32> {
    let one_hot = previous_stage_one_hot(seg, labels);
    concatenate(Axis(0), &[data, one_hot.view()]).expect("same spatial shape")
}

/// The grid a case has in the next stage's preprocessing: its cropped grid (at the original
/// spacing, transposed) resampled to that configuration's spacing, as the resample stage computes it.
pub fn next_stage_shape(properties: &CaseProperties, next: &PlanView) -> Result<[usize; 3], PreprocessError> {
    let cropped_spacing = properties
        .transpose_forward
        .map(|a| properties.original_spacing[a]);
    Ok(compute_new_shape(
        properties.shape_after_cropping_and_before_resampling,
        cropped_spacing,
        next.target_spacing(cropped_spacing)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array3;

    #[test]
    fn previous_stage_channels_follow_the_image() {
        let seg = Array3::from_shape_vec((1, 1, 4), vec![0, 1, 2, 3]).unwrap();
        let data = Array4::<f32>::from_elem((1, 1, 1, 4), 7.0);
        let joined = with_previous_stage(data.view(), seg.view(), &[1, 3]);
        assert_eq!(joined.shape(), [3, 1, 1, 4]);
        assert_eq!(joined[[0, 0, 0, 2]], 7.0);
        let hot: Vec<f32> = joined.slice(ndarray::s![1.., 0, 0, ..]).iter().copied().collect();
        assert_eq!(hot, [0., 1., 0., 0., 0., 0., 0., 1.]);
    }

    #[test]
    fn every_case_must_be_held_out_by_a_previous_stage_training() {
        let dir = tempfile::tempdir().unwrap();
        let training = dir.path().join("fold0");
        std::fs::create_dir_all(&training).unwrap();
        let info = FoldInfo {
            configuration: "3d_lowres".into(),
            fold: "0".into(),
            validation_cases: vec!["a".into()],
            file_ending: ".nii.gz".into(),
            probabilities: true,
            mirror_axes: Some(vec![0, 1, 2]),
        };
        crate::atomic_file::write_json(&training.join("fold.json"), &info).unwrap();
        let file = prediction_path(&training, "3d_cascade_fullres", "a");
        std::fs::create_dir_all(&file).unwrap();
        let cases = ["a".to_string()];
        let found = collect_predictions(
            std::slice::from_ref(&training),
            "3d_cascade_fullres",
            "3d_lowres",
            &cases,
        )
        .unwrap();
        assert_eq!(found["a"], file);
        let more = ["a".to_string(), "b".to_string()];
        let err = collect_predictions(
            std::slice::from_ref(&training),
            "3d_cascade_fullres",
            "3d_lowres",
            &more,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("predicted 1 of the 2 cases") && err.contains("missing b"),
            "{err}"
        );
        let err = collect_predictions(&[training], "3d_cascade_fullres", "2d", &cases)
            .unwrap_err()
            .to_string();
        assert!(err.contains("a training of 3d_lowres"), "{err}");
        assert!(collect_predictions(&[], "c", "p", &cases)
            .unwrap_err()
            .to_string()
            .contains("previous_stage"));
    }
}
