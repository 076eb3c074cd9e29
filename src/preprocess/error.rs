//! The error of preprocessing: of one case's steps (read, crop, normalize, resample) and of the
//! stages that run them over a dataset. Errors of the modules below (images, plans, case store,
//! normalization, resampling) are wrapped, not rewritten, so each names its own file.

use crate::data::case_store::CaseStoreError;
use crate::data::dataset::DatasetError;
use crate::data::image::ImageError;
use crate::plans::PlansError;

use super::normalize::NormalizeError;
use super::resample::ResampleError;

#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    /// Anything that went wrong with one case, named by its id.
    #[error("case {case}: {source}")]
    Case {
        case: String,
        #[source]
        source: Box<PreprocessError>,
    },
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error(transparent)]
    Plans(#[from] PlansError),
    #[error(transparent)]
    CaseStore(#[from] CaseStoreError),
    #[error("no image channels")]
    NoChannels,
    #[error("channel {channel} differs in shape from channel 0")]
    ChannelShape { channel: usize },
    #[error("label shape {label:?} differs from image shape {image:?}")]
    LabelShape { label: Vec<usize>, image: Vec<usize> },
    #[error("segmentation of shape {found:?} does not fit the image (z, y, x) {expected:?}")]
    SegmentationShape { found: Vec<usize>, expected: [usize; 3] },
    #[error("configuration {configuration}: spacing {spacing:?} is neither 2D nor 3D")]
    SpacingDimensions {
        configuration: String,
        spacing: Vec<f64>,
    },
    #[error("the plan names {schemes} channel schemes, the case has {channels} channels")]
    ChannelCount { schemes: usize, channels: usize },
    /// A normalization scheme the plan names that nnflow does not know.
    #[error(transparent)]
    Scheme(NormalizeError),
    #[error("channel {channel}: {source}")]
    Normalize {
        channel: usize,
        #[source]
        source: NormalizeError,
    },
    #[error(transparent)]
    Resample(#[from] ResampleError),
    #[error("is already normalized (two normalize stages in a row?)")]
    AlreadyNormalized,
    #[error("is already resampled (two resample stages in a row?)")]
    AlreadyResampled,
    #[error("is already normalized and resampled (nothing left to preprocess)")]
    AlreadyPreprocessed,
    #[error("no cases to preprocess")]
    NoCases,
    #[error("interrupted")]
    Interrupted,
}

impl PreprocessError {
    /// For `map_err`: the error of case `id`.
    pub fn in_case(id: &str) -> impl FnOnce(PreprocessError) -> PreprocessError + '_ {
        move |source| PreprocessError::Case {
            case: id.to_string(),
            source: Box::new(source),
        }
    }
}
