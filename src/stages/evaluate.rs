//! The `evaluate` stage: a folder of predicted segmentations against reference segmentations, as
//! nnU-Net's `nnUNetv2_evaluate_folder` -> `summary.json` (Dice, IoU, TP, FP, FN, TN and volumes per
//! case and label; means; foreground mean).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{thread_pool, to_json, Kind, Stage, StageContext, StageError, StageInput};
use crate::data::dataset::Dataset;
use crate::evaluate::folder::{evaluate_folder, evaluation_targets, foreground_dice, summary_json};

pub const KIND: Kind = Kind {
    name: "evaluate",
    version: 1,
    toolchain: &[],
    schema: |generator| generator.subschema_for::<EvaluateStage>(),
    build: super::finite::build_finite::<EvaluateStage>,
};

/// Evaluates predictions against references (labels or regions, ignore label, from dataset.json).
#[derive(Deserialize, Serialize, JsonSchema, Debug)]
#[serde(deny_unknown_fields)]
pub struct EvaluateStage {
    /// Folder of predicted segmentations (e.g. `${predict.outputs}`), named like the references.
    #[serde(skip_serializing)]
    pub predictions: String,
    /// Folder of reference segmentations (e.g. `${dataset}/labelsTs`).
    #[serde(skip_serializing)]
    pub reference: String,
    /// The dataset folder (its dataset.json names labels, regions, the ignore label, file ending).
    #[serde(skip_serializing)]
    pub dataset: String,
}

impl Stage for EvaluateStage {
    fn inputs(&self) -> Vec<StageInput> {
        vec![
            StageInput {
                name: "predictions".into(),
                path: self.predictions.clone(),
            },
            StageInput {
                name: "reference".into(),
                path: self.reference.clone(),
            },
            StageInput {
                name: "dataset/dataset.json".into(),
                path: format!("{}/dataset.json", self.dataset),
            },
        ]
    }

    fn params_json(&self) -> serde_json::Value {
        to_json(self)
    }

    fn run(&self, ctx: &StageContext) -> Result<(), StageError> {
        let dataset = Dataset::open(&ctx.root.join(&self.dataset))?;
        let targets = evaluation_targets(&dataset);
        let ignore = dataset.ignore_label.map(|l| l as i32);
        let predictions = ctx.root.join(&self.predictions);
        let reference = ctx.root.join(&self.reference);
        let cases = thread_pool(ctx)?
            .install(|| evaluate_folder(&predictions, &reference, &dataset.file_ending, &targets, ignore))?;
        let summary = summary_json(&cases, &targets);
        let path = ctx.out_dir.join("summary.json");
        crate::atomic_file::write_json(&path, &summary)?;
        ctx.log(&format!(
            "{} cases, foreground mean Dice {:.4}",
            cases.len(),
            foreground_dice(&summary)
        ));
        Ok(())
    }
}
