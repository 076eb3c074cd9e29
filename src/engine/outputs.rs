//! Putting one instance's outputs in place, under its exclusive lock: by running its stage in a
//! fresh staging folder and moving the result into the outputs folder, or by restoring a cache
//! entry. Either way, what an earlier run left there is cleared first.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use super::cache::{LinkMode, Manifest};
use super::config::Pipeline;
use super::evaluate::output_location;
use super::hashing::Digest;
use super::instance::Slot;
use super::locks::{remove_staging, staging_folder};
use super::owned::ProjectOutputs;
use super::paths::declared_outputs;
use super::record::file_safe;
use super::stage::StageContext;
use super::{Engine, FsError, Operation, RunError};

/// Runs the stage into a fresh temporary folder, moves it into place, and returns every output
/// file (`output/<n>/<path>` for declared project outputs, `out/<path>`) with its place and digest.
pub(super) fn run_instance(
    engine: &Engine,
    index: usize,
    slot: &Slot,
) -> Result<BTreeMap<String, (PathBuf, Digest)>, RunError> {
    let Slot {
        gpus,
        threads,
        cancel,
        status,
    } = *slot;
    let pipeline = &engine.pipeline;
    let instance = &pipeline.instances[index];
    let stage = &instance.implementation;
    let project = project_outputs(engine, index)?;
    // Stale outputs from an earlier run must not pass for this run's (only files nnflow wrote go).
    project.clear(engine.records.get(&instance.id).as_ref(), |path| {
        in_cache(engine, path)
    })?;
    let safe_id = file_safe(&instance.id);
    // This run holds the instance's lock: staging folders of its id are left by killed runs.
    remove_staging(&pipeline.state_dir, &safe_id, |_| true);
    let temporary = staging_folder(&pipeline.state_dir, &safe_id);
    fs::create_dir_all(&temporary).map_err(FsError::on(Operation::Create, &temporary))?;
    let logs = pipeline.state_dir.join("logs");
    fs::create_dir_all(&logs).map_err(FsError::on(Operation::Create, &logs))?;
    let log_file = logs.join(format!("{safe_id}.log"));
    // the log shows this run only: an error must not come with an older run's lines
    remove_path(&log_file)?;
    let resume_dir = resume_dir(pipeline, &instance.id);
    let env: BTreeMap<String, String> = stage
        .env()
        .into_iter()
        .filter_map(|n| Some((n.clone(), std::env::var(&n).ok()?)))
        .collect();
    let context = StageContext {
        root: &pipeline.root,
        out_dir: &temporary,
        log_file: &log_file,
        resume_dir: &resume_dir,
        status: &|text: &str| status.set(&instance.id, text),
        threads,
        gpus,
        env: &env,
        cancel,
    };
    if let Err(source) = stage.run(&context) {
        project.failed();
        let _ = fs::remove_dir_all(&temporary);
        return Err(RunError::Stage {
            id: instance.id.clone(),
            source,
            log_tail: log_tail(&log_file),
        });
    }
    let project_files = match project.files(true) {
        Ok(files) => files,
        Err(error) => {
            project.failed();
            let _ = fs::remove_dir_all(&temporary);
            return Err(error.into());
        }
    };
    project.written(project_files.values().cloned())?;
    remove_path(&instance.out_dir)?;
    if let Some(parent) = instance.out_dir.parent() {
        fs::create_dir_all(parent).map_err(FsError::on(Operation::Create, parent))?;
    }
    fs::rename(&temporary, &instance.out_dir)
        .map_err(FsError::on(Operation::MoveOutputsInto, &instance.out_dir))?;

    let mut files = BTreeMap::new();
    for (name, path) in project_files {
        let digest = engine.hasher.digest_file(&path)?;
        files.insert(name, (path, digest));
    }
    let out_entries = list_folder(&instance.out_dir)?;
    let out = engine.hasher.digest_tree(&instance.out_dir, &out_entries)?;
    for (path, digest) in out {
        files.insert(format!("out/{path}"), (instance.out_dir.join(&path), digest));
    }
    Ok(files)
}

/// Whether a file's exact contents are an output nnflow stored: replacing it loses nothing.
fn in_cache(engine: &Engine, path: &Path) -> bool {
    engine
        .hasher
        .digest_file(path)
        .is_ok_and(|digest| engine.cache.has_blob(&digest))
}

/// The instance's declared project outputs, checked again to lie inside the project.
fn project_outputs<'a>(engine: &'a Engine, index: usize) -> Result<ProjectOutputs<'a>, RunError> {
    let pipeline = &engine.pipeline;
    let instance = &pipeline.instances[index];
    let slots = declared_outputs(pipeline, instance)?;
    Ok(ProjectOutputs::new(
        &pipeline.root,
        &pipeline.state_dir,
        &instance.id,
        slots,
    ))
}

/// Where a stage keeps what lets a later run continue (training checkpoints).
pub(super) fn resume_dir(pipeline: &Pipeline, id: &str) -> PathBuf {
    pipeline.state_dir.join("resume").join(file_safe(id))
}

/// Puts a cache entry's files into place: hard links in the outputs folder, copies in the project.
pub(super) fn restore(engine: &Engine, index: usize, manifest: &Manifest) -> Result<(), RunError> {
    let instance = &engine.pipeline.instances[index];
    let project = project_outputs(engine, index)?;
    project.clear(engine.records.get(&instance.id).as_ref(), |path| {
        in_cache(engine, path)
    })?;
    remove_path(&instance.out_dir)?;
    fs::create_dir_all(&instance.out_dir).map_err(FsError::on(Operation::Create, &instance.out_dir))?;
    let mut project_files = Vec::new();
    for (path, file) in &manifest.files {
        let destination = output_location(&engine.pipeline, instance, path);
        // Project files may be edited by the user: never hard-link them to the cache.
        let mode = if path.starts_with("out/") {
            LinkMode::HardlinkOrCopy
        } else {
            project_files.push(destination.clone());
            LinkMode::Copy
        };
        engine
            .cache
            .restore_file(file, &destination, mode, &engine.hasher)
            .map_err(|source| RunError::Restore {
                path: path.clone(),
                source,
            })?;
    }
    Ok(project.written(project_files)?)
}

fn list_folder(folder: &Path) -> Result<Vec<PathBuf>, FsError> {
    let entries = fs::read_dir(folder).map_err(FsError::on(Operation::List, folder))?;
    let mut names: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| PathBuf::from(e.file_name()))
        .collect();
    names.sort();
    Ok(names)
}

pub(super) fn remove_path(path: &Path) -> Result<(), FsError> {
    let result = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(_) => Ok(()),
    };
    result.map_err(FsError::on(Operation::Remove, path))
}

/// What follows a stage's error: the last lines of its log, or where its (empty) log is.
fn log_tail(log_file: &Path) -> String {
    let Ok(text) = fs::read_to_string(log_file) else {
        return String::new();
    };
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(20)..];
    if tail.is_empty() {
        format!(" (log: {})", log_file.display())
    } else {
        format!(
            "\n--- last lines of {} ---\n{}",
            log_file.display(),
            tail.join("\n")
        )
    }
}
