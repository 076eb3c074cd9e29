//! Images to predict: a folder in nnU-Net's naming (`<case>_<CCCC><ending>`, one file per
//! channel) or, for single-channel datasets, plain files (`<case><ending>`).

use std::path::Path;

use super::InferenceError;
use crate::data::dataset::Case;
use crate::file_error::FileError;

pub fn image_cases(folder: &Path, channels: usize, ending: &str) -> Result<Vec<Case>, InferenceError> {
    let mut names: Vec<String> = std::fs::read_dir(folder)
        .map_err(FileError::io(folder))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(ending) && !n.starts_with('.'))
        .collect();
    names.sort();
    // the case id of a `<case>_<CCCC><ending>` name
    let case_of = |name: &str| -> Option<String> {
        let stem = name.strip_suffix(ending)?;
        let (case, channel) = stem.rsplit_once('_')?;
        (channel.len() == 4 && channel.bytes().all(|b| b.is_ascii_digit())).then(|| case.to_string())
    };
    let mut ids: Vec<String> = names.iter().filter_map(|n| case_of(n)).collect();
    ids.dedup();
    let mut cases = Vec::new();
    for id in ids {
        let images: Vec<_> = (0..channels)
            .map(|c| folder.join(format!("{id}_{c:04}{ending}")))
            .collect();
        if let Some(missing) = images.iter().find(|p| !p.is_file()) {
            return Err(InferenceError::MissingImage {
                case: id,
                image: missing.clone(),
            });
        }
        cases.push(Case {
            id,
            images,
            label: Default::default(),
        });
    }
    if channels == 1 {
        // files without a channel suffix are cases of their own
        for name in names.iter().filter(|n| case_of(n).is_none()) {
            let id = name.strip_suffix(ending).unwrap_or(name).to_string();
            cases.push(Case {
                id,
                images: vec![folder.join(name)],
                label: Default::default(),
            });
        }
    }
    if cases.is_empty() {
        return Err(InferenceError::NoImages {
            folder: folder.to_path_buf(),
            ending: ending.to_string(),
        });
    }
    cases.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(cases)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nnunet_names_and_plain_files() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["a_0000.nii.gz", "b.nii.gz", "notes.txt"] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let cases = image_cases(dir.path(), 1, ".nii.gz").unwrap();
        let ids: Vec<&str> = cases.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert!(image_cases(dir.path(), 2, ".nii.gz")
            .unwrap_err()
            .to_string()
            .contains("a_0001"));
    }
}
