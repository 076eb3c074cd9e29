//! The file side of preprocessing one case: reading a raw case's images and label, and
//! reading plans.json to tell whether a configuration applies. Everything numeric is in
//! `super::case_steps`; this module only reads and hands over arrays and plans.

use std::path::Path;

use ndarray::Array3;

use super::case_steps::{self, RawCase};
use super::PreprocessError;
use crate::data::case_store::StoredCase;
use crate::data::dataset::Case;
use crate::data::image;
use crate::plans::Plans;

/// Reads a raw case (label optional), transposes it as planned and crops it to its nonzero region.
/// Errors name the case.
pub fn load_raw(case: &Case, with_label: bool, transpose: [usize; 3]) -> Result<StoredCase, PreprocessError> {
    read_raw(case, with_label)
        .and_then(|raw| case_steps::crop_raw(raw, transpose))
        .map_err(PreprocessError::in_case(&case.id))
}

/// Reads a raw case's image channels (and label) as they are in the files.
fn read_raw(case: &Case, with_label: bool) -> Result<RawCase, PreprocessError> {
    let mut channels: Vec<Array3<f32>> = Vec::new();
    let mut geometry = None;
    for path in &case.images {
        // A file may hold several channels (RGB pictures, 4D NIfTI), as in nnU-Net's readers.
        let decoded = image::read(path)?;
        geometry.get_or_insert(decoded.geometry);
        channels.extend(decoded.channels);
    }
    let geometry = geometry.ok_or(PreprocessError::NoChannels)?;
    let spacing = geometry.spacing_zyx();
    let seg = if with_label {
        let (label, _) = image::read_labels(&case.label)?;
        Some(label)
    } else {
        None
    };
    Ok(RawCase {
        channels,
        seg,
        geometry,
        spacing,
    })
}

/// Why a configuration does not apply: plans.json (already written) lacks it. `None` when it is
/// planned, or when plans.json cannot be read (the stage then reports that itself).
pub fn unplanned_configuration(plans_json: &Path, name: &str) -> Option<String> {
    let plans = Plans::read(plans_json).ok()?;
    case_steps::unplanned_reason(&plans, name)
}

/// Why a configuration needs no preprocessing of its own (see
/// [`case_steps::shared_preprocessing_reason`]). `None` also when plans.json cannot be read.
pub fn shared_preprocessing(plans_json: &Path, name: &str) -> Option<String> {
    let plans = Plans::read(plans_json).ok()?;
    case_steps::shared_preprocessing_reason(&plans, name)
}
