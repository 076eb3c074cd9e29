//! The `report` stage: the report page (`crate::report`) from the results it is given, cached like
//! any stage, so a CI job can publish its folder. It shows the results, not the DAG's state, which
//! is not an input of the stage: `nnflow report` shows that too.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{dataset_inputs, to_json, Kind, Stage, StageContext, StageError, StageInput};
use crate::report::{write_page, Sources};

pub const KIND: Kind = Kind {
    name: "report",
    version: 1,
    toolchain: &[],
    schema: |generator| generator.subschema_for::<ReportStage>(),
    build: super::finite::build_finite::<ReportStage>,
};

/// Writes `index.html` and its pictures: dataset and plan, training curves, cross-validation, model
/// choice, postprocessing, Dice per case and prediction overlays.
#[derive(Deserialize, Serialize, JsonSchema, Debug)]
#[serde(deny_unknown_fields)]
pub struct ReportStage {
    /// The dataset folder (dataset.json, imagesTr, labelsTr).
    #[serde(skip_serializing)]
    pub dataset: String,
    /// The plan stage's outputs: `${plan.outputs}`.
    #[serde(skip_serializing, default)]
    pub plan: Option<String>,
    /// The trainings: `${train[*].outputs}`.
    #[serde(skip_serializing, default)]
    pub trainings: Vec<String>,
    /// The ensemble-select stage's outputs: `${select.outputs}`.
    #[serde(skip_serializing, default)]
    pub selection: Option<String>,
    /// The postprocess stage's outputs: `${postprocess.outputs}`.
    #[serde(skip_serializing, default)]
    pub postprocessing: Option<String>,
    /// The images predicted (e.g. `${test_images}`) and their predictions (`${predictions}`).
    #[serde(skip_serializing, default)]
    pub images: Option<String>,
    #[serde(skip_serializing, default)]
    pub predictions: Option<String>,
    /// The evaluate stage's outputs (`${evaluate.outputs}`) and its reference labels.
    #[serde(skip_serializing, default)]
    pub evaluation: Option<String>,
    #[serde(skip_serializing, default)]
    pub test_labels: Option<String>,
}

impl Stage for ReportStage {
    fn inputs(&self) -> Vec<StageInput> {
        let mut inputs = dataset_inputs(&self.dataset);
        for (name, path) in [
            ("images", &self.images),
            ("predictions", &self.predictions),
            ("test_labels", &self.test_labels),
        ] {
            if let Some(path) = path {
                inputs.push(StageInput {
                    name: name.into(),
                    path: path.clone(),
                });
            }
        }
        inputs
    }

    fn params_json(&self) -> serde_json::Value {
        to_json(self)
    }

    fn run(&self, ctx: &StageContext) -> Result<(), StageError> {
        let path = |p: &Option<String>| p.as_ref().map(|p| ctx.root.join(p));
        let sources = Sources {
            pipeline: "the report stage".into(),
            stages: Vec::new(),
            dataset: Some(ctx.root.join(&self.dataset)),
            plan: path(&self.plan),
            trainings: self
                .trainings
                .iter()
                .map(|t| ctx.root.join(t))
                .filter(|t| t.exists())
                .collect(),
            select: path(&self.selection),
            postprocess: path(&self.postprocessing),
            test_images: path(&self.images),
            predictions: path(&self.predictions),
            evaluation: path(&self.evaluation),
            test_labels: path(&self.test_labels),
        };
        let written = write_page(&sources, ctx.out_dir)?;
        ctx.log(&format!(
            "report: {} cases, {} pictures",
            written.cases, written.pictures
        ));
        Ok(())
    }
}
