//! What a training run reads before it starts, without libtorch: the [`Setup`] from plans.json,
//! dataset.json, the preprocessed cases and the split, and the [`BatchMaker`] that samples and
//! augments its batches. The `nnflow-torch` worker's trainer builds the network and runs the loop.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::augment::pipeline::TransformSpec;
use crate::augment::{DaConfig, Pipeline};
use crate::data::case_store::{list_cases, read_labels};
use crate::data::dataset::Dataset;
use crate::evaluate::folder::evaluation_targets;
use crate::network::Architecture;
use crate::plans::{Plans, ResolvedConfiguration};
use crate::preprocess::case_steps::PlanView;
use crate::train::case_reader::CaseReader;
use crate::train::data::BatchMaker;
use crate::train::params::TrainParams;
use crate::train::previous_stage::collect_predictions;
use crate::train::sampler::PatchSampler;
use crate::train::splits::{fold_cases, Fold, Split};
use crate::train::TrainError;

/// What training needs from plans.json and dataset.json.
pub struct Setup {
    pub architecture: Architecture,
    pub patch_size: Vec<usize>,
    pub batch_size: usize,
    pub batch_dice: bool,
    pub use_mask_for_norm: Vec<bool>,
    pub ignore_label: Option<i64>,
    /// Region datasets: each region's label values (nnU-Net's `foreground_regions`).
    pub regions: Option<Vec<Vec<i16>>>,
    /// The configuration's plans.json entry (`inherits_from` resolved), for export.
    pub configuration: ResolvedConfiguration,
    pub split: Split,
    /// The cascade's second stage: the previous stage's segmentation of every case.
    pub previous_stage: Option<PreviousStage>,
    /// Configurations that take this one's validation predictions as their previous stage.
    pub next_stages: Vec<PlanView>,
    /// The network's spatial axes the augmentation mirrors, which test-time mirroring may flip
    /// (nnU-Net's `inference_allowed_mirroring_axes`): the final validation's and, through
    /// `fold.json`, prediction's.
    pub mirror_axes: Vec<usize>,
}

/// The previous stage's predictions, given to the network as one-hot channels.
pub struct PreviousStage {
    /// The foreground labels, one input channel each.
    pub labels: Vec<i16>,
    /// Case id -> its `(1, z, y, x)` label array on this configuration's grid.
    pub predictions: BTreeMap<String, PathBuf>,
}

impl Setup {
    pub fn read(params: &TrainParams) -> Result<Setup, TrainError> {
        let dataset = Dataset::open(Path::new(&params.dataset))?;
        let plans_path = Path::new(&params.plan).join("plans.json");
        let plans = Plans::read(&plans_path)?;
        let configuration = plans.configuration(&params.configuration)?;
        // the regions nnU-Net trains and evaluates, as label lists
        let regions = dataset.has_regions().then(|| {
            let targets = evaluation_targets(&dataset);
            targets
                .iter()
                .map(|t| t.labels().iter().map(|&v| v as i16).collect())
                .collect::<Vec<_>>()
        });
        let num_classes = dataset.num_segmentation_heads();
        let preprocessed = Path::new(&params.preprocessed);
        let ids = list_cases(preprocessed);
        if ids.is_empty() {
            return Err(TrainError::NoPreprocessedCases {
                folder: preprocessed.to_path_buf(),
            });
        }
        let previous_stage = match configuration.previous_stage_name() {
            Some(previous) => {
                let trainings: Vec<PathBuf> = params.previous_stage.iter().map(PathBuf::from).collect();
                Some(PreviousStage {
                    labels: dataset.foreground_labels(),
                    predictions: collect_predictions(&trainings, &params.configuration, previous, &ids)?,
                })
            }
            None if !params.previous_stage.is_empty() => {
                return Err(TrainError::NotACascade {
                    configuration: params.configuration.clone(),
                })
            }
            None => None,
        };
        let next_stages = configuration
            .next_stage_names()
            .iter()
            .map(|next| PlanView::new(&plans, next))
            .collect::<Result<_, _>>()?;
        let extra_channels = previous_stage.as_ref().map_or(0, |p| p.labels.len());
        if regions.is_some() && dataset.regions_class_order.as_ref().map(Vec::len) != Some(num_classes) {
            return Err(TrainError::RegionsClassOrder { regions: num_classes });
        }
        let architecture = Architecture::from_plan(
            configuration.architecture()?,
            dataset.channels.len() + extra_channels,
            num_classes,
            params.deep_supervision,
        )
        .map_err(|source| TrainError::Architecture {
            configuration: params.configuration.clone(),
            source,
        })?;
        let patch_size = match &params.patch_size {
            Some(patch_size) => patch_size.clone(),
            None => configuration
                .patch_size()
                .map_err(TrainError::PlanEntry)?
                .to_vec(),
        };
        if patch_size.len() != architecture.spatial_dims {
            return Err(TrainError::PatchDimensions {
                patch_size,
                spatial_dims: architecture.spatial_dims,
                configuration: params.configuration.clone(),
            });
        }
        let divisor = cumulative_strides(&architecture);
        if let Some(axis) = (0..patch_size.len()).find(|&a| !patch_size[a].is_multiple_of(divisor[a])) {
            return Err(TrainError::PatchStride {
                patch_size,
                axis,
                stride: divisor[axis],
            });
        }
        let batch_size = match params.batch_size {
            Some(b) => b,
            None => configuration.batch_size().map_err(TrainError::PlanEntry)?,
        };
        let fold = Fold::parse(&params.fold.text())?;
        let split = fold_cases(&ids, &fold, params.splits.as_deref().map(Path::new))?;
        if split.train.is_empty() || split.val.is_empty() {
            return Err(TrainError::EmptyFold {
                fold: params.fold.text(),
            });
        }
        let mirror_axes = match &params.augment {
            Some(pipeline) => inference_mirror_axes(pipeline, architecture.spatial_dims),
            None => inference_mirror_axes(
                &Pipeline::nnunet_default(&DaConfig::from_patch_size(&patch_size)?),
                architecture.spatial_dims,
            ),
        };
        Ok(Setup {
            mirror_axes,
            architecture,
            patch_size,
            batch_size,
            batch_dice: configuration.batch_dice(),
            use_mask_for_norm: configuration.use_mask_for_norm().to_vec(),
            ignore_label: dataset.ignore_label,
            regions,
            configuration,
            split,
            previous_stage,
            next_stages,
        })
    }
}

/// The network's spatial axes an augmentation list mirrors: every axis of an enabled `mirror`
/// entry that can flip anything (`p` and `p_per_axis` above 0). nnU-Net's trainer allows test-time
/// mirroring on exactly its augmentation's mirror axes (3D: all three, also for an anisotropic
/// patch augmented in-plane; 2D: both; `nnUNetTrainerNoMirroring`: none). The augmentation counts
/// axes of (z, y, x) samples, where a 2D network's y and x are 1 and 2; the 2D samples' z has one
/// voxel, so flipping it changes nothing.
pub fn inference_mirror_axes(augment: &Pipeline, spatial_dims: usize) -> Vec<usize> {
    let first = 3 - spatial_dims;
    let mut axes: Vec<usize> = augment
        .transforms
        .iter()
        .filter_map(|t| match t {
            TransformSpec::Mirror(m) if m.enabled && m.p > 0.0 && m.p_per_axis > 0.0 => Some(&m.axes),
            _ => None,
        })
        .flatten()
        .filter(|&&a| (first..3).contains(&a))
        .map(|&a| a - first)
        .collect();
    axes.sort_unstable();
    axes.dedup();
    axes
}

fn cumulative_strides(arch: &Architecture) -> Vec<usize> {
    let mut total = vec![1; arch.spatial_dims];
    for stride in &arch.strides {
        for (t, s) in total.iter_mut().zip(stride) {
            *t *= s;
        }
    }
    total
}

pub fn as_3d(patch: &[usize]) -> [usize; 3] {
    match patch {
        [y, x] => [1, *y, *x],
        [z, y, x] => [*z, *y, *x],
        _ => unreachable!("validated patch size"),
    }
}

/// The previous stage's `(z, y, x)` segmentation of a case.
pub fn read_previous_stage(previous: &PreviousStage, id: &str) -> Result<ndarray::Array3<i16>, TrainError> {
    let labels =
        read_labels(&previous.predictions[id]).map_err(|source| TrainError::PreviousStageLabels {
            case: id.to_string(),
            source,
        })?;
    Ok(labels.index_axis_move(ndarray::Axis(0), 0))
}

/// The batches of a run: training patches (enlarged crops for the spatial transform) with the
/// augmentation pipeline, validation patches with only the label clean-up.
pub fn batch_maker(params: &TrainParams, setup: &Setup) -> Result<BatchMaker, TrainError> {
    let da = DaConfig::from_patch_size(&setup.patch_size)?;
    let mut augment = match &params.augment {
        Some(pipeline) => pipeline.clone(),
        None => Pipeline::nnunet_default(&da).with_mask_for_norm(&setup.use_mask_for_norm),
    };
    if let Some(previous) = &setup.previous_stage {
        // nnU-Net's cascade augmentations of the previous stage's segmentation, unless `augment`
        // lists them itself (then with the labels filled in)
        augment = augment.with_previous_stage(&previous.labels);
    }
    let open = |ids: &[String]| -> Result<Vec<CaseReader>, TrainError> {
        ids.iter()
            .map(|id| {
                let case = CaseReader::open(Path::new(&params.preprocessed), id)?;
                match &setup.previous_stage {
                    Some(previous) => case.with_previous_stage(&previous.predictions[id]),
                    None => Ok(case),
                }
            })
            .collect()
    };
    let patch = as_3d(&setup.patch_size);
    let sampler = |cases, crop_size| PatchSampler {
        cases,
        crop_size,
        patch_size: patch,
        batch_size: setup.batch_size,
        oversample_foreground: params.oversample_foreground,
        has_ignore_label: setup.ignore_label.is_some(),
    };
    let scales = if params.deep_supervision {
        setup.architecture.deep_supervision_scales()
    } else {
        vec![[1.0; 3]]
    };
    // The enlarged crop only feeds a spatial transform; without one, crop the patch itself.
    let spatial = augment
        .transforms
        .iter()
        .any(|t| t.name() == "spatial" && t.gate().0);
    let crop = if spatial {
        as_3d(&da.initial_patch_size)
    } else {
        patch
    };
    Ok(BatchMaker {
        train: sampler(open(&setup.split.train)?, crop),
        validation: sampler(open(&setup.split.val)?, patch),
        augment,
        validation_transforms: Pipeline {
            transforms: vec![TransformSpec::RemoveLabel(Default::default())],
        },
        scales,
        seed: params.seed,
        previous_stage_labels: setup.previous_stage.as_ref().map(|p| p.labels.clone()),
        // the ignore label travels as its own last channel, the loss's mask
        regions: setup.regions.as_ref().map(|regions| {
            let mut channels = regions.clone();
            channels.extend(setup.ignore_label.map(|l| vec![l as i16]));
            channels
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline(json: &str) -> Pipeline {
        Pipeline::from_json(json).unwrap()
    }

    /// nnU-Net's trainer mirrors every axis (3D also for an anisotropic patch augmented in-plane,
    /// `configure_rotation_dummyDA_mirroring_and_inital_patch_size`), and prediction may flip them.
    #[test]
    fn the_default_augmentation_mirrors_every_axis() {
        for (patch, dims, expected) in [
            (vec![64, 64, 64], 3, vec![0, 1, 2]),
            (vec![8, 64, 64], 3, vec![0, 1, 2]),
            (vec![128, 96], 2, vec![0, 1]),
        ] {
            let da = DaConfig::from_patch_size(&patch).unwrap();
            assert_eq!(da.dummy_2d, patch == [8, 64, 64]);
            assert_eq!(
                inference_mirror_axes(&Pipeline::nnunet_default(&da), dims),
                expected,
                "{patch:?}"
            );
        }
    }

    #[test]
    fn a_restricted_or_disabled_mirror_entry_restricts_prediction() {
        let only_yx = pipeline(r#"[{"name": "mirror", "axes": [1, 2]}]"#);
        assert_eq!(inference_mirror_axes(&only_yx, 3), [1, 2]);
        // the 2D network's (y, x) are the samples' axes 1 and 2; z (one voxel) is no axis of it
        assert_eq!(inference_mirror_axes(&only_yx, 2), [0, 1]);
        let all = pipeline(r#"[{"name": "mirror"}]"#);
        assert_eq!(inference_mirror_axes(&all, 2), [0, 1]);
        // nnUNetTrainerNoMirroring: none
        for none in [
            r#"[{"name": "mirror", "enabled": false}]"#,
            r#"[{"name": "mirror", "p": 0.0}]"#,
            r#"[{"name": "mirror", "p_per_axis": 0.0}]"#,
            r#"[{"name": "gaussian_noise"}]"#,
            "[]",
        ] {
            assert!(inference_mirror_axes(&pipeline(none), 3).is_empty(), "{none}");
        }
        // two entries: the axes of both
        let two = pipeline(r#"[{"name": "mirror", "axes": [2]}, {"name": "mirror", "axes": [0, 2]}]"#);
        assert_eq!(inference_mirror_axes(&two, 3), [0, 2]);
    }
}
