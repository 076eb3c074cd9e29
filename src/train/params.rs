//! The `train` stage's parameters: every hyperparameter of nnU-Net's trainer, typed, with nnU-Net
//! v2's defaults, so customising training needs a pipeline file rather than a Python subclass.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::augment::Pipeline;
use crate::torch_env::DeviceChoice;
use crate::train::TrainError;

fn default_epochs() -> usize {
    1000
}
fn default_iterations() -> usize {
    250
}
fn default_val_iterations() -> usize {
    50
}
fn default_lr() -> f64 {
    1e-2
}
fn default_weight_decay() -> f64 {
    3e-5
}
fn default_momentum() -> f64 {
    0.99
}
fn default_grad_clip() -> f64 {
    12.0
}
fn default_true() -> bool {
    true
}
fn default_oversample() -> f64 {
    0.33
}
fn default_checkpoint_every() -> usize {
    50
}
fn default_step_size() -> f64 {
    0.5
}
fn default_fold() -> FoldParam {
    FoldParam::Index(0)
}

/// A fold number or `"all"`.
#[derive(Deserialize, Serialize, JsonSchema, Debug, Clone, PartialEq)]
#[serde(untagged)]
pub enum FoldParam {
    Index(usize),
    Name(String),
}

impl FoldParam {
    pub fn text(&self) -> String {
        match self {
            FoldParam::Index(i) => i.to_string(),
            FoldParam::Name(s) => s.clone(),
        }
    }
}

/// Weights of the two loss terms.
#[derive(Deserialize, Serialize, JsonSchema, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LossWeights {
    #[serde(default = "one")]
    pub dice: f64,
    #[serde(default = "one")]
    pub ce: f64,
}

fn one() -> f64 {
    1.0
}

impl Default for LossWeights {
    fn default() -> Self {
        LossWeights { dice: 1.0, ce: 1.0 }
    }
}

#[derive(Deserialize, Serialize, JsonSchema, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainParams {
    /// The dataset folder in nnU-Net's raw layout (dataset.json: labels, ignore label, channels).
    #[serde(skip_serializing)]
    pub dataset: String,
    /// The plan stage's outputs folder (holding plans.json): `${plan.outputs}`.
    #[serde(skip_serializing)]
    pub plan: String,
    /// The preprocessed cases of this configuration: `${resample.outputs}`.
    #[serde(skip_serializing)]
    pub preprocessed: String,
    /// The planned configuration to train, e.g. `3d_fullres` (one of nnU-Net's: 2d, 3d_fullres,
    /// 3d_lowres, 3d_cascade_fullres).
    #[serde(deserialize_with = "crate::preprocess::plan::deserialize_configuration")]
    pub configuration: String,
    /// The cascade's second stage only (`3d_cascade_fullres`): the outputs of the previous stage's
    /// trainings, `${train[configuration=3d_lowres].outputs}`. Their predictions of the held-out
    /// cases, on this configuration's grid, become extra input channels.
    #[serde(default, skip_serializing)]
    pub previous_stage: Vec<String>,
    /// Cross-validation fold (0-based) or `"all"` (train on every case).
    #[serde(default = "default_fold")]
    pub fold: FoldParam,
    /// A splits file in nnU-Net's `splits_final.json` format; without it, nnU-Net's seeded 5-fold
    /// split of the sorted case ids.
    #[serde(default, skip_serializing)]
    pub splits: Option<String>,
    /// Start from these weights instead of a random initialisation (nnU-Net's
    /// `-pretrained_weights`, for fine-tuning): a checkpoint file, nnU-Net's `.pth` or nnflow's
    /// `checkpoint_final.safetensors`. Every parameter but the segmentation outputs
    /// (`.seg_layers.`) is taken from it and must have the network's shape.
    #[serde(default, skip_serializing)]
    pub pretrained_weights: Option<String>,
    #[serde(default = "default_epochs")]
    pub epochs: usize,
    #[serde(default = "default_iterations")]
    pub iterations_per_epoch: usize,
    #[serde(default = "default_val_iterations")]
    pub val_iterations: usize,
    /// Default: the plan's.
    #[serde(default)]
    pub batch_size: Option<usize>,
    /// Default: the plan's. Changing it also changes the augmentation's geometry.
    #[serde(default)]
    pub patch_size: Option<Vec<usize>>,
    #[serde(default = "default_lr")]
    pub learning_rate: f64,
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    /// SGD momentum (Nesterov).
    #[serde(default = "default_momentum")]
    pub momentum: f64,
    /// Gradient norm clipping threshold.
    #[serde(default = "default_grad_clip")]
    pub grad_clip: f64,
    #[serde(default)]
    pub loss: LossWeights,
    #[serde(default = "default_true")]
    pub deep_supervision: bool,
    /// Share of each batch forced to contain foreground (nnU-Net: the last third).
    #[serde(default = "default_oversample")]
    pub oversample_foreground: f64,
    /// The augmentation list (see the transforms' parameters); default: nnU-Net v2's list for
    /// the patch size, in nnU-Net's order.
    #[serde(default)]
    pub augment: Option<Pipeline>,
    #[serde(default)]
    pub device: DeviceChoice,
    /// Mixed precision (fp16 autocast with dynamic loss scaling) on CUDA; ignored on CPU.
    #[serde(default = "default_true")]
    pub amp: bool,
    /// Seeds the network's initialisation, the patch sampling and every augmentation.
    #[serde(default)]
    pub seed: u64,
    /// Epochs between resumable checkpoints.
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: usize,
    /// Stop when the moving-average pseudo Dice has not improved for this many epochs (off when
    /// absent, as in nnU-Net).
    #[serde(default)]
    pub early_stopping: Option<usize>,
    /// Sliding-window step (fraction of the patch) of the final validation.
    #[serde(default = "default_step_size")]
    pub validation_step_size: f64,
    /// Mirroring test-time augmentation in the final validation (nnU-Net: on).
    #[serde(default = "default_true")]
    pub validation_mirroring: bool,
    /// Keep the held-out cases' probabilities (`validation/<case>.npy`), which ensembling needs
    /// (nnU-Net's `--npz`).
    #[serde(default = "default_true")]
    pub save_probabilities: bool,
}

impl TrainParams {
    pub fn validate(&self) -> Result<(), TrainError> {
        let mut problems = Vec::new();
        if self.epochs == 0 || self.iterations_per_epoch == 0 {
            problems.push("`epochs` and `iterations_per_epoch` must be positive".to_string());
        }
        if self.batch_size == Some(0) {
            problems.push("`batch_size` must be positive".into());
        }
        if let Some(p) = &self.patch_size {
            if !(p.len() == 2 || p.len() == 3) || p.contains(&0) {
                problems.push(format!(
                    "`patch_size` must have 2 or 3 positive entries, got {p:?}"
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.oversample_foreground) {
            problems.push("`oversample_foreground` must lie in [0, 1]".into());
        }
        if !(self.validation_step_size > 0.0 && self.validation_step_size <= 1.0) {
            problems.push("`validation_step_size` must lie in (0, 1]".into());
        }
        if self.checkpoint_every == 0 {
            problems.push("`checkpoint_every` must be positive".into());
        }
        if let FoldParam::Name(name) = &self.fold {
            if name != "all" && name.parse::<usize>().is_err() {
                problems.push(format!("`fold` must be a number or \"all\", got {name:?}"));
            }
        }
        if let Some(pipeline) = &self.augment {
            if let Err(e) = pipeline.validate() {
                problems.push(format!("`augment`: {e}"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(TrainError::InvalidParams { problems })
        }
    }

    /// The parameters that define what a checkpoint is a checkpoint of: everything except how long
    /// to train and how to validate at the end. A run whose identity matches a stored checkpoint
    /// continues from it (after a kill, or when `epochs` grows).
    pub fn resume_identity(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).expect("parameters serialize");
        if let Some(map) = value.as_object_mut() {
            for key in [
                "epochs",
                "early_stopping",
                "validation_step_size",
                "validation_mirroring",
                "checkpoint_every",
            ] {
                map.remove(key);
            }
        }
        value
    }
}
