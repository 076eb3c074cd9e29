//! The `train` stage: one nnU-Net training run (configuration x fold) in the `nnflow-torch` worker.
//!
//! The stage is keyed by its parameters, dataset.json, plans.json, the splits file and (through
//! the reference) the preprocessed cases. Its resume folder keeps the latest checkpoint together
//! with an identity: the parameters except `epochs` and the final-validation settings, plus a
//! digest of every input's contents. A rerun with the same identity continues from that
//! checkpoint: after a kill, or when only `epochs` grew.

use std::path::{Path, PathBuf};
use std::process::Command;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::process::run_logged_polling;
use super::{to_json, Kind, Stage, StageContext, StageError, StageInput};
use crate::file_error::FileError;
use crate::train::job::TrainJob;
use crate::train::params::TrainParams;
use crate::train::progress::Progress;

/// Version 2: cases read in the chunked layout; predictions for the cascade's next stage written
/// as chunked label arrays (`next_stage/<next>/<case>.zarr`), not `.npy`.
pub const KIND: Kind = Kind {
    name: "train",
    version: 2,
    toolchain: super::LIBTORCH,
    schema: |generator| generator.subschema_for::<TrainStage>(),
    build: super::finite::build_finite::<TrainStage>,
};

/// Trains nnU-Net's network of the plan (PlainConvUNet, or ResidualEncoderUNet for the ResEnc
/// presets) for one configuration and fold. Every hyperparameter and the
/// augmentation list are parameters, with nnU-Net v2's defaults.
#[derive(Deserialize, Serialize, JsonSchema, Debug)]
#[serde(transparent)]
pub struct TrainStage(pub TrainParams);

impl Stage for TrainStage {
    fn inputs(&self) -> Vec<StageInput> {
        let p = &self.0;
        let mut inputs = vec![
            StageInput {
                name: "dataset/dataset.json".into(),
                path: format!("{}/dataset.json", p.dataset),
            },
            StageInput {
                name: "plan".into(),
                path: format!("{}/plans.json", p.plan),
            },
        ];
        if let Some(splits) = &p.splits {
            inputs.push(StageInput {
                name: "splits".into(),
                path: splits.clone(),
            });
        }
        if let Some(weights) = &p.pretrained_weights {
            inputs.push(StageInput {
                name: "pretrained_weights".into(),
                path: weights.clone(),
            });
        }
        inputs
    }

    fn params_json(&self) -> serde_json::Value {
        to_json(&self.0)
    }

    fn not_applicable(&self, root: &Path) -> Option<String> {
        crate::preprocess::case_io::unplanned_configuration(
            &root.join(&self.0.plan).join("plans.json"),
            &self.0.configuration,
        )
    }

    fn run(&self, ctx: &StageContext) -> Result<(), StageError> {
        self.0.validate()?;
        let absolute = |p: &str| -> String { ctx.root.join(p).to_string_lossy().into_owned() };
        let mut params = self.0.clone();
        params.dataset = absolute(&params.dataset);
        params.plan = absolute(&params.plan);
        params.preprocessed = absolute(&params.preprocessed);
        params.splits = params.splits.as_deref().map(absolute);
        params.pretrained_weights = params.pretrained_weights.as_deref().map(absolute);
        params.previous_stage = params.previous_stage.iter().map(|p| absolute(p)).collect();
        let identity = serde_json::json!({
            "params": params.resume_identity(),
            "inputs": inputs_digest(&params)?,
        });
        std::fs::create_dir_all(ctx.resume_dir).map_err(FileError::io(ctx.resume_dir))?;
        let job = TrainJob {
            params,
            identity,
            out_dir: ctx.out_dir.to_path_buf(),
            resume_dir: ctx.resume_dir.to_path_buf(),
            threads: ctx.threads.max(1) as usize,
        };
        let job_file = ctx.resume_dir.join("job.json");
        crate::atomic_file::write_json(&job_file, &job)?;
        let mut command = Command::new(crate::torch_env::worker_path());
        command.arg("train").arg(&job_file).current_dir(ctx.root);
        let progress_file = ctx.resume_dir.join("progress.json");
        let mut shown = None;
        Ok(run_logged_polling(command, ctx, "training", || {
            let Ok(text) = std::fs::read_to_string(&progress_file) else {
                return;
            };
            if shown.as_ref() != Some(&text) {
                if let Ok(p) = serde_json::from_str::<Progress>(&text) {
                    (ctx.status)(&p.describe());
                }
                shown = Some(text);
            }
        })?)
    }
}

/// blake3 over every file the training reads (sorted relative paths and contents), so a
/// checkpoint is never resumed on changed data.
fn inputs_digest(params: &TrainParams) -> Result<String, FileError> {
    let mut files: Vec<(String, PathBuf)> = vec![
        (
            "dataset.json".into(),
            Path::new(&params.dataset).join("dataset.json"),
        ),
        ("plans.json".into(), Path::new(&params.plan).join("plans.json")),
    ];
    if let Some(splits) = &params.splits {
        files.push(("splits".into(), PathBuf::from(splits)));
    }
    // other starting weights are another training: never resumed from this one's checkpoint
    if let Some(weights) = &params.pretrained_weights {
        files.push(("pretrained_weights".into(), PathBuf::from(weights)));
    }
    // the cascade's previous-stage predictions made for this configuration (label array folders)
    for training in &params.previous_stage {
        let folder = Path::new(training)
            .join(crate::train::previous_stage::FOLDER)
            .join(&params.configuration);
        if folder.is_dir() {
            files.extend(files_under(&folder, "previous_stage")?);
        }
    }
    // the cases: properties files and every chunk file of their arrays
    files.extend(files_under(Path::new(&params.preprocessed), "preprocessed")?);
    let mut total = blake3::Hasher::new();
    for (name, path) in files {
        let mut file_hash = blake3::Hasher::new();
        file_hash.update_mmap_rayon(&path).map_err(FileError::io(&path))?;
        total.update(name.as_bytes());
        total.update(file_hash.finalize().as_bytes());
    }
    Ok(total.finalize().to_hex().to_string())
}

/// Every file under `folder`, sorted, named `<prefix>/<relative path>`.
fn files_under(folder: &Path, prefix: &str) -> Result<Vec<(String, PathBuf)>, FileError> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(folder).map_err(FileError::io(folder))? {
        let path = entry.map_err(FileError::io(folder))?.path();
        let name = format!(
            "{prefix}/{}",
            path.file_name().unwrap_or_default().to_string_lossy()
        );
        if path.is_dir() {
            files.extend(files_under(&path, &name)?);
        } else {
            files.push((name, path));
        }
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pretrained_weights_are_keyed_by_their_contents() {
        let params: toml::Value = toml::from_str(
            r#"
            dataset = "D"
            plan = "plan"
            preprocessed = "pre"
            configuration = "3d_fullres"
            pretrained_weights = "models/checkpoint_final.pth"
            "#,
        )
        .unwrap();
        let stage = (KIND.build)(params).unwrap();
        assert!(
            stage
                .inputs()
                .iter()
                .any(|i| i.name == "pretrained_weights" && i.path == "models/checkpoint_final.pth"),
            "{:?}",
            stage.inputs()
        );
        // where the file lies is no parameter: moving it re-runs nothing
        assert!(stage.params_json().get("pretrained_weights").is_none());
    }
}
