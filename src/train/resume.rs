//! The `train` stage's resume checkpoints, kept so that a killed or extended training continues
//! instead of starting over, and guarded so that a damaged one never blocks a run.
//!
//! The resume folder holds two checkpoints ("slots"), [`LATEST`] and [`PREVIOUS`], each the
//! weights and the optimizer's momentum (safetensors) plus the trainer state (JSON). A slot counts
//! only while its checksum record `<slot>.blake3.json` exists and matches every file's size and
//! blake3. The record is written after the files (sealing the slot) and removed before they are
//! replaced (unsealing it), so a kill in the middle of a save, a truncated copy or a disk error
//! shows up as a damaged slot, explained in the log, instead of as a loader error on every later
//! run. Before a new latest checkpoint is written the intact latest becomes the previous one, so
//! at every moment at least one slot is intact (after the first save), and a damaged latest has
//! something to fall back on.
//!
//! Free of libtorch, so unit tests need none: the worker writes the tensor files itself
//! (`nnflow-torch`'s `checkpoint` module) between [`begin_saving_latest`] and
//! [`finish_saving_latest`], and loads them inside [`resume`].

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::atomic_file;
use crate::file_error::FileError;
use crate::train::TrainError;

/// The checkpoint a run continues from when it is intact.
pub const LATEST: &str = "checkpoint_latest";
/// The checkpoint before it: the fallback when the latest is damaged.
pub const PREVIOUS: &str = "checkpoint_previous";

/// The files of one training checkpoint named `name` in `dir`.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointPaths {
    pub weights: PathBuf,
    /// The SGD momentum buffers (resume checkpoints only).
    pub optimizer: PathBuf,
    /// The trainer state; written last.
    pub state: PathBuf,
}

pub fn paths(dir: &Path, name: &str) -> CheckpointPaths {
    CheckpointPaths {
        weights: dir.join(format!("{name}.safetensors")),
        optimizer: dir.join(format!("{name}.optimizer.safetensors")),
        state: dir.join(format!("{name}.json")),
    }
}

impl CheckpointPaths {
    /// Every file with its role, the key in checksum records (roles, not file names, so that a
    /// record stays valid when the slot is copied under another name).
    fn by_role(&self) -> [(&'static str, &Path); 3] {
        [
            ("weights", &self.weights),
            ("optimizer", &self.optimizer),
            ("state", &self.state),
        ]
    }
}

/// One file's entry in a checksum record.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct FileChecksum {
    bytes: u64,
    blake3: String,
}

/// Why a slot cannot be resumed from: the file at fault and what is wrong with it.
#[derive(Debug, Clone, PartialEq)]
pub struct Damage {
    pub file: PathBuf,
    pub reason: String,
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file.display(), self.reason)
    }
}

/// One resume checkpoint: its files and its checksum record.
#[derive(Debug, Clone)]
pub struct Slot {
    pub name: &'static str,
    pub files: CheckpointPaths,
    /// `<name>.blake3.json`: each file's size and blake3 by role, present only while they match.
    pub record: PathBuf,
}

impl Slot {
    pub fn new(dir: &Path, name: &'static str) -> Slot {
        Slot {
            name,
            files: paths(dir, name),
            record: dir.join(format!("{name}.blake3.json")),
        }
    }

    /// Whether anything of this slot is on disk. Nothing at all is a first run, not damage.
    pub fn is_present(&self) -> bool {
        self.files.by_role().iter().any(|(_, file)| file.exists()) || self.record.exists()
    }

    /// Records the size and blake3 of every file: from now on the slot counts.
    pub fn seal(&self) -> Result<(), FileError> {
        let mut record = BTreeMap::new();
        for (role, file) in self.files.by_role() {
            let (bytes, blake3) = digest(file).map_err(FileError::io(file))?;
            record.insert(role.to_string(), FileChecksum { bytes, blake3 });
        }
        atomic_file::write_json(&self.record, &record)
    }

    /// Removes the checksum record: the slot no longer counts while its files change.
    pub fn unseal(&self) -> Result<(), FileError> {
        remove_if_present(&self.record)
    }

    /// Checks every file against the checksum record; the first problem found names its file.
    pub fn verify(&self) -> Result<(), Damage> {
        let damage = |file: &Path, reason: String| Damage {
            file: file.to_path_buf(),
            reason,
        };
        let text = match fs::read_to_string(&self.record) {
            Ok(text) => text,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(damage(
                    &self.record,
                    "missing: the checkpoint has no checksums (its save was interrupted, or an \
                     older nnflow wrote it)"
                        .into(),
                ))
            }
            Err(e) => return Err(damage(&self.record, format!("unreadable: {e}"))),
        };
        let record: BTreeMap<String, FileChecksum> = serde_json::from_str(&text)
            .map_err(|e| damage(&self.record, format!("damaged checksum record: {e}")))?;
        for (role, file) in self.files.by_role() {
            let Some(expected) = record.get(role) else {
                return Err(damage(
                    &self.record,
                    format!("damaged checksum record: no entry for the {role} file"),
                ));
            };
            let (bytes, blake3) = digest(file).map_err(|e| match e.kind() {
                ErrorKind::NotFound => damage(file, "missing".into()),
                _ => damage(file, format!("unreadable: {e}")),
            })?;
            if bytes != expected.bytes {
                return Err(damage(
                    file,
                    format!("damaged: {bytes} bytes where {} were written", expected.bytes),
                ));
            }
            if blake3 != expected.blake3 {
                return Err(damage(
                    file,
                    "damaged: its contents differ from what was written (blake3 checksum mismatch)".into(),
                ));
            }
        }
        Ok(())
    }

    /// Makes `to` a sealed copy of this (intact) slot; `to` is unsealed while its files change.
    /// Real copies, not hard links: two slots never share a file, so no single damaged file can
    /// take both.
    fn copy_into(&self, to: &Slot) -> Result<(), TrainError> {
        to.unseal()?;
        for ((_, from), (_, dest)) in self.files.by_role().into_iter().zip(to.files.by_role()) {
            fs::copy(from, dest).map_err(|source| TrainError::CopyCheckpoint {
                from: from.to_path_buf(),
                to: dest.to_path_buf(),
                source,
            })?;
        }
        let record = fs::read(&self.record).map_err(FileError::io(&self.record))?;
        atomic_file::write_atomically(&to.record, &record).map_err(FileError::io(&to.record))?;
        Ok(())
    }
}

/// Call before writing a new latest checkpoint into `dir`. Keeps an intact latest as the previous
/// one (a damaged latest never replaces a good previous), then unseals the latest, so a save that
/// is interrupted leaves it visibly incomplete rather than mismatched.
pub fn begin_saving_latest(dir: &Path) -> Result<(), TrainError> {
    let latest = Slot::new(dir, LATEST);
    if latest.verify().is_ok() {
        latest.copy_into(&Slot::new(dir, PREVIOUS))?;
    }
    Ok(latest.unseal()?)
}

/// Call once every file of the new latest checkpoint is in place: seals it.
pub fn finish_saving_latest(dir: &Path) -> Result<(), FileError> {
    Slot::new(dir, LATEST).seal()
}

/// Finds the checkpoint to continue from: the latest, else the previous one. A slot is loaded only
/// after its checksums match; `load` then returns the loaded value, `Ok(None)` when the checkpoint
/// belongs to other parameters or inputs (training starts over, as it should), or an error naming
/// the file when it cannot be used after all. Every slot passed over gets one line through `log`
/// naming the file, why, and what happens instead. Never an error: a damaged checkpoint costs
/// epochs, not the run (so `load`'s error only needs to explain itself in that line).
pub fn resume<T, E: fmt::Display>(
    dir: &Path,
    mut load: impl FnMut(&Slot) -> Result<Option<T>, E>,
    mut log: impl FnMut(&str),
) -> Option<(T, &'static str)> {
    let slots = [Slot::new(dir, LATEST), Slot::new(dir, PREVIOUS)];
    for (i, slot) in slots.iter().enumerate() {
        if !slot.is_present() {
            continue;
        }
        let problem = match slot.verify() {
            Err(damage) => damage.to_string(),
            Ok(()) => match load(slot) {
                Ok(loaded) => return loaded.map(|value| (value, slot.name)),
                Err(error) => error.to_string(),
            },
        };
        let action = match slots[i + 1..].iter().find(|s| s.is_present()) {
            Some(next) => format!("falling back to {}", next.name),
            None => "starting training from scratch".to_string(),
        };
        log(&format!(
            "resume checkpoint {} cannot be used: {problem}; {action}",
            slot.name
        ));
    }
    None
}

/// Size and blake3 (hex) of a file.
fn digest(path: &Path) -> std::io::Result<(u64, String)> {
    let bytes = fs::metadata(path)?.len();
    let mut hasher = blake3::Hasher::new();
    hasher.update_mmap_rayon(path)?;
    Ok((bytes, hasher.finalize().to_hex().to_string()))
}

fn remove_if_present(path: &Path) -> Result<(), FileError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(FileError::io(path)(e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a checkpoint's three files (contents tagged with `tag`) the way the worker does:
    /// between `begin_saving_latest` and `finish_saving_latest`.
    fn save_latest(dir: &Path, tag: &str) {
        begin_saving_latest(dir).unwrap();
        let files = paths(dir, LATEST);
        fs::write(&files.weights, format!("weights of {tag}").repeat(100)).unwrap();
        fs::write(&files.optimizer, format!("momentum of {tag}")).unwrap();
        fs::write(&files.state, format!("{{\"tag\": \"{tag}\"}}")).unwrap();
        finish_saving_latest(dir).unwrap();
    }

    fn tag_of(slot: &Slot) -> String {
        let state: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&slot.files.state).unwrap()).unwrap();
        state["tag"].as_str().unwrap().to_string()
    }

    /// `resume` with a loader that reads the tag; returns what it chose and the log lines.
    fn resume_tag(dir: &Path) -> (Option<(String, &'static str)>, Vec<String>) {
        let mut lines = Vec::new();
        let chosen = resume(
            dir,
            |slot| Ok::<_, String>(Some(tag_of(slot))),
            |line| lines.push(line.to_string()),
        );
        (chosen, lines)
    }

    fn truncate(path: &Path, bytes: u64) {
        fs::OpenOptions::new()
            .write(true)
            .open(path)
            .unwrap()
            .set_len(bytes)
            .unwrap();
    }

    #[test]
    fn a_sealed_checkpoint_verifies_and_saving_keeps_the_previous_one() {
        let dir = tempfile::tempdir().unwrap();
        save_latest(dir.path(), "epoch 1");
        assert!(
            !Slot::new(dir.path(), PREVIOUS).is_present(),
            "nothing to keep yet"
        );
        save_latest(dir.path(), "epoch 2");
        let latest = Slot::new(dir.path(), LATEST);
        let previous = Slot::new(dir.path(), PREVIOUS);
        assert_eq!(latest.verify(), Ok(()));
        assert_eq!(previous.verify(), Ok(()));
        assert_eq!(tag_of(&latest), "epoch 2");
        assert_eq!(tag_of(&previous), "epoch 1");
        let (chosen, lines) = resume_tag(dir.path());
        assert_eq!(chosen, Some(("epoch 2".to_string(), LATEST)));
        assert!(lines.is_empty(), "{lines:?}");
    }

    #[test]
    fn a_truncated_file_is_named_with_its_sizes() {
        let dir = tempfile::tempdir().unwrap();
        save_latest(dir.path(), "epoch 1");
        let latest = Slot::new(dir.path(), LATEST);
        truncate(&latest.files.weights, 5);
        let damage = latest.verify().unwrap_err();
        assert_eq!(damage.file, latest.files.weights);
        assert_eq!(damage.reason, "damaged: 5 bytes where 1800 were written");
    }

    #[test]
    fn changed_contents_of_the_same_size_fail_the_checksum() {
        let dir = tempfile::tempdir().unwrap();
        save_latest(dir.path(), "epoch 1");
        let latest = Slot::new(dir.path(), LATEST);
        fs::write(&latest.files.optimizer, "momentum of epoch 9").unwrap();
        let damage = latest.verify().unwrap_err();
        assert_eq!(damage.file, latest.files.optimizer);
        assert!(damage.reason.contains("blake3 checksum mismatch"), "{damage}");
    }

    #[test]
    fn a_checkpoint_without_checksums_or_files_is_damaged() {
        let dir = tempfile::tempdir().unwrap();
        save_latest(dir.path(), "epoch 1");
        let latest = Slot::new(dir.path(), LATEST);
        fs::remove_file(&latest.files.state).unwrap();
        assert_eq!(
            latest.verify().unwrap_err(),
            Damage {
                file: latest.files.state.clone(),
                reason: "missing".into()
            }
        );
        latest.unseal().unwrap();
        let damage = latest.verify().unwrap_err();
        assert_eq!(damage.file, latest.record);
        assert!(
            damage
                .reason
                .starts_with("missing: the checkpoint has no checksums"),
            "{damage}"
        );
        fs::write(&latest.record, "{\"weights\": ").unwrap();
        assert!(latest
            .verify()
            .unwrap_err()
            .reason
            .starts_with("damaged checksum record"));
    }

    #[test]
    fn a_damaged_latest_falls_back_to_the_previous_with_one_line() {
        let dir = tempfile::tempdir().unwrap();
        save_latest(dir.path(), "epoch 1");
        save_latest(dir.path(), "epoch 2");
        let latest = Slot::new(dir.path(), LATEST);
        truncate(&latest.files.weights, 3);
        let (chosen, lines) = resume_tag(dir.path());
        assert_eq!(chosen, Some(("epoch 1".to_string(), PREVIOUS)));
        assert_eq!(
            lines,
            [format!(
                "resume checkpoint checkpoint_latest cannot be used: {}: damaged: 3 bytes where 1800 \
                 were written; falling back to checkpoint_previous",
                latest.files.weights.display()
            )]
        );
    }

    #[test]
    fn a_damaged_latest_never_replaces_a_good_previous() {
        let dir = tempfile::tempdir().unwrap();
        save_latest(dir.path(), "epoch 1");
        save_latest(dir.path(), "epoch 2");
        truncate(&Slot::new(dir.path(), LATEST).files.state, 0);
        // the run resumes from the previous checkpoint (epoch 1) and saves epoch 2 again
        save_latest(dir.path(), "epoch 2 again");
        let previous = Slot::new(dir.path(), PREVIOUS);
        assert_eq!(previous.verify(), Ok(()));
        assert_eq!(tag_of(&previous), "epoch 1");
        save_latest(dir.path(), "epoch 3");
        assert_eq!(tag_of(&previous), "epoch 2 again");
    }

    #[test]
    fn an_interrupted_save_leaves_the_previous_checkpoint_to_resume_from() {
        let dir = tempfile::tempdir().unwrap();
        save_latest(dir.path(), "epoch 1");
        // killed after the weights of epoch 2 were written, before the checksums
        begin_saving_latest(dir.path()).unwrap();
        fs::write(paths(dir.path(), LATEST).weights, "half of epoch 2").unwrap();
        let (chosen, lines) = resume_tag(dir.path());
        assert_eq!(chosen, Some(("epoch 1".to_string(), PREVIOUS)));
        assert_eq!(lines.len(), 1);
        assert!(
            lines[0].contains("checkpoint_latest.blake3.json: missing"),
            "{lines:?}"
        );
    }

    #[test]
    fn with_both_checkpoints_damaged_training_starts_from_scratch() {
        let dir = tempfile::tempdir().unwrap();
        save_latest(dir.path(), "epoch 1");
        save_latest(dir.path(), "epoch 2");
        truncate(&Slot::new(dir.path(), LATEST).files.weights, 4);
        truncate(&Slot::new(dir.path(), PREVIOUS).files.optimizer, 4);
        let (chosen, lines) = resume_tag(dir.path());
        assert_eq!(chosen, None);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0].contains("checkpoint_latest.safetensors: damaged")
                && lines[0].ends_with("falling back to checkpoint_previous"),
            "{lines:?}"
        );
        assert!(
            lines[1].contains("checkpoint_previous.optimizer.safetensors: damaged")
                && lines[1].ends_with("starting training from scratch"),
            "{lines:?}"
        );
    }

    #[test]
    fn a_first_run_or_other_parameters_start_over_silently() {
        let dir = tempfile::tempdir().unwrap();
        let (chosen, lines) = resume_tag(dir.path());
        assert_eq!((chosen, lines.len()), (None, 0));
        save_latest(dir.path(), "epoch 1");
        save_latest(dir.path(), "epoch 2");
        let mut asked = Vec::new();
        let chosen: Option<((), _)> = resume(
            dir.path(),
            |slot| {
                asked.push(slot.name);
                Ok::<_, String>(None)
            },
            |line| panic!("unexpected log line {line}"),
        );
        assert!(chosen.is_none());
        assert_eq!(asked, [LATEST], "a checkpoint of other parameters is not damage");
    }

    #[test]
    fn a_checkpoint_that_fails_to_load_is_passed_over() {
        let dir = tempfile::tempdir().unwrap();
        save_latest(dir.path(), "epoch 1");
        save_latest(dir.path(), "epoch 2");
        let mut lines = Vec::new();
        let chosen = resume(
            dir.path(),
            |slot| match slot.name {
                LATEST => Err(format!("{}: no tensor named x", slot.files.weights.display())),
                _ => Ok(Some(tag_of(slot))),
            },
            |line| lines.push(line.to_string()),
        );
        assert_eq!(chosen, Some(("epoch 1".to_string(), PREVIOUS)));
        assert_eq!(lines.len(), 1);
        assert!(lines[0].contains("no tensor named x; falling back to checkpoint_previous"));
    }
}
