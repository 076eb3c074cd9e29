//! Training checkpoints: weights as safetensors under nnU-Net's parameter names, the optimizer's
//! momentum buffers as a second safetensors file, and the trainer state as JSON. The JSON is
//! written last and names the epoch; each file goes through a temporary name and a rename. Resume
//! checkpoints are also checksummed and kept in two generations (`nnflow::train::resume`).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{nn::VarStore, Device, Tensor};

use nnflow::atomic_file;
pub use nnflow::train::resume::paths;
use nnflow::train::resume::{self, Slot};

use crate::optim::{LossScaler, Sgd};
use nnflow::json_numbers::{nan_as_null, nan_as_null_vec};

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

fn write_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<(), String> {
    let temporary = atomic_file::temporary_path(path);
    let on_cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.to_device(Device::Cpu).contiguous()))
        .collect();
    Tensor::write_safetensors(&on_cpu, &temporary).map_err(|e| format!("{}: {e}", path.display()))?;
    // on disk before the rename, so a power cut leaves the old file or the new one, not a hole
    std::fs::File::open(&temporary)
        .and_then(|file| file.sync_all())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::rename(&temporary, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Saves weights (and, when `sgd` is given, momentum) plus the state.
pub fn save(
    dir: &Path,
    name: &str,
    vs: &VarStore,
    sgd: Option<&Sgd>,
    state: &TrainerState,
) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
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
    atomic_file::write_json(&p.state, state)
}

/// Saves the resume checkpoint (`checkpoint_latest` in the resume folder): the intact one before it
/// becomes `checkpoint_previous`, and the new one is sealed with checksums once complete.
pub fn save_latest(dir: &Path, vs: &VarStore, sgd: &Sgd, state: &TrainerState) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    resume::begin_saving_latest(dir)?;
    save(dir, resume::LATEST, vs, Some(sgd), state)?;
    resume::finish_saving_latest(dir)
}

/// The trainer state of a resume checkpoint, without its tensors (to check what it belongs to
/// before loading anything).
pub fn read_state(slot: &Slot) -> Result<TrainerState, String> {
    atomic_file::read_json(&slot.files.state)
}

/// Loads a resume checkpoint's weights into `vs` and momentum into `sgd`, all or nothing: both
/// files are read and checked against the network before anything is copied, so after a failed
/// load the network is still the freshly initialised one and falling back (or starting over) is
/// exact.
pub fn load(slot: &Slot, vs: &mut VarStore, sgd: &mut Sgd) -> Result<(), String> {
    let read = |path: &Path| -> Result<BTreeMap<String, Tensor>, String> {
        Ok(Tensor::read_safetensors(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .into_iter()
            .collect())
    };
    let weights = read(&slot.files.weights)?;
    let momentum = read(&slot.files.optimizer)?;
    let variables = sorted_variables(vs);
    for (name, variable) in &variables {
        let fits = |file: &Path, stored: Option<&Tensor>, required: bool| match stored {
            None if required => Err(format!("{}: no tensor {name}", file.display())),
            Some(t) if t.size() != variable.size() => Err(format!(
                "{}: {name} has shape {:?}, the network's is {:?}",
                file.display(),
                t.size(),
                variable.size()
            )),
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
}
