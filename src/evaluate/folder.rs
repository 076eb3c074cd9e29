//! Evaluating a folder of predicted segmentations against a folder of references, as nnU-Net's
//! `compute_metrics_on_folder`: every prediction must have a reference of the same file name;
//! metrics per case and label (or region), then the summary, written as nnU-Net's summary.json.

use std::path::Path;

use ndarray::Array3;
use rayon::prelude::*;
use serde_json::{json, Value};

use super::metrics::{case_metrics, summarize, Metrics, Target};
use super::EvaluateError;
use crate::data::dataset::{Dataset, LabelValue};
use crate::data::image;
use crate::file_error::FileError;

/// What nnU-Net evaluates for a dataset: its foreground labels (without the ignore label), or its
/// regions (the label entries other than background and `ignore`).
pub fn evaluation_targets(dataset: &Dataset) -> Vec<Target> {
    if dataset.has_regions() {
        dataset
            .labels
            .iter()
            .filter(|l| l.name != "ignore")
            .filter_map(|l| match &l.value {
                LabelValue::Single(0) => None,
                LabelValue::Single(v) => Some(Target::Region(vec![*v as i32])),
                LabelValue::Region(values) => {
                    Some(Target::Region(values.iter().map(|&v| v as i32).collect()))
                }
            })
            .collect()
    } else {
        dataset
            .labels
            .iter()
            .filter_map(|l| match l.value {
                LabelValue::Single(v) if v != 0 && Some(v) != dataset.ignore_label => {
                    Some(Target::Label(v as i32))
                }
                _ => None,
            })
            .collect()
    }
}

/// One evaluated case.
pub struct CaseResult {
    pub file: String,
    pub metrics: std::collections::BTreeMap<String, Metrics>,
}

/// Metrics of already loaded label maps (shapes must agree).
pub fn evaluate_pair(
    file: &str,
    reference: &Array3<i32>,
    prediction: &Array3<i32>,
    targets: &[Target],
    ignore_label: Option<i32>,
) -> Result<CaseResult, EvaluateError> {
    if reference.shape() != prediction.shape() {
        return Err(EvaluateError::ShapeMismatch {
            file: file.to_string(),
            prediction: prediction.shape().to_vec(),
            reference: reference.shape().to_vec(),
        });
    }
    Ok(CaseResult {
        file: file.to_string(),
        metrics: case_metrics(reference.view(), prediction.view(), targets, ignore_label),
    })
}

/// Every `*<file_ending>` in `predictions` against the file of the same name in `references`.
pub fn evaluate_folder(
    predictions: &Path,
    references: &Path,
    file_ending: &str,
    targets: &[Target],
    ignore_label: Option<i32>,
) -> Result<Vec<CaseResult>, EvaluateError> {
    let mut files: Vec<String> = std::fs::read_dir(predictions)
        .map_err(FileError::io(predictions))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(file_ending) && !name.starts_with('.'))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(EvaluateError::NoPredictions {
            folder: predictions.to_path_buf(),
            file_ending: file_ending.to_string(),
        });
    }
    let missing: Vec<String> = files
        .iter()
        .filter(|f| !references.join(f).is_file())
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(EvaluateError::MissingReferences {
            references: references.to_path_buf(),
            missing,
        });
    }
    files
        .par_iter()
        .map(|file| {
            let read = |folder: &Path| image::read_labels(folder.join(file)).map(|(a, _)| a);
            evaluate_pair(
                file,
                &read(references)?,
                &read(predictions)?,
                targets,
                ignore_label,
            )
        })
        .collect()
}

/// nnU-Net's summary.json: foreground mean, per-label means, per case (file names relative).
pub fn summary_json(cases: &[CaseResult], targets: &[Target]) -> Value {
    let per_case: Vec<_> = cases.iter().map(|c| c.metrics.clone()).collect();
    let summary = summarize(&per_case, targets);
    json!({
        "foreground_mean": summary.foreground_mean,
        "mean": summary.mean,
        "metric_per_case": cases
            .iter()
            .map(|c| json!({ "metrics": c.metrics, "prediction_file": c.file, "reference_file": c.file }))
            .collect::<Vec<_>>(),
    })
}

/// The foreground mean Dice of a summary (NaN when undefined).
pub fn foreground_dice(summary: &Value) -> f64 {
    summary["foreground_mean"]["Dice"].as_f64().unwrap_or(f64::NAN)
}
