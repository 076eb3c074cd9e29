//! The error of the training layer without libtorch: parameters, splits, the run's setup, the
//! cases read for training, batches, the cascade's previous stage and the resume checkpoints.
//! Errors of the modules below (files, dataset.json, plans.json, the case store, augmentation,
//! preprocessing) are wrapped, not rewritten, so each still names its own file.

use std::path::PathBuf;

use crate::augment::AugmentError;
use crate::data::case_store::CaseStoreError;
use crate::data::dataset::DatasetError;
use crate::file_error::FileError;
use crate::network::architecture::ArchitectureError;
use crate::plans::PlansError;
use crate::preprocess::PreprocessError;

use super::progress_plot::PlotError;
use crate::data::chunked::ChunkedError;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Every problem of the parameters at once.
    #[error("{}", .problems.join("; "))]
    InvalidParams { problems: Vec<String> },
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error(transparent)]
    Plans(#[from] PlansError),
    /// A value of the configuration's plans.json entry (patch or batch size) that is missing.
    #[error("plans.json: {0}")]
    PlanEntry(#[source] PlansError),
    #[error(transparent)]
    Preprocess(#[from] PreprocessError),
    #[error(transparent)]
    CaseStore(#[from] CaseStoreError),
    #[error(transparent)]
    Augment(#[from] AugmentError),

    #[error("fold `{text}` is neither a number nor `all`")]
    InvalidFold { text: String },
    #[error("{cases} cases cannot be split into {folds} folds")]
    TooFewCases { cases: usize, folds: usize },
    #[error("{}: case `{case}` is not in the preprocessed data", .splits_file.display())]
    UnknownSplitCase { splits_file: PathBuf, case: String },
    #[error("fold {index} does not exist: the splits have {count} folds")]
    NoSuchFold { index: usize, count: usize },
    #[error("fold {fold}: no training or no validation cases")]
    EmptyFold { fold: String },

    #[error("{}: no preprocessed cases", .folder.display())]
    NoPreprocessedCases { folder: PathBuf },
    /// The configuration's network cannot be built.
    #[error("plans.json configuration {configuration}: {source}")]
    Architecture {
        configuration: String,
        #[source]
        source: ArchitectureError,
    },
    #[error(
        "patch_size {patch_size:?} does not fit the {spatial_dims}D network of configuration {configuration}"
    )]
    PatchDimensions {
        patch_size: Vec<usize>,
        spatial_dims: usize,
        configuration: String,
    },
    #[error(
        "patch_size {patch_size:?}: axis {axis} must be a multiple of {stride} (the network's total stride)"
    )]
    PatchStride {
        patch_size: Vec<usize>,
        axis: usize,
        stride: usize,
    },
    #[error(
        "dataset.json: region training needs `regions_class_order` with one entry per region ({regions})"
    )]
    RegionsClassOrder { regions: usize },

    #[error("`previous_stage` is given but the plan's {configuration} is not the second stage of a cascade")]
    NotACascade { configuration: String },
    #[error(
        "{configuration} is the second stage of a cascade: `previous_stage` must name the \
         {previous} trainings (e.g. \"${{train[configuration={previous}].outputs}}\")"
    )]
    NoPreviousStage { configuration: String, previous: String },
    #[error(
        "{}: a training of {trained}, but the previous stage of {configuration} is {previous}",
        .training.display()
    )]
    WrongPreviousStage {
        training: PathBuf,
        trained: String,
        configuration: String,
        previous: String,
    },
    #[error(
        "the previous stage {previous} predicted {} of the {} cases {configuration} needs \
         (missing {}): every case must be held out by one of its trainings, so train all \
         folds of {previous}",
        .cases - .missing.len(),
        .cases,
        first_five(.missing)
    )]
    PreviousStageIncomplete {
        previous: String,
        configuration: String,
        /// How many cases the configuration needs.
        cases: usize,
        missing: Vec<String>,
    },
    #[error("case {case}: previous stage: {source}")]
    PreviousStageLabels {
        case: String,
        #[source]
        source: ChunkedError,
    },
    #[error(
        "{}: a previous-stage prediction in nnflow's earlier .npy layout; train {previous} again",
        .path.display()
    )]
    PreviousStageOldLayout { path: PathBuf, previous: String },

    #[error("cannot start augmentation threads: {0}")]
    AugmentationThreads(#[source] rayon::ThreadPoolBuildError),
    #[error("copying {} to {}: {source}", .from.display(), .to.display())]
    CopyCheckpoint {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", .path.display())]
    Plot {
        path: PathBuf,
        #[source]
        source: PlotError,
    },
}

/// The missing cases as the message lists them: the first five, then "...".
fn first_five(missing: &[String]) -> String {
    let shown = missing
        .iter()
        .take(5)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if missing.len() > 5 {
        format!("{shown}, ...")
    } else {
        shown
    }
}
