//! Images to predict: a folder in nnU-Net's naming (`<case>_<CCCC><ending>`, one file per
//! channel) or, for single-channel datasets, plain files (`<case><ending>`). The dataset's file
//! ending comes first, as in nnU-Net; a folder without such files may hold images of another
//! format nnflow reads (each case predicted into its own format) or DICOM series, one folder
//! each (`<case>/` or `<case>_<CCCC>/`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::InferenceError;
use crate::data::dataset::{channel_files, Case};
use crate::data::image;
use crate::file_error::FileError;

/// An entry of the input folder that is an image: its name without the ending, and the ending
/// (empty for a DICOM series folder).
struct Input {
    stem: String,
    ending: String,
}

pub fn image_cases(folder: &Path, channels: usize, ending: &str) -> Result<Vec<Case>, InferenceError> {
    let inputs = inputs(folder, ending)?;
    // the case id of a `<case>_<CCCC>` stem
    let case_of = |stem: &str| -> Option<String> {
        let (case, channel) = stem.rsplit_once('_')?;
        (channel.len() == 4 && channel.bytes().all(|b| b.is_ascii_digit())).then(|| case.to_string())
    };
    let mut by_id: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for input in &inputs {
        let Some(id) = case_of(&input.stem) else { continue };
        if by_id.contains_key(&id) {
            continue;
        }
        let images = channel_files(folder, &id, &input.ending, channels);
        if let Some(missing) = images.iter().find(|p| !p.exists()) {
            return Err(InferenceError::MissingImage {
                case: id,
                image: missing.clone(),
            });
        }
        by_id.insert(id, images);
    }
    if channels == 1 {
        // files without a channel suffix are cases of their own
        for input in inputs.iter().filter(|i| case_of(&i.stem).is_none()) {
            let path = folder.join(format!("{}{}", input.stem, input.ending));
            by_id.entry(input.stem.clone()).or_insert(vec![path]);
        }
    }
    if by_id.is_empty() {
        return Err(InferenceError::NoImages {
            folder: folder.to_path_buf(),
            ending: ending.to_string(),
        });
    }
    Ok(by_id
        .into_iter()
        .map(|(id, images)| Case {
            id,
            images,
            label: Default::default(),
        })
        .collect())
}

/// The images in `folder`: files with the dataset's ending if there are any, else files of any
/// format nnflow reads and DICOM series folders. Hidden entries are skipped.
fn inputs(folder: &Path, ending: &str) -> Result<Vec<Input>, InferenceError> {
    let mut entries: Vec<(String, bool)> = std::fs::read_dir(folder)
        .map_err(FileError::io(folder))?
        .filter_map(|e| e.ok())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path().is_dir()))
        .filter(|(name, _)| !name.starts_with('.'))
        .collect();
    entries.sort();
    let with_ending: Vec<Input> = entries
        .iter()
        .filter(|(name, is_dir)| !is_dir && name.ends_with(ending))
        .map(|(name, _)| Input {
            stem: name[..name.len() - ending.len()].to_string(),
            ending: ending.to_string(),
        })
        .collect();
    if !with_ending.is_empty() {
        return Ok(with_ending);
    }
    Ok(entries
        .into_iter()
        .filter_map(|(name, is_dir)| {
            if is_dir {
                return Some(Input {
                    stem: name,
                    ending: String::new(),
                });
            }
            let found = image::ending_of(Path::new(&name))?;
            Some(Input {
                stem: name[..name.len() - found.len()].to_string(),
                ending: name[name.len() - found.len()..].to_string(),
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nnunet_names_and_plain_files() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["a_0000.nii.gz", "b.nii.gz", "notes.txt", "c.nrrd"] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let cases = image_cases(dir.path(), 1, ".nii.gz").unwrap();
        let ids: Vec<&str> = cases.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"], "the dataset's ending wins, as in nnU-Net");
        assert!(image_cases(dir.path(), 2, ".nii.gz")
            .unwrap_err()
            .to_string()
            .contains("a_0001"));
    }

    #[test]
    fn other_formats_and_series_folders_when_the_dataset_ending_is_absent() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["a_0000.nrrd", "b.mha", "notes.txt", ".hidden.nrrd"] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        std::fs::create_dir(dir.path().join("series_7")).unwrap();
        let cases = image_cases(dir.path(), 1, ".nii.gz").unwrap();
        let found: Vec<(&str, &Path)> = cases
            .iter()
            .map(|c| (c.id.as_str(), c.images[0].as_path()))
            .collect();
        assert_eq!(
            found,
            [
                ("a", dir.path().join("a_0000.nrrd").as_path()),
                ("b", dir.path().join("b.mha").as_path()),
                ("series_7", dir.path().join("series_7").as_path()),
            ]
        );
    }

    #[test]
    fn an_rgb_picture_is_one_file_for_three_channels() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("road_0000.png"), b"").unwrap();
        let cases = image_cases(dir.path(), 3, ".png").unwrap();
        assert_eq!(cases[0].images, [dir.path().join("road_0000.png")]);
    }
}
