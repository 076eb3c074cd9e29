//! Datasets in nnU-Net's raw layout: `dataset.json` (v2 with `channel_names`, or the older v1 with
//! `modality` and a `training` list), `imagesTr/{case}_{CCCC}{ending}` one file per channel and
//! `labelsTr/{case}{ending}`. Reads the description and finds the cases; reading voxels is
//! elsewhere. Layout problems are collected per case so one report lists every bad case.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::image;

/// A label's value: one integer, or a list of integers for a region (sigmoid training).
#[derive(Deserialize, Clone, Debug, PartialEq)]
#[serde(untagged)]
pub enum LabelValue {
    Single(i64),
    Region(Vec<i64>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Label {
    pub name: String,
    pub value: LabelValue,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Case {
    pub id: String,
    /// One file per channel, in channel order.
    pub images: Vec<PathBuf>,
    pub label: PathBuf,
}

/// A dataset description, whichever dataset.json version it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    pub root: PathBuf,
    /// Channel names (they choose the normalization), in channel order.
    pub channels: Vec<String>,
    /// Labels in dataset.json order, background first; the ignore label is not among them.
    pub labels: Vec<Label>,
    pub ignore_label: Option<i64>,
    pub regions_class_order: Option<Vec<i64>>,
    pub file_ending: String,
    pub num_training: usize,
    pub cases: Vec<Case>,
}

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: invalid dataset.json: {source}")]
    Invalid {
        path: PathBuf,
        #[source]
        source: InvalidDatasetJson,
    },
}

/// What is wrong inside a dataset.json.
#[derive(Debug, thiserror::Error)]
pub enum InvalidDatasetJson {
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error("neither `channel_names` nor `modality` is present")]
    NoChannels,
    #[error("channel keys must be \"0\", \"1\", ...")]
    ChannelKey,
    #[error("channel keys must be consecutive from \"0\"")]
    ChannelGap,
    #[error("label `{name}` must be an integer or a list of integers")]
    LabelValue { name: String },
    #[error("the ignore label must be one integer")]
    IgnoreRegion,
    #[error("v1 label key `{key}` is not an integer")]
    V1LabelKey { key: String },
    #[error("v1 label {value} must have a name")]
    V1LabelName { value: i64 },
}

/// dataset.json as written by nnU-Net v2, or v1 (keys of both accepted; unknown keys ignored, as
/// nnU-Net does).
#[derive(Deserialize)]
struct RawDatasetJson {
    channel_names: Option<BTreeMap<String, String>>,
    modality: Option<BTreeMap<String, String>>,
    labels: BTreeMap<String, serde_json::Value>,
    #[serde(rename = "numTraining")]
    num_training: Option<usize>,
    file_ending: Option<String>,
    regions_class_order: Option<Vec<i64>>,
    training: Option<Vec<V1Pair>>,
}

#[derive(Deserialize)]
struct V1Pair {
    image: String,
    label: String,
}

impl Dataset {
    /// Reads `<root>/dataset.json` and lists the training cases.
    pub fn open(root: &Path) -> Result<Dataset, DatasetError> {
        let path = root.join("dataset.json");
        let text = std::fs::read_to_string(&path).map_err(|source| DatasetError::Read {
            path: path.clone(),
            source,
        })?;
        let invalid = |source: InvalidDatasetJson| DatasetError::Invalid {
            path: path.clone(),
            source,
        };
        let raw: RawDatasetJson = serde_json::from_str(&text).map_err(|e| invalid(e.into()))?;
        let channels = channel_list(raw.channel_names.as_ref().or(raw.modality.as_ref())).map_err(invalid)?;
        let (labels, ignore_label) = if raw.modality.is_some() && raw.channel_names.is_none() {
            (v1_labels(&raw.labels).map_err(invalid)?, None)
        } else {
            v2_labels(&raw.labels).map_err(invalid)?
        };
        let file_ending = raw.file_ending.clone().unwrap_or_else(|| ".nii.gz".to_string());
        let cases = match &raw.training {
            Some(pairs) if raw.channel_names.is_none() => v1_cases(root, pairs, channels.len(), &file_ending),
            _ => v2_cases(root, &file_ending, channels.len()),
        };
        Ok(Dataset {
            root: root.to_path_buf(),
            channels,
            labels,
            ignore_label,
            regions_class_order: raw.regions_class_order,
            file_ending,
            num_training: raw.num_training.unwrap_or(cases.len()),
            cases,
        })
    }

    /// The network's output channels, as nnU-Net's `num_segmentation_heads`: one per region
    /// (background and the ignore label excluded) for region datasets, else one per label
    /// (background included, the ignore label excluded).
    pub fn num_segmentation_heads(&self) -> usize {
        if self.has_regions() {
            self.labels
                .iter()
                .filter(|l| l.name != "ignore")
                .filter(|l| match &l.value {
                    LabelValue::Single(v) => *v != 0,
                    LabelValue::Region(values) => !values.iter().all(|&v| v == 0),
                })
                .count()
        } else {
            self.labels
                .iter()
                .filter(|l| matches!(l.value, LabelValue::Single(v) if Some(v) != self.ignore_label))
                .count()
        }
    }

    /// The training case with this id.
    pub fn case(&self, id: &str) -> Option<&Case> {
        self.cases.iter().find(|c| c.id == id)
    }

    /// Whether labels are regions (lists of label values), trained with sigmoids.
    pub fn has_regions(&self) -> bool {
        self.labels
            .iter()
            .any(|l| matches!(l.value, LabelValue::Region(_)))
    }

    /// nnU-Net's `foreground_labels`: every label value named in dataset.json (regions flattened)
    /// except background and the ignore label, sorted. The cascade gives each one an input channel.
    pub fn foreground_labels(&self) -> Vec<i16> {
        let mut values: Vec<i16> = self
            .labels
            .iter()
            .filter(|l| l.name != "ignore")
            .flat_map(|l| match &l.value {
                LabelValue::Single(v) => vec![*v],
                LabelValue::Region(vs) => vs.clone(),
            })
            .filter(|&v| v != 0 && Some(v) != self.ignore_label)
            .map(|v| v as i16)
            .collect();
        values.sort_unstable();
        values.dedup();
        values
    }

    /// The label values a segmentation may contain (ignore label included).
    pub fn allowed_label_values(&self) -> Vec<i64> {
        let mut values: Vec<i64> = self
            .labels
            .iter()
            .flat_map(|l| match &l.value {
                LabelValue::Single(v) => vec![*v],
                LabelValue::Region(vs) => vs.clone(),
            })
            .chain(self.ignore_label)
            .collect();
        values.sort_unstable();
        values.dedup();
        values
    }

    /// Problems with the layout (no voxels read): case count, missing channel or label files,
    /// label values that are not consecutive. One line per problem, naming the case or file.
    pub fn layout_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.cases.len() != self.num_training {
            problems.push(format!(
                "dataset.json says numTraining = {} but {} cases were found in imagesTr",
                self.num_training,
                self.cases.len()
            ));
        }
        for case in &self.cases {
            for (channel, image) in case.images.iter().enumerate() {
                if !image.is_file() {
                    problems.push(format!(
                        "case {}: channel {channel} image {} is missing",
                        case.id,
                        image.display()
                    ));
                }
            }
            if !case.label.is_file() {
                problems.push(format!(
                    "case {}: label file {} is missing",
                    case.id,
                    case.label.display()
                ));
            }
        }
        if !self.has_regions() {
            let values: Vec<i64> = self
                .allowed_label_values()
                .into_iter()
                .filter(|v| Some(*v) != self.ignore_label)
                .collect();
            let consecutive: Vec<i64> = (0..values.len() as i64).collect();
            if values != consecutive {
                problems.push(format!(
                    "labels must be consecutive integers starting at 0, got {values:?}"
                ));
            }
        }
        problems
    }
}

fn channel_list(names: Option<&BTreeMap<String, String>>) -> Result<Vec<String>, InvalidDatasetJson> {
    let names = names.ok_or(InvalidDatasetJson::NoChannels)?;
    let mut indexed: Vec<(usize, &String)> = Vec::new();
    for (index, name) in names {
        let index = index
            .parse::<usize>()
            .map_err(|_| InvalidDatasetJson::ChannelKey)?;
        indexed.push((index, name));
    }
    indexed.sort();
    if indexed.iter().enumerate().any(|(i, (index, _))| i != *index) {
        return Err(InvalidDatasetJson::ChannelGap);
    }
    Ok(indexed.into_iter().map(|(_, name)| name.clone()).collect())
}

/// v2: `name -> value`; `"ignore"` names the ignore label.
fn v2_labels(
    labels: &BTreeMap<String, serde_json::Value>,
) -> Result<(Vec<Label>, Option<i64>), InvalidDatasetJson> {
    let mut list = Vec::new();
    let mut ignore = None;
    for (name, value) in labels {
        let value: LabelValue = serde_json::from_value(value.clone())
            .map_err(|_| InvalidDatasetJson::LabelValue { name: name.clone() })?;
        match (name.as_str(), &value) {
            ("ignore", LabelValue::Single(v)) => ignore = Some(*v),
            ("ignore", LabelValue::Region(_)) => return Err(InvalidDatasetJson::IgnoreRegion),
            _ => list.push(Label {
                name: name.clone(),
                value,
            }),
        }
    }
    list.sort_by_key(|l| match &l.value {
        LabelValue::Single(v) => (*v, 0),
        LabelValue::Region(vs) => (vs.iter().copied().max().unwrap_or(0), 1),
    });
    Ok((list, ignore))
}

/// v1: `"value" -> name`.
fn v1_labels(labels: &BTreeMap<String, serde_json::Value>) -> Result<Vec<Label>, InvalidDatasetJson> {
    let mut list = Vec::new();
    for (value, name) in labels {
        let value = value
            .parse::<i64>()
            .map_err(|_| InvalidDatasetJson::V1LabelKey { key: value.clone() })?;
        let name = name.as_str().ok_or(InvalidDatasetJson::V1LabelName { value })?;
        list.push(Label {
            name: name.to_string(),
            value: LabelValue::Single(value),
        });
    }
    list.sort_by_key(|l| match l.value {
        LabelValue::Single(v) => v,
        LabelValue::Region(_) => i64::MAX,
    });
    Ok(list)
}

/// v2 layout: cases are the distinct `{case}` of `imagesTr/{case}_{CCCC}{ending}`.
fn v2_cases(root: &Path, ending: &str, channels: usize) -> Vec<Case> {
    let mut ids: Vec<String> = std::fs::read_dir(root.join("imagesTr"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let stem = name.strip_suffix(ending)?;
            let (case, channel) = stem.rsplit_once('_')?;
            (channel.len() == 4 && channel.bytes().all(|b| b.is_ascii_digit())).then(|| case.to_string())
        })
        .collect();
    ids.sort();
    ids.dedup();
    ids.into_iter()
        .map(|id| case_files(root, id, ending, channels))
        .collect()
}

/// v1 layout: `training` lists `./imagesTr/{case}{ending}` (channels as `{case}_{CCCC}{ending}` on
/// disk, as nnU-Net's conversion writes them) and `./labelsTr/{case}{ending}`.
fn v1_cases(root: &Path, pairs: &[V1Pair], channels: usize, ending: &str) -> Vec<Case> {
    let mut cases: Vec<Case> = pairs
        .iter()
        .map(|pair| {
            let file = Path::new(&pair.image)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            let id = file.strip_suffix(ending).unwrap_or(&file).to_string();
            let mut case = case_files(root, id, ending, channels);
            case.label = root.join(pair.label.trim_start_matches("./"));
            case
        })
        .collect();
    cases.sort_by(|a, b| a.id.cmp(&b.id));
    cases
}

fn case_files(root: &Path, id: String, ending: &str, channels: usize) -> Case {
    let images = channel_files(&root.join("imagesTr"), &id, ending, channels);
    let label = root.join("labelsTr").join(format!("{id}{ending}"));
    Case { id, images, label }
}

/// A case's channel files `{id}_{CCCC}{ending}` in `folder`, one per channel. A picture (PNG, BMP,
/// TIFF) may hold several channels (RGB), as nnU-Net's NaturalImage2DIO reads them: then the files
/// that exist from `_0000` on are the case's, and reading checks the channel count.
pub fn channel_files(folder: &Path, id: &str, ending: &str, channels: usize) -> Vec<PathBuf> {
    let files: Vec<PathBuf> = (0..channels)
        .map(|c| folder.join(format!("{id}_{c:04}{ending}")))
        .collect();
    if !image::several_channels_per_file(ending) {
        return files;
    }
    let present = files.iter().take_while(|f| f.is_file()).count().max(1);
    let rest_missing = files[present..].iter().all(|f| !f.exists());
    if rest_missing {
        files[..present].to_vec()
    } else {
        files
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"").unwrap();
    }

    #[test]
    fn reads_v2_with_regions_ignore_label_and_channels() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(
            root.join("dataset.json"),
            r#"{"channel_names": {"0": "T2", "1": "ADC"}, "labels": {"background": 0, "whole": [1, 2], "core": 2, "ignore": 3},
                "regions_class_order": [1, 2], "numTraining": 2, "file_ending": ".nii.gz"}"#,
        )
        .unwrap();
        for case in ["b_002", "a_001"] {
            touch(&root.join(format!("imagesTr/{case}_0000.nii.gz")));
            touch(&root.join(format!("imagesTr/{case}_0001.nii.gz")));
            touch(&root.join(format!("labelsTr/{case}.nii.gz")));
        }
        let dataset = Dataset::open(root).unwrap();
        assert_eq!(dataset.channels, ["T2", "ADC"]);
        assert_eq!(dataset.ignore_label, Some(3));
        assert!(dataset.has_regions());
        assert_eq!(dataset.allowed_label_values(), [0, 1, 2, 3]);
        assert_eq!(
            dataset.cases.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
            ["a_001", "b_002"]
        );
        assert_eq!(
            dataset.cases[0].images[1],
            root.join("imagesTr/a_001_0001.nii.gz")
        );
        assert!(
            dataset.layout_problems().is_empty(),
            "{:?}",
            dataset.layout_problems()
        );
    }

    #[test]
    fn reads_v1_and_reports_every_layout_problem() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(
            root.join("dataset.json"),
            r#"{"modality": {"0": "CT"}, "labels": {"0": "background", "2": "tumour"}, "numTraining": 3,
                "training": [{"image": "./imagesTr/la_003.nii.gz", "label": "./labelsTr/la_003.nii.gz"},
                             {"image": "./imagesTr/la_001.nii.gz", "label": "./labelsTr/la_001.nii.gz"}]}"#,
        )
        .unwrap();
        touch(&root.join("imagesTr/la_001_0000.nii.gz"));
        touch(&root.join("labelsTr/la_001.nii.gz"));
        touch(&root.join("labelsTr/la_003.nii.gz"));
        let dataset = Dataset::open(root).unwrap();
        assert_eq!(dataset.channels, ["CT"]);
        assert_eq!(
            dataset.labels[1],
            Label {
                name: "tumour".into(),
                value: LabelValue::Single(2)
            }
        );
        assert_eq!(dataset.cases[0].id, "la_001");
        let problems = dataset.layout_problems();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].contains("numTraining = 3 but 2 cases"));
        assert!(problems[1].contains("case la_003: channel 0 image"));
        assert!(problems[2].contains("consecutive"));
    }

    #[test]
    fn invalid_dataset_json_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("dataset.json"),
            r#"{"labels": {"background": 0}}"#,
        )
        .unwrap();
        let error = Dataset::open(dir.path()).unwrap_err().to_string();
        assert!(
            error.contains("dataset.json") && error.contains("channel_names"),
            "{error}"
        );
        let missing = Dataset::open(&dir.path().join("nope")).unwrap_err().to_string();
        assert!(missing.contains("nope/dataset.json"), "{missing}");
    }
}
