//! `nnflow import --msd TaskXX_Name`: a Medical Segmentation Decathlon task (nnU-Net v1 layout:
//! 4D multi-modality images, a v1 dataset.json) converted to nnU-Net v2's raw layout, as
//! `nnUNetv2_convert_MSD_dataset` does:
//!
//! - the dataset is named `DatasetXXX_Name` from `TaskXX_Name` (id overridable, as nnU-Net's
//!   `-overwrite_id`);
//! - every `.nii.gz` image of imagesTr and imagesTs is split into one file per channel,
//!   `{case}_{c:04}.nii.gz` (a 3D image is copied as `{case}_0000.nii.gz`); labelsTr is copied;
//!   files whose names start with `.` or `_` are skipped (the MSD tars hold macOS `._` files);
//! - dataset.json keeps the v1 keys but `modality`, `training` and `test`: `channel_names` is the
//!   v1 `modality`, `labels` becomes name -> value, `file_ending` is `.nii.gz`.
//!
//! Unlike nnU-Net, which writes each channel with SimpleITK, a 4D image is split losslessly: each
//! channel file keeps the stored datatype, scaling and the header's spatial geometry bit for bit
//! ([`nifti::split_volumes`]), so SimpleITK reads it with the spacing, origin and direction nnU-Net
//! gives its channels (the 4D image's first three axes). Every file is read in full first, so a
//! damaged one is reported by its own name. As the folder import, the dataset is assembled in a
//! temporary folder next to the output and renamed into place only when it passes the integrity
//! check; an existing output is never touched.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::{Map, Value};

use super::dataset::{Dataset, DatasetError};
use super::integrity::{check_dataset, Report};
use super::nifti::{self, NiftiError};

/// What `nnflow import --msd` converts, and where to.
#[derive(Clone, Debug)]
pub struct MsdSpec {
    /// The extracted task folder, e.g. `Task04_Hippocampus`.
    pub task_folder: PathBuf,
    /// A path that does not exist: the dataset folder to create. An existing folder that is not a
    /// dataset (no dataset.json, name not `Dataset...`): the folder to create the dataset in, named
    /// `DatasetXXX_Name` as nnU-Net names it (e.g. nnUNet_raw).
    pub output: PathBuf,
    /// The dataset id for the name; default: the task's number.
    pub dataset_id: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum MsdError {
    #[error("{}: not an MSD task folder: {detail}", folder.display())]
    NotATask { folder: PathBuf, detail: String },
    #[error("{}: {detail}", path.display())]
    DatasetJson { path: PathBuf, detail: String },
    #[error("cannot read folder {}: {source}", folder.display())]
    ReadFolder { folder: PathBuf, source: std::io::Error },
    #[error("{} already exists; nothing was written", output.display())]
    OutputExists { output: PathBuf },
    #[error("dataset id {id} is already taken by {}; choose another with --dataset-id; nothing was written",
            existing.display())]
    IdTaken { id: u32, existing: PathBuf },
    #[error(transparent)]
    Image(#[from] NiftiError),
    #[error("{}: {volumes} volume(s), but dataset.json declares {channels} modalities", path.display())]
    ChannelCount {
        path: PathBuf,
        volumes: usize,
        channels: usize,
    },
    #[error("cannot copy {} to {}: {source}", from.display(), to.display())]
    Copy {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
    /// Writing the staging folder the dataset is assembled in.
    #[error("cannot write {}: {source}", staging.display())]
    Staging {
        staging: PathBuf,
        source: std::io::Error,
    },
    /// Renaming the assembled dataset into place.
    #[error("cannot create {}: {source}", output.display())]
    Rename { output: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error("the converted dataset is not valid:\n{}", .0.render())]
    Invalid(Report),
}

const ENDING: &str = ".nii.gz";

/// `TaskXX_Name` -> (XX, Name). nnU-Net requires exactly one `_`; a name holding more keeps them.
pub fn parse_task_name(folder_name: &str) -> Option<(u32, &str)> {
    let (task, name) = folder_name.split_once('_')?;
    let digits = task.strip_prefix("Task")?;
    if name.is_empty() || digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((digits.parse().ok()?, name))
}

/// nnU-Net's name for the converted dataset: `Dataset{id:03}_{Name}`.
pub fn dataset_name(id: u32, name: &str) -> String {
    format!("Dataset{id:03}_{name}")
}

/// Converts the task; returns the opened dataset at its final place.
pub fn import_msd(spec: &MsdSpec) -> Result<Dataset, MsdError> {
    let folder = &spec.task_folder;
    let not_a_task = |detail: String| MsdError::NotATask {
        folder: folder.clone(),
        detail,
    };
    let folder_name = folder
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let (task_id, name) = parse_task_name(&folder_name)
        .ok_or_else(|| not_a_task(format!("its name must be TaskXX_Name, got {folder_name:?}")))?;
    for sub in ["imagesTr", "labelsTr"] {
        if !folder.join(sub).is_dir() {
            return Err(not_a_task(format!("no {sub} folder")));
        }
    }
    let json_path = folder.join("dataset.json");
    if !json_path.is_file() {
        return Err(not_a_task("no dataset.json".into()));
    }
    let v1 = read_v1_json(&json_path)?;
    let channels = v1.get("modality").and_then(Value::as_object).map_or(0, Map::len);
    let id = spec.dataset_id.unwrap_or(task_id);
    let output = resolve_output(&spec.output, id, name)?;

    let mut jobs = Vec::new();
    for sub in ["imagesTr", "imagesTs"] {
        if folder.join(sub).is_dir() {
            for (case, path) in task_files(&folder.join(sub))? {
                jobs.push(Job::Image { sub, case, path });
            }
        }
    }
    for (case, path) in task_files(&folder.join("labelsTr"))? {
        jobs.push(Job::Label { case, path });
    }

    let staging = output.with_file_name(format!(
        ".{}.importing-{}",
        output.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let result = assemble(&staging, &jobs, channels, &v1);
    match result {
        Ok(()) => {
            // Checked again: a folder that appeared meanwhile is never replaced.
            if output.exists() {
                let _ = std::fs::remove_dir_all(&staging);
                return Err(MsdError::OutputExists { output });
            }
            std::fs::rename(&staging, &output).map_err(|source| MsdError::Rename {
                output: output.clone(),
                source,
            })?;
            Ok(Dataset::open(&output)?)
        }
        Err(error) => {
            let _ = std::fs::remove_dir_all(&staging);
            Err(error)
        }
    }
}

/// The dataset folder `--out` names (see [`MsdSpec::output`]); refuses one that exists, and, in a
/// parent folder, a dataset id another `DatasetXXX_*` there already has (as nnU-Net refuses).
fn resolve_output(out: &Path, id: u32, name: &str) -> Result<PathBuf, MsdError> {
    if !out.exists() {
        return Ok(out.to_path_buf());
    }
    let is_dataset = out.join("dataset.json").exists()
        || out
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("Dataset"));
    if !out.is_dir() || is_dataset {
        return Err(MsdError::OutputExists {
            output: out.to_path_buf(),
        });
    }
    let target = out.join(dataset_name(id, name));
    if target.exists() {
        return Err(MsdError::OutputExists { output: target });
    }
    let prefix = format!("Dataset{id:03}_");
    let entries = std::fs::read_dir(out).map_err(|source| MsdError::ReadFolder {
        folder: out.to_path_buf(),
        source,
    })?;
    if let Some(existing) = entries
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))
    {
        return Err(MsdError::IdTaken {
            id,
            existing: existing.path(),
        });
    }
    Ok(target)
}

fn read_v1_json(path: &Path) -> Result<Map<String, Value>, MsdError> {
    let bad = |detail: String| MsdError::DatasetJson {
        path: path.to_path_buf(),
        detail,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let value: Value = serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let Value::Object(map) = value else {
        return Err(bad("not a JSON object".into()));
    };
    for key in ["modality", "labels"] {
        if !map.get(key).is_some_and(Value::is_object) {
            return Err(bad(format!(
                "no `{key}` object: is this an MSD (nnU-Net v1) dataset.json?"
            )));
        }
    }
    Ok(map)
}

/// The v2 dataset.json: the v1 keys but `modality`, `training`, `test`; `channel_names`, labels
/// as name -> value, `file_ending`.
fn v2_json(v1: &Map<String, Value>, path: &Path) -> Result<Map<String, Value>, MsdError> {
    let bad = |detail: String| MsdError::DatasetJson {
        path: path.to_path_buf(),
        detail,
    };
    let mut out = v1.clone();
    for key in ["modality", "training", "test"] {
        out.remove(key);
    }
    let mut labels = Map::new();
    let v1_labels = v1["labels"].as_object().expect("checked when read");
    for (value, name) in v1_labels {
        let value: i64 = value
            .trim()
            .parse()
            .map_err(|_| bad(format!("label value {value:?} is not an integer")))?;
        let name = name
            .as_str()
            .ok_or_else(|| bad(format!("label {value}: name {name} is not a string")))?;
        if labels.insert(name.to_string(), Value::from(value)).is_some() {
            return Err(bad(format!("label name {name:?} is used twice")));
        }
    }
    out.insert("labels".into(), Value::Object(labels));
    out.insert("file_ending".into(), Value::from(ENDING));
    out.insert("channel_names".into(), v1["modality"].clone());
    Ok(out)
}

/// Case name -> file for every `.nii.gz` in a folder, skipping names that start with `.` or `_`
/// as nnU-Net does (the MSD tars hold macOS `._` AppleDouble files).
fn task_files(folder: &Path) -> Result<BTreeMap<String, PathBuf>, MsdError> {
    let entries = std::fs::read_dir(folder).map_err(|source| MsdError::ReadFolder {
        folder: folder.to_path_buf(),
        source,
    })?;
    Ok(entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_str()?.to_string();
            if name.starts_with('.') || name.starts_with('_') {
                return None;
            }
            let case = name.strip_suffix(ENDING)?;
            Some((case.to_string(), entry.path()))
        })
        .collect())
}

enum Job {
    Image {
        sub: &'static str,
        case: String,
        path: PathBuf,
    },
    Label {
        case: String,
        path: PathBuf,
    },
}

fn assemble(staging: &Path, jobs: &[Job], channels: usize, v1: &Map<String, Value>) -> Result<(), MsdError> {
    let io = |source| MsdError::Staging {
        staging: staging.to_path_buf(),
        source,
    };
    for sub in ["imagesTr", "labelsTr"] {
        std::fs::create_dir_all(staging.join(sub)).map_err(io)?;
    }
    if jobs
        .iter()
        .any(|j| matches!(j, Job::Image { sub: "imagesTs", .. }))
    {
        std::fs::create_dir_all(staging.join("imagesTs")).map_err(io)?;
    }
    jobs.par_iter().try_for_each(|job| match job {
        Job::Image { sub, case, path } => {
            let target = |c: usize| staging.join(sub).join(format!("{case}_{c:04}{ENDING}"));
            convert_image(path, channels, target)
        }
        Job::Label { case, path } => {
            nifti::verify(path)?;
            copy(path, &staging.join("labelsTr").join(format!("{case}{ENDING}")))
        }
    })?;
    let json = v2_json(v1, &staging.join("dataset.json"))?;
    std::fs::write(
        staging.join("dataset.json"),
        serde_json::to_vec_pretty(&Value::Object(json)).expect("JSON values serialize"),
    )
    .map_err(io)?;
    let dataset = Dataset::open(staging)?;
    let report = check_dataset(&dataset);
    if report.is_ok() {
        Ok(())
    } else {
        Err(MsdError::Invalid(report))
    }
}

/// A 4D image split into its channels; a 3D one read in full (so damage is reported by its own
/// name) and copied as channel 0, as nnU-Net copies it.
fn convert_image(path: &Path, channels: usize, target: impl Fn(usize) -> PathBuf) -> Result<(), MsdError> {
    let header = nifti::read_header(path)?;
    let volumes = header.volumes();
    if volumes != channels {
        return Err(MsdError::ChannelCount {
            path: path.to_path_buf(),
            volumes,
            channels,
        });
    }
    if volumes == 1 {
        nifti::verify(path)?;
        copy(path, &target(0))
    } else {
        nifti::split_volumes(path, target)?;
        Ok(())
    }
}

fn copy(from: &Path, to: &Path) -> Result<(), MsdError> {
    std::fs::copy(from, to)
        .map(|_| ())
        .map_err(|source| MsdError::Copy {
            from: from.to_path_buf(),
            to: to.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_names_map_to_dataset_names_like_nnunet() {
        assert_eq!(parse_task_name("Task04_Hippocampus"), Some((4, "Hippocampus")));
        assert_eq!(parse_task_name("Task10_Colon"), Some((10, "Colon")));
        assert_eq!(parse_task_name("Task05_Prostate_v2"), Some((5, "Prostate_v2")));
        assert_eq!(parse_task_name("Dataset004_Hippocampus"), None);
        assert_eq!(parse_task_name("Task_Hippocampus"), None);
        assert_eq!(parse_task_name("Task04_"), None);
        assert_eq!(dataset_name(4, "Hippocampus"), "Dataset004_Hippocampus");
        assert_eq!(dataset_name(1234, "X"), "Dataset1234_X");
    }

    #[test]
    fn v2_json_inverts_labels_and_renames_modality() {
        let v1: Map<String, Value> = serde_json::from_str(
            r#"{"name": "X", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "a"},
                "numTraining": 3, "numTest": 1, "training": [], "test": []}"#,
        )
        .unwrap();
        let v2 = v2_json(&v1, Path::new("dataset.json")).unwrap();
        let expected: Map<String, Value> = serde_json::from_str(
            r#"{"name": "X", "channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1},
                "numTraining": 3, "numTest": 1, "file_ending": ".nii.gz"}"#,
        )
        .unwrap();
        assert_eq!(v2, expected);
        let mut twice = v1.clone();
        twice["labels"] = serde_json::json!({"0": "background", "1": "background"});
        let err = v2_json(&twice, Path::new("x/dataset.json"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("x/dataset.json") && err.contains("used twice"),
            "{err}"
        );
    }
}
