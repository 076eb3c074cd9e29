//! `nnflow export-model`: nnflow's trainings as the zip `nnUNetv2_export_model_to_zip` makes, for
//! `nnUNetv2_install_pretrained_model_from_zip` and `nnUNetv2_predict` (and `nnflow predict -m`).
//! The trainings are named by the pipeline that trained them (its up-to-date `train` instances and
//! the plan they used), or by folder (`-m` trainings, `--plan` the plan stage's outputs). The zip
//! itself is [`super::export_zip`]'s.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::export_zip::{self, ExportError, ExportRequest};
use super::output::outln;
use super::{EXIT_FAILED, EXIT_INVALID, EXIT_OK};
use crate::engine::config::Instance;
use crate::engine::status::{self, State};
use crate::engine::{Engine, OpenError, RunError};
use crate::inference::model::{ModelError, ModelSource, TrainedModel, DEFAULT_CHECKPOINT};
use crate::stages::registry;

/// What `nnflow export-model` was asked.
#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:\n  \
    nnflow export-model pipelines/nnunet.toml --set dataset=data/Dataset501_Lung -o Dataset501_Lung.zip\n  \
    nnflow export-model -m pipelines/.nnflow/nnunet/out/train --plan pipelines/.nnflow/nnunet/out/plan -o model.zip\n\
    Then, with nnU-Net v2: nnUNetv2_install_pretrained_model_from_zip model.zip;\n  \
    nnUNetv2_predict -d Dataset501_Lung -c 3d_fullres -i IMAGES -o PREDICTIONS")]
pub struct ExportArgs {
    /// The pipeline that trained the models: every up-to-date instance of its `train` stages is
    /// exported (with the plan they used); give the `--set` values the run had. Instead of a
    /// pipeline, give -m and --plan.
    #[arg(required_unless_present = "trainings", conflicts_with_all = ["trainings", "plan"])]
    pub pipeline: Option<PathBuf>,
    /// With a pipeline: override a variable or a stage parameter, as `nnflow run --set`.
    #[arg(long = "set", value_name = "KEY=VALUE", requires = "pipeline")]
    pub sets: Vec<String>,
    /// With a pipeline: the training stage to export (default: every stage of kind `train`).
    #[arg(long, value_name = "STAGE", requires = "pipeline")]
    pub stage: Option<String>,
    /// Without a pipeline: nnflow training outputs (folders holding fold.json), or folders holding
    /// them (`.nnflow/<pipeline>/out/train`).
    #[arg(short = 'm', value_name = "TRAINING", num_args = 1.., requires = "plan")]
    pub trainings: Vec<PathBuf>,
    /// With -m: the plan stage's outputs folder (plans.json, dataset.json and
    /// dataset_fingerprint.json), e.g. `.nnflow/<pipeline>/out/plan`.
    #[arg(long, value_name = "DIR", requires = "trainings")]
    pub plan: Option<PathBuf>,
    /// Configurations to export (default: every one trained).
    #[arg(short = 'c', value_name = "CONFIGURATION", num_args = 1..)]
    pub configurations: Vec<String>,
    /// Folds to export (`0 1 2 3 4`, `all`); default every trained fold.
    #[arg(short = 'f', value_name = "FOLD", num_args = 1..)]
    pub folds: Vec<String>,
    /// Checkpoints to export, by nnU-Net's names (nnflow's `checkpoint_best.safetensors` is
    /// `checkpoint_best.pth`); every fold must have them.
    #[arg(long = "chk", value_name = "FILE", num_args = 1.., default_value = DEFAULT_CHECKPOINT)]
    pub checkpoints: Vec<String>,
    /// The dataset's folder name in the zip, `DatasetXXX_Name` (nnU-Net finds models by the
    /// number); default: plans.json's `dataset_name` (the dataset folder's name).
    #[arg(long, value_name = "DatasetXXX_Name")]
    pub dataset_name: Option<String>,
    /// The zip to write. An existing file is replaced only if `nnflow export-model` wrote it.
    #[arg(short = 'o', value_name = "ZIP")]
    pub output: PathBuf,
}

/// Why the trainings to export could not be found; each names the pipeline, stage or folder.
#[derive(Debug, thiserror::Error)]
pub enum ExportCommandError {
    #[error("{0}")]
    Open(#[from] OpenError),
    #[error(transparent)]
    Status(#[from] RunError),
    #[error("{}: no stage {stage}", pipeline.display())]
    UnknownStage { pipeline: PathBuf, stage: String },
    #[error("{}: stage {stage} is a {kind} stage, not a train stage", pipeline.display())]
    NotTraining {
        pipeline: PathBuf,
        stage: String,
        kind: String,
    },
    #[error("{}: no training{}{}", pipeline.display(), selection(configurations, folds), skipped_list(skipped))]
    NoTrainings {
        pipeline: PathBuf,
        configurations: Vec<String>,
        folds: Vec<String>,
        /// Instances that do not apply, with the reason.
        skipped: Vec<String>,
    },
    #[error(
        "{}: not trained yet or out of date: {}; run `nnflow run {} {}` first",
        pipeline.display(),
        instances.join(", "),
        pipeline.display(),
        instances.join(" ")
    )]
    NotUpToDate {
        pipeline: PathBuf,
        instances: Vec<String>,
    },
    #[error("the trainings use different plans ({}); export them one plan at a time", plans.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    SeveralPlans { plans: Vec<PathBuf> },
    #[error("no training of configuration {configuration} (trained: {})", trained.join(", "))]
    MissingConfiguration {
        configuration: String,
        trained: Vec<String>,
    },
    #[error(
        "{}: an nnU-Net model already ({model}); nnUNetv2_export_model_to_zip exports it",
        dir.display()
    )]
    NotNnflow { dir: PathBuf, model: String },
    #[error(transparent)]
    Model(#[from] ModelError),
}

fn selection(configurations: &[String], folds: &[String]) -> String {
    let mut text = String::new();
    if !configurations.is_empty() {
        text.push_str(&format!(" of configuration {}", configurations.join(", ")));
    }
    if !folds.is_empty() {
        text.push_str(&format!(" of fold {}", folds.join(", ")));
    }
    text
}

fn skipped_list(skipped: &[String]) -> String {
    if skipped.is_empty() {
        String::new()
    } else {
        format!(" (not applicable: {})", skipped.join("; "))
    }
}

/// Exports what `args` names; the exit code.
pub fn export_model(args: ExportArgs) -> i32 {
    let (plan_dir, models) = match trainings(&args) {
        Ok(found) => found,
        Err(error) => {
            crate::errln!("error: {error}");
            return EXIT_INVALID;
        }
    };
    let request = ExportRequest {
        plan_dir,
        models,
        folds: (!args.folds.is_empty()).then(|| args.folds.clone()),
        checkpoints: args.checkpoints.clone(),
        dataset_name: args.dataset_name.clone(),
        output: args.output.clone(),
    };
    match export_zip::export(&request) {
        Ok(exported) => {
            for model in &exported.models {
                outln!(
                    "{}: {}/{} (fold {})",
                    args.output.display(),
                    exported.dataset_name,
                    model.folder,
                    model.folds.join(", ")
                );
            }
            crate::errln!(
                "with nnU-Net v2: nnUNetv2_install_pretrained_model_from_zip {}",
                args.output.display()
            );
            for model in &exported.models {
                crate::errln!(
                    "  nnUNetv2_predict -d {} -c {} -p {} -f {} -i IMAGES -o OUT",
                    exported.dataset_name,
                    model.configuration,
                    model.plans_name,
                    model.folds.join(" ")
                );
            }
            EXIT_OK
        }
        Err(error) => {
            crate::errln!("error: {error}");
            match error {
                ExportError::File(_) | ExportError::Zip { .. } | ExportError::Pth(_) => EXIT_FAILED,
                _ => EXIT_INVALID,
            }
        }
    }
}

/// The plan stage's outputs and the trainings, one model per configuration.
fn trainings(args: &ExportArgs) -> Result<(PathBuf, Vec<TrainedModel>), ExportCommandError> {
    let (plan_dir, models) = match (&args.pipeline, &args.plan) {
        (Some(pipeline), _) => from_pipeline(pipeline, args)?,
        (None, Some(plan)) => {
            let mut models = Vec::new();
            for path in &args.trainings {
                models.extend(TrainedModel::open_all(path)?);
            }
            (plan.clone(), models)
        }
        // clap requires one or the other
        (None, None) => (PathBuf::new(), Vec::new()),
    };
    if let Some(model) = models.iter().find(|m| m.source != ModelSource::Nnflow) {
        return Err(ExportCommandError::NotNnflow {
            dir: model.dir.clone(),
            model: model.describe(),
        });
    }
    let mut models = merge(models)?;
    if !args.configurations.is_empty() {
        let trained: Vec<String> = models.iter().map(|m| m.configuration.clone()).collect();
        if let Some(missing) = args.configurations.iter().find(|c| !trained.contains(c)) {
            return Err(ExportCommandError::MissingConfiguration {
                configuration: missing.clone(),
                trained,
            });
        }
        models.retain(|m| args.configurations.contains(&m.configuration));
    }
    Ok((plan_dir, models))
}

/// The pipeline's trainings (those `--stage`, `-c` and `-f` select), which must be up to date, and
/// the plan they were trained on.
fn from_pipeline(
    pipeline: &Path,
    args: &ExportArgs,
) -> Result<(PathBuf, Vec<TrainedModel>), ExportCommandError> {
    let engine = Engine::open(pipeline, &args.sets, registry())?;
    let instances = &engine.pipeline.instances;
    if let Some(stage) = &args.stage {
        let instance =
            instances
                .iter()
                .find(|i| i.stage == *stage)
                .ok_or_else(|| ExportCommandError::UnknownStage {
                    pipeline: pipeline.to_path_buf(),
                    stage: stage.clone(),
                })?;
        if instance.kind.name != crate::stages::train::KIND.name {
            return Err(ExportCommandError::NotTraining {
                pipeline: pipeline.to_path_buf(),
                stage: stage.clone(),
                kind: instance.kind.name.to_string(),
            });
        }
    }
    let chosen: Vec<&Instance> = instances
        .iter()
        .filter(|i| match &args.stage {
            Some(stage) => i.stage == *stage,
            None => i.kind.name == crate::stages::train::KIND.name,
        })
        .filter(|i| selected(&args.configurations, param(i, "configuration")))
        .filter(|i| selected(&args.folds, param(i, "fold")))
        .collect();
    let no_trainings = |skipped| ExportCommandError::NoTrainings {
        pipeline: pipeline.to_path_buf(),
        configurations: args.configurations.clone(),
        folds: args.folds.clone(),
        skipped,
    };
    if chosen.is_empty() {
        return Err(no_trainings(Vec::new()));
    }
    let ids: Vec<String> = chosen.iter().map(|i| i.id.clone()).collect();
    let mut outdated = Vec::new();
    let mut skipped = Vec::new();
    let mut fresh = Vec::new();
    for report in status::status(&engine, &ids)?
        .into_iter()
        .filter(|s| ids.contains(&s.id))
    {
        match report.state {
            State::Fresh => fresh.push(report.id),
            State::Skipped => skipped.push(format!("{}: {}", report.id, report.reasons.join("; "))),
            State::Stale | State::New => outdated.push(report.id),
        }
    }
    if !outdated.is_empty() {
        return Err(ExportCommandError::NotUpToDate {
            pipeline: pipeline.to_path_buf(),
            instances: outdated,
        });
    }
    if fresh.is_empty() {
        return Err(no_trainings(skipped));
    }
    let mut plans: Vec<PathBuf> = Vec::new();
    let mut models = Vec::new();
    for instance in chosen.iter().filter(|i| fresh.contains(&i.id)) {
        let plan = engine
            .pipeline
            .root
            .join(param(instance, "plan").unwrap_or_default());
        if !plans.contains(&plan) {
            plans.push(plan);
        }
        models.extend(TrainedModel::open_all(&instance.out_dir)?);
    }
    if plans.len() > 1 {
        return Err(ExportCommandError::SeveralPlans { plans });
    }
    Ok((plans.remove(0), models))
}

/// Whether `value` is among `wanted` (everything is when nothing is named).
fn selected(wanted: &[String], value: Option<String>) -> bool {
    wanted.is_empty() || value.is_some_and(|v| wanted.contains(&v))
}

/// An instance's parameter as text (`fold = 0` is `"0"`), where it is a string or an integer.
fn param(instance: &Instance, key: &str) -> Option<String> {
    match instance.params_node.get(key)?.to_toml() {
        toml::Value::String(s) => Some(s),
        toml::Value::Integer(i) => Some(i.to_string()),
        _ => None,
    }
}

/// One model per configuration, with the folds of every training of it (nnflow's trainings).
fn merge(models: Vec<TrainedModel>) -> Result<Vec<TrainedModel>, ModelError> {
    let mut by_configuration: BTreeMap<String, TrainedModel> = BTreeMap::new();
    for model in models {
        let Some(merged) = by_configuration.get_mut(&model.configuration) else {
            by_configuration.insert(model.configuration.clone(), model);
            continue;
        };
        for fold in model.folds {
            if let Some(first) = merged.folds.iter().find(|f| f.fold == fold.fold) {
                return Err(ModelError::DuplicateFold {
                    dir: common_parent(&first.dir, &fold.dir),
                    fold: fold.fold,
                    first: first.dir.clone(),
                    second: fold.dir,
                });
            }
            merged.folds.push(fold);
        }
        merged.dir = common_parent(&merged.dir, &model.dir);
    }
    let mut models: Vec<TrainedModel> = by_configuration.into_values().collect();
    for model in &mut models {
        // numbered folds ascending, then `all`
        model
            .folds
            .sort_by_key(|f| f.fold.parse::<u32>().map_or(u64::MAX, u64::from));
    }
    Ok(models)
}

/// The deepest folder holding both paths (for messages).
fn common_parent(a: &Path, b: &Path) -> PathBuf {
    a.ancestors()
        .find(|ancestor| b.starts_with(ancestor))
        .unwrap_or(Path::new(""))
        .to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::model::{CheckpointFormat, TrainedFold};

    fn training(dir: &str, configuration: &str, fold: &str) -> TrainedModel {
        TrainedModel {
            dir: dir.into(),
            configuration: configuration.into(),
            source: ModelSource::Nnflow,
            format: CheckpointFormat::Safetensors,
            folds: vec![TrainedFold {
                fold: fold.into(),
                dir: dir.into(),
                checkpoints: BTreeMap::new(),
            }],
        }
    }

    #[test]
    fn trainings_merge_by_configuration_with_sorted_folds() {
        let merged = merge(vec![
            training("/o/train/c=3d,f=all", "3d_fullres", "all"),
            training("/o/train/c=2d,f=0", "2d", "0"),
            training("/o/train/c=3d,f=1", "3d_fullres", "1"),
            training("/o/train/c=3d,f=0", "3d_fullres", "0"),
        ])
        .unwrap();
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].configuration, "2d");
        let three_d = &merged[1];
        assert_eq!(three_d.dir, Path::new("/o/train"));
        let folds: Vec<&str> = three_d.folds.iter().map(|f| f.fold.as_str()).collect();
        assert_eq!(folds, ["0", "1", "all"]);

        let err = merge(vec![
            training("/a/x", "3d_fullres", "0"),
            training("/a/y", "3d_fullres", "0"),
        ])
        .unwrap_err();
        assert!(
            matches!(&err, ModelError::DuplicateFold { fold, .. } if fold == "0"),
            "{err}"
        );
    }
}
