//! Preprocessed cases on disk, the format the preprocessing stages exchange and training reads.
//! Per case a Zarr v3 group `<id>.zarr/` holding the arrays `data` (float32, channels x z x y x)
//! and `seg` (int8 when the labels fit, else int16; 1 x z x y x, -1 outside the nonzero mask),
//! chunked for the configuration's patch and compressed ([`crate::data::chunked`]), and
//! `<id>.json` (properties: cropping, spacings, geometry, class locations).
//!
//! A case exists once its properties file does. The arrays are written into a temporary folder
//! renamed into place, and the properties last, so a killed stage never leaves a case that looks
//! complete. Cases of the earlier layout (`<id>_data.npy`, `<id>_seg.npy`) are refused with an
//! error saying so, never misread.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ndarray::{Array4, ArrayView4};
use serde::{Deserialize, Serialize};

use super::chunked::{self, ChunkShapes, ChunkedArray, ChunkedError};
use super::image::Geometry;
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
    /// The properties file (`<id>.json`), or a file or folder of the case's arrays.
    #[error(transparent)]
    File(#[from] FileError),
    #[error("case {case}: {source}")]
    Chunked {
        case: String,
        #[source]
        source: ChunkedError,
    },
    #[error(
        "case {case}: {} holds the case in nnflow's earlier .npy layout; preprocess it again \
         (rerun the normalize and resample stages)",
        .folder.display()
    )]
    OldLayout { case: String, folder: PathBuf },
    #[error("case {case}: no segmentation")]
    NoSegmentation { case: String },
    #[error("case {case}: segmentation {seg:?} and image {data:?} differ")]
    SegShape {
        case: String,
        seg: Vec<usize>,
        data: Vec<usize>,
    },
}

/// The folder of a case's arrays.
fn arrays_folder(folder: &Path, id: &str) -> PathBuf {
    folder.join(format!("{id}.zarr"))
}

fn properties_path(folder: &Path, id: &str) -> PathBuf {
    folder.join(format!("{id}.json"))
}

/// For `map_err`: a chunked-array error of case `id`.
fn in_case(id: &str) -> impl FnOnce(ChunkedError) -> CaseStoreError + '_ {
    move |source| CaseStoreError::Chunked {
        case: id.to_string(),
        source,
    }
}

/// Writes a case whose arrays are read in patches of `patch` (the configuration's patch size,
/// `(z, y, x)` or `(y, x)`). The properties file is written last, and marks the case as present.
pub fn write_case(folder: &Path, id: &str, case: &StoredCase, patch: &[usize]) -> Result<(), CaseStoreError> {
    let properties = properties_path(folder, id);
    std::fs::create_dir_all(folder).map_err(FileError::io(folder))?;
    write_arrays_renamed(folder, id, |staging| {
        let shape: [usize; 4] = case.data.shape().try_into().expect("four axes");
        chunked::write_group(staging)?;
        let shapes = ChunkShapes::for_patch(shape, patch, 4);
        chunked::write(staging, "data", case.data.view(), shapes)?;
        if let Some(seg) = &case.seg {
            write_seg(staging, "seg", seg.view(), patch)?;
        }
        Ok(())
    })?;
    // Compact: class locations are ten thousand coordinates per class.
    write_properties(&properties, &case.properties)
}

/// Labels as int8 when they fit, as nnU-Net stores them: half the bytes to write and read.
fn write_seg(folder: &Path, name: &str, seg: ArrayView4<i16>, patch: &[usize]) -> Result<(), ChunkedError> {
    let shape: [usize; 4] = seg.shape().try_into().expect("four axes");
    if seg.iter().all(|&v| i8::try_from(v).is_ok()) {
        let narrow = seg.mapv(|v| v as i8);
        chunked::write(
            folder,
            name,
            narrow.view(),
            ChunkShapes::for_patch(shape, patch, 1),
        )
    } else {
        chunked::write(folder, name, seg, ChunkShapes::for_patch(shape, patch, 2))
    }
}

/// Writes a case's arrays into a temporary folder, then renames it to `<id>.zarr`. A case written
/// before is first made absent (its properties removed), so no reader pairs old properties with
/// new arrays.
fn write_arrays_renamed(
    folder: &Path,
    id: &str,
    write: impl FnOnce(&Path) -> Result<(), ChunkedError>,
) -> Result<(), CaseStoreError> {
    let destination = arrays_folder(folder, id);
    let staging = crate::atomic_file::temporary_path(&destination);
    let io = |path: &Path, source| {
        CaseStoreError::File(FileError::Io {
            path: path.to_path_buf(),
            source,
        })
    };
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| io(&staging, e))?;
    }
    std::fs::create_dir_all(&staging).map_err(|e| io(&staging, e))?;
    if let Err(e) = write(&staging) {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(in_case(id)(e));
    }
    replace_folder(&staging, &destination, &properties_path(folder, id)).map_err(|(path, e)| io(&path, e))
}

/// For `map_err`: an I/O error with its path.
fn at(path: &Path) -> impl FnOnce(std::io::Error) -> (PathBuf, std::io::Error) + '_ {
    move |e| (path.to_path_buf(), e)
}

/// Renames `staging` to `destination`, removing what `destination` held; `properties` goes first.
fn replace_folder(
    staging: &Path,
    destination: &Path,
    properties: &Path,
) -> Result<(), (PathBuf, std::io::Error)> {
    match std::fs::remove_file(properties) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(at(properties)(e)),
        _ => {}
    }
    if destination.exists() {
        std::fs::remove_dir_all(destination).map_err(at(destination))?;
    }
    std::fs::rename(staging, destination).map_err(at(destination))
}

fn write_properties(path: &Path, properties: &CaseProperties) -> Result<(), CaseStoreError> {
    let text = serde_json::to_vec(properties).map_err(FileError::json(path))?;
    Ok(crate::atomic_file::write_atomically(path, &text).map_err(FileError::io(path))?)
}

pub fn read_properties(folder: &Path, id: &str) -> Result<CaseProperties, CaseStoreError> {
    let path = properties_path(folder, id);
    let text = std::fs::read(&path).map_err(FileError::io(&path))?;
    Ok(serde_json::from_slice(&text).map_err(FileError::json(&path))?)
}

/// A stored case opened for reading boxes: its arrays' metadata read and every chunk file
/// checked; nothing decoded yet.
pub struct OpenedCase {
    /// `(c, z, y, x)` float32.
    pub data: ChunkedArray,
    /// `(1, z, y, x)` labels on the image's grid, if the case has them.
    pub seg: Option<ChunkedArray>,
}

/// Opens case `id`'s arrays (its properties are read separately, [`read_properties`]).
pub fn open_case(folder: &Path, id: &str) -> Result<OpenedCase, CaseStoreError> {
    let arrays = arrays_folder(folder, id);
    if !arrays.is_dir() && folder.join(format!("{id}_data.npy")).exists() {
        return Err(CaseStoreError::OldLayout {
            case: id.to_string(),
            folder: folder.to_path_buf(),
        });
    }
    let data = ChunkedArray::open(&arrays, "data").map_err(in_case(id))?;
    if !data.holds::<f32>() {
        return Err(in_case(id)(ChunkedError::Layout {
            path: data.path().to_path_buf(),
            expected: "a float32 image".into(),
            found: "another data type".into(),
        }));
    }
    let seg = if arrays.join("seg").exists() {
        let seg = ChunkedArray::open(&arrays, "seg").map_err(in_case(id))?;
        let (s, d) = (seg.shape(), data.shape());
        if s[0] != 1 || s[1..] != d[1..] || !(seg.holds::<i8>() || seg.holds::<i16>()) {
            return Err(CaseStoreError::SegShape {
                case: id.to_string(),
                seg: s.to_vec(),
                data: d.to_vec(),
            });
        }
        Some(seg)
    } else {
        None
    };
    Ok(OpenedCase { data, seg })
}

/// A case's segmentation alone, if it has one.
pub fn read_seg(folder: &Path, id: &str) -> Result<Option<Array4<i16>>, CaseStoreError> {
    let opened = open_case(folder, id)?;
    opened
        .seg
        .map(|seg| seg.read_labels_box([0; 4], seg.shape()).map_err(in_case(id)))
        .transpose()
}

/// Writes a case whose arrays are those of `source` unchanged: the array files are hard-linked
/// (copied across filesystems) and only the properties are written.
pub fn write_case_linked(
    source: &Path,
    folder: &Path,
    id: &str,
    properties: &CaseProperties,
) -> Result<(), CaseStoreError> {
    // refuses an old-layout source with its own error
    open_case(source, id)?;
    std::fs::create_dir_all(folder).map_err(FileError::io(folder))?;
    let destination = arrays_folder(folder, id);
    let staging = crate::atomic_file::temporary_path(&destination);
    let linked = link_tree(&arrays_folder(source, id), &staging)
        .and_then(|()| replace_folder(&staging, &destination, &properties_path(folder, id)));
    if let Err((path, source)) = linked {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(FileError::Io { path, source }.into());
    }
    write_properties(&properties_path(folder, id), properties)
}

/// Recreates the folder tree `from` at `to`, hard-linking (else copying) every file.
fn link_tree(from: &Path, to: &Path) -> Result<(), (PathBuf, std::io::Error)> {
    std::fs::create_dir_all(to).map_err(at(to))?;
    for entry in std::fs::read_dir(from).map_err(at(from))? {
        let entry = entry.map_err(at(from))?;
        let (source, target) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type().map_err(at(&source))?.is_dir() {
            link_tree(&source, &target)?;
        } else if std::fs::hard_link(&source, &target).is_err() {
            std::fs::copy(&source, &target).map_err(at(&target))?;
        }
    }
    Ok(())
}

pub fn read_case(folder: &Path, id: &str) -> Result<StoredCase, CaseStoreError> {
    let opened = open_case(folder, id)?;
    let properties = read_properties(folder, id)?;
    let data = opened.data.read_all::<f32>().map_err(in_case(id))?;
    let seg = opened
        .seg
        .map(|seg| seg.read_labels_box([0; 4], seg.shape()))
        .transpose()
        .map_err(in_case(id))?;
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

/// Writes a `(1, z, y, x)` label array alone as the Zarr array folder `path` (the cascade's
/// previous-stage segmentations), chunked for `patch`; atomically (a temporary folder renamed).
pub fn write_labels(path: &Path, labels: ArrayView4<i16>, patch: &[usize]) -> Result<(), ChunkedError> {
    let parent = path.parent().unwrap_or(Path::new("."));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ChunkedError::Io(FileError::Io { path, source })
    };
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let staging = crate::atomic_file::temporary_path(path);
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io(&staging))?;
    }
    std::fs::create_dir_all(&staging).map_err(io(&staging))?;
    if let Err(e) = write_seg(&staging, "", labels, patch) {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    if path.exists() {
        std::fs::remove_dir_all(path).map_err(io(path))?;
    }
    std::fs::rename(&staging, path).map_err(io(path))
}

/// Opens a label array written by [`write_labels`], checking it is `(1, z, y, x)` labels.
pub fn open_labels(path: &Path) -> Result<ChunkedArray, ChunkedError> {
    let labels = ChunkedArray::open(path, "")?;
    if labels.shape()[0] != 1 || !(labels.holds::<i8>() || labels.holds::<i16>()) {
        return Err(ChunkedError::Layout {
            path: path.to_path_buf(),
            expected: "(1, z, y, x) int8 or int16 labels".into(),
            found: format!("shape {:?}", labels.shape()),
        });
    }
    Ok(labels)
}

/// A label array written by [`write_labels`], whole.
pub fn read_labels(path: &Path) -> Result<Array4<i16>, ChunkedError> {
    let labels = open_labels(path)?;
    labels.read_labels_box([0; 4], labels.shape())
}

/// Properties of a small case, for tests.
#[cfg(test)]
pub(crate) fn sample_properties() -> CaseProperties {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn case(shape: (usize, usize, usize, usize), label_max: i16) -> StoredCase {
        let data = Array4::from_shape_fn(shape, |(c, z, y, x)| {
            (c * 100 + z * 10 + y + x) as f32 * 0.25 - (z * x) as f32 / 7.0
        });
        let seg = Array4::from_shape_fn((1, shape.1, shape.2, shape.3), |(_, z, y, x)| {
            if z == 0 {
                -1
            } else {
                ((x + 2 * y + 7 * z) * 3 % (label_max as usize + 1)) as i16
            }
        });
        StoredCase {
            data,
            seg: Some(seg),
            properties: sample_properties(),
        }
    }

    fn stored_type(folder: &Path, id: &str) -> String {
        let text = std::fs::read_to_string(arrays_folder(folder, id).join("seg/zarr.json")).unwrap();
        let metadata: serde_json::Value = serde_json::from_str(&text).unwrap();
        metadata["data_type"].as_str().unwrap().to_string()
    }

    /// float32 images and int8 / int16 labels come back exactly, for shapes no multiple of the
    /// chunks (3D and 2D patches), and without a segmentation.
    #[test]
    fn write_read_round_trip_and_listing() {
        let dir = tempfile::tempdir().unwrap();
        for (id, shape, label_max, patch, seg_type) in [
            ("case_001", (2, 4, 4, 6), 2, vec![4, 4, 4], "int8"),
            ("case_002", (1, 19, 37, 23), 300, vec![8, 16, 8], "int16"),
            ("case_003", (3, 5, 41, 35), 3, vec![32, 16], "int8"),
        ] {
            let case = case(shape, label_max);
            write_case(dir.path(), id, &case, &patch).unwrap();
            assert_eq!(read_case(dir.path(), id).unwrap(), case, "{id}");
            assert_eq!(stored_type(dir.path(), id), seg_type, "{id}");
            assert_eq!(read_seg(dir.path(), id).unwrap(), case.seg, "{id}");
        }
        let mut image_only = case((1, 3, 3, 3), 1);
        image_only.seg = None;
        write_case(dir.path(), "test_001", &image_only, &[128, 128, 128]).unwrap();
        assert_eq!(read_case(dir.path(), "test_001").unwrap(), image_only);
        assert_eq!(read_seg(dir.path(), "test_001").unwrap(), None);
        assert_eq!(
            list_cases(dir.path()),
            ["case_001", "case_002", "case_003", "test_001"]
        );
    }

    /// The chunk files follow the patch: a patch read touches few of them, and a case is many
    /// files only when it is large.
    #[test]
    fn shards_follow_the_patch_size() {
        let dir = tempfile::tempdir().unwrap();
        write_case(dir.path(), "c", &case((1, 19, 37, 23), 2), &[8, 16, 8]).unwrap();
        let opened = open_case(dir.path(), "c").unwrap();
        let shapes = ChunkShapes::for_patch([1, 19, 37, 23], &[8, 16, 8], 4);
        let count = |folder: &Path| {
            walk(folder)
                .iter()
                .filter(|p| p.components().any(|c| c.as_os_str() == "c"))
                .count()
        };
        let shards: usize = (0..4)
            .map(|a| [1usize, 19, 37, 23][a].div_ceil(shapes.shard[a]))
            .product();
        assert_eq!(count(opened.data.path()), shards);
        assert!(shards > 1, "{shapes:?}");
    }

    fn walk(folder: &Path) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(folder).unwrap().flatten() {
            if entry.file_type().unwrap().is_dir() {
                files.extend(walk(&entry.path()));
            } else {
                files.push(entry.path());
            }
        }
        files
    }

    /// A killed write never leaves a case that looks complete: arrays without properties, or a
    /// staging folder, are no case; rewriting a case replaces it whole.
    #[test]
    fn a_case_exists_only_once_complete() {
        let dir = tempfile::tempdir().unwrap();
        let first = case((1, 6, 7, 8), 2);
        write_case(dir.path(), "a", &first, &[4, 4, 4]).unwrap();
        // killed after renaming the arrays, before the properties: not listed, not readable
        write_case(dir.path(), "b", &first, &[4, 4, 4]).unwrap();
        std::fs::remove_file(properties_path(dir.path(), "b")).unwrap();
        // killed while writing the arrays: a staging folder
        let staging = crate::atomic_file::temporary_path(&arrays_folder(dir.path(), "c"));
        std::fs::create_dir_all(staging.join("data")).unwrap();
        std::fs::write(staging.join("data/zarr.json"), b"{").unwrap();
        // and the earlier layout's leftovers of an unfinished case
        std::fs::write(dir.path().join("d_data.npy"), b"partial").unwrap();
        assert_eq!(list_cases(dir.path()), ["a"]);
        assert!(read_case(dir.path(), "b").is_err());

        // a rewrite with other arrays: the new ones, no file of the old left over
        let second = case((2, 3, 9, 5), 1);
        write_case(dir.path(), "a", &second, &[2, 2, 2]).unwrap();
        assert_eq!(read_case(dir.path(), "a").unwrap(), second);
        assert_eq!(list_cases(dir.path()), ["a"]);
    }

    /// Unchanged arrays are linked, not rewritten, and read back the same.
    #[test]
    fn linked_cases_share_the_chunk_files() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let (source, target) = (dir.path().join("s"), dir.path().join("t"));
        let stored = case((1, 6, 7, 8), 2);
        write_case(&source, "a", &stored, &[4, 4, 4]).unwrap();
        let mut properties = stored.properties.clone();
        properties.resampled = true;
        write_case_linked(&source, &target, "a", &properties).unwrap();
        let linked = read_case(&target, "a").unwrap();
        assert_eq!((&linked.data, &linked.seg), (&stored.data, &stored.seg));
        assert!(linked.properties.resampled);
        let files = walk(&arrays_folder(&source, "a"));
        assert!(files.len() > 3);
        for file in files {
            let relative = file.strip_prefix(arrays_folder(&source, "a")).unwrap();
            let other = arrays_folder(&target, "a").join(relative);
            let inode = |p: &Path| std::fs::metadata(p).unwrap().ino();
            assert_eq!(inode(&file), inode(&other), "{}", relative.display());
        }
    }

    /// A damaged or missing chunk file is an error naming the case and the file, never zeros.
    #[test]
    fn corrupt_or_missing_chunks_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        write_case(dir.path(), "a", &case((1, 9, 10, 11), 2), &[4, 4, 4]).unwrap();
        let data = arrays_folder(dir.path(), "a").join("data");
        let shard = data.join("c/0/1/1/1");
        assert!(shard.is_file());
        let original = std::fs::read(&shard).unwrap();

        // a flipped byte in the compressed data: zstd's checksum (or the decoder) refuses it
        let mut damaged = original.clone();
        damaged[original.len() / 3] ^= 0x5a;
        std::fs::write(&shard, &damaged).unwrap();
        let err = read_case(dir.path(), "a").unwrap_err().to_string();
        assert!(err.starts_with("case a: ") && err.contains("c/0/1/1/1"), "{err}");

        // a damaged shard index (its crc32c)
        let mut damaged = original.clone();
        let n = damaged.len();
        damaged[n - 10] ^= 0x01;
        std::fs::write(&shard, &damaged).unwrap();
        let err = read_case(dir.path(), "a").unwrap_err().to_string();
        assert!(err.starts_with("case a: ") && err.contains("c/0/1/1/1"), "{err}");

        // truncated
        std::fs::write(&shard, &original[..original.len() / 2]).unwrap();
        let err = read_case(dir.path(), "a").unwrap_err().to_string();
        assert!(err.starts_with("case a: ") && err.contains("c/0/1/1/1"), "{err}");

        // missing: refused when the case is opened
        std::fs::remove_file(&shard).unwrap();
        let err = open_case(dir.path(), "a").err().unwrap().to_string();
        assert!(
            err.starts_with("case a: ") && err.contains("c/0/1/1/1") && err.contains("missing chunk file"),
            "{err}"
        );
        std::fs::write(&shard, &original).unwrap();
        assert!(read_case(dir.path(), "a").is_ok());

        // the whole image array missing
        std::fs::remove_dir_all(&data).unwrap();
        let err = read_case(dir.path(), "a").unwrap_err().to_string();
        assert!(err.contains("case a: ") && err.contains("missing"), "{err}");
    }

    /// A folder of the earlier `.npy` layout (an old cache, a user's folder) is refused, saying so.
    #[test]
    fn old_npy_cases_are_refused_not_misread() {
        let dir = tempfile::tempdir().unwrap();
        let old = case((1, 3, 4, 5), 2);
        crate::data::npy::write(&dir.path().join("x_data.npy"), old.data.view()).unwrap();
        crate::data::npy::write(&dir.path().join("x_seg.npy"), old.seg.as_ref().unwrap().view()).unwrap();
        write_properties(&properties_path(dir.path(), "x"), &old.properties).unwrap();
        assert_eq!(list_cases(dir.path()), ["x"]);
        for err in [
            read_case(dir.path(), "x").unwrap_err(),
            open_case(dir.path(), "x").err().unwrap(),
            read_seg(dir.path(), "x").unwrap_err(),
        ] {
            assert!(matches!(err, CaseStoreError::OldLayout { .. }), "{err}");
            assert!(err.to_string().contains("earlier .npy layout"), "{err}");
        }
    }

    #[test]
    fn label_arrays_round_trip_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("next_stage/a.zarr");
        let labels = Array4::from_shape_fn((1, 5, 6, 7), |(_, z, y, x)| ((z + y + x) % 3) as i16);
        write_labels(&path, labels.view(), &[4, 4, 4]).unwrap();
        assert_eq!(read_labels(&path).unwrap(), labels);
        let other = labels.mapv(|v| v * 200);
        write_labels(&path, other.view(), &[4, 4, 4]).unwrap();
        assert_eq!(read_labels(&path).unwrap(), other);
        let entries: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(entries.len(), 1, "no staging folder left");
        let image = dir.path().join("image.zarr");
        std::fs::create_dir_all(&image).unwrap();
        chunked::write(
            &image,
            "",
            Array4::<f32>::zeros((2, 3, 3, 3)).view(),
            ChunkShapes::for_patch([2, 3, 3, 3], &[2, 2, 2], 4),
        )
        .unwrap();
        let err = read_labels(&image).unwrap_err().to_string();
        assert!(err.contains("(1, z, y, x) int8 or int16 labels"), "{err}");
    }
}
