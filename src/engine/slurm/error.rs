//! Why a Slurm run could not be submitted, followed or cancelled: [`SlurmError`], and
//! [`SubmitError`], one failed `sbatch`.

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;

use crate::engine::{FsError, RunError};
use crate::file_error::FileError;

#[derive(Debug, thiserror::Error)]
pub enum SlurmError {
    /// Selecting the instances or checking what is fresh, as for a local run.
    #[error(transparent)]
    Run(#[from] RunError),
    #[error(transparent)]
    Fs(#[from] FsError),
    /// A script, an instance list or a state file of the run.
    #[error(transparent)]
    File(#[from] FileError),
    #[error("cannot find the nnflow binary: {0}")]
    NoBinary(#[source] io::Error),
    #[error("submitting stage `{stage}`: {source}")]
    Submit { stage: String, source: SubmitError },
    /// The probe job did not find the work directory, the cache or the binary; `said` is what
    /// the probe printed ("...; "), if anything.
    #[error(
        "the Slurm jobs cannot use this work directory ({said}{source}): the work directory {}, the \
         cache {} and the nnflow binary must be on a filesystem the compute nodes share and can \
         write. Nothing was submitted.",
        work_dir.display(),
        cache_dir.display()
    )]
    NotShared {
        said: String,
        source: SubmitError,
        work_dir: PathBuf,
        cache_dir: PathBuf,
    },
    /// `squeue` or `scancel` could not be started.
    #[error("cannot run {command}: {source}")]
    CannotRun {
        command: &'static str,
        source: io::Error,
    },
    /// `squeue` or `scancel` failed; `stderr` is what it said.
    #[error("{command} failed: {stderr}")]
    CommandFailed { command: &'static str, stderr: String },
    #[error("no Slurm run of {pipeline} to cancel")]
    NoRunToCancel { pipeline: String },
}

/// An `sbatch` failure.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("cannot run sbatch: {0} (is Slurm installed here?)")]
    CannotRun(#[source] io::Error),
    /// `--wait` passes on the job's failure without a message.
    #[error("sbatch: the job failed ({0})")]
    JobFailed(ExitStatus),
    /// `transient`: the controller was busy or briefly unreachable, so trying again may help.
    #[error("sbatch failed: {stderr}")]
    Rejected { stderr: String, transient: bool },
    #[error("sbatch printed no job id ({stderr})")]
    NoJobId { stderr: String },
}

impl SubmitError {
    /// Whether trying again may help.
    pub fn is_transient(&self) -> bool {
        matches!(self, SubmitError::Rejected { transient: true, .. })
    }
}
