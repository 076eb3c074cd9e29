//! `nnflow import`: from folders of images (one folder per channel) and a folder of
//! segmentations with matching file names, the layout most people start with, build a dataset in
//! nnU-Net's raw layout. Images are files of any format nnflow reads, copied as they are, or DICOM
//! series (one folder per case), converted to NIfTI with the series' geometry since nnU-Net's
//! layout names one file per channel. The dataset is assembled in a temporary folder and renamed
//! into place only when it passes the integrity check, so a bad import writes nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::dataset::{Dataset, DatasetError};
use super::image::{self, ImageError};
use super::integrity::{check_dataset, Report};
use super::nifti;

#[derive(Clone, Debug)]
pub struct ImportSpec {
    /// One folder per channel; files are matched across folders by name.
    pub image_folders: Vec<PathBuf>,
    pub label_folder: PathBuf,
    /// Channel names (e.g. "CT", "T2"), one per image folder.
    pub channel_names: Vec<String>,
    /// Label name -> value; empty: `background` = 0 and `label_<v>` for every value found.
    pub labels: BTreeMap<String, i64>,
    pub output: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read folder {}: {source}", folder.display())]
    ReadFolder { folder: PathBuf, source: std::io::Error },
    #[error("give one channel name per image folder ({folders} folders, {names} names)")]
    ChannelNames { folders: usize, names: usize },
    #[error("{} already exists; nothing was written", output.display())]
    OutputExists { output: PathBuf },
    /// Writing the staging folder the dataset is assembled in.
    #[error("cannot write {}: {source}", staging.display())]
    Staging {
        staging: PathBuf,
        source: std::io::Error,
    },
    /// Renaming the assembled dataset into place.
    #[error("cannot create {}: {source}", output.display())]
    Rename { output: PathBuf, source: std::io::Error },
    #[error("case {case}: {file} is {found} but the segmentations are {expected}; use one format")]
    MixedEndings {
        case: String,
        file: PathBuf,
        found: String,
        expected: String,
    },
    #[error(
        "case {case}: DICOM series are converted to NIfTI, so the segmentations must be NIfTI \
             (.nii.gz or .nii), not {found}"
    )]
    SeriesNeedNifti { case: String, found: String },
    #[error("case {case}: {source}")]
    Label {
        case: String,
        #[source]
        source: ImageError,
    },
    #[error("case {case}: {source}")]
    Series {
        case: String,
        #[source]
        source: ImageError,
    },
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error("the imported dataset is not valid:\n{}", .0.render())]
    Invalid(Report),
}

/// The file's name without the ending of its format, and that ending (empty for a folder, a
/// DICOM series).
fn case_name(path: &Path) -> Option<(String, String)> {
    let name = path.file_name()?.to_str()?;
    if name.starts_with('.') {
        return None;
    }
    if path.is_dir() {
        return Some((name.to_string(), String::new()));
    }
    let ending = image::ending_of(path)?;
    let (stem, found) = name.split_at(name.len() - ending.len());
    Some((stem.to_string(), found.to_string()))
}

/// Case name -> image, for every image file (any format nnflow reads) and every DICOM series
/// folder in a folder. Hidden entries are skipped.
fn image_files(folder: &Path) -> Result<BTreeMap<String, PathBuf>, ImportError> {
    let entries = std::fs::read_dir(folder).map_err(|source| ImportError::ReadFolder {
        folder: folder.to_path_buf(),
        source,
    })?;
    Ok(entries
        .flatten()
        .filter_map(|entry| {
            let path = entry.path();
            let (case, _) = case_name(&path)?;
            Some((case, path))
        })
        .collect())
}

/// A DICOM series as a NIfTI channel with the series' geometry: int16 when every value is an
/// integer that fits (CT after rescaling), else float32.
fn convert_series(case: &str, series: &Path, target: &Path) -> Result<(), ImportError> {
    let in_case = |source| ImportError::Series {
        case: case.to_string(),
        source,
    };
    let decoded = image::read(series).map_err(in_case)?;
    let header = decoded.geometry.nifti_header();
    // a series is one channel (one slice stack)
    let data = &decoded.channels[0];
    let fits_i16 = data
        .iter()
        .all(|&v| v.fract() == 0.0 && (f32::from(i16::MIN)..=f32::from(i16::MAX)).contains(&v));
    let written = if fits_i16 {
        nifti::write(target, &data.mapv(|v| v as i16), &header)
    } else {
        nifti::write(target, data, &header)
    };
    written.map_err(|e| in_case(e.into()))
}

pub fn import(spec: &ImportSpec) -> Result<Dataset, ImportError> {
    if spec.image_folders.is_empty() || spec.image_folders.len() != spec.channel_names.len() {
        return Err(ImportError::ChannelNames {
            folders: spec.image_folders.len(),
            names: spec.channel_names.len(),
        });
    }
    if spec.output.exists() {
        return Err(ImportError::OutputExists {
            output: spec.output.clone(),
        });
    }
    let labels = image_files(&spec.label_folder)?;
    let channels: Vec<BTreeMap<String, PathBuf>> = spec
        .image_folders
        .iter()
        .map(|f| image_files(f))
        .collect::<Result<_, _>>()?;
    let mut problems = Vec::new();
    for (channel, files) in channels.iter().enumerate() {
        for case in files.keys().filter(|c| !labels.contains_key(*c)) {
            problems.push(format!(
                "case {case}: channel {channel} image has no segmentation with the same name"
            ));
        }
        for case in labels.keys().filter(|c| !files.contains_key(*c)) {
            problems.push(format!(
                "case {case}: no image in {}",
                spec.image_folders[channel].display()
            ));
        }
    }
    if !problems.is_empty() {
        return Err(ImportError::Invalid(Report {
            problems,
            warnings: Vec::new(),
        }));
    }
    let staging = spec.output.with_file_name(format!(
        ".{}.importing-{}",
        spec.output.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let result = assemble(spec, &labels, &channels, &staging);
    match result {
        Ok(()) => {
            std::fs::rename(&staging, &spec.output).map_err(|source| ImportError::Rename {
                output: spec.output.clone(),
                source,
            })?;
            Ok(Dataset::open(&spec.output)?)
        }
        Err(error) => {
            let _ = std::fs::remove_dir_all(&staging);
            Err(error)
        }
    }
}

fn assemble(
    spec: &ImportSpec,
    labels: &BTreeMap<String, PathBuf>,
    channels: &[BTreeMap<String, PathBuf>],
    staging: &Path,
) -> Result<(), ImportError> {
    let io = |source| ImportError::Staging {
        staging: staging.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(staging.join("imagesTr")).map_err(io)?;
    std::fs::create_dir_all(staging.join("labelsTr")).map_err(io)?;
    // Keep each file's own format and encoding: copy as is, naming it as nnU-Net expects. The
    // segmentations' format is the dataset's.
    let ending = |path: &Path| case_name(path).map(|(_, ending)| ending).unwrap_or_default();
    let file_ending = labels
        .values()
        .next()
        .map_or(".nii.gz".to_string(), |p| ending(p));
    let mixed = |case: &String, file: &Path, found: String| ImportError::MixedEndings {
        case: case.clone(),
        file: file.to_path_buf(),
        found: if found.is_empty() {
            "a DICOM series".into()
        } else {
            found
        },
        expected: if file_ending.is_empty() {
            "DICOM series".into()
        } else {
            file_ending.clone()
        },
    };
    if file_ending.is_empty() || image::ImageFormat::from_ending(&file_ending).is_none() {
        let (case, label) = labels.iter().next().expect("a label was found");
        return Err(mixed(case, label, file_ending.clone()));
    }
    for (case, label) in labels {
        if ending(label) != file_ending {
            return Err(mixed(case, label, ending(label)));
        }
        std::fs::copy(label, staging.join(format!("labelsTr/{case}{file_ending}"))).map_err(io)?;
        for (channel, files) in channels.iter().enumerate() {
            let source = &files[case];
            let target = staging.join(format!("imagesTr/{case}_{channel:04}{file_ending}"));
            match ending(source) {
                found if found == file_ending => {
                    std::fs::copy(source, target).map_err(io)?;
                }
                series if series.is_empty() => {
                    if image::ImageFormat::from_ending(&file_ending) != Some(image::ImageFormat::Nifti) {
                        return Err(ImportError::SeriesNeedNifti {
                            case: case.clone(),
                            found: file_ending.clone(),
                        });
                    }
                    convert_series(case, source, &target)?;
                }
                other => return Err(mixed(case, source, other)),
            }
        }
    }
    let label_values = if spec.labels.is_empty() {
        discovered_labels(labels)?
    } else {
        spec.labels.clone()
    };
    let channel_names: BTreeMap<String, &String> = spec
        .channel_names
        .iter()
        .enumerate()
        .map(|(i, n)| (i.to_string(), n))
        .collect();
    let json = serde_json::json!({
        "channel_names": channel_names,
        "labels": label_values,
        "numTraining": labels.len(),
        "file_ending": file_ending,
    });
    std::fs::write(
        staging.join("dataset.json"),
        serde_json::to_vec_pretty(&json).expect("json"),
    )
    .map_err(io)?;
    let dataset = Dataset::open(staging)?;
    let report = check_dataset(&dataset);
    if report.is_ok() {
        Ok(())
    } else {
        Err(ImportError::Invalid(report))
    }
}

/// `background` = 0 and `label_<v>` for every other value found in the segmentations.
fn discovered_labels(labels: &BTreeMap<String, PathBuf>) -> Result<BTreeMap<String, i64>, ImportError> {
    let mut values = std::collections::BTreeSet::new();
    for (case, path) in labels {
        let (label, _) = image::read_labels(path).map_err(|source| ImportError::Label {
            case: case.clone(),
            source,
        })?;
        values.extend(label.iter().map(|&v| v as i64));
    }
    Ok(values
        .into_iter()
        .map(|v| {
            (
                if v == 0 {
                    "background".to_string()
                } else {
                    format!("label_{v}")
                },
                v,
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synthetic::{write_dataset, SyntheticSpec};

    /// Plain folders `images/` and `masks/` made from a synthetic dataset.
    fn plain_layout(root: &Path) {
        let nnunet = root.join("source");
        write_dataset(
            &nnunet,
            &SyntheticSpec {
                cases: 3,
                shape_zyx: [6, 8, 8],
                ..SyntheticSpec::default()
            },
        )
        .unwrap();
        std::fs::create_dir_all(root.join("images")).unwrap();
        std::fs::create_dir_all(root.join("masks")).unwrap();
        for case in 0..3 {
            let id = format!("case_{case:03}");
            std::fs::copy(
                nnunet.join(format!("imagesTr/{id}_0000.nii.gz")),
                root.join(format!("images/p{case}.nii.gz")),
            )
            .unwrap();
            std::fs::copy(
                nnunet.join(format!("labelsTr/{id}.nii.gz")),
                root.join(format!("masks/p{case}.nii.gz")),
            )
            .unwrap();
        }
    }

    fn spec(root: &Path) -> ImportSpec {
        ImportSpec {
            image_folders: vec![root.join("images")],
            label_folder: root.join("masks"),
            channel_names: vec!["CT".into()],
            labels: BTreeMap::new(),
            output: root.join("Dataset001_Imported"),
        }
    }

    #[test]
    fn builds_an_nnunet_dataset_with_discovered_labels() {
        let dir = tempfile::tempdir().unwrap();
        plain_layout(dir.path());
        let dataset = import(&spec(dir.path())).unwrap();
        assert_eq!(dataset.channels, ["CT"]);
        assert_eq!(
            dataset.cases.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
            ["p0", "p1", "p2"]
        );
        assert_eq!(dataset.allowed_label_values(), [0, 1, 2]);
        assert!(dataset.root.join("imagesTr/p1_0000.nii.gz").is_file());
        assert!(dataset.layout_problems().is_empty());
    }

    #[test]
    fn a_bad_import_writes_nothing_and_lists_every_problem() {
        let dir = tempfile::tempdir().unwrap();
        plain_layout(dir.path());
        std::fs::remove_file(dir.path().join("masks/p2.nii.gz")).unwrap();
        let mut spec = spec(dir.path());
        spec.labels = [("background".to_string(), 0), ("liver".to_string(), 1)].into();
        let error = import(&spec).unwrap_err().to_string();
        assert!(
            error.contains("case p2: channel 0 image has no segmentation"),
            "{error}"
        );
        std::fs::copy(
            dir.path().join("masks/p1.nii.gz"),
            dir.path().join("masks/p2.nii.gz"),
        )
        .unwrap();
        let error = import(&spec).unwrap_err().to_string();
        assert!(error.contains("label values [2] are not declared"), "{error}");
        assert!(!spec.output.exists());
        let leftovers = std::fs::read_dir(dir.path()).unwrap().filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("importing")
        });
        assert_eq!(leftovers.count(), 0);
    }
}
