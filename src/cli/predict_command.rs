//! `nnflow predict`: nnUNetv2_predict's command line on the `predict` stage. It writes a one-stage
//! pipeline, `nnflow-predict.toml`, into the folder it runs in and runs it there, so a prediction
//! is cached like any stage (the same call again computes nothing) and the file shows, and
//! `nnflow run` repeats, exactly what ran. The folder is the project: the output must lie inside
//! it; images and models may lie anywhere.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::commands::run_pipeline;
use super::{PipelineArgs, EXIT_INVALID};
use crate::torch_env::DeviceChoice;

/// The pipeline file `nnflow predict` writes; replaced only when it wrote it (the first line).
pub const PIPELINE_FILE: &str = "nnflow-predict.toml";
const MARKER: &str = "# written by `nnflow predict`";

/// What `nnflow predict` was asked.
#[derive(clap::Args, Debug)]
pub struct PredictArgs {
    /// Folder of images to predict (nnU-Net naming `<case>_0000.nii.gz`, or plain files).
    #[arg(short = 'i')]
    pub input: PathBuf,
    /// Folder for the predictions; inside the current folder.
    #[arg(short = 'o')]
    pub output: PathBuf,
    /// An nnU-Net v2 model: a results folder (`<trainer>__<plans>__<configuration>`), a folder
    /// above such folders, or a zip from `nnUNetv2_export_model_to_zip`; or nnflow trainings
    /// (with --plan). Several are ensembled.
    #[arg(short = 'm', required = true)]
    pub models: Vec<PathBuf>,
    /// With -m nnflow trainings (folders holding fold.json, or above them): the plan stage's
    /// outputs they were trained with (plans.json and dataset.json), e.g. `.nnflow/nnunet/out/plan`.
    #[arg(long, value_name = "DIR")]
    pub plan: Option<PathBuf>,
    /// Folds to use (`0 1 2 3 4`, or `all`); default every fold the model has.
    #[arg(short = 'f', num_args = 1..)]
    pub folds: Vec<String>,
    /// Each fold's checkpoint file (nnU-Net's `-chk`).
    #[arg(long = "chk", value_name = "FILE", default_value = "checkpoint_final.pth")]
    pub checkpoint: String,
    /// Sliding-window step as a fraction of the patch.
    #[arg(long, default_value_t = 0.5)]
    pub step_size: f64,
    /// No mirroring test-time augmentation.
    #[arg(long)]
    pub disable_tta: bool,
    /// Also write each case's probabilities (`<case>.npy`).
    #[arg(long)]
    pub save_probabilities: bool,
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// For a cascade's second stage (3d_cascade_fullres): the previous stage's segmentations of
    /// the same images, `<case><file ending>` in DIR; they become extra input channels, as in
    /// nnUNetv2_predict. An error for models that are no cascade.
    #[arg(long, value_name = "DIR")]
    pub prev_stage_predictions: Option<PathBuf>,
    /// Print one JSON object (see README) instead of progress.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Device {
    Auto,
    Cpu,
    Cuda,
}

/// The pipeline's only stage, as the TOML the file holds.
#[derive(Serialize)]
struct PredictStageToml {
    kind: &'static str,
    images: String,
    output: String,
    models: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    plan: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    folds: Vec<String>,
    checkpoint: String,
    step_size: f64,
    mirroring: bool,
    save_probabilities: bool,
    device: DeviceChoice,
    #[serde(skip_serializing_if = "Option::is_none")]
    previous_stage_predictions: Option<String>,
}

#[derive(Serialize)]
struct PipelineToml {
    pipeline: PipelineSection,
    stages: Stages,
}

#[derive(Serialize)]
struct PipelineSection {
    name: &'static str,
}

#[derive(Serialize)]
struct Stages {
    predict: PredictStageToml,
}

/// Writes the pipeline for `args` into the current folder and runs it; the exit code.
pub fn predict(args: PredictArgs) -> i32 {
    match write_pipeline(&args) {
        Ok(file) => {
            let pipeline = PipelineArgs {
                pipeline: file,
                sets: Vec::new(),
            };
            run_pipeline(&pipeline, args.json)
        }
        Err(message) => {
            crate::errln!("error: {message}");
            EXIT_INVALID
        }
    }
}

/// The pipeline file for `args`, written where nnflow may write it. The error says why not.
fn write_pipeline(args: &PredictArgs) -> Result<PathBuf, String> {
    let project = std::env::current_dir().map_err(|e| format!("cannot read the current folder: {e}"))?;
    let output = project.join(&args.output);
    if !lexically_inside(&output, &project) {
        return Err(format!(
            "-o {}: nnflow writes only inside the folder it runs in ({}); run it from a folder that \
             holds the output folder",
            args.output.display(),
            project.display()
        ));
    }
    let file = project.join(PIPELINE_FILE);
    if let Ok(text) = std::fs::read_to_string(&file) {
        if !text.starts_with(MARKER) {
            return Err(format!(
                "{} exists and was not written by `nnflow predict`; it is left as it is (move it, or \
                 run from another folder)",
                file.display()
            ));
        }
    }
    let stage = PredictStageToml {
        kind: "predict",
        images: as_written(&args.input, &project),
        output: as_written(&args.output, &project),
        models: args.models.iter().map(|m| as_written(m, &project)).collect(),
        plan: args.plan.as_ref().map(|plan| as_written(plan, &project)),
        folds: args.folds.clone(),
        checkpoint: args.checkpoint.clone(),
        step_size: args.step_size,
        mirroring: !args.disable_tta,
        save_probabilities: args.save_probabilities,
        device: match args.device {
            Device::Auto => DeviceChoice::Auto,
            Device::Cpu => DeviceChoice::Cpu,
            Device::Cuda => DeviceChoice::Cuda,
        },
        previous_stage_predictions: args
            .prev_stage_predictions
            .as_ref()
            .map(|folder| as_written(folder, &project)),
    };
    let pipeline = PipelineToml {
        pipeline: PipelineSection { name: "predict" },
        stages: Stages { predict: stage },
    };
    let body = toml::to_string(&pipeline).map_err(|e| format!("cannot write the pipeline: {e}"))?;
    let text = format!("{MARKER}; `nnflow run {PIPELINE_FILE}` repeats it.\n\n{body}");
    crate::atomic_file::write_atomically(&file, text.as_bytes())
        .map_err(|e| format!("{}: {e}", file.display()))?;
    Ok(file)
}

/// A path as the pipeline file gives it: relative to the project when it lies inside it.
fn as_written(path: &Path, project: &Path) -> String {
    let absolute = project.join(path);
    match absolute.strip_prefix(project) {
        Ok(relative) if lexically_inside(&absolute, project) => relative.to_string_lossy().into_owned(),
        _ => absolute.to_string_lossy().into_owned(),
    }
}

/// Whether `path` lies inside `folder` without leaving it through `..` (the engine checks
/// symlinks as well, when it loads the pipeline).
fn lexically_inside(path: &Path, folder: &Path) -> bool {
    path.strip_prefix(folder).is_ok_and(|rest| {
        !rest.as_os_str().is_empty()
            && rest
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_) | std::path::Component::CurDir))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_inside_the_project_are_written_relative() {
        let project = Path::new("/p");
        assert_eq!(as_written(Path::new("out"), project), "out");
        assert_eq!(as_written(Path::new("/p/a/b"), project), "a/b");
        assert_eq!(as_written(Path::new("/data/in"), project), "/data/in");
        assert_eq!(as_written(Path::new("../in"), project), "/p/../in");
        assert!(lexically_inside(Path::new("/p/out"), project));
        assert!(!lexically_inside(Path::new("/p"), project));
        assert!(!lexically_inside(Path::new("/p/../out"), project));
        assert!(!lexically_inside(Path::new("/q/out"), project));
    }
}
