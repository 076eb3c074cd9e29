//! `nnflow watch`: re-run the pipeline whenever the pipeline file or one of the stages' inputs
//! changes (debounced). The run itself re-executes only what the change made stale. A failed run
//! or an invalid pipeline is reported and watching goes on.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};

use super::graph::paths_overlap;
use super::Engine;

/// Why watching could not start.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot watch {}: {source}", folder.display())]
    Folder { folder: PathBuf, source: std::io::Error },
    #[error("cannot start watching: {0}")]
    Start(#[source] notify::Error),
    #[error("cannot watch {}: {source}", folder.display())]
    Notify { folder: PathBuf, source: notify::Error },
}

/// Calls `on_change` once at start and after every relevant change until `stop` is set.
/// `on_change` loads and runs the pipeline; it returns the engine it loaded (None when invalid)
/// so the watcher knows which inputs to follow.
pub fn watch(
    pipeline_file: &Path,
    debounce: Duration,
    stop: &AtomicBool,
    mut on_change: impl FnMut() -> Option<Engine>,
) -> Result<(), WatchError> {
    let root = pipeline_file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let root = root.canonicalize().map_err(|source| WatchError::Folder {
        folder: root.clone(),
        source,
    })?;
    let (sender, receiver) = mpsc::channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reads (our own hashing of inputs among them) are not changes.
        if let Some(event) = event.ok().filter(|e| !e.kind.is_access()) {
            let _ = sender.send(event.paths);
        }
    })
    .map_err(WatchError::Start)?;
    watcher
        .watch(&root, RecursiveMode::Recursive)
        .map_err(|source| WatchError::Notify {
            folder: root.clone(),
            source,
        })?;

    let mut engine = on_change();
    while !stop.load(Ordering::SeqCst) {
        let Ok(paths) = receiver.recv_timeout(Duration::from_millis(200)) else {
            continue;
        };
        let mut relevant = is_relevant(&paths, engine.as_ref(), &root, pipeline_file);
        // Debounce: gather the burst of events an editor or a copy produces.
        while let Ok(more) = receiver.recv_timeout(debounce) {
            relevant |= is_relevant(&more, engine.as_ref(), &root, pipeline_file);
        }
        if relevant {
            engine = on_change();
        }
    }
    Ok(())
}

fn is_relevant(paths: &[PathBuf], engine: Option<&Engine>, root: &Path, pipeline_file: &Path) -> bool {
    paths.iter().any(|path| {
        let Some(engine) = engine else {
            // While the pipeline is invalid, only the pipeline files matter.
            return path.extension().is_some_and(|e| e == "toml");
        };
        let pipeline = &engine.pipeline;
        if path.starts_with(&pipeline.work_dir) || path.starts_with(&pipeline.cache_dir) {
            return false;
        }
        let canonical_pipeline = pipeline_file.canonicalize().unwrap_or_default();
        if pipeline
            .sources
            .paths()
            .any(|s| s.canonicalize().is_ok_and(|s| s == *path))
            || *path == canonical_pipeline
        {
            return true;
        }
        let Ok(relative) = path.strip_prefix(root) else {
            return false;
        };
        let relative = relative.to_string_lossy();
        let is_output = pipeline.instances.iter().any(|i| {
            i.implementation
                .project_outputs()
                .iter()
                .any(|o| paths_overlap(o, &relative))
        });
        let is_input = pipeline.instances.iter().any(|i| {
            i.implementation
                .inputs()
                .iter()
                .any(|input| paths_overlap(&input.path, &relative))
        });
        is_input && !is_output
    })
}
