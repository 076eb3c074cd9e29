//! The zip `nnflow export-model` writes: nnflow's trainings in the layout of
//! `nnUNetv2_export_model_to_zip`, so that `nnUNetv2_install_pretrained_model_from_zip` installs
//! them and `nnUNetv2_predict` runs them:
//!
//! ```text
//! DatasetXXX_Name/nnUNetTrainer__<plans_name>__<configuration>/plans.json
//!                                                             /dataset.json
//!                                                             /dataset_fingerprint.json
//!                                                             /fold_N/checkpoint_final.pth
//! ```
//!
//! Each fold's `checkpoint_final.safetensors` becomes nnU-Net's checkpoint dict: `network_weights`
//! under every name `state_dict()` gives (aliases share their tensor's storage), the trainer
//! (`nnUNetTrainer`, which builds the network the plan names), `init_args` (plans, configuration,
//! fold, dataset_json), `inference_allowed_mirroring_axes` (the training's mirror axes from
//! `fold.json`) and `current_epoch`. Nothing else of a fold is needed to predict, so nothing else
//! is exported. The zip is written beside its destination and renamed into place; a file nnflow
//! did not write (its zip comment says) is never replaced. The same trainings give the same bytes.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, DateTime, ZipArchive, ZipWriter};

use crate::atomic_file;
use crate::file_error::FileError;
use crate::inference::model::{FoldSelection, ModelError, SelectedCheckpoint, TrainedModel};
use crate::network::pth_writer::{PthWriteError, PthWriter, Value};
use crate::network::safetensors::{read_safetensors, SafetensorsError};
use crate::network::state_dict::nnunet_state_dict;
use crate::plans::{Plans, PlansError};
use crate::train::job::FoldInfo;

/// The trainer class named in the folder and the checkpoints: nnU-Net's default, whose
/// `build_network_architecture` builds the network the plan describes (PlainConvUNet or
/// ResidualEncoderUNet), as nnflow trains it.
pub const TRAINER: &str = "nnUNetTrainer";

/// The zip comment that marks a zip this command wrote (and may replace).
pub const MARKER: &str = "written by `nnflow export-model`";

/// The files of the plan stage's outputs the zip holds beside the folds.
const PLAN_FILES: [&str; 3] = ["plans.json", "dataset.json", "dataset_fingerprint.json"];

/// What to export.
#[derive(Debug, Clone)]
pub struct ExportRequest {
    /// The plan stage's outputs: `plans.json`, with `dataset.json` and `dataset_fingerprint.json`
    /// beside it.
    pub plan_dir: PathBuf,
    /// nnflow's trainings, one model per configuration.
    pub models: Vec<TrainedModel>,
    /// The folds to export (`"0"`.., `"all"`); `None`: every fold holding the first checkpoint.
    pub folds: Option<Vec<String>>,
    /// Checkpoints by nnU-Net's name (`checkpoint_final.pth`); each fold must hold every one.
    pub checkpoints: Vec<String>,
    /// `DatasetXXX_Name`; `None`: plans.json's `dataset_name`.
    pub dataset_name: Option<String>,
    pub output: PathBuf,
}

/// What was written: the zip's dataset folder and models.
#[derive(Debug, Clone, PartialEq)]
pub struct Exported {
    pub dataset_name: String,
    pub models: Vec<ExportedModel>,
}

/// One model folder of the zip.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportedModel {
    /// `nnUNetTrainer__<plans_name>__<configuration>`.
    pub folder: String,
    pub plans_name: String,
    pub configuration: String,
    pub folds: Vec<String>,
}

/// Why a model could not be exported; each names the file, folder or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{}: {source}", path.display())]
    Plans { path: PathBuf, source: PlansError },
    #[error(
        "{}: no {file}; give the plan stage's outputs folder (it holds plans.json, dataset.json \
         and dataset_fingerprint.json)",
        dir.display()
    )]
    MissingPlanFile { dir: PathBuf, file: &'static str },
    #[error(
        "{name:?} ({origin}) is no nnU-Net dataset name; nnU-Net finds models by \
         DatasetXXX_Name (3 or more digits): give --dataset-name, e.g. Dataset501_{}",
        suggestion(name)
    )]
    DatasetName { name: String, origin: &'static str },
    #[error(
        "{}: an nnU-Net model already ({model}); nnUNetv2_export_model_to_zip exports it",
        dir.display()
    )]
    NotNnflow { dir: PathBuf, model: String },
    #[error("{what} {name:?} cannot name a folder in the zip")]
    FolderName { what: &'static str, name: String },
    #[error("no trainings to export")]
    NoModels,
    #[error("configuration {configuration} is there twice: {} and {}", first.display(), second.display())]
    DuplicateConfiguration {
        configuration: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error(transparent)]
    Safetensors(#[from] SafetensorsError),
    #[error("{}: mirror axes {axes:?} do not fit a {dims}D network", path.display())]
    MirrorAxes {
        path: PathBuf,
        axes: Vec<usize>,
        dims: usize,
    },
    #[error(transparent)]
    Pth(#[from] PthWriteError),
    #[error("{}: {source}", path.display())]
    Zip {
        path: PathBuf,
        source: zip::result::ZipError,
    },
    #[error(
        "{}: exists and was not written by `nnflow export-model`; it is left as it is (remove it \
         or choose another -o)",
        path.display()
    )]
    NotOurs { path: PathBuf },
}

/// `Dataset501_` plus the name's letters and digits, for the error's example.
fn suggestion(name: &str) -> String {
    let kept: String = name.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
    if kept.is_empty() {
        "Name".into()
    } else {
        kept
    }
}

/// Whether `name` is a dataset folder name nnU-Net finds by its id: `Dataset`, 3 or more
/// digits, `_`, and a name that is one path component.
pub fn is_dataset_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("Dataset") else {
        return false;
    };
    let digits = rest.chars().take_while(char::is_ascii_digit).count();
    let Some(tail) = rest[digits..].strip_prefix('_') else {
        return false;
    };
    digits >= 3 && is_component(tail)
}

/// Whether `name` can be one part of a path in the zip.
fn is_component(name: &str) -> bool {
    !name.is_empty() && !name.contains(['/', '\\', '\0']) && name != "." && name != ".."
}

/// One configuration's model folder in the zip.
struct ModelFolder {
    folder: String,
    configuration: String,
    folds: Vec<SelectedFold>,
}

/// A fold to export: its checkpoints, `(name in the zip, nnflow's file)`, and the mirror axes its
/// training recorded (every axis where `fold.json` predates them).
struct SelectedFold {
    fold: String,
    dir: PathBuf,
    checkpoints: Vec<(String, PathBuf)>,
    mirror_axes: Vec<usize>,
}

/// Writes the zip `request` describes.
pub fn export(request: &ExportRequest) -> Result<Exported, ExportError> {
    let plan_files = plan_files(&request.plan_dir)?;
    let plans_path = &plan_files[0];
    let plans = Plans::read(plans_path).map_err(|source| ExportError::Plans {
        path: plans_path.clone(),
        source,
    })?;
    let dataset_name = match &request.dataset_name {
        Some(name) if is_dataset_name(name) => name.clone(),
        Some(name) => {
            return Err(ExportError::DatasetName {
                name: name.clone(),
                origin: "--dataset-name",
            })
        }
        None if is_dataset_name(&plans.dataset_name) => plans.dataset_name.clone(),
        None => {
            return Err(ExportError::DatasetName {
                name: plans.dataset_name.clone(),
                origin: "the dataset_name of plans.json",
            })
        }
    };
    refuse_foreign(&request.output)?;
    let folders = model_folders(request, &plans, plans_path)?;
    let plans_json = Value::from_json(&atomic_file::read_json(plans_path)?);
    let dataset_json = Value::from_json(&atomic_file::read_json(&plan_files[1])?);

    let staging = Staging::new(&request.output)?;
    let file = File::create(&staging.zip).map_err(FileError::io(&staging.zip))?;
    let mut zip = ZipWriter::new(BufWriter::new(file));
    let zip_error = |source| ExportError::Zip {
        path: request.output.clone(),
        source,
    };
    let add = |zip: &mut ZipWriter<BufWriter<File>>, name: String, source: &Path| {
        let mut input = File::open(source).map_err(FileError::io(source))?;
        let size = input.metadata().map_err(FileError::io(source))?.len();
        let options = SimpleFileOptions::default()
            .compression_method(CompressionMethod::Deflated)
            .last_modified_time(DateTime::default())
            // zip64 only where the sizes need it (deflate may grow data a little)
            .large_file(size >= 0xFFFF_0000);
        zip.start_file(name, options).map_err(zip_error)?;
        io::copy(&mut input, zip).map_err(FileError::io(&staging.zip))?;
        Ok::<(), ExportError>(())
    };
    for model in &folders {
        let folder = format!("{dataset_name}/{}", model.folder);
        for fold in &model.folds {
            for (name, source) in &fold.checkpoints {
                let pth = staging.dir.join(name);
                let init_args = Value::Dict(vec![
                    ("plans".into(), plans_json.clone()),
                    ("configuration".into(), Value::str(&model.configuration)),
                    ("fold".into(), fold_value(&fold.fold)),
                    ("dataset_json".into(), dataset_json.clone()),
                ]);
                let epoch = current_epoch(&fold.dir, name);
                write_checkpoint(source, &pth, init_args, &fold.mirror_axes, epoch)?;
                add(&mut zip, format!("{folder}/fold_{}/{name}", fold.fold), &pth)?;
                std::fs::remove_file(&pth).map_err(FileError::io(&pth))?;
            }
        }
        for (file, path) in PLAN_FILES.iter().zip(&plan_files) {
            add(&mut zip, format!("{folder}/{file}"), path)?;
        }
    }
    zip.set_comment(MARKER).map_err(zip_error)?;
    let mut out = zip.finish().map_err(zip_error)?;
    out.flush().map_err(FileError::io(&staging.zip))?;
    out.get_ref().sync_all().map_err(FileError::io(&staging.zip))?;
    drop(out);
    std::fs::rename(&staging.zip, &request.output).map_err(FileError::io(&request.output))?;
    Ok(Exported {
        dataset_name,
        models: folders
            .into_iter()
            .map(|m| ExportedModel {
                folder: m.folder,
                plans_name: plans.plans_name.clone(),
                configuration: m.configuration,
                folds: m.folds.into_iter().map(|f| f.fold).collect(),
            })
            .collect(),
    })
}

/// `plans.json`, `dataset.json` and `dataset_fingerprint.json` in `plan` (the folder, or its
/// plans.json).
fn plan_files(plan: &Path) -> Result<Vec<PathBuf>, ExportError> {
    let dir = if plan.is_file() {
        plan.parent().unwrap_or(Path::new(".")).to_path_buf()
    } else {
        plan.to_path_buf()
    };
    PLAN_FILES
        .iter()
        .map(|&file| {
            let path = dir.join(file);
            if path.is_file() {
                Ok(path)
            } else {
                Err(ExportError::MissingPlanFile {
                    dir: dir.clone(),
                    file,
                })
            }
        })
        .collect()
}

/// Fails unless `output` is free or a zip this command wrote.
fn refuse_foreign(output: &Path) -> Result<(), ExportError> {
    if !output.exists() {
        return Ok(());
    }
    let ours = File::open(output)
        .ok()
        .filter(|_| output.is_file())
        .and_then(|file| ZipArchive::new(file).ok())
        .is_some_and(|archive| archive.comment().starts_with(MARKER.as_bytes()));
    if ours {
        Ok(())
    } else {
        Err(ExportError::NotOurs {
            path: output.to_path_buf(),
        })
    }
}

/// Each model's folder, folds and checkpoint files, checked before anything is written.
fn model_folders(
    request: &ExportRequest,
    plans: &Plans,
    plans_path: &Path,
) -> Result<Vec<ModelFolder>, ExportError> {
    if request.models.is_empty() {
        return Err(ExportError::NoModels);
    }
    let mut seen: BTreeMap<&str, &Path> = BTreeMap::new();
    let mut folders = Vec::new();
    for model in &request.models {
        if model.source != crate::inference::model::ModelSource::Nnflow {
            return Err(ExportError::NotNnflow {
                dir: model.dir.clone(),
                model: model.describe(),
            });
        }
        if let Some(first) = seen.insert(&model.configuration, &model.dir) {
            return Err(ExportError::DuplicateConfiguration {
                configuration: model.configuration.clone(),
                first: first.to_path_buf(),
                second: model.dir.clone(),
            });
        }
        let plans_error = |source| ExportError::Plans {
            path: plans_path.to_path_buf(),
            source,
        };
        for (what, name) in [
            ("plans_name", &plans.plans_name),
            ("configuration", &model.configuration),
        ] {
            if !is_component(name) {
                return Err(ExportError::FolderName {
                    what,
                    name: name.clone(),
                });
            }
        }
        let configuration = plans.configuration(&model.configuration).map_err(plans_error)?;
        let dims = configuration.patch_size().map_err(plans_error)?.len();

        let first = model.checkpoint_file(&request.checkpoints[0]);
        let wanted = match &request.folds {
            Some(folds) => FoldSelection::Folds(folds.clone()),
            None => FoldSelection::Folds(
                model
                    .folds
                    .iter()
                    .filter(|f| f.checkpoints.contains_key(&first))
                    .map(|f| f.fold.clone())
                    .collect(),
            ),
        };
        if wanted == FoldSelection::Folds(Vec::new()) {
            return Err(ModelError::NoCheckpoint {
                dir: model.dir.clone(),
                checkpoint: first,
            }
            .into());
        }
        let mut per_fold: Vec<SelectedFold> = Vec::new();
        for checkpoint in &request.checkpoints {
            let name = format!("{}.pth", stem(checkpoint));
            for SelectedCheckpoint { fold, path } in model.select(&wanted, checkpoint)? {
                if let Some(selected) = per_fold.iter_mut().find(|f| f.fold == fold) {
                    selected.checkpoints.push((name.clone(), path));
                    continue;
                }
                let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
                let info_path = dir.join("fold.json");
                let info: FoldInfo = atomic_file::read_json(&info_path)?;
                let mirror_axes = info.mirror_axes_or_all(dims);
                if mirror_axes.iter().any(|&a| a >= dims) {
                    return Err(ExportError::MirrorAxes {
                        path: info_path,
                        axes: mirror_axes,
                        dims,
                    });
                }
                per_fold.push(SelectedFold {
                    fold,
                    dir,
                    checkpoints: vec![(name.clone(), path)],
                    mirror_axes,
                });
            }
        }
        folders.push(ModelFolder {
            folder: format!("{TRAINER}__{}__{}", plans.plans_name, model.configuration),
            configuration: model.configuration.clone(),
            folds: per_fold,
        });
    }
    Ok(folders)
}

/// `checkpoint_best.pth` / `checkpoint_best.safetensors` / `checkpoint_best` -> `checkpoint_best`.
fn stem(checkpoint: &str) -> &str {
    checkpoint
        .strip_suffix(".pth")
        .or_else(|| checkpoint.strip_suffix(".safetensors"))
        .unwrap_or(checkpoint)
}

/// nnU-Net's `init_args['fold']`: an int, or `'all'`.
fn fold_value(fold: &str) -> Value {
    fold.parse::<i64>().map_or(Value::str(fold), Value::Int)
}

/// nnU-Net's `current_epoch` for the checkpoint `name` (`checkpoint_final.pth`: the epochs done;
/// `checkpoint_best.pth`: the best epoch's count), from the trainer state nnflow writes beside the
/// final weights; `None` where it does not say.
fn current_epoch(fold_dir: &Path, name: &str) -> Option<i64> {
    let state: serde_json::Value = atomic_file::read_json(&fold_dir.join("checkpoint_final.json")).ok()?;
    match name {
        "checkpoint_final.pth" => state["epochs_done"].as_i64(),
        "checkpoint_best.pth" => state["best_epoch"].as_i64().map(|e| e + 1),
        _ => None,
    }
}

/// Converts nnflow's weights at `source` into nnU-Net's checkpoint at `target`.
fn write_checkpoint(
    source: &Path,
    target: &Path,
    init_args: Value,
    mirror_axes: &[usize],
    current_epoch: Option<i64>,
) -> Result<(), ExportError> {
    let mut writer = PthWriter::new();
    let mut canonical = BTreeMap::new();
    for tensor in read_safetensors(source)? {
        canonical.insert(tensor.name, writer.tensor(tensor.shape, tensor.values)?);
    }
    let names: Vec<String> = canonical.keys().cloned().collect();
    let weights = nnunet_state_dict(&names)
        .into_iter()
        .map(|(name, of)| (name, canonical[&of].clone()))
        .collect();
    let mut root = vec![("network_weights".to_string(), Value::OrderedDict(weights))];
    if let Some(epoch) = current_epoch {
        root.push(("current_epoch".into(), Value::Int(epoch)));
    }
    root.push(("init_args".into(), init_args));
    root.push(("trainer_name".into(), Value::str(TRAINER)));
    // nnU-Net stores None, not an empty tuple, for no mirroring (its predictor takes max() of it)
    let axes = if mirror_axes.is_empty() {
        Value::None
    } else {
        Value::Tuple(mirror_axes.iter().map(|&a| Value::Int(a as i64)).collect())
    };
    root.push(("inference_allowed_mirroring_axes".into(), axes));
    writer.save(&Value::Dict(root), target)?;
    Ok(())
}

/// The temporary zip beside the destination and a folder for the checkpoints on their way into
/// it; both are removed unless the zip was renamed into place.
struct Staging {
    zip: PathBuf,
    dir: PathBuf,
}

impl Staging {
    fn new(output: &Path) -> Result<Staging, FileError> {
        let zip = atomic_file::temporary_path(output);
        let dir = zip.with_extension("parts");
        if let Some(parent) = output.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(FileError::io(parent))?;
        }
        std::fs::create_dir_all(&dir).map_err(FileError::io(&dir))?;
        Ok(Staging { zip, dir })
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(&self.zip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dataset_names_nnunet_finds() {
        for name in ["Dataset990_Tiny", "Dataset001_a.b", "Dataset1234_Big-Name"] {
            assert!(is_dataset_name(name), "{name}");
        }
        for name in [
            "D",
            "Dataset99_Two",
            "Dataset990",
            "Dataset990_",
            "dataset990_x",
            "Dataset990_a/b",
            "Task990_x",
        ] {
            assert!(!is_dataset_name(name), "{name}");
        }
    }
}
