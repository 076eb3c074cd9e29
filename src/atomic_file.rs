//! Writing files so that readers never see half of one: a temporary file in the same folder,
//! synced, then renamed over the destination.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::file_error::FileError;

/// Writes via a temporary file in the same folder and a rename, so readers never see half a file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    fs::create_dir_all(path.parent().unwrap_or(Path::new(".")))?;
    let temporary = temporary_path(path);
    let mut file = fs::File::create(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&temporary, path)
}

/// A hidden sibling of `path`, unique to this process and thread, for writers that produce the
/// file themselves before renaming it into place.
pub fn temporary_path(path: &Path) -> PathBuf {
    let folder = path.parent().unwrap_or(Path::new("."));
    folder.join(format!(
        ".{}.tmp-{}-{:?}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id(),
        std::thread::current().id()
    ))
}

/// Writes `value` as pretty JSON, atomically.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<(), FileError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(FileError::json(path))?;
    write_atomically(path, &bytes).map_err(FileError::io(path))
}

/// Reads a JSON file.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, FileError> {
    let text = fs::read_to_string(path).map_err(FileError::io(path))?;
    serde_json::from_str(&text).map_err(FileError::json(path))
}
