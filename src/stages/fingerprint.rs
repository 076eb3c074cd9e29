//! The `fingerprint` stage: checks a dataset's integrity and extracts nnU-Net's dataset
//! fingerprint (`dataset_fingerprint.json`).

use std::path::PathBuf;

use rayon::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{dataset_inputs, thread_pool, Kind, Stage, StageContext, StageError, StageInput};
use crate::data::dataset::{Dataset, DatasetError};
use crate::data::fingerprint_format::Fingerprint;
use crate::data::integrity::{check_case, load_case, Report};
use crate::file_error::FileError;
use crate::preprocess::fingerprint::{
    aggregate, case_fingerprint, dataset_fingerprint_with_budget, CaseFingerprint, FingerprintError,
    FOREGROUND_SAMPLES_TOTAL, SAMPLING_SEED,
};

pub const KIND: Kind = Kind {
    name: "fingerprint",
    // 2: images with +Inf/-Inf fail the stage (version 1 cached a fingerprint with `null`
    // statistics for them).
    version: 2,
    toolchain: &[],
    schema: |generator| generator.subschema_for::<FingerprintStage>(),
    build: super::finite::build_finite::<FingerprintStage>,
};

/// Extracts the dataset fingerprint: per case crop to the nonzero region, spacings, shapes after
/// cropping, relative size after cropping, and foreground intensity statistics per channel.
#[derive(Deserialize, Serialize, JsonSchema, Debug)]
#[serde(deny_unknown_fields)]
pub struct FingerprintStage {
    /// The dataset folder in nnU-Net's raw layout (relative to the pipeline file, or absolute).
    /// Its contents, not its location, are part of the cache key.
    #[serde(skip_serializing)]
    pub dataset: String,
    /// Check the dataset first (nnU-Net's integrity list, and no +Inf/-Inf intensities); any
    /// problem fails the stage with one report naming every bad case. Without the check, NaN and
    /// ±Inf intensities still fail the stage, naming a case.
    #[serde(default = "yes")]
    pub check_integrity: bool,
    /// Foreground intensity samples per channel over the whole dataset (nnU-Net: 10e7).
    #[serde(default = "default_samples")]
    pub foreground_samples: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum FingerprintStageError {
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    /// The integrity check found problems (every one of every case is in the report).
    #[error("dataset {}:\n{}", root.display(), report.render())]
    Integrity { root: PathBuf, report: Report },
    #[error(transparent)]
    Fingerprint(#[from] FingerprintError),
    #[error(
        "dataset {}: the fingerprint's `{field}` is not a finite number; \
         dataset_fingerprint.json is not written",
        root.display()
    )]
    NonFinite { root: PathBuf, field: String },
    #[error(transparent)]
    File(#[from] FileError),
}

fn yes() -> bool {
    true
}

fn default_samples() -> usize {
    FOREGROUND_SAMPLES_TOTAL
}

impl Stage for FingerprintStage {
    fn inputs(&self) -> Vec<StageInput> {
        dataset_inputs(&self.dataset)
    }

    fn params_json(&self) -> serde_json::Value {
        super::to_json(self)
    }

    fn run(&self, ctx: &StageContext) -> Result<(), StageError> {
        let dataset = Dataset::open(&ctx.root.join(&self.dataset)).map_err(FingerprintStageError::from)?;
        let fingerprint = if self.check_integrity {
            let pool = thread_pool(ctx)?;
            pool.install(|| checked_fingerprint(&dataset, self.foreground_samples))?
        } else {
            dataset_fingerprint_with_budget(&dataset, ctx.threads as usize, self.foreground_samples)
                .map_err(FingerprintStageError::from)?
        };
        let path = ctx.out_dir.join("dataset_fingerprint.json");
        // Every number the plan reads must be finite (serde_json would write `null`); the checks
        // above make this so, and nothing is written if they ever miss a case.
        let value = serde_json::to_value(&fingerprint).map_err(FileError::json(&path))?;
        if let Some(field) = crate::json_numbers::first_null(&value) {
            return Err(FingerprintStageError::NonFinite {
                root: dataset.root.clone(),
                field,
            }
            .into());
        }
        let text = serde_json::to_vec_pretty(&value).map_err(FileError::json(&path))?;
        Ok(std::fs::write(&path, text).map_err(FileError::io(&path))?)
    }
}

/// Checks and fingerprints every case in one pass (each case is read once), then reports every
/// problem of every case together, or pools the fingerprints.
fn checked_fingerprint(
    dataset: &Dataset,
    samples_total: usize,
) -> Result<Fingerprint, FingerprintStageError> {
    let mut report = Report {
        problems: dataset.layout_problems(),
        warnings: Vec::new(),
    };
    let integrity = |report| FingerprintStageError::Integrity {
        root: dataset.root.clone(),
        report,
    };
    if !report.is_ok() {
        return Err(integrity(report));
    }
    let allowed = dataset.allowed_label_values();
    let samples_per_case = samples_total / dataset.cases.len().max(1);
    let results: Vec<(Report, Option<CaseFingerprint>)> = dataset
        .cases
        .par_iter()
        .map(|case| match load_case(case) {
            Err(unreadable) => (
                Report {
                    problems: unreadable.iter().map(ToString::to_string).collect(),
                    warnings: Vec::new(),
                },
                None,
            ),
            Ok(loaded) => {
                let case_report = check_case(&loaded, dataset.channels.len(), &allowed);
                if !case_report.is_ok() {
                    return (case_report, None);
                }
                let spacing = loaded.channels[0].geometry.spacing_zyx();
                let images = loaded.channels.into_iter().map(|c| c.data).collect();
                let fingerprint =
                    case_fingerprint(images, loaded.label, spacing, samples_per_case, SAMPLING_SEED);
                (case_report, Some(fingerprint))
            }
        })
        .collect();
    let mut fingerprints = Vec::new();
    for (case_report, fingerprint) in results {
        report.problems.extend(case_report.problems);
        report.warnings.extend(case_report.warnings);
        fingerprints.extend(fingerprint);
    }
    if !report.is_ok() {
        return Err(integrity(report));
    }
    Ok(aggregate(fingerprints, dataset.channels.len())?)
}
