//! Computing an instance's cache key from its current inputs, and checking whether what its last
//! record describes is still in place.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::config::{Instance, Pipeline};
use super::hashing::{Digest, FileHasher, HashError};
use super::key::{StageKey, CACHE_LAYOUT};
use super::owned::ProjectOutputs;
use super::paths::declared_outputs;
use super::record::Record;
use super::{FsError, Operation};

/// Why a stage's inputs could not be found or hashed (so its key cannot be computed).
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// A named input (a dataset folder, say).
    #[error("input `{name}` ({}) does not exist", path.display())]
    Missing { name: String, path: PathBuf },
    /// An input named by its own path (a command's), relative to the project folder `root`.
    #[error("input `{pattern}` does not exist (in {})", root.display())]
    NotFound { pattern: String, root: PathBuf },
    #[error("bad input glob `{pattern}`: {source}")]
    BadGlob {
        pattern: String,
        source: glob::PatternError,
    },
    #[error("cannot read input `{pattern}`: {source}")]
    Unreadable {
        pattern: String,
        source: glob::GlobError,
    },
    #[error(transparent)]
    Hash(#[from] HashError),
    #[error(transparent)]
    Fs(#[from] FsError),
}

/// The key of an instance given the output digests of its upstream instances.
pub fn stage_key(
    pipeline: &Pipeline,
    instance: &Instance,
    upstream: BTreeMap<String, Digest>,
    hasher: &FileHasher,
) -> Result<StageKey, InputError> {
    let inputs = digest_inputs(pipeline, instance, hasher)?;
    let env = instance
        .implementation
        .env()
        .into_iter()
        .map(|name| {
            let value = std::env::var(&name).ok();
            (name, value)
        })
        .collect();
    Ok(StageKey {
        cache_layout: CACHE_LAYOUT,
        kind: instance.kind.name.to_string(),
        kind_version: instance.kind.version,
        nnflow_version: env!("CARGO_PKG_VERSION").to_string(),
        toolchain: instance
            .kind
            .toolchain
            .iter()
            .map(|&(component, version)| (component.to_string(), version.to_string()))
            .collect(),
        params: instance.key_params.clone(),
        inputs,
        upstream,
        env,
    })
}

/// Digests of every input file. Inputs named by their own relative path (command stages) are keyed
/// by that path; a named input (a dataset folder, say) is keyed `name/<path inside it>`.
fn digest_inputs(
    pipeline: &Pipeline,
    instance: &Instance,
    hasher: &FileHasher,
) -> Result<BTreeMap<String, Digest>, InputError> {
    let mut digests = BTreeMap::new();
    for input in instance.implementation.inputs() {
        if input.name == input.path {
            let paths = expand_patterns(&pipeline.root, std::slice::from_ref(&input.path))?;
            digests.extend(hasher.digest_tree(&pipeline.root, &paths)?);
            continue;
        }
        let location = pipeline.root.join(&input.path);
        if location.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(&location)
                .map_err(FsError::on(Operation::List, &location))?
                .filter_map(|entry| entry.ok().map(|e| PathBuf::from(e.file_name())))
                .collect();
            entries.sort();
            let inside = hasher.digest_tree(&location, &entries)?;
            digests.extend(
                inside
                    .into_iter()
                    .map(|(path, digest)| (format!("{}/{path}", input.name), digest)),
            );
        } else if location.is_file() {
            digests.insert(input.name.clone(), hasher.digest_file(&location)?);
        } else {
            return Err(InputError::Missing {
                name: input.name.clone(),
                path: location,
            });
        }
    }
    Ok(digests)
}

/// Declared input paths or globs (relative to `root`) as existing relative paths. A literal path
/// that does not exist is an error; a glob may match nothing.
fn expand_patterns(root: &Path, patterns: &[String]) -> Result<Vec<PathBuf>, InputError> {
    let mut paths = Vec::new();
    for pattern in patterns {
        if is_glob(pattern) {
            let full = root.join(pattern);
            let matches = glob::glob(&full.to_string_lossy()).map_err(|source| InputError::BadGlob {
                pattern: pattern.clone(),
                source,
            })?;
            for entry in matches {
                let path = entry.map_err(|source| InputError::Unreadable {
                    pattern: pattern.clone(),
                    source,
                })?;
                paths.push(path.strip_prefix(root).unwrap_or(&path).to_path_buf());
            }
        } else if root.join(pattern).exists() {
            paths.push(PathBuf::from(pattern));
        } else {
            return Err(InputError::NotFound {
                pattern: pattern.clone(),
                root: root.to_path_buf(),
            });
        }
    }
    paths.sort();
    paths.dedup();
    Ok(paths)
}

pub fn is_glob(pattern: &str) -> bool {
    pattern.contains(['*', '?', '['])
}

/// Where a manifest path (`output/<n>/<p>`, `out/<p>`, or `project/<p>` from earlier versions)
/// lives for this instance.
pub fn output_location(pipeline: &Pipeline, instance: &Instance, manifest_path: &str) -> PathBuf {
    match manifest_path.split_once('/') {
        Some(("project", rest)) => pipeline.root.join(rest),
        Some(("out", rest)) => instance.out_dir.join(rest),
        _ if manifest_path.starts_with("output/") => {
            let slots = declared_outputs(pipeline, instance).unwrap_or_default();
            let project = ProjectOutputs::new(&pipeline.root, &pipeline.state_dir, &instance.id, slots);
            // a path no declared output holds any more lies nowhere: it reads as missing
            project.location(manifest_path).unwrap_or_default()
        }
        _ => instance.out_dir.join(manifest_path),
    }
}

/// A manifest path as a person reads it: `project/<where the file lies now>` for a declared
/// output, the path itself otherwise.
pub fn display_path(pipeline: &Pipeline, instance: &Instance, manifest_path: &str) -> String {
    if !manifest_path.starts_with("output/") {
        return manifest_path.to_string();
    }
    let location = output_location(pipeline, instance, manifest_path);
    match location.strip_prefix(&pipeline.root) {
        Ok(relative) => format!("project/{}", relative.to_string_lossy()),
        Err(_) => manifest_path.to_string(),
    }
}

/// The first recorded output that is missing or changed, if any.
pub fn damaged_output(
    pipeline: &Pipeline,
    instance: &Instance,
    record: &Record,
    hasher: &FileHasher,
) -> Option<String> {
    record.outputs.iter().find_map(|(path, digest)| {
        let file = output_location(pipeline, instance, path);
        match hasher.digest_file(&file) {
            Ok(current) if current == *digest => None,
            Ok(_) => Some(format!(
                "output {} was modified",
                display_path(pipeline, instance, path)
            )),
            Err(_) => Some(format!(
                "output {} is missing",
                display_path(pipeline, instance, path)
            )),
        }
    })
}
