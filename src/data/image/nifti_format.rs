//! NIfTI through the image API: [`crate::data::nifti`] owns the file format.

use std::path::Path;

use ndarray::Array3;

use super::{Decoded, Geometry, ImageError};
use crate::data::nifti;

pub fn read(path: &Path) -> Result<Decoded, ImageError> {
    let (channels, header) = nifti::read_channels(path)?;
    Ok(Decoded {
        channels,
        geometry: Geometry::from_nifti(header),
    })
}

pub fn write_labels(path: &Path, labels: &Array3<i16>, geometry: &Geometry) -> Result<(), ImageError> {
    let header = geometry.nifti_header();
    if labels.iter().all(|&v| (0..255).contains(&v)) {
        nifti::write(path, &labels.mapv(|v| v as u8), &header)?;
    } else {
        nifti::write(path, labels, &header)?;
    }
    Ok(())
}
