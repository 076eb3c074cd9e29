//! The `postprocess` stage: nnU-Net's `determine_postprocessing` on the selected model's
//! cross-validation predictions. Keeping only the largest foreground component, then the largest
//! component per label (or region), is accepted where it improves Dice as nnU-Net requires; the
//! accepted rules and every score go to `postprocessing.json`, which `predict` applies.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{reference_inputs, thread_pool, to_json, Kind, Stage, StageContext, StageError, StageInput};
use crate::data::dataset::{Dataset, LabelValue};
use crate::data::image;
use crate::evaluate::folder::evaluation_targets;
use crate::evaluate::postprocess::determine_postprocessing;
use crate::evaluate::EvaluateError;
use crate::file_error::FileError;

pub const KIND: Kind = Kind {
    name: "postprocess",
    version: 1,
    toolchain: &[],
    schema: |generator| generator.subschema_for::<PostprocessStage>(),
    build: super::finite::build_finite::<PostprocessStage>,
};

/// Decides the connected-component postprocessing.
#[derive(Deserialize, Serialize, JsonSchema, Debug)]
#[serde(deny_unknown_fields)]
pub struct PostprocessStage {
    /// The `ensemble-select` stage's outputs (its `crossval/` predictions): `${select.outputs}`.
    #[serde(skip_serializing)]
    pub selection: String,
    /// The dataset folder: dataset.json and the reference labels (labelsTr).
    #[serde(skip_serializing)]
    pub dataset: String,
}

impl Stage for PostprocessStage {
    fn inputs(&self) -> Vec<StageInput> {
        reference_inputs(&self.dataset)
    }

    fn params_json(&self) -> serde_json::Value {
        to_json(self)
    }

    fn run(&self, ctx: &StageContext) -> Result<(), StageError> {
        let dataset = Dataset::open(&ctx.root.join(&self.dataset))?;
        let crossval = ctx.root.join(&self.selection).join("crossval");
        let mut files: Vec<String> = std::fs::read_dir(&crossval)
            .map_err(FileError::io(&crossval))?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .filter(|n| n.ends_with(&dataset.file_ending) && !n.starts_with('.'))
            .collect();
        files.sort();
        let references: Vec<PathBuf> = files
            .iter()
            .map(|file| {
                let id = file.strip_suffix(&dataset.file_ending).unwrap_or(file);
                dataset
                    .case(id)
                    .map(|c| c.label.clone())
                    .ok_or_else(|| EvaluateError::UnknownCase { case: id.to_string() })
            })
            .collect::<Result<_, _>>()?;
        let targets = evaluation_targets(&dataset);
        let ignore = dataset.ignore_label.map(|l| l as i32);
        let foreground: Vec<i32> = dataset
            .labels
            .iter()
            .filter_map(|l| match l.value {
                LabelValue::Single(v) if v != 0 && Some(v) != dataset.ignore_label => Some(v as i32),
                _ => None,
            })
            .collect();
        let load = |i: usize| -> Result<_, EvaluateError> {
            let read = |p: &PathBuf| image::read_labels(p).map(|(a, _)| a);
            Ok((read(&references[i])?, read(&crossval.join(&files[i]))?))
        };
        let decision = thread_pool(ctx)?
            .install(|| determine_postprocessing(files.len(), load, &targets, &foreground, ignore))?;
        ctx.log(&format!(
            "postprocessing: {} rule(s); foreground mean Dice {:.4} -> {:.4}",
            decision.rules.len(),
            decision.input.foreground_mean_dice,
            decision.postprocessed.foreground_mean_dice
        ));
        let path = ctx.out_dir.join("postprocessing.json");
        Ok(crate::atomic_file::write_json(&path, &decision)?)
    }
}
