//! Why running a pipeline (or part of it) failed: [`RunError`], with the instance, the file and
//! the underlying cache, hash or stage error, and [`FsError`], one file-system operation that failed
//! on one path.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use super::cache::CacheError;
use super::evaluate::InputError;
use super::hashing::HashError;
use super::owned::OwnedError;
use super::paths::PathError;
use super::stage::StageError;

/// Why the engine could not select, run, restore or collect what it was asked to.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("no stage or stage instance named `{name}` in {}", pipeline.display())]
    UnknownStage { name: String, pipeline: PathBuf },
    #[error(
        "`{name}` is an `on_demand` stage that no other stage of {} needs, so it is not part of \
         this run (left out: {})",
        pipeline.display(),
        left_out.join(", ")
    )]
    NotNeeded {
        name: String,
        pipeline: PathBuf,
        left_out: Vec<String>,
    },
    #[error("stage `{id}` needs {needs} GPU(s) but {available} are available (use --gpus to name them)")]
    NotEnoughGpus {
        id: String,
        needs: u32,
        available: usize,
    },
    /// The stage's own failure, followed by the end of its log (or where the log is).
    #[error("{source}{log_tail}")]
    Stage {
        id: String,
        source: StageError,
        log_tail: String,
    },
    #[error("inputs changed while the stage ran ({}); its result is not stored", changes.join("; "))]
    InputsChanged { id: String, changes: Vec<String> },
    #[error(
        "another run of this pipeline keeps replacing this stage's inputs; run again when it has finished"
    )]
    InputsKeepChanging { id: String },
    #[error("upstream `{upstream}` has not completed")]
    UpstreamNotCompleted { upstream: String },
    #[error(
        "another run replaced the outputs of upstream `{upstream}`, and this run's are no longer in the cache"
    )]
    UpstreamReplaced { upstream: String },
    /// A declared project output that may not be written (checked again before deleting).
    #[error("stage `{id}`: output {source}")]
    OutputPath { id: String, source: PathError },
    #[error("cannot store outputs in the cache: {source}")]
    Store { id: String, source: CacheError },
    /// `path` is the file's name in the cache manifest.
    #[error("cannot restore {path} from the cache: {source}")]
    Restore { path: String, source: CacheError },
    #[error("cannot write record: {source}")]
    Record { id: String, source: io::Error },
    #[error("cache {}: {source}", cache.display())]
    Collect { cache: PathBuf, source: CacheError },
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Hash(#[from] HashError),
    #[error(transparent)]
    Inputs(#[from] InputError),
    #[error(transparent)]
    Owned(#[from] OwnedError),
    #[error(transparent)]
    Fs(#[from] FsError),
}

/// A file-system operation that failed on one path: "cannot create <path>: <why>".
#[derive(Debug, thiserror::Error)]
#[error("cannot {operation} {}: {source}", path.display())]
pub struct FsError {
    pub operation: Operation,
    pub path: PathBuf,
    pub source: io::Error,
}

/// What the engine tried to do with a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Create,
    Open,
    Lock,
    List,
    Read,
    Remove,
    /// Moving a staging folder into place as an instance's outputs folder.
    MoveOutputsInto,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Operation::Create => "create",
            Operation::Open => "open",
            Operation::Lock => "lock",
            Operation::List => "list",
            Operation::Read => "read",
            Operation::Remove => "remove",
            Operation::MoveOutputsInto => "move outputs into",
        })
    }
}

impl FsError {
    /// For `map_err`: `operation` failed on `path`.
    pub fn on(operation: Operation, path: &Path) -> impl FnOnce(io::Error) -> FsError + '_ {
        move |source| FsError {
            operation,
            path: path.to_path_buf(),
            source,
        }
    }
}
