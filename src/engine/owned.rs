//! Files a stage writes into the project folder: its declared outputs (a command's `outputs`,
//! `predict`'s `output`), besides its own outputs folder in the work directory.
//!
//! nnflow deletes and overwrites only project files it wrote itself. Each instance keeps a journal
//! of the project files it owns; before a run or a restore, a declared output holding any other
//! file is refused with those files named, and nothing is touched. A run that was killed leaves
//! its journal marked as running: what its declared outputs hold then came from that run.
//!
//! In the cache, a project file is named by its declared output's position and its path inside it
//! (`output/<n>/<path>`), not by where it lay, so a cache hit lands where the pipeline now puts
//! the output.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::evaluate::is_glob;
use super::record::{file_safe, Record};
use super::{FsError, Operation};
use crate::file_error::FileError;

/// Foreign files named in an error before "and N more".
const FOREIGN_SHOWN: usize = 8;

/// Why a stage's declared project outputs cannot be listed, cleared or taken over.
#[derive(Debug, thiserror::Error)]
pub enum OwnedError {
    #[error("bad output glob `{declared}`: {source}")]
    BadGlob {
        declared: String,
        source: glob::PatternError,
    },
    #[error("declared output `{declared}` does not exist: the stage did not produce it")]
    NotProduced { declared: String },
    /// `files` are project-relative; the message names the first few.
    #[error(
        "the declared output {} holds files nnflow did not write: {}; nnflow never deletes or \
         overwrites them: move them away or choose another output",
        quoted(outputs),
        first_few(files)
    )]
    ForeignFiles {
        outputs: Vec<String>,
        files: Vec<String>,
    },
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Journal(#[from] FileError),
}

fn quoted(outputs: &[String]) -> String {
    outputs
        .iter()
        .map(|s| format!("`{s}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn first_few(files: &[String]) -> String {
    let shown = files[..files.len().min(FOREIGN_SHOWN)].join(", ");
    match files.len().saturating_sub(FOREIGN_SHOWN) {
        0 => shown,
        more => format!("{shown} and {more} more"),
    }
}

/// One instance's declared project outputs (project-relative, see `paths::declared_outputs`).
pub struct ProjectOutputs<'a> {
    root: &'a Path,
    slots: Vec<String>,
    journal: PathBuf,
}

/// What an instance owns in the project folder.
#[derive(Serialize, Deserialize, Default)]
struct Journal {
    /// Project-relative paths of files this instance wrote.
    files: BTreeSet<String>,
    /// Set while a run writes; still set when that run was killed.
    running: bool,
}

impl<'a> ProjectOutputs<'a> {
    pub fn new(root: &'a Path, state_dir: &Path, id: &str, slots: Vec<String>) -> ProjectOutputs<'a> {
        let journal = state_dir.join("owned").join(format!("{}.json", file_safe(id)));
        ProjectOutputs { root, slots, journal }
    }

    /// Where a cache manifest path of this instance lies, for `output/<n>[/<path>]` names.
    pub fn location(&self, manifest_path: &str) -> Option<PathBuf> {
        let rest = manifest_path.strip_prefix("output/")?;
        let (slot, inner) = rest.split_once('/').unwrap_or((rest, ""));
        let base = self
            .root
            .join(literal_base(self.slots.get(slot.parse::<usize>().ok()?)?));
        Some(if inner.is_empty() { base } else { base.join(inner) })
    }

    /// Every file the declared outputs hold now, by manifest name, with its place. A literal output
    /// that does not exist is an error when `required` (after a run: the stage did not write it).
    pub fn files(&self, required: bool) -> Result<BTreeMap<String, PathBuf>, OwnedError> {
        let mut found = BTreeMap::new();
        for (slot, declared) in self.slots.iter().enumerate() {
            let base = literal_base(declared);
            let matches = if is_glob(declared) {
                let pattern = self.root.join(declared);
                glob::glob(&pattern.to_string_lossy())
                    .map_err(|source| OwnedError::BadGlob {
                        declared: declared.clone(),
                        source,
                    })?
                    .filter_map(Result::ok)
                    .collect()
            } else {
                let path = self.root.join(declared);
                if fs::symlink_metadata(&path).is_err() {
                    if required {
                        return Err(OwnedError::NotProduced {
                            declared: declared.clone(),
                        });
                    }
                    continue;
                }
                vec![path]
            };
            for path in matches {
                for file in walk_files(&path)? {
                    let inner = file
                        .strip_prefix(self.root.join(base))
                        .unwrap_or(&file)
                        .to_string_lossy()
                        .into_owned();
                    let name = if inner.is_empty() {
                        format!("output/{slot}")
                    } else {
                        format!("output/{slot}/{inner}")
                    };
                    found.insert(name, file);
                }
            }
        }
        Ok(found)
    }

    /// Makes the declared outputs empty for a run or a restore: removes the files this instance
    /// owns; refuses, touching nothing, when they hold any other file. `last` is the instance's
    /// last record, which says what it owns when no journal exists yet; `stored(path)` says
    /// whether a file's exact contents are kept in the cache as an output, so that replacing it
    /// loses nothing (results of nnflow whose work directory was deleted).
    pub fn clear(&self, last: Option<&Record>, stored: impl Fn(&Path) -> bool) -> Result<(), OwnedError> {
        let mut journal = self.journal(last);
        let present: Vec<PathBuf> = self.files(false)?.into_values().collect();
        let relative = |path: &Path| self.relative(path);
        if journal.running {
            // a killed run wrote whatever is there now: the outputs were cleared before it started
            journal.files.extend(present.iter().map(|p| relative(p)));
        }
        let foreign: Vec<String> = present
            .iter()
            .filter(|p| !journal.files.contains(&relative(p)) && !stored(p))
            .map(|p| relative(p))
            .collect();
        if !foreign.is_empty() {
            return Err(OwnedError::ForeignFiles {
                outputs: self.slots.clone(),
                files: foreign,
            });
        }
        for path in &present {
            fs::remove_file(path).map_err(FsError::on(Operation::Remove, path))?;
        }
        for declared in &self.slots {
            remove_empty_folders(&self.root.join(literal_base(declared)));
        }
        journal.running = true;
        Ok(self.save(&journal)?)
    }

    /// After a successful run or restore: the instance owns exactly these project files.
    pub fn written(&self, files: impl IntoIterator<Item = PathBuf>) -> Result<(), OwnedError> {
        let files = files.into_iter().map(|p| self.relative(&p)).collect();
        Ok(self.save(&Journal {
            files,
            running: false,
        })?)
    }

    /// After a failed run: whatever the declared outputs hold now was written by it.
    pub fn failed(&self) {
        let mut journal = self.journal(None);
        if let Ok(present) = self.files(false) {
            journal.files.extend(present.values().map(|p| self.relative(p)));
        }
        journal.running = false;
        let _ = self.save(&journal);
    }

    /// A path under the project folder as the journal names it.
    fn relative(&self, path: &Path) -> String {
        path.strip_prefix(self.root)
            .unwrap_or(path)
            .to_string_lossy()
            .into_owned()
    }

    fn journal(&self, last: Option<&Record>) -> Journal {
        if let Ok(journal) = crate::atomic_file::read_json::<Journal>(&self.journal) {
            return journal;
        }
        // No journal yet (results of an earlier nnflow): the last record lists what it wrote.
        let files = last
            .into_iter()
            .flat_map(|record| record.outputs.keys())
            .filter_map(|path| match path.split_once('/') {
                Some(("project", rest)) => Some(self.root.join(rest)),
                Some(("output", _)) => self.location(path),
                _ => None,
            })
            .map(|p| self.relative(&p))
            .collect();
        Journal {
            files,
            running: false,
        }
    }

    fn save(&self, journal: &Journal) -> Result<(), FileError> {
        if self.slots.is_empty() && journal.files.is_empty() && !self.journal.exists() {
            return Ok(()); // a stage without project outputs needs no journal
        }
        crate::atomic_file::write_json(&self.journal, journal)
    }
}

/// The part of a declared output before its first wildcard component.
fn literal_base(declared: &str) -> &str {
    match declared.split('/').position(is_glob) {
        Some(0) => "",
        Some(i) => {
            let end: usize = declared.split('/').take(i).map(|c| c.len() + 1).sum();
            &declared[..end - 1]
        }
        None => declared,
    }
}

/// `path` itself when it is not a folder (symlinks are not followed), else every such entry below.
fn walk_files(path: &Path) -> Result<Vec<PathBuf>, FsError> {
    let meta = fs::symlink_metadata(path).map_err(FsError::on(Operation::Read, path))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    let entries = fs::read_dir(path).map_err(FsError::on(Operation::List, path))?;
    for entry in entries {
        let entry = entry.map_err(FsError::on(Operation::List, path))?;
        files.extend(walk_files(&entry.path())?);
    }
    files.sort();
    Ok(files)
}

/// Removes `folder` and the folders below it when they hold no file.
fn remove_empty_folders(folder: &Path) {
    let Ok(meta) = fs::symlink_metadata(folder) else {
        return;
    };
    if !meta.is_dir() {
        return;
    }
    if let Ok(entries) = fs::read_dir(folder) {
        for entry in entries.flatten() {
            remove_empty_folders(&entry.path());
        }
    }
    let _ = fs::remove_dir(folder); // fails, as it should, when something is left
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outputs<'a>(root: &'a Path, slots: &[&str]) -> ProjectOutputs<'a> {
        let slots = slots.iter().map(|s| s.to_string()).collect();
        ProjectOutputs::new(root, &root.join(".nnflow"), "stage", slots)
    }

    #[test]
    fn literal_base_stops_at_the_first_wildcard() {
        assert_eq!(literal_base("res/*.txt"), "res");
        assert_eq!(literal_base("a/b/*/c"), "a/b");
        assert_eq!(literal_base("*.txt"), "");
        assert_eq!(literal_base("res/x.txt"), "res/x.txt");
    }

    #[test]
    fn foreign_files_are_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("preds")).unwrap();
        fs::write(root.join("preds/mine.txt"), "user").unwrap();
        let outputs = outputs(root, &["preds"]);
        let error = outputs.clear(None, |_| false).unwrap_err().to_string();
        assert!(error.contains("preds/mine.txt"), "{error}");
        assert_eq!(fs::read_to_string(root.join("preds/mine.txt")).unwrap(), "user");
    }

    #[test]
    fn owned_files_are_cleared_and_a_killed_run_owns_what_it_left() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let outputs = outputs(root, &["preds"]);
        outputs.clear(None, |_| false).unwrap(); // nothing there yet
        fs::create_dir_all(root.join("preds/sub")).unwrap();
        fs::write(root.join("preds/sub/a.txt"), "a").unwrap();
        // killed: no `written`/`failed`; the next run owns what it left
        outputs.clear(None, |_| false).unwrap();
        assert!(!root.join("preds").exists());
        fs::create_dir_all(root.join("preds")).unwrap();
        fs::write(root.join("preds/b.txt"), "b").unwrap();
        outputs
            .written(outputs.files(true).unwrap().into_values())
            .unwrap();
        fs::write(root.join("preds/user.txt"), "u").unwrap();
        let error = outputs.clear(None, |_| false).unwrap_err().to_string();
        assert!(
            error.contains("preds/user.txt") && !error.contains("b.txt"),
            "{error}"
        );
        assert!(root.join("preds/b.txt").exists());
    }

    #[test]
    fn manifest_names_follow_the_declared_output() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("res")).unwrap();
        fs::write(root.join("res/a.txt"), "a").unwrap();
        fs::write(root.join("model.bin"), "m").unwrap();
        let before = outputs(root, &["model.bin", "res/*.txt"]);
        let files = before.files(true).unwrap();
        let names: Vec<&str> = files.keys().map(String::as_str).collect();
        assert_eq!(names, ["output/0", "output/1/a.txt"]);
        let moved = outputs(root, &["elsewhere/model.bin", "new/*.txt"]);
        assert_eq!(moved.location("output/1/a.txt").unwrap(), root.join("new/a.txt"));
        assert_eq!(
            moved.location("output/0").unwrap(),
            root.join("elsewhere/model.bin")
        );
    }
}
