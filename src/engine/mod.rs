//! The pipeline engine: pipeline format, DAG, cache keys, content-addressed cache and execution.
//! It is the bottom layer: it knows nothing of images, nnU-Net or libtorch, and uses nothing of the
//! crate outside itself but the bottom utilities `atomic_file`, `file_error` and `errln!`
//! (`tests/layers.rs` checks this). Stages plug in through its [`stage::Stage`] trait; the kinds a
//! pipeline may name come in as a [`stage::Registry`] from the caller (the command line passes
//! nnU-Net's).

pub mod cache;
pub mod config;
mod error;
pub mod evaluate;
pub mod executor;
pub mod gc;
pub mod graph;
pub mod hashing;
mod instance;
pub mod key;
mod locks;
mod outputs;
pub mod owned;
pub mod paths;
mod progress;
pub mod record;
pub mod remote;
mod run_record;
pub mod slurm;
pub mod stage;
pub mod status;
pub mod watch;

use std::path::PathBuf;

use cache::{Cache, CacheError};
use config::{Diagnostics, Pipeline};
use graph::Dag;
use hashing::FileHasher;
use record::Records;
use remote::{Remote, RemoteChoice, RemoteError};
use stage::Registry;

pub use error::{FsError, Operation, RunError};

/// A loaded, validated pipeline with its DAG, cache and records: what every command works on.
pub struct Engine {
    pub pipeline: Pipeline,
    pub dag: Dag,
    pub cache: Cache,
    pub hasher: FileHasher,
    pub records: Records,
    /// The remote cache, looked up after the local one and sent what runs compute.
    pub remote: Option<Remote>,
}

/// Why an engine could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{0}")]
    Invalid(Diagnostics),
    #[error("cannot open cache {path}: {source}")]
    Cache { path: PathBuf, source: CacheError },
    #[error("{0}")]
    Remote(#[from] RemoteError),
}

impl Engine {
    /// Loads and validates a pipeline (all problems reported together) and opens its cache, with
    /// the remote cache its file or `NNFLOW_REMOTE_CACHE` names.
    pub fn open(path: &std::path::Path, sets: &[String], kinds: Registry) -> Result<Engine, OpenError> {
        Engine::open_with(path, sets, kinds, &RemoteChoice::default())
    }

    /// [`Engine::open`] with the remote cache the command line chose.
    pub fn open_with(
        path: &std::path::Path,
        sets: &[String],
        kinds: Registry,
        remote: &RemoteChoice,
    ) -> Result<Engine, OpenError> {
        let pipeline = load_checked(path, sets, kinds).map_err(OpenError::Invalid)?;
        let remote = remote::choose(remote, pipeline.remote_cache.as_deref())?;
        let dag = graph::build(&pipeline).expect("load_checked validated the DAG");
        let cache = Cache::open(&pipeline.cache_dir).map_err(|source| OpenError::Cache {
            path: pipeline.cache_dir.clone(),
            source,
        })?;
        let hasher = FileHasher::open(&pipeline.work_dir.join("state").join("stat-cache"));
        let records = Records::new(&pipeline.state_dir);
        Ok(Engine {
            pipeline,
            dag,
            cache,
            hasher,
            records,
            remote,
        })
    }

    /// Instance indices named by stage names or instance ids; all instances when `names` is empty.
    pub fn select(&self, names: &[String]) -> Result<Vec<usize>, RunError> {
        if names.is_empty() {
            return Ok(self.dag.order.clone());
        }
        let mut selected = Vec::new();
        for name in names {
            let matching: Vec<usize> = self
                .pipeline
                .instances
                .iter()
                .enumerate()
                .filter(|(_, inst)| inst.stage == *name || inst.id == *name)
                .map(|(i, _)| i)
                .collect();
            let left_out: Vec<String> = self
                .pipeline
                .left_out
                .iter()
                .filter(|id| *id == name || id.split('[').next() == Some(name.as_str()))
                .cloned()
                .collect();
            if matching.is_empty() && !left_out.is_empty() {
                return Err(RunError::NotNeeded {
                    name: name.clone(),
                    pipeline: self.pipeline.file.clone(),
                    left_out,
                });
            }
            if matching.is_empty() {
                return Err(RunError::UnknownStage {
                    name: name.clone(),
                    pipeline: self.pipeline.file.clone(),
                });
            }
            selected.extend(matching);
        }
        Ok(selected)
    }
}

/// Loads a pipeline and builds its DAG, reporting configuration and graph problems together.
pub fn load_checked(
    path: &std::path::Path,
    sets: &[String],
    kinds: Registry,
) -> Result<Pipeline, Diagnostics> {
    match config::load(path, sets, kinds) {
        Ok(pipeline) => match graph::build(&pipeline) {
            Ok(_) => Ok(pipeline),
            Err(errors) => Err(pipeline.diagnostics(errors)),
        },
        Err((diagnostics, None)) => Err(diagnostics),
        Err((diagnostics, Some(pipeline))) => {
            let mut items = diagnostics.items;
            if let Err(graph_errors) = graph::build(&pipeline) {
                items.extend(graph_errors);
            }
            Err(pipeline.diagnostics(items))
        }
    }
}
