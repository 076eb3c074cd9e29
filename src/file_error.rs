//! The error of reading or writing one file: what went wrong, and which file. Every layer wraps
//! it in its own error type, so a message always names the file the user has to look at.

use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: {source}", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
}

impl FileError {
    /// For `map_err`: an I/O error on `path`.
    pub fn io(path: &Path) -> impl FnOnce(io::Error) -> FileError + '_ {
        move |source| FileError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// For `map_err`: JSON in `path` that does not parse or does not serialise.
    pub fn json(path: &Path) -> impl FnOnce(serde_json::Error) -> FileError + '_ {
        move |source| FileError::Json {
            path: path.to_path_buf(),
            source,
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            FileError::Io { path, .. } | FileError::Json { path, .. } => path,
        }
    }
}
