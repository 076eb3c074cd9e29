//! Where a pipeline's results are: each stage's state and last outcome, and the output folders of
//! its nnU-Net stages, found by stage kind. Reads records and folders; runs nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::engine::status::{status, State};
use crate::engine::{Engine, RunError};

/// One stage instance as the page's DAG table shows it.
#[derive(Clone, Debug)]
pub struct StageRow {
    pub id: String,
    pub kind: String,
    /// fresh / stale / new / skipped (or "input" when the report is itself a stage).
    pub state: String,
    pub reasons: Vec<String>,
    /// How the latest run ended for it: ran, cached, failed, skipped (with its error or reason).
    pub last_outcome: Option<String>,
    pub last_error: Option<String>,
    /// Seconds its last successful run took.
    pub seconds: Option<f64>,
    /// Upstream instances, by id.
    pub after: Vec<String>,
}

/// The folders the page reads. Any may be missing (a pipeline that has not run, or lacks a stage).
#[derive(Clone, Debug, Default)]
pub struct Sources {
    pub pipeline: String,
    pub stages: Vec<StageRow>,
    /// The raw dataset (dataset.json, imagesTr, labelsTr).
    pub dataset: Option<PathBuf>,
    /// The plan stage's outputs (plans.json, dataset_fingerprint.json).
    pub plan: Option<PathBuf>,
    /// Training output folders (fold.json, training_history.json, progress.png, validation/).
    pub trainings: Vec<PathBuf>,
    /// The ensemble-select stage's outputs (decision.json).
    pub select: Option<PathBuf>,
    /// The postprocess stage's outputs (postprocessing.json).
    pub postprocess: Option<PathBuf>,
    /// Images predicted, and where their predictions are.
    pub test_images: Option<PathBuf>,
    pub predictions: Option<PathBuf>,
    /// The evaluate stage's outputs (summary.json of the test predictions).
    pub evaluation: Option<PathBuf>,
    /// The evaluate stage's reference folder (the test labels).
    pub test_labels: Option<PathBuf>,
}

/// The sources of a pipeline as it stands: every instance's status (why it is stale), the latest
/// run's outcomes (`last_run.json`), and the outputs of its fresh nnU-Net stages.
pub fn from_engine(engine: &Engine) -> Result<Sources, RunError> {
    let statuses = status(engine, &[])?;
    let last_run = last_run(&engine.pipeline.state_dir);
    let pipeline = &engine.pipeline;
    let mut sources = Sources {
        pipeline: pipeline.name.clone(),
        ..Sources::default()
    };
    for (index, instance) in pipeline.instances.iter().enumerate() {
        let Some(found) = statuses.iter().find(|s| s.id == instance.id) else {
            continue;
        };
        let (last_outcome, last_error) = last_run.get(&instance.id).cloned().unwrap_or_default();
        sources.stages.push(StageRow {
            id: instance.id.clone(),
            kind: instance.kind.name.to_string(),
            state: state_name(found.state).to_string(),
            reasons: found.reasons.clone(),
            last_outcome,
            last_error,
            seconds: found.seconds,
            after: engine
                .dag
                .dependencies(index)
                .iter()
                .map(|&d| pipeline.instances[d].id.clone())
                .collect(),
        });
        // results are shown for instances whose outputs are current
        if found.state != State::Fresh {
            continue;
        }
        // where a stage reads from, by the names of its inputs
        let inputs = instance.implementation.inputs();
        let input = |name: &str| {
            let found = inputs.iter().find(|i| i.name == name)?;
            Some(pipeline.root.join(&found.path))
        };
        let out = instance.out_dir.clone();
        match instance.kind.name {
            "fingerprint" => {
                sources.dataset =
                    input("dataset/dataset.json").and_then(|p| p.parent().map(Path::to_path_buf))
            }
            "plan" => sources.plan = Some(out),
            "train" => sources.trainings.push(out),
            "ensemble-select" => sources.select = Some(out),
            "postprocess" => sources.postprocess = Some(out),
            "predict" => {
                sources.test_images = input("images");
                let outputs = instance.implementation.project_outputs();
                sources.predictions = outputs.first().map(|o| pipeline.root.join(o));
            }
            "evaluate" => {
                sources.evaluation = Some(out);
                sources.test_labels = input("reference");
            }
            _ => {}
        }
    }
    Ok(sources)
}

fn state_name(state: State) -> &'static str {
    match state {
        State::Fresh => "fresh",
        State::Stale => "stale",
        State::New => "new",
        State::Skipped => "skipped",
    }
}

/// Instance id -> (outcome, error) of the latest run, from `last_run.json` (absent before a run).
fn last_run(state_dir: &Path) -> BTreeMap<String, (Option<String>, Option<String>)> {
    let Ok(text) = std::fs::read_to_string(state_dir.join("last_run.json")) else {
        return BTreeMap::new();
    };
    let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else {
        return BTreeMap::new();
    };
    json["stages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|stage| {
            let id = stage["id"].as_str()?.to_string();
            let outcome = stage["outcome"].as_str().map(str::to_string);
            let error = stage["error"].as_str().map(str::to_string);
            Some((id, (outcome, error)))
        })
        .collect()
}
