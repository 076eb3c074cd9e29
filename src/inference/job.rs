//! The job the `predict` stage hands the `nnflow-torch` worker (paths absolute). Kept apart from
//! the worker's code so the engine binary links no libtorch.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::torch_env::DeviceChoice;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PredictJob {
    /// Cases to predict: id and one image per channel.
    pub cases: Vec<(String, Vec<PathBuf>)>,
    /// The dataset folder (dataset.json: channels, labels or regions, file ending).
    pub dataset: PathBuf,
    /// plans.json.
    pub plans: PathBuf,
    /// One model per configuration of the ensemble (one for a single configuration), preceded by
    /// the previous stage of any cascade among them.
    pub models: Vec<ModelJob>,
    /// postprocessing.json from the `postprocess` stage, if any.
    pub postprocessing: Option<PathBuf>,
    /// Where the NIfTI predictions go.
    pub output: PathBuf,
    pub step_size: f64,
    pub mirroring: bool,
    pub device: DeviceChoice,
    pub amp: bool,
    pub threads: usize,
    /// Also write each case's probabilities (`<case>.npy`, classes x z x y x, original grid).
    pub save_probabilities: bool,
    /// nnU-Net's `-prev_stage_predictions`: a folder of `<case><file ending>` segmentations of the
    /// input images that a cascade's second stage takes as its previous stage's, instead of
    /// predicting that stage (whose model then need not be among `models`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_stage_predictions: Option<PathBuf>,
}

/// A configuration and the weights of its folds (averaged, as nnU-Net does).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelJob {
    pub configuration: String,
    /// The model's own plans.json (a model trained by nnU-Net brings its own); the job's when
    /// absent.
    #[serde(default)]
    pub plans: Option<PathBuf>,
    /// nnflow's `checkpoint_final.safetensors` or nnU-Net's `checkpoint_*.pth`, one per fold. An
    /// nnU-Net checkpoint also says which axes mirroring may flip
    /// (`inference_allowed_mirroring_axes`).
    pub checkpoints: Vec<PathBuf>,
    /// The spatial axes test-time mirroring may flip, as the training recorded them (nnflow's
    /// `fold.json` key `mirror_axes`, the first fold's, as nnU-Net's predictor takes the first
    /// checkpoint's). Absent: an nnU-Net checkpoint's own, else every axis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror_axes: Option<Vec<usize>>,
    /// Part of the prediction (a member of the ensemble), or only the previous stage of a cascade.
    pub member: bool,
}
