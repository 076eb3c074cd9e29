//! The job the `train` stage hands the `nnflow-torch` worker. Kept apart from the trainer so the
//! engine binary, which writes jobs, links no libtorch code.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::params::TrainParams;

/// What the `train` stage hands the worker (paths absolute). The parameters travel with their
/// paths, which `TrainParams` leaves out of its serialized form (and so out of cache keys).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainJob {
    #[serde(serialize_with = "with_paths")]
    pub params: TrainParams,
    /// The parameters and input contents a resumable checkpoint must match (computed by the stage).
    pub identity: serde_json::Value,
    pub out_dir: PathBuf,
    pub resume_dir: PathBuf,
    pub threads: usize,
}

fn with_paths<S: serde::Serializer>(params: &TrainParams, serializer: S) -> Result<S::Ok, S::Error> {
    let mut value = serde_json::to_value(params).map_err(serde::ser::Error::custom)?;
    let map = value.as_object_mut().expect("parameters are an object");
    map.insert("dataset".into(), params.dataset.clone().into());
    map.insert("plan".into(), params.plan.clone().into());
    map.insert("preprocessed".into(), params.preprocessed.clone().into());
    if let Some(splits) = &params.splits {
        map.insert("splits".into(), splits.clone().into());
    }
    if let Some(weights) = &params.pretrained_weights {
        map.insert("pretrained_weights".into(), weights.clone().into());
    }
    if !params.previous_stage.is_empty() {
        map.insert("previous_stage".into(), params.previous_stage.clone().into());
    }
    value.serialize(serializer)
}

/// What a training's outputs hold (`fold.json`): which configuration and fold, the held-out
/// cases whose predictions are in `validation/`, and the mirror axes prediction may use. Read by
/// ensemble selection, prediction and export.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FoldInfo {
    pub configuration: String,
    pub fold: String,
    pub validation_cases: Vec<String>,
    pub file_ending: String,
    /// Whether `validation/<case>.npy` probabilities were written.
    pub probabilities: bool,
    /// The network's spatial axes the training mirrored (nnU-Net's
    /// `inference_allowed_mirroring_axes`: 3D 0 = z, 1 = y, 2 = x; 2D 0 = y, 1 = x), which
    /// test-time mirroring may flip; empty for none. Trainings written before nnflow recorded it
    /// have no key: every axis, as prediction did then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror_axes: Option<Vec<usize>>,
}

impl FoldInfo {
    /// The axes test-time mirroring may flip for a network of `spatial_dims` dimensions.
    pub fn mirror_axes_or_all(&self, spatial_dims: usize) -> Vec<usize> {
        self.mirror_axes
            .clone()
            .unwrap_or_else(|| (0..spatial_dims).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_keeps_the_paths_its_parameters_leave_out_of_cache_keys() {
        let params: TrainParams = serde_json::from_value(serde_json::json!({
            "dataset": "/d", "plan": "/p", "preprocessed": "/pre", "configuration": "3d_cascade_fullres",
            "splits": "/s.json", "previous_stage": ["/low0", "/low1"],
        }))
        .unwrap();
        let job = TrainJob {
            params: params.clone(),
            identity: serde_json::Value::Null,
            out_dir: "/out".into(),
            resume_dir: "/resume".into(),
            threads: 1,
        };
        let back: TrainJob = serde_json::from_str(&serde_json::to_string(&job).unwrap()).unwrap();
        assert_eq!(back.params, params);
    }

    /// A fold.json written before `mirror_axes` was recorded reads as every axis (what prediction
    /// used then); a recorded empty list is no mirroring, not every axis.
    #[test]
    fn fold_json_without_mirror_axes_means_every_axis() {
        let old = serde_json::json!({
            "configuration": "3d_fullres", "fold": "0", "validation_cases": ["a"],
            "file_ending": ".nii.gz", "probabilities": true,
        });
        let info: FoldInfo = serde_json::from_value(old).unwrap();
        assert_eq!(info.mirror_axes, None);
        assert_eq!(info.mirror_axes_or_all(3), [0, 1, 2]);
        assert_eq!(info.mirror_axes_or_all(2), [0, 1]);
        let none = FoldInfo {
            mirror_axes: Some(Vec::new()),
            ..info.clone()
        };
        assert!(none.mirror_axes_or_all(3).is_empty());
        let written = serde_json::to_value(&none).unwrap();
        assert_eq!(written["mirror_axes"], serde_json::json!([]));
        let back: FoldInfo = serde_json::from_value(written).unwrap();
        assert_eq!(back, none);
    }
}
