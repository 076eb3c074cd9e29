//! Preprocessed cases on disk, the format the preprocessing stages exchange and training reads:
//! per case `<id>_data.npy` (float32, channels x z x y x), `<id>_seg.npy` (int16, 1 x z x y x, -1
//! outside the nonzero mask) and `<id>.json` (properties: cropping, spacings, geometry, class
//! locations). Each file is written under a temporary name and renamed, so a killed stage never
//! leaves a case that looks complete.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ndarray::{Array4, Ix4};
use serde::{Deserialize, Serialize};

use super::image::Geometry;
use super::npy;
use crate::file_error::FileError;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct CaseProperties {
    /// Spacing of the stored arrays, (z, y, x) in the transposed axis order.
    pub spacing: [f64; 3],
    /// Spacing of the raw image, (z, y, x) as read.
    pub original_spacing: [f64; 3],
    /// Axis permutation applied to the raw arrays (nnU-Net's `transpose_forward`).
    pub transpose_forward: [usize; 3],
    /// Shape after transposing, before cropping.
    pub shape_before_cropping: [usize; 3],
    /// `[start, end)` per (transposed) axis of the nonzero crop.
    pub bbox_used_for_cropping: [[usize; 2]; 3],
    pub shape_after_cropping_and_before_resampling: [usize; 3],
    /// The raw image's geometry (its first channel's), so predictions are written with exactly
    /// this geometry, in its format.
    pub geometry: Geometry,
    /// Which steps have been applied, so stages composed in either order know what is left.
    pub normalized: bool,
    pub resampled: bool,
    /// Per foreground label (or region), sampled voxel coordinates `[0, z, y, x]` for foreground
    /// oversampling; set by the stage that fixes the final grid.
    pub class_locations: Option<BTreeMap<String, Vec<[usize; 4]>>>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct StoredCase {
    /// Channels x z x y x.
    pub data: Array4<f32>,
    /// 1 x z x y x; absent for cases without a segmentation (test images).
    pub seg: Option<Array4<i16>>,
    pub properties: CaseProperties,
}

#[derive(Debug, thiserror::Error)]
pub enum CaseStoreError {
    #[error(transparent)]
    Npy(#[from] npy::NpyError),
    /// The properties file (`<id>.json`).
    #[error(transparent)]
    Properties(#[from] FileError),
    #[error("case {case}: {source}")]
    Dimensions {
        case: String,
        #[source]
        source: ndarray::ShapeError,
    },
    #[error("case {case}: segmentation {seg:?} and image {data:?} differ")]
    SegShape {
        case: String,
        seg: Vec<usize>,
        data: Vec<usize>,
    },
}

fn paths(folder: &Path, id: &str) -> (PathBuf, PathBuf, PathBuf) {
    (
        folder.join(format!("{id}_data.npy")),
        folder.join(format!("{id}_seg.npy")),
        folder.join(format!("{id}.json")),
    )
}

/// Writes a case; the properties file is written last, and marks the case as present.
pub fn write_case(folder: &Path, id: &str, case: &StoredCase) -> Result<(), CaseStoreError> {
    let (data_path, seg_path, properties_path) = paths(folder, id);
    std::fs::create_dir_all(folder).map_err(FileError::io(&properties_path))?;
    write_renamed(&data_path, |tmp| npy::write(tmp, case.data.view()))?;
    if let Some(seg) = &case.seg {
        // int8 when the labels fit, as nnU-Net stores them: half the bytes to write and read.
        if seg.iter().all(|&v| i8::try_from(v).is_ok()) {
            let narrow = seg.mapv(|v| v as i8);
            write_renamed(&seg_path, |tmp| npy::write(tmp, narrow.view()))?;
        } else {
            write_renamed(&seg_path, |tmp| npy::write(tmp, seg.view()))?;
        }
    }
    // Compact: class locations are ten thousand coordinates per class.
    write_properties(&properties_path, &case.properties)
}

fn write_properties(path: &Path, properties: &CaseProperties) -> Result<(), CaseStoreError> {
    let text = serde_json::to_vec(properties).map_err(FileError::json(path))?;
    Ok(crate::atomic_file::write_atomically(path, &text).map_err(FileError::io(path))?)
}

fn write_renamed(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<(), npy::NpyError>,
) -> Result<(), CaseStoreError> {
    let temporary = path.with_extension("npy.partial");
    write(&temporary)?;
    std::fs::rename(&temporary, path).map_err(|source| {
        CaseStoreError::Npy(npy::NpyError::Io {
            path: path.to_path_buf(),
            source,
        })
    })
}

pub fn read_properties(folder: &Path, id: &str) -> Result<CaseProperties, CaseStoreError> {
    let (_, _, properties_path) = paths(folder, id);
    let text = std::fs::read(&properties_path).map_err(FileError::io(&properties_path))?;
    Ok(serde_json::from_slice(&text).map_err(FileError::json(&properties_path))?)
}

/// A case's segmentation alone, if it has one.
pub fn read_seg(folder: &Path, id: &str) -> Result<Option<Array4<i16>>, CaseStoreError> {
    let (_, seg_path, _) = paths(folder, id);
    if !seg_path.exists() {
        return Ok(None);
    }
    let seg = npy::read_labels(&seg_path)?
        .into_dimensionality::<Ix4>()
        .map_err(|source| CaseStoreError::Dimensions {
            case: id.to_string(),
            source,
        })?;
    Ok(Some(seg))
}

/// Writes a case whose arrays are those of `source` unchanged: the array files are hard-linked
/// (copied across filesystems) and only the properties are written.
pub fn write_case_linked(
    source: &Path,
    folder: &Path,
    id: &str,
    properties: &CaseProperties,
) -> Result<(), CaseStoreError> {
    let (from_data, from_seg, _) = paths(source, id);
    let (to_data, to_seg, properties_path) = paths(folder, id);
    let io = |path: &Path, source: std::io::Error| {
        CaseStoreError::Npy(npy::NpyError::Io {
            path: path.to_path_buf(),
            source,
        })
    };
    std::fs::create_dir_all(folder).map_err(|e| io(folder, e))?;
    for (from, to) in [(from_data, to_data), (from_seg, to_seg)] {
        if from.exists() && std::fs::hard_link(&from, &to).is_err() {
            std::fs::copy(&from, &to).map_err(|e| io(&to, e))?;
        }
    }
    write_properties(&properties_path, properties)
}

pub fn read_case(folder: &Path, id: &str) -> Result<StoredCase, CaseStoreError> {
    let (data_path, seg_path, _) = paths(folder, id);
    let properties = read_properties(folder, id)?;
    let dimensions = |source| CaseStoreError::Dimensions {
        case: id.to_string(),
        source,
    };
    let data = npy::read::<f32>(&data_path)?
        .into_dimensionality::<Ix4>()
        .map_err(dimensions)?;
    let seg = if seg_path.exists() {
        let seg = npy::read_labels(&seg_path)?
            .into_dimensionality::<Ix4>()
            .map_err(dimensions)?;
        if seg.shape()[1..] != data.shape()[1..] {
            return Err(CaseStoreError::SegShape {
                case: id.to_string(),
                seg: seg.shape().to_vec(),
                data: data.shape().to_vec(),
            });
        }
        Some(seg)
    } else {
        None
    };
    Ok(StoredCase {
        data,
        seg,
        properties,
    })
}

/// Ids of the complete cases in a folder (those whose properties file exists), sorted.
pub fn list_cases(folder: &Path) -> Vec<String> {
    let mut ids: Vec<String> = std::fs::read_dir(folder)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            entry
                .file_name()
                .to_str()?
                .strip_suffix(".json")
                .map(str::to_string)
        })
        .collect();
    ids.sort();
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn sample_properties() -> CaseProperties {
        CaseProperties {
            spacing: [3.0, 1.0, 1.0],
            original_spacing: [3.0, 1.0, 1.0],
            transpose_forward: [0, 1, 2],
            shape_before_cropping: [4, 5, 6],
            bbox_used_for_cropping: [[0, 4], [1, 5], [0, 6]],
            shape_after_cropping_and_before_resampling: [4, 4, 6],
            geometry: Geometry::from_nifti(
                serde_json::from_value(serde_json::json!({
                    "dim": [3, 6, 5, 4, 1, 1, 1, 1], "pixdim": [1.0, 1.0, 1.0, 3.0, 0.0, 0.0, 0.0, 0.0],
                    "xyzt_units": 2, "qform_code": 0, "sform_code": 1, "quatern": [0.0, 0.0, 0.0],
                    "qoffset": [0.0, 0.0, 0.0], "srow": [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0]],
                    "datatype": 4
                }))
                .unwrap(),
            ),
            normalized: false,
            resampled: false,
            class_locations: Some([("1".to_string(), vec![[0, 1, 2, 3]])].into()),
        }
    }

    #[test]
    fn write_read_round_trip_and_listing() {
        let dir = tempfile::tempdir().unwrap();
        let data = Array4::from_shape_fn((2, 4, 4, 6), |(c, z, y, x)| (c * 100 + z * 10 + y + x) as f32);
        let seg = Array4::from_shape_fn(
            (1, 4, 4, 6),
            |(_, z, _, x)| if z == 0 { -1 } else { (x % 3) as i16 },
        );
        let case = StoredCase {
            data,
            seg: Some(seg),
            properties: sample_properties(),
        };
        write_case(dir.path(), "case_001", &case).unwrap();
        assert_eq!(read_case(dir.path(), "case_001").unwrap(), case);
        assert_eq!(list_cases(dir.path()), ["case_001"]);
        // A case whose properties were never written is not listed.
        std::fs::write(dir.path().join("case_002_data.npy"), b"partial").unwrap();
        assert_eq!(list_cases(dir.path()), ["case_001"]);
    }
}
