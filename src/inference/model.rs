//! A trained model as users have it, resolved from what they pass as MODEL to prediction: an
//! nnU-Net v2 results folder (`<trainer>__<plans>__<configuration>` with `plans.json`,
//! `dataset.json` and `fold_N/checkpoint_final.pth`), the zip `nnUNetv2_export_model_to_zip`
//! makes of such folders, or nnflow's own training outputs (`fold.json` next to
//! `checkpoint_final.safetensors`). Only files are looked at here; the checkpoints are read by
//! [`crate::network::pth`] (nnU-Net's) or the worker (nnflow's).

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

use crate::file_error::FileError;

/// The checkpoint nnU-Net's prediction uses unless told otherwise (`-chk`).
pub const DEFAULT_CHECKPOINT: &str = "checkpoint_final.pth";

/// How many folder levels below the one named models are looked for:
/// `DatasetXXX_Name/<trainer>__<plans>__<configuration>`.
const SEARCH_DEPTH: usize = 2;

/// How the folds' weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointFormat {
    /// nnU-Net's `torch.save` checkpoints (`checkpoint_final.pth`), read by
    /// [`crate::network::pth::read_checkpoint`].
    Pth,
    /// nnflow's training outputs (`checkpoint_final.safetensors`).
    Safetensors,
}

impl CheckpointFormat {
    fn extension(self) -> &'static str {
        match self {
            CheckpointFormat::Pth => "pth",
            CheckpointFormat::Safetensors => "safetensors",
        }
    }
}

/// Where a model came from, and what that layout says about it.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// An nnU-Net v2 results folder; its name gives the trainer and plans identifier.
    Nnunet {
        trainer: String,
        plans_identifier: String,
        plans: PathBuf,
        dataset: PathBuf,
        /// `dataset_fingerprint.json`, where the folder has one (prediction does not need it).
        dataset_fingerprint: Option<PathBuf>,
    },
    /// nnflow training outputs (one folder per fold). They hold neither the plan nor
    /// `dataset.json`: those are the plan stage's output and the dataset the caller names.
    Nnflow,
}

/// One trained fold and the checkpoints found in its folder.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainedFold {
    /// `"0"`, `"1"`, ... or `"all"`.
    pub fold: String,
    pub dir: PathBuf,
    /// Checkpoint file name (`checkpoint_final.pth`, `checkpoint_best.safetensors`) -> path.
    pub checkpoints: BTreeMap<String, PathBuf>,
}

/// A trained model of one configuration: its layout and the folds found.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainedModel {
    /// The results folder, or for nnflow trainings the folder holding them (or the one training).
    pub dir: PathBuf,
    pub configuration: String,
    pub source: ModelSource,
    pub format: CheckpointFormat,
    /// Numbered folds in ascending order, then `all`.
    pub folds: Vec<TrainedFold>,
}

/// Which folds to predict with: nnU-Net's `-f`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum FoldSelection {
    /// Every numbered fold holding the checkpoint, as nnU-Net's `auto` (no `-f`). nnU-Net leaves
    /// `fold_all` out of it; here `all` is used when no numbered fold has the checkpoint, where
    /// nnU-Net would fail.
    #[default]
    Auto,
    /// These folds (`"0"`.., `"all"`), each of which must hold the checkpoint.
    Folds(Vec<String>),
}

impl FoldSelection {
    /// nnU-Net's `-f` values: fold numbers and/or `all`; none is [`FoldSelection::Auto`].
    pub fn parse<S: AsRef<str>>(values: &[S]) -> Result<FoldSelection, ModelError> {
        if values.is_empty() {
            return Ok(FoldSelection::Auto);
        }
        let folds = values
            .iter()
            .map(|value| {
                let value = value.as_ref().trim();
                if value == "all" {
                    Ok("all".to_string())
                } else {
                    value
                        .parse::<u32>()
                        .map(|n| n.to_string())
                        .map_err(|_| ModelError::BadFold(value.to_string()))
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(FoldSelection::Folds(folds))
    }
}

/// A fold chosen for prediction and the checkpoint to load.
#[derive(Debug, Clone, PartialEq)]
pub struct SelectedCheckpoint {
    pub fold: String,
    pub path: PathBuf,
}

/// Why a model could not be found or a fold or checkpoint is missing; each names the folder.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{}: does not exist", path.display())]
    NotFound { path: PathBuf },
    #[error(
        "{}: no trained model here: expected an nnU-Net results folder \
         (<trainer>__<plans>__<configuration> with plans.json and fold_N/), nnflow trainings \
         (fold.json) or a folder holding them",
        dir.display()
    )]
    NotAModel { dir: PathBuf },
    #[error("{}: the model folder has no {file}", dir.display())]
    MissingFile { dir: PathBuf, file: &'static str },
    #[error("{}: no fold_0 .. fold_N or fold_all folder", dir.display())]
    NoFolds { dir: PathBuf },
    #[error("{}: holds several models ({}); name one of them", dir.display(), models.join(", "))]
    SeveralModels { dir: PathBuf, models: Vec<String> },
    #[error("{}: fold {fold} is there twice ({} and {})", dir.display(), first.display(), second.display())]
    DuplicateFold {
        dir: PathBuf,
        fold: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("{}: a zip; extract it into a folder first (TrainedModel::open_zip)", path.display())]
    Zip { path: PathBuf },
    #[error("{}: {source}", path.display())]
    ZipArchive {
        path: PathBuf,
        source: zip::result::ZipError,
    },
    #[error(
        "{}: entry {entry:?} is a link, an absolute path or leads out of the folder it is \
         extracted into; nothing was extracted",
        zip.display()
    )]
    UnsafeEntry { zip: PathBuf, entry: String },
    #[error("fold {0:?}: expected a fold number (0, 1, ...) or all")]
    BadFold(String),
    #[error("{}: fold {fold} is not trained (folds found: {})", dir.display(), found.join(", "))]
    MissingFold {
        dir: PathBuf,
        fold: String,
        found: Vec<String>,
    },
    #[error("fold {fold} has no {checkpoint} in {}", dir.display())]
    MissingCheckpoint {
        dir: PathBuf,
        fold: String,
        checkpoint: String,
    },
    #[error("{}: no fold has {checkpoint}", dir.display())]
    NoCheckpoint { dir: PathBuf, checkpoint: String },
}

impl TrainedModel {
    /// The one model at `path`: a results folder, an nnflow training or a folder of trainings of
    /// one configuration, or a folder holding exactly one such model (an extracted zip).
    pub fn open(path: &Path) -> Result<TrainedModel, ModelError> {
        let mut models = TrainedModel::open_all(path)?;
        if models.len() > 1 {
            return Err(ModelError::SeveralModels {
                dir: path.to_path_buf(),
                models: models.iter().map(TrainedModel::describe).collect(),
            });
        }
        Ok(models.remove(0))
    }

    /// Every model at `path`: the folder itself if it is one, else those in its subfolders and
    /// theirs (`DatasetXXX_Name/<trainer>__<plans>__<configuration>`, as in `nnUNet_results` and in
    /// an extracted zip), nnflow trainings grouped by configuration. Sorted by folder.
    pub fn open_all(path: &Path) -> Result<Vec<TrainedModel>, ModelError> {
        if !path.exists() {
            return Err(ModelError::NotFound {
                path: path.to_path_buf(),
            });
        }
        if path.is_file() {
            return Err(if path.extension().is_some_and(|e| e == "zip") {
                ModelError::Zip {
                    path: path.to_path_buf(),
                }
            } else {
                ModelError::NotAModel {
                    dir: path.to_path_buf(),
                }
            });
        }
        let mut models = Vec::new();
        let mut trainings = Vec::new();
        find(path, SEARCH_DEPTH, &mut models, &mut trainings)?;
        models.extend(group_trainings(path, trainings)?);
        if models.is_empty() {
            return Err(ModelError::NotAModel {
                dir: path.to_path_buf(),
            });
        }
        models.sort_by(|a, b| a.dir.cmp(&b.dir).then(a.configuration.cmp(&b.configuration)));
        Ok(models)
    }

    /// Extracts a zip from `nnUNetv2_export_model_to_zip` into `into` (a folder of its own: what
    /// else lies there is opened too) and opens every model in it, one per configuration.
    pub fn open_zip(zip: &Path, into: &Path) -> Result<Vec<TrainedModel>, ModelError> {
        extract_zip(zip, into)?;
        TrainedModel::open_all(into)
    }

    /// `<trainer>__<plans>__<configuration>`, or `nnflow <configuration>`.
    pub fn describe(&self) -> String {
        match &self.source {
            ModelSource::Nnunet {
                trainer,
                plans_identifier,
                ..
            } => format!("{trainer}__{plans_identifier}__{}", self.configuration),
            ModelSource::Nnflow => format!("nnflow {}", self.configuration),
        }
    }

    /// The file name `checkpoint` has in this model's format: nnU-Net's names (`-chk
    /// checkpoint_best.pth`) mean nnflow's `checkpoint_best.safetensors` for nnflow trainings.
    pub fn checkpoint_file(&self, checkpoint: &str) -> String {
        let stem = checkpoint
            .strip_suffix(".pth")
            .or_else(|| checkpoint.strip_suffix(".safetensors"))
            .unwrap_or(checkpoint);
        format!("{stem}.{}", self.format.extension())
    }

    /// The checkpoints to predict with: `folds` (nnU-Net's `-f`) and `checkpoint` (`-chk`,
    /// [`DEFAULT_CHECKPOINT`] by default).
    pub fn select(
        &self,
        folds: &FoldSelection,
        checkpoint: &str,
    ) -> Result<Vec<SelectedCheckpoint>, ModelError> {
        let file = self.checkpoint_file(checkpoint);
        let chosen = |fold: &TrainedFold| {
            fold.checkpoints.get(&file).map(|path| SelectedCheckpoint {
                fold: fold.fold.clone(),
                path: path.clone(),
            })
        };
        match folds {
            FoldSelection::Auto => {
                let numbered: Vec<_> = self
                    .folds
                    .iter()
                    .filter(|f| f.fold != "all")
                    .filter_map(chosen)
                    .collect();
                if !numbered.is_empty() {
                    return Ok(numbered);
                }
                let all: Vec<_> = self
                    .folds
                    .iter()
                    .filter(|f| f.fold == "all")
                    .filter_map(chosen)
                    .collect();
                if all.is_empty() {
                    return Err(ModelError::NoCheckpoint {
                        dir: self.dir.clone(),
                        checkpoint: file,
                    });
                }
                Ok(all)
            }
            FoldSelection::Folds(wanted) => wanted
                .iter()
                .map(|wanted| {
                    let fold = self.folds.iter().find(|f| f.fold == *wanted).ok_or_else(|| {
                        ModelError::MissingFold {
                            dir: self.dir.clone(),
                            fold: wanted.clone(),
                            found: self.folds.iter().map(|f| f.fold.clone()).collect(),
                        }
                    })?;
                    chosen(fold).ok_or_else(|| ModelError::MissingCheckpoint {
                        dir: fold.dir.clone(),
                        fold: fold.fold.clone(),
                        checkpoint: file.clone(),
                    })
                })
                .collect(),
        }
    }
}

/// What nnflow's trainer writes as `fold.json` (`FoldInfo` in src/train/job.rs, a layer this one
/// may not use): only the fields that say which model a training belongs to.
#[derive(Deserialize)]
struct FoldJson {
    configuration: String,
    fold: String,
}

/// One nnflow training folder.
struct Training {
    configuration: String,
    fold: TrainedFold,
}

/// Collects the models at `dir` and, `depth` levels down, below it.
fn find(
    dir: &Path,
    depth: usize,
    models: &mut Vec<TrainedModel>,
    trainings: &mut Vec<Training>,
) -> Result<(), ModelError> {
    if let Some(model) = nnunet_results(dir, depth == SEARCH_DEPTH)? {
        models.push(model);
        return Ok(());
    }
    if let Some(training) = nnflow_training(dir)? {
        trainings.push(training);
        return Ok(());
    }
    if depth == 0 {
        return Ok(());
    }
    for sub in subfolders(dir)? {
        find(&sub, depth - 1, models, trainings)?;
    }
    Ok(())
}

/// The subfolders of `dir`, sorted.
fn subfolders(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(FileError::io(dir))? {
        let path = entry.map_err(FileError::io(dir))?.path();
        if path.is_dir() {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}

/// `<trainer>__<plans>__<configuration>`, split.
fn results_name(dir: &Path) -> Option<(String, String, String)> {
    let name = dir.file_name()?.to_str()?;
    let mut parts = name.splitn(3, "__");
    let (trainer, plans, configuration) = (parts.next()?, parts.next()?, parts.next()?);
    if [trainer, plans, configuration].iter().any(|p| p.is_empty()) {
        return None;
    }
    Some((trainer.into(), plans.into(), configuration.into()))
}

/// The nnU-Net results folder at `dir`, if its name has the form of one. `given`: `dir` is the
/// folder the user named, not one found below it.
fn nnunet_results(dir: &Path, given: bool) -> Result<Option<TrainedModel>, ModelError> {
    let Some((trainer, plans_identifier, configuration)) = results_name(dir) else {
        return Ok(None);
    };
    let fold_folders: Vec<(PathBuf, String)> = subfolders(dir)?
        .into_iter()
        .filter_map(|sub| {
            let fold = sub
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("fold_"))
                .and_then(fold_name)?;
            Some((sub, fold))
        })
        .collect();
    // Below the folder the user named, a name of this form without plans.json or folds is
    // something else (nnU-Net's `ensembles/ensemble___<model>___...` folders).
    if !given && fold_folders.is_empty() && !dir.join("plans.json").exists() {
        return Ok(None);
    }
    let required = |file: &'static str| {
        let path = dir.join(file);
        if path.is_file() {
            Ok(path)
        } else {
            Err(ModelError::MissingFile {
                dir: dir.to_path_buf(),
                file,
            })
        }
    };
    let plans = required("plans.json")?;
    let dataset = required("dataset.json")?;
    let fingerprint = dir.join("dataset_fingerprint.json");
    let mut folds = Vec::new();
    for (sub, fold) in fold_folders {
        folds.push(TrainedFold {
            fold,
            checkpoints: checkpoints(&sub, CheckpointFormat::Pth)?,
            dir: sub,
        });
    }
    if folds.is_empty() {
        return Err(ModelError::NoFolds {
            dir: dir.to_path_buf(),
        });
    }
    sort_folds(&mut folds);
    Ok(Some(TrainedModel {
        dir: dir.to_path_buf(),
        configuration,
        source: ModelSource::Nnunet {
            trainer,
            plans_identifier,
            plans,
            dataset,
            dataset_fingerprint: fingerprint.is_file().then_some(fingerprint),
        },
        format: CheckpointFormat::Pth,
        folds,
    }))
}

/// `"3"` or `"all"`, as a fold; anything else is no fold folder.
fn fold_name(text: &str) -> Option<String> {
    if text == "all" {
        return Some(text.into());
    }
    text.parse::<u32>().ok().map(|n| n.to_string())
}

/// Numbered folds ascending, then `all`.
fn sort_folds(folds: &mut [TrainedFold]) {
    folds.sort_by_key(|f| f.fold.parse::<u32>().map_or(u64::MAX, u64::from));
}

/// The checkpoints in a fold folder: `checkpoint_*.pth`, or nnflow's `checkpoint_*.safetensors`
/// without the optimizer state files.
fn checkpoints(dir: &Path, format: CheckpointFormat) -> Result<BTreeMap<String, PathBuf>, ModelError> {
    let suffix = format!(".{}", format.extension());
    let mut found = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(FileError::io(dir))? {
        let path = entry.map_err(FileError::io(dir))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.starts_with("checkpoint_")
            && name.ends_with(&suffix)
            && !name.ends_with(".optimizer.safetensors")
            && path.is_file()
        {
            found.insert(name.to_string(), path.clone());
        }
    }
    Ok(found)
}

/// The nnflow training at `dir`, if it has a `fold.json`.
fn nnflow_training(dir: &Path) -> Result<Option<Training>, ModelError> {
    let file = dir.join("fold.json");
    if !file.is_file() {
        return Ok(None);
    }
    let info: FoldJson = crate::atomic_file::read_json(&file)?;
    Ok(Some(Training {
        configuration: info.configuration,
        fold: TrainedFold {
            fold: info.fold,
            dir: dir.to_path_buf(),
            checkpoints: checkpoints(dir, CheckpointFormat::Safetensors)?,
        },
    }))
}

/// nnflow trainings found below `root`, one model per configuration. A model's folder is the
/// training itself when it is the only one, else `root`.
fn group_trainings(root: &Path, trainings: Vec<Training>) -> Result<Vec<TrainedModel>, ModelError> {
    let mut by_configuration: BTreeMap<String, Vec<TrainedFold>> = BTreeMap::new();
    for training in trainings {
        let folds = by_configuration.entry(training.configuration).or_default();
        if let Some(first) = folds.iter().find(|f| f.fold == training.fold.fold) {
            return Err(ModelError::DuplicateFold {
                dir: root.to_path_buf(),
                fold: training.fold.fold,
                first: first.dir.clone(),
                second: training.fold.dir,
            });
        }
        folds.push(training.fold);
    }
    Ok(by_configuration
        .into_iter()
        .map(|(configuration, mut folds)| {
            sort_folds(&mut folds);
            let dir = match folds.as_slice() {
                [only] => only.dir.clone(),
                _ => root.to_path_buf(),
            };
            TrainedModel {
                dir,
                configuration,
                source: ModelSource::Nnflow,
                format: CheckpointFormat::Safetensors,
                folds,
            }
        })
        .collect())
}

/// Extracts `zip` into `into`. Every entry is checked before anything is written: one that is
/// a link, an absolute path or leads out of `into` (zip-slip) refuses the whole zip. A failure
/// while writing leaves what was extracted so far.
pub fn extract_zip(zip: &Path, into: &Path) -> Result<(), ModelError> {
    let archive_error = |source| ModelError::ZipArchive {
        path: zip.to_path_buf(),
        source,
    };
    let file = File::open(zip).map_err(FileError::io(zip))?;
    let mut archive = zip::ZipArchive::new(file).map_err(archive_error)?;
    let mut entries = Vec::with_capacity(archive.len());
    for index in 0..archive.len() {
        let entry = archive.by_index(index).map_err(archive_error)?;
        let name = entry.name().map_err(archive_error)?.into_owned();
        let relative = match safe_relative_path(&name) {
            Some(relative) if !entry.is_symlink() => relative,
            _ => {
                return Err(ModelError::UnsafeEntry {
                    zip: zip.to_path_buf(),
                    entry: name,
                })
            }
        };
        entries.push((index, relative, entry.is_dir()));
    }
    for (index, relative, is_dir) in entries {
        let target = into.join(&relative);
        if is_dir {
            std::fs::create_dir_all(&target).map_err(FileError::io(&target))?;
            continue;
        }
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(FileError::io(parent))?;
        }
        let mut entry = archive.by_index(index).map_err(archive_error)?;
        let mut out = File::create(&target).map_err(FileError::io(&target))?;
        io::copy(&mut entry, &mut out).map_err(FileError::io(&target))?;
    }
    Ok(())
}

/// An entry name as a path below the extraction folder, or `None` where it is absolute, names a
/// drive, holds `..` or a NUL, or names nothing. Both separators count, as Windows tools write
/// `\`.
fn safe_relative_path(name: &str) -> Option<PathBuf> {
    if name.contains('\0') || name.starts_with('/') || name.starts_with('\\') {
        return None;
    }
    let mut path = PathBuf::new();
    for part in name.split(['/', '\\']) {
        match part {
            "" | "." => {}
            ".." => return None,
            _ if part.contains(':') => return None,
            _ => path.push(part),
        }
    }
    let only_normal = path.components().all(|c| matches!(c, Component::Normal(_)));
    (only_normal && !path.as_os_str().is_empty()).then_some(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    /// A results folder: fold_0 with both checkpoints, fold_1 with the final one, fold_3 with none
    /// (training stopped early), fold_all, and folders nnU-Net also leaves there.
    fn results_folder(root: &Path) -> PathBuf {
        let dir = root.join("Dataset990_Tiny/nnUNetTrainer__nnUNetPlans__3d_fullres");
        for file in ["plans.json", "dataset.json", "dataset_fingerprint.json"] {
            write(&dir.join(file), "{}");
        }
        for file in [
            "fold_0/checkpoint_final.pth",
            "fold_0/checkpoint_best.pth",
            "fold_1/checkpoint_final.pth",
            "fold_1/progress.png",
            "fold_3/debug.json",
            "fold_all/checkpoint_final.pth",
            "crossval_results_folds_0_1/summary.json",
        ] {
            write(&dir.join(file), "");
        }
        dir
    }

    #[test]
    fn opens_an_nnunet_results_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = results_folder(tmp.path());
        let model = TrainedModel::open(&dir).unwrap();
        assert_eq!(model.configuration, "3d_fullres");
        assert_eq!(model.format, CheckpointFormat::Pth);
        assert_eq!(
            model.source,
            ModelSource::Nnunet {
                trainer: "nnUNetTrainer".into(),
                plans_identifier: "nnUNetPlans".into(),
                plans: dir.join("plans.json"),
                dataset: dir.join("dataset.json"),
                dataset_fingerprint: Some(dir.join("dataset_fingerprint.json")),
            }
        );
        assert_eq!(model.describe(), "nnUNetTrainer__nnUNetPlans__3d_fullres");
        let folds: Vec<&str> = model.folds.iter().map(|f| f.fold.as_str()).collect();
        assert_eq!(folds, ["0", "1", "3", "all"]);
        let names: Vec<&String> = model.folds[0].checkpoints.keys().collect();
        assert_eq!(names, ["checkpoint_best.pth", "checkpoint_final.pth"]);
        // the dataset folder above it and the results root above that hold the same one model
        assert_eq!(TrainedModel::open(dir.parent().unwrap()).unwrap(), model);
        assert_eq!(TrainedModel::open(tmp.path()).unwrap(), model);
    }

    #[test]
    fn selects_folds_and_checkpoints_as_nnunet_does() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = results_folder(tmp.path());
        let model = TrainedModel::open(&dir).unwrap();
        let folds = |selected: Vec<SelectedCheckpoint>| -> Vec<(String, PathBuf)> {
            selected.into_iter().map(|s| (s.fold, s.path)).collect()
        };
        // auto: the numbered folds that hold the checkpoint, not fold_all
        let auto = model.select(&FoldSelection::Auto, DEFAULT_CHECKPOINT).unwrap();
        assert_eq!(
            folds(auto),
            [
                ("0".into(), dir.join("fold_0/checkpoint_final.pth")),
                ("1".into(), dir.join("fold_1/checkpoint_final.pth")),
            ]
        );
        let best = model.select(&FoldSelection::Auto, "checkpoint_best.pth").unwrap();
        assert_eq!(
            folds(best),
            [("0".into(), dir.join("fold_0/checkpoint_best.pth"))]
        );
        let all = FoldSelection::parse(&["all"]).unwrap();
        assert_eq!(
            folds(model.select(&all, DEFAULT_CHECKPOINT).unwrap()),
            [("all".into(), dir.join("fold_all/checkpoint_final.pth"))]
        );

        let err = model
            .select(&FoldSelection::parse(&["0", "1"]).unwrap(), "checkpoint_best.pth")
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "fold 1 has no checkpoint_best.pth in {}",
                dir.join("fold_1").display()
            )
        );
        let err = model
            .select(&FoldSelection::parse(&["4"]).unwrap(), DEFAULT_CHECKPOINT)
            .unwrap_err();
        assert!(
            matches!(&err, ModelError::MissingFold { fold, found, .. }
                if fold == "4" && found == &["0", "1", "3", "all"]),
            "{err}"
        );
        let err = model
            .select(&FoldSelection::Auto, "checkpoint_latest.pth")
            .unwrap_err();
        assert!(matches!(err, ModelError::NoCheckpoint { .. }), "{err}");
    }

    #[test]
    fn fold_all_alone_is_what_auto_selects() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("T__P__2d");
        write(&dir.join("plans.json"), "{}");
        write(&dir.join("dataset.json"), "{}");
        write(&dir.join("fold_all/checkpoint_final.pth"), "");
        let model = TrainedModel::open(&dir).unwrap();
        let selected = model.select(&FoldSelection::Auto, DEFAULT_CHECKPOINT).unwrap();
        assert_eq!(selected[0].fold, "all");
        assert_eq!(
            model.source,
            ModelSource::Nnunet {
                trainer: "T".into(),
                plans_identifier: "P".into(),
                plans: dir.join("plans.json"),
                dataset: dir.join("dataset.json"),
                dataset_fingerprint: None,
            }
        );
    }

    #[test]
    fn parses_nnunets_fold_arguments() {
        assert_eq!(FoldSelection::parse::<&str>(&[]).unwrap(), FoldSelection::Auto);
        assert_eq!(
            FoldSelection::parse(&["0", "03", "all"]).unwrap(),
            FoldSelection::Folds(vec!["0".into(), "3".into(), "all".into()])
        );
        let err = FoldSelection::parse(&["-1"]).unwrap_err();
        assert!(matches!(err, ModelError::BadFold(f) if f == "-1"));
    }

    #[test]
    fn says_what_a_results_folder_lacks() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("nnUNetTrainer__nnUNetPlans__2d");
        write(&dir.join("fold_0/checkpoint_final.pth"), "");
        write(&dir.join("dataset.json"), "{}");
        let err = TrainedModel::open(&dir).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{}: the model folder has no plans.json", dir.display())
        );
        write(&dir.join("plans.json"), "{}");
        std::fs::remove_dir_all(dir.join("fold_0")).unwrap();
        let err = TrainedModel::open(&dir).unwrap_err();
        assert!(matches!(err, ModelError::NoFolds { .. }), "{err}");

        let empty = tmp.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let err = TrainedModel::open(&empty).unwrap_err();
        assert!(matches!(err, ModelError::NotAModel { .. }), "{err}");
        let err = TrainedModel::open(&tmp.path().join("missing")).unwrap_err();
        assert!(matches!(err, ModelError::NotFound { .. }), "{err}");
    }

    /// nnU-Net's `ensembles/ensemble___<model>___<model>___<folds>` folders have the form of a
    /// results folder's name but are none.
    #[test]
    fn ensemble_folders_are_no_models() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = results_folder(tmp.path());
        write(
            &tmp.path().join(
                "Dataset990_Tiny/ensembles/ensemble___nnUNetTrainer__nnUNetPlans__2d___\
                 nnUNetTrainer__nnUNetPlans__3d_fullres___0_1_2_3_4/summary.json",
            ),
            "{}",
        );
        let dataset = tmp.path().join("Dataset990_Tiny");
        assert_eq!(TrainedModel::open(&dataset).unwrap().dir, dir);
    }

    fn write_zip(path: &Path, entries: &[(&str, &str)]) {
        let mut zip = zip::ZipWriter::new(File::create(path).unwrap());
        let options =
            zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        for (name, text) in entries {
            zip.start_file(*name, options).unwrap();
            zip.write_all(text.as_bytes()).unwrap();
        }
        zip.finish().unwrap();
    }

    #[test]
    fn opens_every_configuration_of_an_exported_zip() {
        let tmp = tempfile::tempdir().unwrap();
        let zip = tmp.path().join("model.zip");
        let mut entries = Vec::new();
        for configuration in ["2d", "3d_fullres"] {
            let base = format!("Dataset990_Tiny/nnUNetTrainer__nnUNetPlans__{configuration}");
            for file in [
                "fold_0/checkpoint_final.pth",
                "fold_0/progress.png",
                "fold_0/validation/summary.json",
                "fold_1/checkpoint_final.pth",
                "plans.json",
                "dataset.json",
                "dataset_fingerprint.json",
            ] {
                entries.push((format!("{base}/{file}"), configuration.to_string()));
            }
        }
        entries.push(("Dataset990_Tiny/inference_information.json".into(), "{}".into()));
        let entries: Vec<(&str, &str)> = entries.iter().map(|(n, t)| (n.as_str(), t.as_str())).collect();
        write_zip(&zip, &entries);

        let into = tmp.path().join("extracted");
        let models = TrainedModel::open_zip(&zip, &into).unwrap();
        let names: Vec<String> = models.iter().map(TrainedModel::describe).collect();
        assert_eq!(
            names,
            [
                "nnUNetTrainer__nnUNetPlans__2d",
                "nnUNetTrainer__nnUNetPlans__3d_fullres"
            ]
        );
        let selected = models[1]
            .select(&FoldSelection::Auto, DEFAULT_CHECKPOINT)
            .unwrap();
        assert_eq!(selected.len(), 2);
        assert_eq!(std::fs::read_to_string(&selected[1].path).unwrap(), "3d_fullres");

        let err = TrainedModel::open(&into).unwrap_err();
        assert!(
            matches!(&err, ModelError::SeveralModels { models, .. } if models.len() == 2),
            "{err}"
        );
        let err = TrainedModel::open(&zip).unwrap_err();
        assert!(matches!(err, ModelError::Zip { .. }), "{err}");
    }

    #[test]
    fn refuses_zip_entries_that_leave_the_folder() {
        for evil in [
            "../evil.txt",
            "Dataset990_Tiny/../../evil.txt",
            "/tmp/evil.txt",
            "..\\evil.txt",
            "C:/evil.txt",
        ] {
            let tmp = tempfile::tempdir().unwrap();
            let zip = tmp.path().join("model.zip");
            write_zip(
                &zip,
                &[("Dataset990_Tiny/T__P__2d/plans.json", "{}"), (evil, "gotcha")],
            );
            let into = tmp.path().join("a/b");
            let err = TrainedModel::open_zip(&zip, &into).unwrap_err();
            assert!(
                matches!(&err, ModelError::UnsafeEntry { entry, .. } if entry == evil),
                "{evil}: {err}"
            );
            // checked before anything is written
            assert!(!into.exists(), "{evil}");
            assert!(!tmp.path().join("a/evil.txt").exists());
        }
    }

    #[test]
    fn entry_names_become_relative_paths() {
        assert_eq!(
            safe_relative_path("a/./b\\c.json"),
            Some(PathBuf::from("a/b/c.json"))
        );
        assert_eq!(safe_relative_path("a/"), Some(PathBuf::from("a")));
        for bad in ["", "./", "a/../../b", "/a", "\\a", "a\0b", "c:a"] {
            assert_eq!(safe_relative_path(bad), None, "{bad:?}");
        }
    }

    fn nnflow_training(dir: &Path, configuration: &str, fold: &str, best: bool) {
        write(
            &dir.join("fold.json"),
            &serde_json::json!({
                "configuration": configuration, "fold": fold, "validation_cases": ["a"],
                "file_ending": ".nii.gz", "probabilities": false,
            })
            .to_string(),
        );
        write(&dir.join("checkpoint_final.safetensors"), "");
        write(&dir.join("checkpoint_final.json"), "{}");
        if best {
            write(&dir.join("checkpoint_best.safetensors"), "");
        }
    }

    #[test]
    fn opens_nnflow_trainings() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        nnflow_training(&root.join("train-1"), "3d_fullres", "1", false);
        nnflow_training(&root.join("train-0"), "3d_fullres", "0", true);
        nnflow_training(&root.join("train-2d"), "2d", "all", false);

        let one = TrainedModel::open(&root.join("train-0")).unwrap();
        assert_eq!(one.dir, root.join("train-0"));
        assert_eq!(one.source, ModelSource::Nnflow);
        assert_eq!(one.format, CheckpointFormat::Safetensors);
        let names: Vec<&String> = one.folds[0].checkpoints.keys().collect();
        assert_eq!(
            names,
            ["checkpoint_best.safetensors", "checkpoint_final.safetensors"]
        );

        let models = TrainedModel::open_all(root).unwrap();
        let found: Vec<(String, Vec<String>)> = models
            .iter()
            .map(|m| (m.describe(), m.folds.iter().map(|f| f.fold.clone()).collect()))
            .collect();
        assert_eq!(
            found,
            [
                ("nnflow 3d_fullres".into(), vec!["0".into(), "1".into()]),
                ("nnflow 2d".into(), vec!["all".into()]),
            ]
        );
        // nnU-Net's checkpoint names mean nnflow's
        let fullres = &models[0];
        let selected = fullres.select(&FoldSelection::Auto, DEFAULT_CHECKPOINT).unwrap();
        assert_eq!(
            selected[1].path,
            root.join("train-1/checkpoint_final.safetensors")
        );
        let err = fullres
            .select(&FoldSelection::parse(&["1"]).unwrap(), "checkpoint_best.pth")
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "fold 1 has no checkpoint_best.safetensors in {}",
                root.join("train-1").display()
            )
        );
    }

    #[test]
    fn the_same_fold_twice_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        nnflow_training(&tmp.path().join("a"), "2d", "0", false);
        nnflow_training(&tmp.path().join("b"), "2d", "0", false);
        let err = TrainedModel::open(tmp.path()).unwrap_err();
        assert!(matches!(err, ModelError::DuplicateFold { .. }), "{err}");
    }

    /// `tests/fixtures/predict/<name>` (made by `generate.py` there with nnU-Net v2.8.1).
    fn predict_fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/predict")
            .join(name)
    }

    /// The model nnU-Net v2.8.1 trained and `nnUNetv2_export_model_to_zip` exported, opened and its
    /// fold 0 checkpoint read without torch: the weights equal the ones the generator took from
    /// `checkpoint_final.pth['network_weights']` with torch.
    #[test]
    fn reads_the_model_nnunet_exported() {
        let tmp = tempfile::tempdir().unwrap();
        let models = TrainedModel::open_zip(&predict_fixture("model.zip"), tmp.path()).unwrap();
        let [model] = models.as_slice() else {
            panic!("{models:?}")
        };
        assert_eq!(model.describe(), "nnUNetTrainerTinyCPU__nnUNetPlans__3d_fullres");
        let ModelSource::Nnunet { plans, dataset, .. } = &model.source else {
            panic!("{:?}", model.source)
        };
        for (file, extracted) in [("plans.json", plans), ("dataset.json", dataset)] {
            assert_eq!(
                std::fs::read(extracted).unwrap(),
                std::fs::read(predict_fixture(file)).unwrap()
            );
        }
        let selected = model.select(&FoldSelection::Auto, DEFAULT_CHECKPOINT).unwrap();
        assert_eq!(selected.len(), 1);
        assert_eq!(selected[0].fold, "0");

        let checkpoint = crate::network::pth::read_checkpoint(&selected[0].path).unwrap();
        assert_eq!(checkpoint.trainer_name, "nnUNetTrainerTinyCPU");
        assert_eq!(checkpoint.mirror_axes, [0, 1, 2]);
        assert_eq!(checkpoint.configuration.as_deref(), Some("3d_fullres"));
        assert_eq!(checkpoint.fold.as_deref(), Some("0"));
        assert_eq!(checkpoint.current_epoch, Some(12));

        let reference: BTreeMap<String, (Vec<usize>, Vec<f32>)> =
            crate::network::safetensors::read_safetensors(&predict_fixture("weights.safetensors"))
                .unwrap()
                .into_iter()
                .map(|tensor| (tensor.name, (tensor.shape, tensor.values)))
                .collect();
        assert_eq!(reference.len(), 68);
        for (name, (shape, values)) in &reference {
            let read = checkpoint.get(name).unwrap_or_else(|| panic!("no {name}"));
            assert_eq!(&read.shape, shape, "{name}");
            assert_eq!(&read.values, values, "{name}");
        }
        // every other name is one of PyTorch's aliases of a canonical tensor, with its values
        let canonical: Vec<String> = reference.keys().cloned().collect();
        let aliases: BTreeMap<String, String> = crate::network::state_dict::nnunet_aliases(&canonical)
            .into_iter()
            .collect();
        assert_eq!(checkpoint.weights.len(), 188);
        for weights in &checkpoint.weights {
            if reference.contains_key(&weights.name) {
                continue;
            }
            let of = aliases
                .get(&weights.name)
                .unwrap_or_else(|| panic!("{} is neither canonical nor an alias", weights.name));
            assert_eq!(weights.values, reference[of].1, "{}", weights.name);
        }
    }
}
