//! Evaluation of predictions against references: nnU-Net's metrics and summary. Pure functions on
//! label maps; the `evaluate` stage (reading files, writing summary.json) builds on them.

pub mod ensemble;
pub mod folder;
pub mod metrics;
pub mod postprocess;

use std::path::PathBuf;

use crate::data::image::ImageError;
use crate::file_error::FileError;

/// Why evaluating predictions against references failed: which folder, which file.
#[derive(Debug, thiserror::Error)]
pub enum EvaluateError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{}: no predictions (*{file_ending})", folder.display())]
    NoPredictions { folder: PathBuf, file_ending: String },
    #[error("{}: no reference for {} prediction(s): {}", references.display(), missing.len(), missing.join(", "))]
    MissingReferences {
        references: PathBuf,
        /// File names of the predictions without a reference.
        missing: Vec<String>,
    },
    /// A prediction of a case the dataset does not have (so no reference label).
    #[error("case {case} is not in the dataset")]
    UnknownCase { case: String },
    #[error("{file}: prediction shape {prediction:?} differs from the reference's {reference:?}")]
    ShapeMismatch {
        file: String,
        prediction: Vec<usize>,
        reference: Vec<usize>,
    },
}
