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
    #[error(
        "{}: holds {name} (shape {shape:?}), which is no weight of the network the plan describes",
        .file.display()
    )]
    UnexpectedTensor {
        file: PathBuf,
        name: String,
        shape: Vec<i64>,
    },
    /// An nnU-Net checkpoint of a trainer known to build another network.
    #[error("{}: {source}", .file.display())]
    Trainer {
        file: PathBuf,
        source: nnflow::inference::trainers::RefusedTrainer,
    },
    /// The weights of an nnU-Net checkpoint do not fit the plan's network (a trainer that changes
    /// the network, or another model's checkpoint).
    #[error(
        "{source} (trained by {trainer}{})",
        if nnflow::inference::trainers::is_training_only(trainer) {
            ""
        } else {
            ", a trainer nnflow does not know: does it change the network?"
        }
    )]
    NotThePlansNetwork {
        trainer: String,
        source: Box<CheckpointError>,
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
    /// Seconds of the epoch spent waiting for batches (absent in checkpoints written before it was
    /// recorded).
    #[serde(default)]
    pub data_wait_seconds: f64,
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

/// What a checkpoint says besides its weights.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Loaded {
    /// An nnU-Net checkpoint's `inference_allowed_mirroring_axes` (empty: none); `None` for
    /// nnflow's, whose training records them in `fold.json`.
    pub mirror_axes: Option<Vec<usize>>,
    /// An nnU-Net checkpoint's `trainer_name`.
    pub trainer: Option<String>,
}

/// Loads trained weights into `vs` for prediction: nnflow's `checkpoint_final.safetensors` or
/// nnU-Net's `.pth` (read without torch, `nnflow::network::pth`). An nnU-Net checkpoint of a
/// trainer known to build another network is refused by name
/// ([`nnflow::inference::trainers`]). The file must hold exactly the network's weights: every
/// variable with its shape, and nothing else but PyTorch's aliases of them (see [`alias_of`]),
/// so the weights of a network the plan does not describe (a trainer nnflow does not know that
/// changes it) are named rather than half loaded. Nothing is copied unless everything fits.
pub fn load_weights(path: &Path, vs: &mut VarStore) -> Result<Loaded, CheckpointError> {
    // the trainer first: a network nnflow does not build may hold tensors it cannot even read
    if let Some(trainer) = pth_trainer(path) {
        nnflow::inference::trainers::check_trainer(&trainer).map_err(|source| CheckpointError::Trainer {
            file: path.to_path_buf(),
            source,
        })?;
    }
    let (stored, loaded) = read_weights(path)?;
    let variables = sorted_variables(vs);
    let fits =
        check_fit(path, &stored, &variables).and_then(|()| check_nothing_left(path, &stored, &variables));
    if let Err(error) = fits {
        return Err(match &loaded.trainer {
            Some(trainer) => CheckpointError::NotThePlansNetwork {
                trainer: trainer.clone(),
                source: Box::new(error),
            },
            None => error,
        });
    }
    copy_into(&variables, &stored);
    Ok(loaded)
}

/// nnU-Net's `load_pretrained_weights`, for fine-tuning: every variable but the segmentation
/// outputs (their classes may differ) from `path`, each with the network's shape; other tensors in
/// the file are ignored, as nnU-Net does.
pub fn load_pretrained(path: &Path, vs: &mut VarStore) -> Result<(), CheckpointError> {
    let (stored, _) = read_weights(path)?;
    let variables: Vec<(String, Tensor)> = sorted_variables(vs)
        .into_iter()
        .filter(|(name, _)| !name.contains(".seg_layers."))
        .collect();
    check_fit(path, &stored, &variables)?;
    copy_into(&variables, &stored);
    Ok(())
}

/// The `trainer_name` of an nnU-Net checkpoint, read from its pickle alone (no tensor data);
/// `None` for other files, which [`read_weights`] then describes.
fn pth_trainer(path: &Path) -> Option<String> {
    if path.extension().is_none_or(|e| e != "pth") {
        return None;
    }
    match pytorch_reader::PytorchReader::read_pickle_data(path, Some("trainer_name")) {
        Ok(pytorch_reader::PickleValue::String(name)) => Some(name),
        _ => None,
    }
}

/// The tensors of a weights file by name, on the CPU, and what an nnU-Net checkpoint says
/// besides.
fn read_weights(path: &Path) -> Result<(BTreeMap<String, Tensor>, Loaded), CheckpointError> {
    if path.extension().is_some_and(|e| e == "pth") {
        let checkpoint = read_checkpoint(path)?;
        let weights = checkpoint
            .weights
            .into_iter()
            .map(|w| {
                let shape: Vec<i64> = w.shape.iter().map(|&d| d as i64).collect();
                (w.name, Tensor::from_slice(&w.values).reshape(&shape))
            })
            .collect();
        let loaded = Loaded {
            mirror_axes: Some(checkpoint.mirror_axes),
            trainer: Some(checkpoint.trainer_name),
        };
        Ok((weights, loaded))
    } else {
        let weights = Tensor::read_safetensors(path)
            .map_err(tensors(path))?
            .into_iter()
            .collect();
        Ok((weights, Loaded::default()))
    }
}

/// Every variable is in `stored` with its shape; the first that is not is named.
fn check_fit(
    path: &Path,
    stored: &BTreeMap<String, Tensor>,
    variables: &[(String, Tensor)],
) -> Result<(), CheckpointError> {
    for (name, variable) in variables {
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
    Ok(())
}

/// Every tensor of `stored` is a variable or an alias of one; the first (by name) that is
/// neither is named.
fn check_nothing_left(
    path: &Path,
    stored: &BTreeMap<String, Tensor>,
    variables: &[(String, Tensor)],
) -> Result<(), CheckpointError> {
    let names: Vec<String> = variables.iter().map(|(name, _)| name.clone()).collect();
    let aliases = alias_map(&names);
    for (name, tensor) in stored {
        if names.contains(name) || alias_of(name, tensor, stored, &aliases).is_some() {
            continue;
        }
        return Err(CheckpointError::UnexpectedTensor {
            file: path.to_path_buf(),
            name: name.clone(),
            shape: tensor.size(),
        });
    }
    Ok(())
}

/// PyTorch's other names of the variables `names` (alias -> variable), as nnU-Net's state dicts
/// list them ([`nnflow::network::state_dict::nnunet_aliases`]).
fn alias_map(names: &[String]) -> BTreeMap<String, String> {
    nnflow::network::state_dict::nnunet_aliases(names)
        .into_iter()
        .collect()
}

/// The variable `name` is another name of in PyTorch's state dict, where its tensor is that
/// variable's (same shape and values in the file).
fn alias_of<'a>(
    name: &str,
    tensor: &Tensor,
    stored: &BTreeMap<String, Tensor>,
    aliases: &'a BTreeMap<String, String>,
) -> Option<&'a str> {
    let variable = aliases.get(name)?;
    let canonical = stored.get(variable)?;
    (canonical.size() == tensor.size() && canonical.equal(tensor)).then_some(variable.as_str())
}

/// Copies the stored tensors into the (checked) variables.
fn copy_into(variables: &[(String, Tensor)], stored: &BTreeMap<String, Tensor>) {
    tch::no_grad(|| {
        for (name, variable) in variables {
            // a shallow clone: copying into it writes the VarStore's variable
            variable.shallow_clone().copy_(&stored[name]);
        }
    });
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
            data_wait_seconds: 0.25,
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

    /// `tests/fixtures/<folder>/<name>` (torch wrote them: `generate.py` there).
    fn fixture(folder: &str, name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(folder)
            .join(name)
    }

    /// The toy network of tests/fixtures/pth/generate.py under its canonical names, without the
    /// variables `leave_out` names.
    fn toy(leave_out: &[&str]) -> VarStore {
        let vs = VarStore::new(Device::Cpu);
        let add = |name: String, shape: &[i64]| {
            if leave_out.contains(&name.as_str()) {
                return;
            }
            let mut path = vs.root();
            let parts: Vec<&str> = name.split('.').collect();
            for part in &parts[..parts.len() - 1] {
                path = &path / *part;
            }
            let _ = path.var(parts[parts.len() - 1], shape, Init::Const(0.0));
        };
        for (stage, (cin, cout)) in [(1, 2), (2, 3)].into_iter().enumerate() {
            let block = format!("encoder.stages.{stage}");
            add(format!("{block}.conv.weight"), &[cout, cin, 3, 3, 3]);
            add(format!("{block}.conv.bias"), &[cout]);
            add(format!("{block}.norm.weight"), &[cout]);
            add(format!("{block}.norm.bias"), &[cout]);
        }
        add("decoder.seg_layers.0.weight".into(), &[2, 3, 1, 1, 1]);
        add("decoder.seg_layers.0.bias".into(), &[2]);
        vs
    }

    /// nnU-Net's checkpoints list each tensor under several names; they load into the network's
    /// canonical variables with torch's values, and say their trainer and mirroring axes.
    #[test]
    fn an_nnunet_checkpoint_loads_with_its_aliases() {
        let expected: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture("pth", "expected.json")).unwrap()).unwrap();
        for (file, trainer, axes) in [
            ("nnunet_like.pth", "nnUNetTrainerToy", vec![0, 1, 2]),
            ("dtypes.pth", "nnUNetTrainerNoMirroring", vec![]),
        ] {
            let mut vs = toy(&[]);
            let loaded = load_weights(&fixture("pth", file), &mut vs).unwrap();
            assert_eq!(loaded.trainer.as_deref(), Some(trainer), "{file}");
            assert_eq!(loaded.mirror_axes, Some(axes), "{file}");
            for (name, variable) in sorted_variables(&vs) {
                let values: Vec<f32> =
                    serde_json::from_value(expected[file]["weights"][&name]["values"].clone()).unwrap();
                assert_eq!(
                    Vec::<f32>::try_from(variable.flatten(0, -1)).unwrap(),
                    values,
                    "{file} {name}"
                );
            }
        }
    }

    /// A checkpoint holding a tensor the network has not (here: the network lacks the segmentation
    /// bias, as if the trainer had built another network) is refused, the tensor named.
    #[test]
    fn a_tensor_the_network_has_not_is_named() {
        let mut vs = toy(&["decoder.seg_layers.0.bias"]);
        let error = load_weights(&fixture("pth", "nnunet_like.pth"), &mut vs).unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains("nnunet_like.pth: holds decoder.seg_layers.0.bias (shape [2])"),
            "{message}"
        );
        assert!(
            message.contains("trained by nnUNetTrainerToy, a trainer nnflow does not know"),
            "{message}"
        );
        assert_eq!(
            values(&vs),
            values(&toy(&["decoder.seg_layers.0.bias"])),
            "nothing copied"
        );

        // a known trainer: the mismatch is named without guessing at the trainer
        let mut vs = toy(&["decoder.seg_layers.0.bias"]);
        let message = load_weights(&fixture("pth", "dtypes.pth"), &mut vs)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("(trained by nnUNetTrainerNoMirroring)"),
            "{message}"
        );

        // nnflow's own checkpoints: exactly the variables
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("checkpoint_final.safetensors");
        let mut variables = sorted_variables(&tiny(1.0));
        variables.push((
            "c.running_mean".into(),
            Tensor::zeros([4], (Kind::Float, Device::Cpu)),
        ));
        Tensor::write_safetensors(&variables, &file).unwrap();
        let error = load_weights(&file, &mut tiny(0.0)).unwrap_err();
        assert!(
            matches!(&error, CheckpointError::UnexpectedTensor { name, shape, .. }
                if name == "c.running_mean" && shape == &[4]),
            "{error}"
        );
        // a missing weight is named too
        let error = load_weights(&fixture("pth", "nnunet_like.pth"), &mut tiny(0.0)).unwrap_err();
        assert!(error.to_string().contains("no tensor a.weight"), "{error}");
    }

    /// nnUNetTrainerBN's checkpoint (BatchNorm, with an int64 buffer nnflow cannot even read) is
    /// refused by its trainer's name, with the reason.
    #[test]
    fn a_trainer_that_builds_another_network_is_refused_by_name() {
        let path = fixture("pth", "int_buffer.pth");
        let error = load_weights(&path, &mut toy(&[])).unwrap_err();
        assert!(matches!(error, CheckpointError::Trainer { .. }), "{error}");
        let message = error.to_string();
        assert!(message.starts_with(&path.display().to_string()), "{message}");
        assert!(
            message
                .contains("trainer nnUNetTrainerBN replaces instance normalization with batch normalization"),
            "{message}"
        );
    }

    /// An alias is accepted only as another name of the same tensor.
    #[test]
    fn an_alias_must_hold_its_variables_values() {
        let vs = VarStore::new(Device::Cpu);
        let block = vs.root() / "encoder" / "stages" / 0 / 0 / "convs" / 0;
        let _ = (&block / "conv").var("weight", &[2, 1, 3], Init::Const(0.0));
        let _ = (&block / "conv").var("bias", &[2], Init::Const(0.0));
        let _ = (&block / "norm").var("bias", &[2], Init::Const(0.0));
        let mut vs = vs;
        let full = |value: f64, shape: &[i64]| Tensor::full(shape, value, (Kind::Float, Device::Cpu));
        let base = "encoder.stages.0.0.convs.0";
        let mut stored = vec![
            (format!("{base}.conv.weight"), full(1.0, &[2, 1, 3])),
            (format!("{base}.conv.bias"), full(2.0, &[2])),
            (format!("{base}.norm.bias"), full(3.0, &[2])),
            (format!("{base}.all_modules.0.weight"), full(1.0, &[2, 1, 3])),
            (format!("{base}.all_modules.0.bias"), full(2.0, &[2])),
            (format!("{base}.all_modules.1.bias"), full(3.0, &[2])),
            (format!("decoder.{base}.conv.bias"), full(2.0, &[2])),
            (format!("decoder.{base}.all_modules.1.bias"), full(3.0, &[2])),
        ];
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("w.safetensors");
        Tensor::write_safetensors(&stored, &file).unwrap();
        load_weights(&file, &mut vs).unwrap();
        assert_eq!(values(&vs)[0], [2.0, 2.0], "conv.bias (sorted first)");

        // the same name with other values is no alias
        stored[7].1 = full(4.0, &[2]);
        Tensor::write_safetensors(&stored, &file).unwrap();
        let error = load_weights(&file, &mut vs).unwrap_err();
        assert!(
            matches!(&error, CheckpointError::UnexpectedTensor { name, .. }
                if name == &format!("decoder.{base}.all_modules.1.bias")),
            "{error}"
        );
    }

    /// Every name nnU-Net 2.8.1's state dicts give besides the canonical ones
    /// (tests/fixtures/network: PlainConvUNet and ResidualEncoderUNet, 2D and 3D, each entry with
    /// the canonical name it is an alias of) is recognised as that alias.
    #[test]
    fn every_alias_of_nnunets_networks_is_recognised() {
        for case in [
            "a_small_3d_iso",
            "c_small_2d",
            "resenc_small_3d",
            "resenc_stem_2d",
        ] {
            let text = std::fs::read_to_string(fixture("network", &format!("{case}.json"))).unwrap();
            let json: serde_json::Value = serde_json::from_str(&text).unwrap();
            let entries = json["state_dict"].as_array().unwrap();
            let shape =
                |e: &serde_json::Value| -> Vec<i64> { serde_json::from_value(e["shape"].clone()).unwrap() };
            let mut stored = BTreeMap::new();
            // a value of its own for every canonical tensor, so conv and norm biases differ
            for (i, e) in entries.iter().filter(|e| e["alias_of"].is_null()).enumerate() {
                let name = e["name"].as_str().unwrap().to_string();
                stored.insert(
                    name,
                    Tensor::full(shape(e).as_slice(), i as f64, (Kind::Float, Device::Cpu)),
                );
            }
            let aliases_of_variables = alias_map(&stored.keys().cloned().collect::<Vec<_>>());
            let variables: Vec<(String, Tensor)> = stored
                .iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect();
            let mut aliases = 0;
            for e in entries.iter().filter(|e| !e["alias_of"].is_null()) {
                let of = e["alias_of"].as_str().unwrap();
                let tensor = stored[of].copy();
                assert_eq!(
                    alias_of(
                        e["name"].as_str().unwrap(),
                        &tensor,
                        &stored,
                        &aliases_of_variables
                    ),
                    Some(of),
                    "{case}: {}",
                    e["name"]
                );
                aliases += 1;
            }
            assert!(aliases > 100, "{case}: {aliases} aliases");
            check_nothing_left(Path::new(case), &stored, &variables).unwrap();
        }
    }
}
