//! Inference: turning a trained network's per-patch predictions into whole-image logits.

pub mod cases;
pub mod export;
pub mod job;
pub mod model;
pub mod sliding_window;
pub mod trainers;
pub mod writer;

pub use model::{FoldSelection, ModelError, TrainedModel};

use std::path::PathBuf;

use crate::data::case_store::CaseProperties;
use crate::data::image::ImageError;
use crate::data::npy::NpyError;
use crate::evaluate::ensemble::EnsembleError;
use crate::file_error::FileError;
use crate::plans::PlansError;
use crate::preprocess::resample::ResampleError;

/// Why finding, exporting or writing a predicted case failed.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    /// Anything that went wrong with one case, named by its id.
    #[error("case {case}: {source}")]
    Case {
        case: String,
        #[source]
        source: Box<InferenceError>,
    },
    #[error(transparent)]
    File(#[from] FileError),
    #[error("case {case}: {} is missing", image.display())]
    MissingImage { case: String, image: PathBuf },
    #[error("{}: no images (*{ending}, nor another image format nnflow reads, nor DICOM series folders)", folder.display())]
    NoImages { folder: PathBuf, ending: String },
    #[error("dataset.json: region-based labels need `regions_class_order`")]
    NoRegionOrder,
    #[error("logits of shape {shape:?} are empty")]
    EmptyLogits { shape: Vec<usize> },
    #[error("{channels} logit channels but regions_class_order has {regions} regions")]
    RegionCount { channels: usize, regions: usize },
    #[error("regions_class_order {order:?} has labels outside int16")]
    RegionOrderRange { order: Vec<i64> },
    #[error("region label {label} does not fit int16")]
    RegionLabelRange { label: i64 },
    #[error("{classes} classes do not fit int16")]
    TooManyClasses { classes: usize },
    /// The crop does not fit the shapes, or `transpose_forward` is no permutation.
    #[error(
        "inconsistent case properties: bbox {:?}, shape before cropping {:?}, after {:?}, \
         transpose_forward {:?}",
        properties.bbox_used_for_cropping,
        properties.shape_before_cropping,
        properties.shape_after_cropping_and_before_resampling,
        properties.transpose_forward
    )]
    InconsistentProperties { properties: Box<CaseProperties> },
    #[error(transparent)]
    Plans(#[from] PlansError),
    #[error("configuration {configuration}: spacing {spacing:?} is neither 2D nor 3D")]
    SpacingDimensions {
        configuration: String,
        spacing: Vec<f64>,
    },
    #[error("resampling the logits: {0}")]
    Resample(#[source] ResampleError),
    #[error(
        "exported segmentation has shape {found:?} but the raw image header says (z, y, x) {expected:?}"
    )]
    ExportedShape { found: Vec<usize>, expected: [usize; 3] },
    /// Writing a label map; the path comes first, as it always did (the NIfTI error names it too).
    #[error("{}: {source}", path.display())]
    WriteLabelMap { path: PathBuf, source: ImageError },
    #[error(transparent)]
    Npy(#[from] NpyError),
    #[error(transparent)]
    Ensemble(#[from] EnsembleError),
    #[error("no model")]
    NoModel,
    /// Finding the trained model a user named, its folds or checkpoints. (Boxed, as the next,
    /// to keep this error small.)
    #[error(transparent)]
    Model(Box<ModelError>),
    /// Reading an nnU-Net `.pth` checkpoint.
    #[error(transparent)]
    Checkpoint(Box<crate::network::pth::PthError>),
}

impl From<ModelError> for InferenceError {
    fn from(error: ModelError) -> Self {
        InferenceError::Model(Box::new(error))
    }
}

impl From<crate::network::pth::PthError> for InferenceError {
    fn from(error: crate::network::pth::PthError) -> Self {
        InferenceError::Checkpoint(Box::new(error))
    }
}

impl InferenceError {
    /// For `map_err`: the error of case `id`.
    pub fn in_case<E: Into<InferenceError>>(id: &str) -> impl FnOnce(E) -> InferenceError + '_ {
        move |source| InferenceError::Case {
            case: id.to_string(),
            source: Box::new(source.into()),
        }
    }
}
