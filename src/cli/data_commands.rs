//! Dataset commands: import (folders or an MSD task), check, synth.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::output::outln;
use super::{EXIT_FAILED, EXIT_INVALID, EXIT_OK};
use crate::data::dataset::Dataset;
use crate::data::import::{self, ImportError, ImportSpec};
use crate::data::integrity::check_dataset;
use crate::data::msd_import::{self, MsdError, MsdSpec};
use crate::data::synthetic::{write_dataset, SyntheticSpec};
use crate::file_error::FileError;

/// The optional `--config` file of `nnflow import`.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ImportConfig {
    #[serde(default)]
    channels: Vec<String>,
    #[serde(default)]
    labels: BTreeMap<String, i64>,
}

/// An `--config` file that cannot be read or is not a valid import configuration.
#[derive(Debug, thiserror::Error)]
enum ImportConfigError {
    #[error(transparent)]
    Read(#[from] FileError),
    #[error("{}: {source}", path.display())]
    Parse { path: PathBuf, source: toml::de::Error },
}

fn read_import_config(path: &Path) -> Result<ImportConfig, ImportConfigError> {
    let text = std::fs::read_to_string(path).map_err(FileError::io(path))?;
    toml::from_str(&text).map_err(|source| ImportConfigError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

pub fn import(
    images: Vec<PathBuf>,
    labels: PathBuf,
    mut channels: Vec<String>,
    label_values: Vec<String>,
    config: Option<PathBuf>,
    out: PathBuf,
) -> i32 {
    let mut label_map = BTreeMap::new();
    if let Some(path) = config {
        match read_import_config(&path) {
            Ok(config) => {
                if channels.is_empty() {
                    channels = config.channels;
                }
                label_map = config.labels;
            }
            Err(error) => {
                crate::errln!("error: {error}");
                return EXIT_INVALID;
            }
        }
    }
    for entry in &label_values {
        match entry
            .split_once('=')
            .map(|(name, value)| (name, value.trim().parse::<i64>()))
        {
            Some((name, Ok(value))) => {
                label_map.insert(name.trim().to_string(), value);
            }
            _ => {
                crate::errln!("error: --label {entry}: expected NAME=INTEGER");
                return EXIT_INVALID;
            }
        }
    }
    let spec = ImportSpec {
        image_folders: images,
        label_folder: labels,
        channel_names: channels,
        labels: label_map,
        output: out,
    };
    match import::import(&spec) {
        Ok(dataset) => {
            outln!(
                "imported {} cases into {}",
                dataset.cases.len(),
                dataset.root.display()
            );
            EXIT_OK
        }
        Err(ImportError::Invalid(report)) => {
            crate::errln!("{}\nnothing was written", report.render());
            EXIT_INVALID
        }
        Err(error) => {
            crate::errln!("error: {error}");
            EXIT_INVALID
        }
    }
}

/// `nnflow import --msd TASK_FOLDER -o OUT [--dataset-id N]`.
pub fn import_msd(task_folder: PathBuf, dataset_id: Option<u32>, out: PathBuf) -> i32 {
    let spec = MsdSpec {
        task_folder,
        output: out,
        dataset_id,
    };
    match msd_import::import_msd(&spec) {
        Ok(dataset) => {
            outln!(
                "converted {} into {} ({} training cases, {} channels)",
                spec.task_folder.display(),
                dataset.root.display(),
                dataset.cases.len(),
                dataset.channels.len()
            );
            EXIT_OK
        }
        Err(MsdError::Invalid(report)) => {
            crate::errln!("{}\nnothing was written", report.render());
            EXIT_INVALID
        }
        Err(error) => {
            crate::errln!("error: {error}");
            EXIT_INVALID
        }
    }
}

pub fn check(root: &Path) -> i32 {
    let dataset = match Dataset::open(root) {
        Ok(dataset) => dataset,
        Err(error) => {
            crate::errln!("error: {error}");
            return EXIT_INVALID;
        }
    };
    let report = check_dataset(&dataset);
    if !report.render().is_empty() {
        crate::errln!("{}", report.render());
    }
    if report.is_ok() {
        outln!("{}: {} cases, no problems", root.display(), dataset.cases.len());
        EXIT_OK
    } else {
        EXIT_INVALID
    }
}

/// `nnflow synth` arguments.
pub struct SynthArgs {
    pub cases: usize,
    pub shape: Vec<usize>,
    pub spacing: Vec<f64>,
    pub channels: usize,
    pub foreground_labels: usize,
    pub seed: u64,
    pub spacing_variation: f64,
    pub test_cases: usize,
    pub file_ending: String,
}

pub fn synth(root: &Path, args: SynthArgs) -> i32 {
    let (Ok(shape_zyx), Ok(spacing_zyx)) = (
        <[usize; 3]>::try_from(args.shape.as_slice()),
        <[f64; 3]>::try_from(args.spacing.as_slice()),
    ) else {
        crate::errln!("error: --shape and --spacing take three values, z,y,x");
        return EXIT_INVALID;
    };
    if !(0.0..1.0).contains(&args.spacing_variation) {
        crate::errln!("error: --spacing-variation must be in [0, 1)");
        return EXIT_INVALID;
    }
    let spec = SyntheticSpec {
        cases: args.cases,
        shape_zyx,
        spacing_zyx,
        channels: args.channels,
        foreground_labels: args.foreground_labels,
        seed: args.seed,
        spacing_variation: args.spacing_variation,
        test_cases: args.test_cases,
        file_ending: args.file_ending,
    };
    match write_dataset(root, &spec) {
        Ok(()) => {
            outln!("wrote {} synthetic cases to {}", args.cases, root.display());
            EXIT_OK
        }
        Err(error) => {
            crate::errln!("error: {error}");
            EXIT_FAILED
        }
    }
}
