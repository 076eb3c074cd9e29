//! What a Slurm run leaves on the shared filesystem: the run's jobs (`run.json`), the scripts and
//! instance lists they run, their logs, and one receipt per instance written by the job itself
//! when it ends (outcome, time, error). `<state>/slurm/latest` names the latest run.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::executor::Outcome;
use crate::engine::record::file_safe;
use crate::file_error::FileError;

/// One `sbatch` submission: a job array whose task `i` runs `instances[i]`.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Submitted {
    pub job_id: String,
    pub stage: String,
    pub instances: Vec<String>,
}

impl Submitted {
    /// The Slurm id of the task running `instance` (`<job>_<index>`).
    pub fn task_id(&self, instance: &str) -> Option<String> {
        let index = self.instances.iter().position(|i| i == instance)?;
        Some(format!("{}_{index}", self.job_id))
    }
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct SlurmRun {
    pub run_id: String,
    /// Shared by every job of the run, so one `squeue --name` covers it.
    pub job_name: String,
    pub submitted_unix: u64,
    pub jobs: Vec<Submitted>,
}

/// How the instance ended, as the job saw it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum JobOutcome {
    Ran,
    Cached,
    Failed,
    Skipped,
    NotApplicable,
}

impl From<Outcome> for JobOutcome {
    fn from(outcome: Outcome) -> JobOutcome {
        match outcome {
            Outcome::Ran => JobOutcome::Ran,
            Outcome::Cached => JobOutcome::Cached,
            Outcome::Failed => JobOutcome::Failed,
            Outcome::Skipped => JobOutcome::Skipped,
            Outcome::NotApplicable => JobOutcome::NotApplicable,
        }
    }
}

impl From<JobOutcome> for Outcome {
    fn from(outcome: JobOutcome) -> Outcome {
        match outcome {
            JobOutcome::Ran => Outcome::Ran,
            JobOutcome::Cached => Outcome::Cached,
            JobOutcome::Failed => Outcome::Failed,
            JobOutcome::Skipped => Outcome::Skipped,
            JobOutcome::NotApplicable => Outcome::NotApplicable,
        }
    }
}

/// Written by a job when its instance ends.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Receipt {
    pub id: String,
    pub outcome: JobOutcome,
    pub seconds: f64,
    pub error: Option<String>,
    /// `SLURM_JOB_ID` (with `_<task>` for an array task) and the node.
    pub job: String,
    pub host: String,
    pub started_unix: u64,
    pub finished_unix: u64,
}

/// The folders of one run.
pub struct RunDir(pub PathBuf);

impl RunDir {
    pub fn new(state_dir: &Path, run_id: &str) -> RunDir {
        RunDir(state_dir.join("slurm").join(run_id))
    }

    /// The latest run of the pipeline, if any.
    pub fn latest(state_dir: &Path) -> Option<(RunDir, SlurmRun)> {
        let run_id = std::fs::read_to_string(state_dir.join("slurm").join("latest")).ok()?;
        let dir = RunDir::new(state_dir, run_id.trim());
        let run = crate::atomic_file::read_json(&dir.0.join("run.json")).ok()?;
        Some((dir, run))
    }

    pub fn save(&self, state_dir: &Path, run: &SlurmRun) -> Result<(), FileError> {
        crate::atomic_file::write_json(&self.0.join("run.json"), run)?;
        crate::atomic_file::write_atomically(&state_dir.join("slurm").join("latest"), run.run_id.as_bytes())
            .map_err(FileError::io(state_dir))
    }

    pub fn receipt_path(&self, id: &str) -> PathBuf {
        self.0.join("receipts").join(format!("{}.json", file_safe(id)))
    }

    pub fn receipt(&self, id: &str) -> Option<Receipt> {
        crate::atomic_file::read_json(&self.receipt_path(id)).ok()
    }

    pub fn write_receipt(&self, receipt: &Receipt) -> Result<(), FileError> {
        let path = self.receipt_path(&receipt.id);
        std::fs::create_dir_all(path.parent().expect("a folder")).map_err(FileError::io(&path))?;
        crate::atomic_file::write_json(&path, receipt)
    }

    /// Instances to run even when fresh (`--force`), one per line.
    pub fn forced_list(&self) -> PathBuf {
        self.0.join("forced")
    }

    pub fn logs(&self) -> PathBuf {
        self.0.join("logs")
    }

    pub fn scripts(&self) -> PathBuf {
        self.0.join("scripts")
    }
}
