//! Plans moved from one dataset to another: nnU-Net v2.8.1's `nnUNetv2_move_plans_between_datasets`
//! (`experiment_planning/plans_for_pretraining/move_plans_between_datasets.py`), used to train on a
//! dataset with another dataset's network, patch and preprocessing (pretraining and fine-tuning).
//!
//! nnU-Net copies the source plans whole and changes four things: `dataset_name` (the target's),
//! `image_reader_writer` (the target's reader, from its dataset.json), `plans_name` (the target
//! identifier, by default the source's) and, when the identifier changes, each configuration's
//! `data_identifier`. Everything else stays the source's: configurations (architecture, patch,
//! batch size, spacing, normalization schemes and masks, resampling), the transpose, the median
//! spacing and shape, and `foreground_intensity_properties_per_channel`, so CT normalization clips
//! and scales the target's images with the source's statistics ("Yes, also the clip values, mean
//! and std are transferred!", nnU-Net's documentation/pretraining_and_finetuning.md). The target's
//! own fingerprint does not enter the plans; nnU-Net's trainer only copies it beside the model.
//!
//! nnU-Net checks nothing: its preprocessing fails later when the plans cover fewer channels than
//! the target has, and with more, the pretrained weights do not fit the target's first layer (and
//! nnflow's normalize refuses the case). [`transfer_plans`] refuses any channel count mismatch up
//! front, naming both files. Pure: the caller reads and writes the files.

use serde_json::Value;
use thiserror::Error;

use crate::plans::{Plans, PlansError};
use crate::preprocess::plan::{normalization, reader_writer_for_ending};

/// nnU-Net's reader/writer classes (`nnunetv2.imageio`): the names a dataset.json's
/// `overwrite_image_reader_writer` may give. nnU-Net ignores another name and derives the reader
/// from the file ending.
const READER_WRITERS: [&str; 6] = [
    "NaturalImage2DIO",
    "SimpleITKIO",
    "SimpleITKIOWithReorient",
    "Tiff3DIO",
    "NibabelIO",
    "NibabelIOWithReorient",
];

/// The dataset the plans move to.
#[derive(Clone, Copy, Debug)]
pub struct TransferTarget<'a> {
    /// Its folder name (`Dataset002_Heart`): the new `dataset_name`.
    pub dataset_name: &'a str,
    /// Its dataset.json `channel_names` values, in channel order.
    pub channel_names: &'a [String],
    /// Its dataset.json (`file_ending` and `overwrite_image_reader_writer` choose the reader).
    pub dataset_json: &'a Value,
    /// Where that dataset.json lies, for errors.
    pub dataset_json_origin: &'a str,
}

/// The plans where they come from.
#[derive(Clone, Copy, Debug)]
pub struct TransferSource<'a> {
    pub plans: &'a Value,
    /// Where the plans lie, for errors.
    pub origin: &'a str,
}

/// The moved plans, and what the caller should tell the user.
#[derive(Clone, Debug, PartialEq)]
pub struct Transferred {
    /// plans.json for the target, keys in the source's order.
    pub plans: Value,
    /// Channels whose transferred normalization differs from what nnU-Net would plan for the
    /// target's channel name (allowed, as in nnU-Net, but worth a line in the log).
    pub notes: Vec<String>,
}

#[derive(Debug, Error)]
pub enum TransferError {
    /// Not JSON of plans.json's shape; the error names the file and the key.
    #[error("not an nnU-Net plans.json: {0}")]
    NotPlans(#[source] PlansError),
    /// Typed, but a configuration nnU-Net's preprocessing could not use (a missing key, a circular
    /// `inherits_from`).
    #[error("{source_file}: not a usable nnU-Net plans.json: {error}")]
    Unusable {
        source_file: String,
        #[source]
        error: PlansError,
    },
    /// The plans' per-channel lists do not fit the target's channels (boxed: the error stays small).
    #[error(transparent)]
    Channels(Box<ChannelMismatch>),
    #[error("{dataset_json}: no nnU-Net image reader handles file ending {file_ending:?}")]
    UnknownFileEnding {
        dataset_json: String,
        file_ending: String,
    },
}

/// Source plans made for another number of channels than the target has.
#[derive(Debug, Error)]
pub enum ChannelMismatch {
    #[error(
        "{source_file}: configuration `{configuration}` plans {planned} {what} per channel, but \
         {dataset_json} lists {channels} channel(s) ({names}); plans move only between datasets \
         with as many channels (normalization is planned per channel, and pretrained weights fit \
         the first layer only for as many input channels)"
    )]
    Count {
        source_file: String,
        configuration: String,
        what: &'static str,
        planned: usize,
        dataset_json: String,
        channels: usize,
        names: String,
    },
    #[error(
        "{source_file}: `foreground_intensity_properties_per_channel` has no channel {channel}, but \
         {dataset_json} lists {channels} channel(s) ({names}); plans move only between datasets \
         with as many channels"
    )]
    MissingIntensityProperties {
        source_file: String,
        channel: usize,
        dataset_json: String,
        channels: usize,
        names: String,
    },
}

/// Moves `source`'s plans to `target` as `nnUNetv2_move_plans_between_datasets -tp
/// target_plans_name` does. The source identifier (nnU-Net's `-sp`, the plans file's name) is
/// the source's `plans_name`, which nnU-Net writes as that name; `None` keeps it.
pub fn transfer_plans(
    source: TransferSource,
    target: TransferTarget,
    target_plans_name: Option<&str>,
) -> Result<Transferred, TransferError> {
    let typed = Plans::from_json(source.plans, source.origin).map_err(TransferError::NotPlans)?;
    let notes = check_channels(&typed, source, target)?;
    let reader = reader_writer(target)?;

    let mut plans = source.plans.clone();
    let source_identifier = typed.plans_name.as_str();
    let target_identifier = target_plans_name.unwrap_or(source_identifier);
    // Keys are replaced in place, so the file keeps the source's key order, as nnU-Net's
    // `save_json(..., sort_keys=False)` of the edited dict does.
    plans["dataset_name"] = target.dataset_name.into();
    if target_identifier != source_identifier {
        let configurations = plans["configurations"].as_object_mut().into_iter().flatten();
        for (_, configuration) in configurations {
            if let Some(identifier) = configuration.get_mut("data_identifier") {
                *identifier = renamed_identifier(identifier, source_identifier, target_identifier).into();
            }
        }
    }
    plans["image_reader_writer"] = reader.into();
    plans["plans_name"] = target_identifier.into();
    Ok(Transferred { plans, notes })
}

/// nnU-Net's renaming: a `data_identifier` that starts with the source identifier gets the target
/// identifier in its place (`nnUNetPlans_3d_fullres` -> `Pre_3d_fullres`); any other is prefixed
/// (`nnUNetPlans_2d` of ResEnc plans -> `Pre_nnUNetPlans_2d`).
fn renamed_identifier(identifier: &Value, source: &str, target: &str) -> String {
    // A non-string identifier cannot get here: `Plans` typed it as a string.
    let old = identifier.as_str().unwrap_or_default();
    match old.strip_prefix(source) {
        Some(rest) => format!("{target}{rest}"),
        None => format!("{target}_{old}"),
    }
}

/// The target's reader, as nnU-Net's `determine_reader_writer_from_dataset_json`: dataset.json's
/// `overwrite_image_reader_writer` when it names one of nnU-Net's readers, else the first reader
/// that claims the file ending.
fn reader_writer(target: TransferTarget) -> Result<String, TransferError> {
    let overwrite = target.dataset_json["overwrite_image_reader_writer"].as_str();
    if let Some(name) = overwrite.filter(|name| READER_WRITERS.contains(name)) {
        return Ok(name.to_string());
    }
    let file_ending = target.dataset_json["file_ending"].as_str().unwrap_or(".nii.gz");
    reader_writer_for_ending(file_ending)
        .map(str::to_string)
        .ok_or_else(|| TransferError::UnknownFileEnding {
            dataset_json: target.dataset_json_origin.to_string(),
            file_ending: file_ending.to_string(),
        })
}

/// Refuses plans whose per-channel lists do not fit the target's channels; returns a note per
/// channel whose transferred normalization differs from what the target's channel name would get.
fn check_channels(
    plans: &Plans,
    source: TransferSource,
    target: TransferTarget,
) -> Result<Vec<String>, TransferError> {
    let channels = target.channel_names.len();
    let names = target
        .channel_names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ");
    let count_error = |configuration: &str, what: &'static str, planned: usize| {
        TransferError::Channels(Box::new(ChannelMismatch::Count {
            source_file: source.origin.to_string(),
            configuration: configuration.to_string(),
            what,
            planned,
            dataset_json: target.dataset_json_origin.to_string(),
            channels,
            names: names.clone(),
        }))
    };
    let (planned_for_target, _) = normalization(target.channel_names, 1.0);
    let mut notes = Vec::new();
    for name in plans.configurations.keys() {
        let unusable = |error| TransferError::Unusable {
            source_file: source.origin.to_string(),
            error,
        };
        let configuration = plans.configuration(name).map_err(unusable)?;
        let schemes = configuration.normalization_schemes().map_err(unusable)?;
        if schemes.len() != channels {
            return Err(count_error(name, "normalization scheme(s)", schemes.len()));
        }
        if let Some(masks) = &configuration.values.use_mask_for_norm {
            if masks.len() != channels {
                return Err(count_error(name, "`use_mask_for_norm` value(s)", masks.len()));
            }
        }
        for (channel, (scheme, planned)) in schemes.iter().zip(&planned_for_target).enumerate() {
            let note = format!(
                "channel {channel} (`{}`) keeps the transferred {scheme} (with the source's intensity \
                 statistics); planned for this dataset it would get {planned}",
                target.channel_names[channel]
            );
            if scheme != planned && !notes.contains(&note) {
                notes.push(note);
            }
        }
    }
    // nnU-Net's preprocessing looks up every channel's statistics, whatever its scheme.
    let properties = &plans.foreground_intensity_properties_per_channel;
    if let Some(channel) = (0..channels).find(|c| !properties.contains_key(&c.to_string())) {
        return Err(TransferError::Channels(Box::new(
            ChannelMismatch::MissingIntensityProperties {
                source_file: source.origin.to_string(),
                channel,
                dataset_json: target.dataset_json_origin.to_string(),
                channels,
                names,
            },
        )));
    }
    Ok(notes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A minimal plan: a 3d_fullres configuration with `identifier` and a cascade stage inheriting
    /// from it (no data_identifier of its own).
    fn plans(plans_name: &str, identifier: &str, schemes: &[&str]) -> Value {
        let properties: serde_json::Map<String, Value> = (0..schemes.len())
            .map(|c| {
                let stats = json!({"max": 1.0, "mean": 0.5, "median": 0.5, "min": 0.0,
                                   "percentile_00_5": 0.0, "percentile_99_5": 1.0, "std": 0.1});
                (c.to_string(), stats)
            })
            .collect();
        json!({
            "dataset_name": "Dataset001_Source",
            "plans_name": plans_name,
            "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
            "original_median_shape_after_transp": [64, 64, 64],
            "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2],
            "transpose_backward": [0, 1, 2],
            "configurations": {
                "3d_fullres": {
                    "data_identifier": identifier,
                    "normalization_schemes": schemes,
                    "use_mask_for_norm": vec![false; schemes.len()],
                },
                "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
            },
            "experiment_planner_used": "ExperimentPlanner",
            "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": properties,
        })
    }

    fn move_to(
        source: &Value,
        channels: &[&str],
        extra: Value,
        name: Option<&str>,
    ) -> Result<Transferred, TransferError> {
        let channel_names: Vec<String> = channels.iter().map(|c| c.to_string()).collect();
        let mut dataset_json = json!({"file_ending": ".nii.gz"});
        if let (Some(json), Some(extra)) = (dataset_json.as_object_mut(), extra.as_object()) {
            json.extend(extra.clone());
        }
        transfer_plans(
            TransferSource {
                plans: source,
                origin: "source/plans.json",
            },
            TransferTarget {
                dataset_name: "Dataset002_Target",
                channel_names: &channel_names,
                dataset_json: &dataset_json,
                dataset_json_origin: "target/dataset.json",
            },
            name,
        )
    }

    #[test]
    fn keeping_the_identifier_changes_only_the_dataset_and_reader() {
        let source = plans("nnUNetPlans", "nnUNetPlans_3d_fullres", &["ZScoreNormalization"]);
        let moved = move_to(&source, &["MRI"], json!({}), None).unwrap();
        let mut expected = source.clone();
        expected["dataset_name"] = "Dataset002_Target".into();
        assert_eq!(moved.plans, expected);
        assert!(moved.notes.is_empty(), "{:?}", moved.notes);
        let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&moved.plans), keys(&source));
    }

    #[test]
    fn a_new_identifier_renames_data_identifiers_as_nnunet_does() {
        let source = plans("nnUNetPlans", "nnUNetPlans_3d_fullres", &["CTNormalization"]);
        let moved = move_to(&source, &["CT"], json!({}), Some("Pre")).unwrap();
        assert_eq!(moved.plans["plans_name"], "Pre");
        assert_eq!(
            moved.plans["configurations"]["3d_fullres"]["data_identifier"],
            "Pre_3d_fullres"
        );
        assert!(moved.plans["configurations"]["3d_cascade_fullres"]
            .get("data_identifier")
            .is_none());
        // Not starting with the source identifier: prefixed (ResEnc plans' shared `nnUNetPlans_*`).
        let resenc = plans(
            "nnUNetResEncUNetMPlans",
            "nnUNetPlans_3d_fullres",
            &["CTNormalization"],
        );
        let moved = move_to(&resenc, &["CT"], json!({}), Some("Pre")).unwrap();
        assert_eq!(
            moved.plans["configurations"]["3d_fullres"]["data_identifier"],
            "Pre_nnUNetPlans_3d_fullres"
        );
    }

    #[test]
    fn the_reader_is_the_targets() {
        let source = plans("nnUNetPlans", "nnUNetPlans_3d_fullres", &["ZScoreNormalization"]);
        let nifti = move_to(&source, &["MRI"], json!({"file_ending": ".nii"}), None).unwrap();
        assert_eq!(nifti.plans["image_reader_writer"], "NibabelIO");
        let named = json!({"overwrite_image_reader_writer": "NibabelIOWithReorient"});
        let overwritten = move_to(&source, &["MRI"], named, None).unwrap();
        assert_eq!(overwritten.plans["image_reader_writer"], "NibabelIOWithReorient");
        // An unknown class: nnU-Net falls back to the file ending.
        let unknown = json!({"overwrite_image_reader_writer": "MyIO"});
        assert_eq!(
            move_to(&source, &["MRI"], unknown, None).unwrap().plans["image_reader_writer"],
            "SimpleITKIO"
        );
        let error = move_to(&source, &["MRI"], json!({"file_ending": ".jpg"}), None).unwrap_err();
        assert_eq!(
            error.to_string(),
            "target/dataset.json: no nnU-Net image reader handles file ending \".jpg\""
        );
    }

    #[test]
    fn a_channel_count_mismatch_names_both_files() {
        let source = plans(
            "nnUNetPlans",
            "nnUNetPlans_3d_fullres",
            &["CTNormalization", "ZScoreNormalization"],
        );
        let error = move_to(&source, &["CT"], json!({}), None)
            .unwrap_err()
            .to_string();
        // Configurations in name order: the cascade stage (inheriting 3d_fullres's schemes) first.
        assert!(
            error.starts_with(
                "source/plans.json: configuration `3d_cascade_fullres` plans 2 normalization \
                 scheme(s) per channel, but target/dataset.json lists 1 channel(s) (`CT`)"
            ),
            "{error}"
        );
        let mut no_stats = plans("nnUNetPlans", "nnUNetPlans_3d_fullres", &["CTNormalization"]);
        no_stats["foreground_intensity_properties_per_channel"] = json!({});
        let error = move_to(&no_stats, &["CT"], json!({}), None)
            .unwrap_err()
            .to_string();
        assert!(error.contains("has no channel 0"), "{error}");
    }

    #[test]
    fn a_configuration_preprocessing_could_not_use_is_refused() {
        let mut source = plans("nnUNetPlans", "nnUNetPlans_3d_fullres", &["CTNormalization"]);
        source["configurations"]["3d_fullres"]
            .as_object_mut()
            .unwrap()
            .remove("normalization_schemes");
        let error = move_to(&source, &["CT"], json!({}), None)
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "source/plans.json: not a usable nnU-Net plans.json: configuration 3d_cascade_fullres: \
             `normalization_schemes` is missing"
        );
    }

    #[test]
    fn another_modality_is_allowed_with_a_note() {
        let source = plans("nnUNetPlans", "nnUNetPlans_3d_fullres", &["CTNormalization"]);
        let moved = move_to(&source, &["T2"], json!({}), None).unwrap();
        assert_eq!(moved.notes.len(), 1, "{:?}", moved.notes);
        assert!(moved.notes[0].contains("CTNormalization") && moved.notes[0].contains("ZScoreNormalization"));
    }

    #[test]
    fn not_a_plans_file_is_refused_with_the_field() {
        let dataset_json = json!({"channel_names": {"0": "CT"}, "labels": {"background": 0}});
        let error = move_to(&dataset_json, &["CT"], json!({}), None)
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("not an nnU-Net plans.json: source/plans.json: "),
            "{error}"
        );
        assert!(error.contains("dataset_name"), "{error}");
    }
}
