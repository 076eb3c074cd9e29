//! Training checkpoints: weights as safetensors under nnU-Net's parameter names, the optimizer's
//! momentum buffers as a second safetensors file, and the trainer state as JSON. The JSON is
//! written last and names the epoch, so a checkpoint is complete exactly when its JSON exists; each
//! file goes through a temporary name and a rename.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{nn::VarStore, Device, Tensor};

use nnflow::atomic_file;

use crate::optim::{LossScaler, Sgd};

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
pub struct EpochRecord {
    pub epoch: usize,
    pub train_loss: f64,
    pub val_loss: f64,
    pub pseudo_dice: Vec<f64>,
    pub mean_pseudo_dice: f64,
    pub ema_pseudo_dice: f64,
    pub learning_rate: f64,
    pub epoch_seconds: f64,
}

pub struct CheckpointPaths {
    pub weights: PathBuf,
    pub optimizer: PathBuf,
    pub state: PathBuf,
}

pub fn paths(dir: &Path, name: &str) -> CheckpointPaths {
    CheckpointPaths {
        weights: dir.join(format!("{name}.safetensors")),
        optimizer: dir.join(format!("{name}.optimizer.safetensors")),
        state: dir.join(format!("{name}.json")),
    }
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

/// Loads the weights of a checkpoint into `vs` (names must match exactly).
pub fn load_weights(vs: &mut VarStore, path: &Path) -> Result<(), String> {
    vs.load(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Loads a complete checkpoint: weights into `vs`, momentum into `sgd`, and the state.
pub fn load(dir: &Path, name: &str, vs: &mut VarStore, sgd: &mut Sgd) -> Result<TrainerState, String> {
    let p = paths(dir, name);
    let state: TrainerState = atomic_file::read_json(&p.state)?;
    load_weights(vs, &p.weights)?;
    let buffers: BTreeMap<String, Tensor> = Tensor::read_safetensors(&p.optimizer)
        .map_err(|e| format!("{}: {e}", p.optimizer.display()))?
        .into_iter()
        .collect();
    let device = vs.device();
    for ((name, _), slot) in sorted_variables(vs).iter().zip(sgd.buffers.iter_mut()) {
        *slot = buffers.get(name).map(|b| b.to_device(device));
    }
    Ok(state)
}
