//! The `nnflow` command line: arguments in, exit code out. Exit codes: 0 success, 1 a stage
//! failed, 2 invalid pipeline or usage, 130 interrupted.

mod commands;
mod data_commands;
pub mod export_command;
pub mod export_zip;
mod output;
mod predict_command;
mod report_command;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::engine::config::raw::ExecutorKind;
use crate::engine::remote::{RemoteChoice, RemoteMode, UrlChoice};

pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILED: i32 = 1;
pub const EXIT_INVALID: i32 = 2;
pub const EXIT_INTERRUPTED: i32 = 130;

#[derive(Parser, Debug)]
#[command(
    name = "nnflow",
    version,
    about = "nnU-Net as a declarative, content-cached pipeline engine"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command that reads a pipeline accepts.
#[derive(clap::Args, Debug, Clone)]
pub struct PipelineArgs {
    /// The pipeline file (TOML).
    pub pipeline: PathBuf,
    /// Override a variable (`NAME=VALUE`) or a stage parameter (`STAGE.PARAM=VALUE`, every matrix
    /// instance). VALUE is read as TOML (`'folds=[0,1]'`), else taken as a string.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
}

/// Which remote cache a command uses (besides `[pipeline] remote_cache` and the environment).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RemoteArgs {
    /// Share results through this remote cache: http(s)://, s3://, gs://, az:// or file:// (overrides
    /// the pipeline's `remote_cache` and NNFLOW_REMOTE_CACHE).
    #[arg(long, value_name = "URL", conflicts_with = "no_remote_cache")]
    pub remote_cache: Option<String>,
    /// Use no remote cache, whatever the pipeline or NNFLOW_REMOTE_CACHE says.
    #[arg(long)]
    pub no_remote_cache: bool,
    /// `read`: restore from the remote, upload nothing; `write`: upload only; `read-write`
    /// (default; NNFLOW_REMOTE_CACHE_MODE sets it too).
    #[arg(long, value_enum, value_name = "MODE")]
    pub remote_cache_mode: Option<RemoteMode>,
}

impl RemoteArgs {
    pub fn choice(&self) -> RemoteChoice {
        let url = match (&self.remote_cache, self.no_remote_cache) {
            (_, true) => UrlChoice::Off,
            (Some(url), false) => UrlChoice::Url(url.clone()),
            (None, false) => UrlChoice::Configured,
        };
        RemoteChoice {
            url,
            mode: self.remote_cache_mode,
        }
    }

    /// The same choice as environment variables, for processes this one starts (Slurm jobs).
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = Vec::new();
        if self.no_remote_cache {
            env.push(("NNFLOW_REMOTE_CACHE".to_string(), String::new()));
        } else if let Some(url) = &self.remote_cache {
            env.push(("NNFLOW_REMOTE_CACHE".to_string(), url.clone()));
        }
        if let Some(mode) = self.remote_cache_mode {
            let name = serde_json::to_value(mode)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string));
            env.push(("NNFLOW_REMOTE_CACHE_MODE".to_string(), name.unwrap_or_default()));
        }
        env
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the pipeline (or the named stages and what they depend on).
    Run {
        #[command(flatten)]
        pipeline: PipelineArgs,
        /// Stage names or instance ids (e.g. `train` or `train[fold=0]`); default: all.
        stages: Vec<String>,
        /// Run these stages even if they are fresh (repeatable).
        #[arg(long, value_name = "STAGE")]
        force: Vec<String>,
        /// Show what would run and why, run nothing.
        #[arg(long)]
        dry_run: bool,
        /// Keep running everything that does not depend on a failed stage.
        #[arg(long)]
        keep_going: bool,
        /// Most stages running at once (default: CPU cores).
        #[arg(short = 'j', long)]
        jobs: Option<usize>,
        /// CUDA device indices stages may use, e.g. `0,1` (default: all detected; `--gpus=` for none).
        #[arg(long, value_delimiter = ',')]
        gpus: Option<Vec<usize>>,
        /// Print one JSON object (see README) instead of progress.
        #[arg(long)]
        json: bool,
        /// Where stages run (default: the pipeline's `executor`, else local).
        #[arg(long, value_enum)]
        executor: Option<ExecutorKind>,
        /// With the Slurm executor: submit the jobs and return (`nnflow status` follows them).
        #[arg(long)]
        detach: bool,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Predict a folder of images with nnU-Net models, as `nnUNetv2_predict` does (cached: the
    /// same call again computes nothing). Writes and runs `nnflow-predict.toml` in this folder.
    Predict(predict_command::PredictArgs),
    /// Write nnflow's trainings as the zip `nnUNetv2_export_model_to_zip` makes: nnU-Net v2
    /// installs it (`nnUNetv2_install_pretrained_model_from_zip`) and predicts with it, as does
    /// `nnflow predict -m`.
    ExportModel(export_command::ExportArgs),
    /// Cancel the Slurm jobs of the pipeline's latest Slurm run.
    Cancel {
        #[command(flatten)]
        pipeline: PipelineArgs,
    },
    /// Inside a Slurm job: bring one stage instance up to date and write its receipt.
    #[command(hide = true)]
    SlurmJob {
        #[command(flatten)]
        pipeline: PipelineArgs,
        #[arg(long)]
        run_dir: PathBuf,
        /// The file listing the job array's instances, one per task.
        #[arg(long)]
        ids: PathBuf,
    },
    /// Show every stage instance as fresh, stale or new, and why.
    Status {
        #[command(flatten)]
        pipeline: PipelineArgs,
        /// Stage names or instance ids; default: all.
        stages: Vec<String>,
        /// Print one JSON object (see README).
        #[arg(long)]
        json: bool,
        /// Exit with 1 when any instance is stale or new (a CI check that the lock file and the
        /// outputs match the pipeline); 0 when all are fresh.
        #[arg(long)]
        exit_code: bool,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Write the report page: stage states, dataset and plan, training curves, cross-validation,
    /// Dice per case and prediction overlays, in one folder (default `.nnflow/<name>/report`).
    Report {
        #[command(flatten)]
        pipeline: PipelineArgs,
        /// The folder to write (new, empty, or an earlier report).
        #[arg(short = 'o', long)]
        out: Option<PathBuf>,
        /// Open the page in the browser afterwards.
        #[arg(long)]
        open: bool,
    },
    /// Print the DAG.
    Dag {
        #[command(flatten)]
        pipeline: PipelineArgs,
        #[arg(long, value_enum, default_value_t = DagFormat::Text)]
        format: DagFormat,
    },
    /// Check the pipeline and report every problem.
    Validate {
        #[command(flatten)]
        pipeline: PipelineArgs,
    },
    /// Print the JSON Schema of the pipeline format.
    Schema,
    /// Re-run affected stages whenever the pipeline file or an input changes.
    Watch {
        #[command(flatten)]
        pipeline: PipelineArgs,
        /// Most stages running at once (default: CPU cores).
        #[arg(short = 'j', long)]
        jobs: Option<usize>,
        /// Milliseconds of quiet before a change triggers a run.
        #[arg(long, default_value_t = 300)]
        debounce_ms: u64,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Remove cache entries the pipeline's current state does not reference.
    Gc {
        #[command(flatten)]
        pipeline: PipelineArgs,
        /// Also keep the entries used by the last N runs in this work directory.
        #[arg(long, default_value_t = 0)]
        keep_last: usize,
    },
    /// Build an nnU-Net-layout dataset from a folder of images per channel and a folder of
    /// segmentations with matching file names, or (`--msd`) from a Medical Segmentation Decathlon
    /// task, as nnUNetv2_convert_MSD_dataset. Checks it; writes nothing if it is invalid.
    Import {
        /// Image folder, one per channel, in channel order (repeatable).
        #[arg(long = "images", required_unless_present = "msd")]
        images: Vec<PathBuf>,
        /// Segmentation folder.
        #[arg(long, required_unless_present = "msd")]
        labels: Option<PathBuf>,
        /// Channel name per image folder, e.g. `CT` or `T2` (repeatable; chooses normalization).
        #[arg(long = "channel", required_unless_present = "msd")]
        channels: Vec<String>,
        /// Label `name=value` (repeatable); default: background=0 and label_<v> for values found.
        #[arg(long = "label", value_name = "NAME=VALUE")]
        label_values: Vec<String>,
        /// Or a TOML file with `channels = [...]` and `[labels] name = value`.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Convert this MSD task folder (`TaskXX_Name`, 4D images split into channels) instead.
        #[arg(long, value_name = "TASK_FOLDER",
              conflicts_with_all = ["images", "labels", "channels", "label_values", "config"])]
        msd: Option<PathBuf>,
        /// With --msd: the id of the dataset's name `DatasetXXX_Name` (default: the task's number).
        #[arg(long, requires = "msd")]
        dataset_id: Option<u32>,
        /// The dataset folder to create (e.g. Dataset501_Lung). With --msd, an existing folder
        /// (e.g. nnUNet_raw) gets the dataset inside it, named `DatasetXXX_Name` like nnU-Net's.
        #[arg(short = 'o', long, visible_alias = "output")]
        out: PathBuf,
    },
    /// Check a dataset in nnU-Net's layout and list every bad case (exit 2 if any).
    Check { dataset: PathBuf },
    /// Write a small synthetic dataset in nnU-Net's layout (demo, tests, benchmarks).
    Synth {
        dataset: PathBuf,
        #[arg(long, default_value_t = 8)]
        cases: usize,
        /// Shape z,y,x.
        #[arg(long, value_delimiter = ',', default_values_t = [24, 32, 32])]
        shape: Vec<usize>,
        /// Spacing z,y,x in mm.
        #[arg(long, value_delimiter = ',', default_values_t = [2.0, 1.0, 1.0])]
        spacing: Vec<f64>,
        #[arg(long, default_value_t = 1)]
        channels: usize,
        #[arg(long, default_value_t = 2)]
        foreground_labels: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Vary each case's spacing per axis by up to this fraction (e.g. 0.1).
        #[arg(long, default_value_t = 0.0)]
        spacing_variation: f64,
        /// Also write this many test cases to imagesTs / labelsTs.
        #[arg(long, default_value_t = 0)]
        test_cases: usize,
        /// The image format, as a file ending: .nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd, .tiff (3D),
        /// or .png, .bmp, .tif (2D pictures: give a shape of one slice, e.g. 1,64,64).
        #[arg(long, default_value = ".nii.gz")]
        format: String,
    },
    /// Print nnflow and libtorch versions, CUDA availability, GPU and thread counts.
    Doctor {
        #[arg(long)]
        json: bool,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DagFormat {
    Text,
    Dot,
    Mermaid,
}

/// Parses the process arguments and runs the command; returns the exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { EXIT_INVALID } else { EXIT_OK };
        }
    };
    let code = commands::dispatch(cli.command);
    if code == EXIT_OK && output::failed() {
        EXIT_FAILED
    } else {
        code
    }
}
