//! Training checkpoints: weights as safetensors under nnU-Net's parameter names, the optimizer's
//! momentum buffers as a second safetensors file, and the trainer state as JSON. The JSON is
//! written last and names the epoch; each file goes through a temporary name and a rename. Resume
//! checkpoints are also checksummed and kept in two generations (`nnflow::train::resume`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{nn::VarStore, Device, Tensor};

use nnflow::atomic_file;
use nnflow::file_error::FileError;
use nnflow::network::pth::{read_checkpoint, PthError};
pub use nnflow::train::resume::paths;
use nnflow::train::resume::{self, Slot};
use nnflow::train::TrainError;

use crate::optim::{LossScaler, Sgd};
use nnflow::json_numbers::{nan_as_null, nan_as_null_vec};

/// Why a checkpoint cannot be written or loaded; each names its file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    File(#[from] FileError),
    /// Keeping the previous checkpoint while the latest is replaced.
    #[error(transparent)]
    Resume(#[from] TrainError),
    #[error("{}: {source}", .path.display())]
    Tensors {
        path: PathBuf,
        #[source]
        source: tch::TchError,
    },
    #[error("{}: no tensor {name}", .file.display())]
    MissingTensor { file: PathBuf, name: String },
    /// An nnU-Net checkpoint that cannot be read.
    #[error(transparent)]
    Pth(#[from] PthError),
    #[error("{}: {name} has shape {stored:?}, the network's is {expected:?}", .file.display())]
    TensorShape {
        file: PathBuf,
        name: String,
        stored: Vec<i64>,
        expected: Vec<i64>,
    },
}

/// For `map_err`: a safetensors error on `path`.
fn tensors(path: &Path) -> impl FnOnce(tch::TchError) -> CheckpointError + '_ {
    move |source| CheckpointError::Tensors {
        path: path.to_path_buf(),
        source,
    }
}

/// Everything besides tensors that a resumed run needs to continue exactly.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// What this is a checkpoint of (see `TrainParams::resume_identity`).
    pub identity: serde_json::Value,
    /// Epochs completed.
    pub epochs_done: usize,
    pub logs: Vec<EpochRecord>,
    pub best_ema: Option<f64>,
    pub best_epoch: Option<usize>,
    pub scaler: LossScaler,
}

/// One epoch's figures, as logged and plotted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
/// Losses and pseudo Dice may be NaN (a class absent from every validation patch, as in nnU-Net):
/// JSON writes that as `null`, read back as NaN.
pub struct EpochRecord {
    pub epoch: usize,
    #[serde(with = "nan_as_null")]
    pub train_loss: f64,
    #[serde(with = "nan_as_null")]
    pub val_loss: f64,
    #[serde(with = "nan_as_null_vec")]
    pub pseudo_dice: Vec<f64>,
    #[serde(with = "nan_as_null")]
    pub mean_pseudo_dice: f64,
    #[serde(with = "nan_as_null")]
    pub ema_pseudo_dice: f64,
    pub learning_rate: f64,
    pub epoch_seconds: f64,
}

/// The variables in a fixed (sorted) order: the order of the optimizer's buffers.
pub fn sorted_variables(vs: &VarStore) -> Vec<(String, Tensor)> {
    let sorted: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    sorted.into_iter().collect()
}

fn write_tensors(path: &Path, variables: &[(String, Tensor)]) -> Result<(), CheckpointError> {
    let temporary = atomic_file::temporary_path(path);
    let on_cpu: Vec<(String, Tensor)> = variables
        .iter()
        .map(|(n, t)| (n.clone(), t.to_device(Device::Cpu).contiguous()))
        .collect();
    Tensor::write_safetensors(&on_cpu, &temporary).map_err(tensors(path))?;
    // on disk before the rename, so a power cut leaves the old file or the new one, not a hole
    std::fs::File::open(&temporary)
        .and_then(|file| file.sync_all())
        .map_err(FileError::io(path))?;
    std::fs::rename(&temporary, path).map_err(FileError::io(path))?;
    Ok(())
}

/// Saves weights (and, when `sgd` is given, momentum) plus the state.
pub fn save(
    dir: &Path,
    name: &str,
    vs: &VarStore,
    sgd: Option<&Sgd>,
    state: &TrainerState,
) -> Result<(), CheckpointError> {
    std::fs::create_dir_all(dir).map_err(FileError::io(dir))?;
    let p = paths(dir, name);
    let variables = sorted_variables(vs);
    write_tensors(&p.weights, &variables)?;
    if let Some(sgd) = sgd {
        let buffers: Vec<(String, Tensor)> = variables
            .iter()
            .zip(&sgd.buffers)
            .filter_map(|((n, _), b)| b.as_ref().map(|b| (n.clone(), b.shallow_clone())))
            .collect();
        write_tensors(&p.optimizer, &buffers)?;
    }
    Ok(atomic_file::write_json(&p.state, state)?)
}

/// Saves the resume checkpoint (`checkpoint_latest` in the resume folder): the intact one before it
/// becomes `checkpoint_previous`, and the new one is sealed with checksums once complete.
pub fn save_latest(
    dir: &Path,
    vs: &VarStore,
    sgd: &Sgd,
    state: &TrainerState,
) -> Result<(), CheckpointError> {
    std::fs::create_dir_all(dir).map_err(FileError::io(dir))?;
    resume::begin_saving_latest(dir)?;
    save(dir, resume::LATEST, vs, Some(sgd), state)?;
    Ok(resume::finish_saving_latest(dir)?)
}

/// The trainer state of a resume checkpoint, without its tensors (to check what it belongs to
/// before loading anything).
pub fn read_state(slot: &Slot) -> Result<TrainerState, FileError> {
    atomic_file::read_json(&slot.files.state)
}

/// Loads trained weights into `vs` for prediction: nnflow's `checkpoint_final.safetensors` or
/// nnU-Net's `.pth` (read without torch, `nnflow::network::pth`). Every variable of the network
/// must be in the file with its shape; other names in the file (nnU-Net's aliases of the same
/// tensors) are ignored. Nothing is copied unless everything fits. Returns the axes an nnU-Net
/// checkpoint allows mirroring on (`inference_allowed_mirroring_axes`; nnflow's say none).
pub fn load_weights(path: &Path, vs: &mut VarStore) -> Result<Option<Vec<usize>>, CheckpointError> {
    load_weights_where(path, vs, |_| true)
}

/// nnU-Net's `load_pretrained_weights`, for fine-tuning: every variable but the segmentation
/// outputs (their classes may differ) from `path`, each with the network's shape.
pub fn load_pretrained(path: &Path, vs: &mut VarStore) -> Result<(), CheckpointError> {
    load_weights_where(path, vs, |name| !name.contains(".seg_layers.")).map(|_| ())
}

/// [`load_weights`] for the variables whose names `wanted` accepts.
fn load_weights_where(
    path: &Path,
    vs: &mut VarStore,
    wanted: impl Fn(&str) -> bool,
) -> Result<Option<Vec<usize>>, CheckpointError> {
    let (stored, mirror_axes): (BTreeMap<String, Tensor>, _) = if path.extension().is_some_and(|e| e == "pth")
    {
        let checkpoint = read_checkpoint(path)?;
        let weights = checkpoint
            .weights
            .into_iter()
            .map(|w| {
                let shape: Vec<i64> = w.shape.iter().map(|&d| d as i64).collect();
                (w.name, Tensor::from_slice(&w.values).reshape(&shape))
            })
            .collect();
        (weights, Some(checkpoint.mirror_axes))
    } else {
        let weights = Tensor::read_safetensors(path)
            .map_err(tensors(path))?
            .into_iter()
            .collect();
        (weights, None)
    };
    let variables: Vec<(String, Tensor)> = sorted_variables(vs)
        .into_iter()
        .filter(|(name, _)| wanted(name))
        .collect();
    for (name, variable) in &variables {
        match stored.get(name) {
            None => {
                return Err(CheckpointError::MissingTensor {
                    file: path.to_path_buf(),
                    name: name.clone(),
                })
            }
            Some(t) if t.size() != variable.size() => {
                return Err(CheckpointError::TensorShape {
                    file: path.to_path_buf(),
                    name: name.clone(),
                    stored: t.size(),
                    expected: variable.size(),
                })
            }
            Some(_) => {}
        }
    }
    tch::no_grad(|| {
        for (name, variable) in &variables {
            // a shallow clone: copying into it writes the VarStore's variable
            variable.shallow_clone().copy_(&stored[name]);
        }
    });
    Ok(mirror_axes)
}

/// Loads a resume checkpoint's weights into `vs` and momentum into `sgd`, all or nothing: both
/// files are read and checked against the network before anything is copied, so after a failed
/// load the network is still the freshly initialised one and falling back (or starting over) is
/// exact.
pub fn load(slot: &Slot, vs: &mut VarStore, sgd: &mut Sgd) -> Result<(), CheckpointError> {
    let read = |path: &Path| -> Result<BTreeMap<String, Tensor>, CheckpointError> {
        Ok(Tensor::read_safetensors(path)
            .map_err(tensors(path))?
            .into_iter()
            .collect())
    };
    let weights = read(&slot.files.weights)?;
    let momentum = read(&slot.files.optimizer)?;
    let variables = sorted_variables(vs);
    for (name, variable) in &variables {
        let fits = |file: &Path, stored: Option<&Tensor>, required: bool| match stored {
            None if required => Err(CheckpointError::MissingTensor {
                file: file.to_path_buf(),
                name: name.clone(),
            }),
            Some(t) if t.size() != variable.size() => Err(CheckpointError::TensorShape {
                file: file.to_path_buf(),
                name: name.clone(),
                stored: t.size(),
                expected: variable.size(),
            }),
            _ => Ok(()),
        };
        fits(&slot.files.weights, weights.get(name), true)?;
        // a variable without momentum had no SGD step yet
        fits(&slot.files.optimizer, momentum.get(name), false)?;
    }
    let device = vs.device();
    tch::no_grad(|| {
        for (name, variable) in &variables {
            // a shallow clone: copying into it writes the VarStore's variable
            variable.shallow_clone().copy_(&weights[name]);
        }
    });
    for ((name, _), slot) in variables.iter().zip(sgd.buffers.iter_mut()) {
        *slot = momentum.get(name).map(|b| b.to_device(device));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::Init;
    use tch::Kind;

    /// A two-variable network whose values are `offset + 0, 1, 2, ...`.
    fn tiny(offset: f64) -> VarStore {
        let vs = VarStore::new(Device::Cpu);
        let root = vs.root();
        let _ = (&root / "a").var("weight", &[2, 3], Init::Const(0.0));
        let _ = (&root / "b").var("bias", &[4], Init::Const(0.0));
        set(&vs, offset);
        vs
    }

    fn set(vs: &VarStore, offset: f64) {
        tch::no_grad(|| {
            for (_, variable) in sorted_variables(vs) {
                let values = Tensor::arange(variable.numel() as i64, (Kind::Float, Device::Cpu))
                    .view(variable.size().as_slice())
                    + offset;
                variable.shallow_clone().copy_(&values);
            }
        });
    }

    /// Momentum for the first variable only (the second had no step yet).
    fn sgd_with_momentum(vs: &VarStore, value: f64) -> Sgd {
        let mut sgd = Sgd::new(2, 0.99, 3e-5);
        let first = &sorted_variables(vs)[0].1;
        sgd.buffers[0] = Some(first.ones_like() * value);
        sgd
    }

    fn state(epochs_done: usize) -> TrainerState {
        TrainerState {
            identity: serde_json::json!({"fold": 0}),
            epochs_done,
            logs: Vec::new(),
            best_ema: Some(0.5),
            best_epoch: Some(0),
            scaler: LossScaler::default(),
        }
    }

    fn values(vs: &VarStore) -> Vec<Vec<f32>> {
        sorted_variables(vs)
            .iter()
            .map(|(_, t)| Vec::<f32>::try_from(t.flatten(0, -1)).unwrap())
            .collect()
    }

    #[test]
    fn weights_momentum_and_state_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let vs = tiny(1.0);
        save_latest(dir.path(), &vs, &sgd_with_momentum(&vs, 0.25), &state(3)).unwrap();

        let slot = Slot::new(dir.path(), resume::LATEST);
        slot.verify().unwrap();
        assert_eq!(read_state(&slot).unwrap(), state(3));
        let mut loaded = tiny(-5.0);
        let mut sgd = Sgd::new(2, 0.99, 3e-5);
        load(&slot, &mut loaded, &mut sgd).unwrap();
        assert_eq!(values(&loaded), values(&vs));
        let momentum = sgd.buffers[0].as_ref().expect("momentum of the first variable");
        assert_eq!(momentum.size(), vec![2, 3]);
        assert_eq!(momentum.min().double_value(&[]), 0.25);
        assert_eq!(momentum.max().double_value(&[]), 0.25);
        assert!(sgd.buffers[1].is_none(), "no momentum stays no momentum");
    }

    #[test]
    fn the_previous_latest_is_kept_and_used_when_the_latest_is_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let vs = tiny(1.0);
        save_latest(dir.path(), &vs, &sgd_with_momentum(&vs, 0.25), &state(1)).unwrap();
        set(&vs, 10.0);
        save_latest(dir.path(), &vs, &sgd_with_momentum(&vs, 0.5), &state(2)).unwrap();

        let previous = Slot::new(dir.path(), resume::PREVIOUS);
        previous.verify().unwrap();
        assert_eq!(read_state(&previous).unwrap().epochs_done, 1);
        let latest = Slot::new(dir.path(), resume::LATEST);
        assert_eq!(read_state(&latest).unwrap().epochs_done, 2);

        // a truncated latest weights file: resuming falls back to the previous checkpoint
        let weights = std::fs::read(&latest.files.weights).unwrap();
        std::fs::write(&latest.files.weights, &weights[..weights.len() / 2]).unwrap();
        let mut loaded = tiny(0.0);
        let mut sgd = Sgd::new(2, 0.99, 3e-5);
        let mut log = Vec::new();
        let (resumed, slot) = resume::resume(
            dir.path(),
            |slot| {
                let state = read_state(slot)?;
                load(slot, &mut loaded, &mut sgd)?;
                Ok::<_, CheckpointError>(Some(state))
            },
            |line| log.push(line.to_string()),
        )
        .expect("the previous checkpoint is intact");
        assert_eq!((resumed.epochs_done, slot), (1, resume::PREVIOUS));
        assert_eq!(values(&loaded), values(&tiny(1.0)));
        assert_eq!(sgd.buffers[0].as_ref().unwrap().max().double_value(&[]), 0.25);
        assert_eq!(log.len(), 1, "{log:?}");
        assert!(log[0].contains(resume::LATEST), "{log:?}");
    }

    /// A checkpoint of another network is refused before anything is copied.
    #[test]
    fn a_mismatched_checkpoint_leaves_the_network_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let other = VarStore::new(Device::Cpu);
        let _ = (other.root() / "a").var("weight", &[3, 2], Init::Const(1.0));
        let _ = (other.root() / "b").var("bias", &[4], Init::Const(1.0));
        save_latest(dir.path(), &other, &Sgd::new(2, 0.99, 3e-5), &state(1)).unwrap();

        let mut vs = tiny(7.0);
        let mut sgd = sgd_with_momentum(&vs, 0.25);
        let error = load(&Slot::new(dir.path(), resume::LATEST), &mut vs, &mut sgd)
            .unwrap_err()
            .to_string();
        assert!(error.contains("a.weight has shape [3, 2]"), "{error}");
        assert_eq!(values(&vs), values(&tiny(7.0)));
        assert!(sgd.buffers[0].is_some());
    }

    /// An epoch whose pseudo Dice is NaN (a class never seen in validation) survives the checkpoint
    /// state's JSON; before, it was written as `null` and the state could not be read back.
    #[test]
    fn an_epoch_with_nan_figures_round_trips() {
        let record = EpochRecord {
            epoch: 3,
            train_loss: 0.5,
            val_loss: f64::NAN,
            pseudo_dice: vec![0.9, f64::NAN],
            mean_pseudo_dice: f64::NAN,
            ema_pseudo_dice: 0.4,
            learning_rate: 0.01,
            epoch_seconds: 1.0,
        };
        let text = serde_json::to_string(&record).unwrap();
        let back: EpochRecord = serde_json::from_str(&text).unwrap();
        assert!(back.val_loss.is_nan() && back.mean_pseudo_dice.is_nan());
        assert_eq!(back.pseudo_dice[0], 0.9);
        assert!(back.pseudo_dice[1].is_nan());
        assert_eq!((back.epoch, back.train_loss, back.ema_pseudo_dice), (3, 0.5, 0.4));
    }

    /// An encoder variable and a segmentation output of `classes` classes, valued `offset + i`.
    fn with_classes(classes: i64, offset: f64) -> VarStore {
        let vs = VarStore::new(Device::Cpu);
        let root = vs.root();
        let _ = (&root / "encoder" / "stages" / 0).var("weight", &[2, 3], Init::Const(0.0));
        let _ = (&root / "decoder" / "seg_layers" / 0).var("weight", &[classes, 2], Init::Const(0.0));
        set(&vs, offset);
        vs
    }

    #[test]
    fn pretrained_weights_are_all_but_the_segmentation_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pretrained.safetensors");
        let trained = with_classes(3, 100.0);
        Tensor::write_safetensors(&sorted_variables(&trained), &file).unwrap();

        // another task with two classes: the encoder comes from the file, the outputs stay fresh
        let mut fine_tuned = with_classes(2, 0.0);
        let fresh = values(&fine_tuned);
        load_pretrained(&file, &mut fine_tuned).unwrap();
        let loaded = values(&fine_tuned);
        assert_eq!(loaded[1], values(&trained)[1], "encoder.stages.0.weight");
        assert_eq!(loaded[0], fresh[0], "decoder.seg_layers.0.weight");

        // loading for prediction takes everything, so the outputs' shapes must fit
        let error = load_weights(&file, &mut with_classes(2, 0.0))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("decoder.seg_layers.0.weight has shape [3, 2]"),
            "{error}"
        );

        // a different encoder is named, not loaded
        let vs = VarStore::new(Device::Cpu);
        let _ = (&vs.root() / "encoder" / "stages" / 0).var("weight", &[2, 4], Init::Const(0.0));
        let mut other = vs;
        let error = load_pretrained(&file, &mut other).unwrap_err().to_string();
        assert!(
            error.contains("encoder.stages.0.weight has shape [2, 3], the network's is [2, 4]"),
            "{error}"
        );
        let vs = VarStore::new(Device::Cpu);
        let _ = (&vs.root() / "encoder" / "stages" / 1).var("weight", &[2, 3], Init::Const(0.0));
        let mut missing = vs;
        let error = load_pretrained(&file, &mut missing).unwrap_err().to_string();
        assert!(error.contains("no tensor encoder.stages.1.weight"), "{error}");
    }
}
