//! PLACEHOLDER being written by a helper.
use std::path::Path;
use ndarray::Array3;
use super::{Decoded, Geometry, ImageError, Role};
pub fn page_count(path: &Path) -> Result<usize, ImageError> { Err(ImageError::invalid(path, "not yet")) }
pub fn read(path: &Path, _role: Role) -> Result<Decoded, ImageError> { Err(ImageError::invalid(path, "not yet")) }
pub fn write_labels(path: &Path, _labels: &Array3<i16>, _geometry: &Geometry) -> Result<(), ImageError> { Err(ImageError::invalid(path, "not yet")) }
