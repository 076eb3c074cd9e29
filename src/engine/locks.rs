//! How runs of one pipeline keep out of each other's way on disk: the lock on each instance's
//! outputs (shared to read them, exclusive to replace them), and the staging folders
//! (`tmp/<id>.<pid>.<nanos>`) a stage writes into before its outputs move into place, with the
//! clean-up of those a killed run left behind.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::outputs::remove_path;
use super::record::file_safe;
use super::{FsError, Operation};

#[derive(Clone, Copy, PartialEq)]
pub(super) enum LockMode {
    /// Reading an instance's outputs: other readers may too; nobody may replace them.
    Shared,
    /// Writing them: alone.
    Exclusive,
}

/// The lock on one instance's outputs (its outputs folder, its declared project outputs, its
/// record), held until the returned file is dropped.
pub(super) fn lock_outputs(state_dir: &Path, id: &str, mode: LockMode) -> Result<fs::File, FsError> {
    let path = lock_path(state_dir, id);
    let folder = path.parent().unwrap_or(state_dir);
    fs::create_dir_all(folder).map_err(FsError::on(Operation::Create, folder))?;
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(FsError::on(Operation::Open, &path))?;
    let locked = match mode {
        LockMode::Shared => file.lock_shared(),
        LockMode::Exclusive => file.lock(),
    };
    locked.map_err(FsError::on(Operation::Lock, &path))?;
    Ok(file)
}

pub(crate) fn lock_path(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join("locks").join(format!("{}.lock", file_safe(id)))
}

/// A new staging folder's path for `safe_id`, unique to this process and moment.
pub(super) fn staging_folder(state_dir: &Path, safe_id: &str) -> PathBuf {
    state_dir
        .join("tmp")
        .join(format!("{safe_id}.{}.{}", std::process::id(), now_nanos()))
}

/// Removes the staging folders (`tmp/<id>.<pid>.<nanos>`) of `safe_id` (every id when empty) for
/// which `removable(path)` holds; returns how many went.
pub(crate) fn remove_staging(state_dir: &Path, safe_id: &str, removable: impl Fn(&Path) -> bool) -> usize {
    let Ok(entries) = fs::read_dir(state_dir.join("tmp")) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((id, _, _)) = staging_parts(&name) else {
            continue;
        };
        if (safe_id.is_empty() || id == safe_id)
            && removable(&entry.path())
            && remove_path(&entry.path()).is_ok()
        {
            removed += 1;
        }
    }
    removed
}

/// `<id>.<pid>.<nanos>` split into its parts, for a staging folder's name.
pub(crate) fn staging_parts(name: &str) -> Option<(&str, u32, u128)> {
    let (rest, nanos) = name.rsplit_once('.')?;
    let (id, pid) = rest.rsplit_once('.')?;
    Some((id, pid.parse().ok()?, nanos.parse().ok()?))
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}
