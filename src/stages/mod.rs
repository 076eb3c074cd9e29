//! Stage kinds: each is a typed parameter struct plus an implementation of [`Stage`], registered in
//! [`KINDS`]. The engine knows stages only through this trait and the registry.

pub mod command;
pub mod ensemble_select;
pub mod evaluate;
pub mod fingerprint;
pub mod plan;
pub mod postprocess;
pub mod predict;
pub mod preprocessing;
pub mod process;
pub mod train;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// What the engine hands a running stage.
pub struct StageContext<'a> {
    /// The pipeline file's folder: relative paths in parameters resolve here.
    pub root: &'a Path,
    /// An empty folder for the stage's outputs; everything written here is cached.
    pub out_dir: &'a Path,
    /// Receives the stage's log (a child process's stdout and stderr).
    pub log_file: &'a Path,
    /// A folder of this stage instance that outlives runs and is not cached: where long stages
    /// keep what lets a later run continue (training checkpoints). Created by the stage if needed.
    pub resume_dir: &'a Path,
    /// Shows a short progress text next to the stage on the terminal (e.g. `epoch 3/20`).
    pub status: &'a dyn Fn(&str),
    pub threads: u32,
    /// CUDA device indices reserved for this stage.
    pub gpus: &'a [usize],
    /// Values of the environment variables the stage declared (they are part of its key).
    pub env: &'a BTreeMap<String, String>,
    /// Set when the run is interrupted; a stage should stop soon after.
    pub cancel: &'a AtomicBool,
}

/// A file, folder or glob a stage reads. Its contents are part of the cache key, labelled by
/// `name` rather than by where it lies, so moving a dataset does not invalidate the cache.
#[derive(Clone, Debug, PartialEq)]
pub struct StageInput {
    /// The label in the key: the path as written for command stages, a parameter name otherwise.
    pub name: String,
    /// Relative to the pipeline folder, or absolute.
    pub path: String,
}

impl StageInput {
    /// An input keyed by its own (relative) path, as command stages declare them.
    pub fn at(path: &str) -> StageInput {
        StageInput {
            name: path.to_string(),
            path: path.to_string(),
        }
    }
}

pub trait Stage: Send + Sync + std::fmt::Debug {
    /// What the stage reads.
    fn inputs(&self) -> Vec<StageInput> {
        Vec::new()
    }
    /// Files, folders or globs the stage writes into the pipeline folder (besides its outputs
    /// folder); they are cached and restored there.
    fn project_outputs(&self) -> Vec<String> {
        Vec::new()
    }
    /// Environment variables the stage reads; their values are part of the key.
    fn env(&self) -> Vec<String> {
        Vec::new()
    }
    /// The parameters as part of the cache key (canonical JSON).
    fn params_json(&self) -> serde_json::Value;
    /// Asked once the stage's upstream stages have finished: a reason when this instance does not
    /// apply (e.g. a configuration the plan did not produce). It is then reported as skipped with
    /// that reason and does not hold back its dependents, which see no outputs from it.
    fn not_applicable(&self, _root: &Path) -> Option<String> {
        None
    }
    fn run(&self, ctx: &StageContext) -> Result<(), String>;
}

/// A parameter problem: the path of keys to the offending value, and what is wrong.
#[derive(Debug)]
pub struct ParamError {
    pub path: Vec<String>,
    pub message: String,
}

/// A registered stage kind.
pub struct Kind {
    pub name: &'static str,
    /// Bumped whenever the kind's outputs change meaning, so cached results are not reused.
    pub version: u32,
    /// Whether the kind runs libtorch code (its key then includes the libtorch version).
    pub uses_torch: bool,
    /// JSON schema of the kind's parameters (an object schema).
    pub schema: fn(&mut schemars::SchemaGenerator) -> schemars::Schema,
    pub build: fn(toml::Value) -> Result<Box<dyn Stage>, ParamError>,
}

pub static KINDS: &[Kind] = &[
    command::KIND,
    fingerprint::KIND,
    plan::KIND,
    preprocessing::NORMALIZE,
    preprocessing::RESAMPLE,
    train::KIND,
    evaluate::KIND,
    ensemble_select::KIND,
    postprocess::KIND,
    predict::KIND,
];

pub fn find_kind(name: &str) -> Option<&'static Kind> {
    KINDS.iter().find(|kind| kind.name == name)
}

impl Kind {
    /// The names of the kind's parameters (the properties of its schema).
    pub fn parameter_names(&self) -> Vec<String> {
        let mut generator = schemars::SchemaGenerator::default();
        let schema = (self.schema)(&mut generator);
        let mut names = Vec::new();
        schema_properties(schema.as_value(), &generator, &mut names, 0);
        names
    }
}

/// Collects the property names of an object schema, following `$ref`s and `allOf`/`anyOf`/`oneOf`.
fn schema_properties(
    schema: &serde_json::Value,
    generator: &schemars::SchemaGenerator,
    names: &mut Vec<String>,
    depth: usize,
) {
    if depth > 8 {
        return;
    }
    if let Some(reference) = schema.get("$ref").and_then(serde_json::Value::as_str) {
        let name = reference.rsplit('/').next().unwrap_or_default();
        if let Some(definition) = generator.definitions().get(name) {
            schema_properties(definition, generator, names, depth + 1);
        }
    }
    if let Some(properties) = schema.get("properties").and_then(serde_json::Value::as_object) {
        for name in properties.keys() {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
    }
    for combinator in ["allOf", "anyOf", "oneOf"] {
        for part in schema
            .get(combinator)
            .and_then(serde_json::Value::as_array)
            .into_iter()
            .flatten()
        {
            schema_properties(part, generator, names, depth + 1);
        }
    }
}

/// Reads a kind's parameters, reporting the path of the first offending value.
pub fn build_typed<P>(params: toml::Value) -> Result<Box<dyn Stage>, ParamError>
where
    P: DeserializeOwned + Stage + 'static,
{
    serde_path_to_error::deserialize::<_, P>(params)
        .map(|stage| Box::new(stage) as Box<dyn Stage>)
        .map_err(|err| ParamError {
            path: err.path().iter().map(|segment| segment.to_string()).collect(),
            message: err.into_inner().message().to_string(),
        })
}

/// Parameters as canonical JSON (maps sorted by serde_json's default map).
pub fn to_json(params: &impl Serialize) -> serde_json::Value {
    serde_json::to_value(params).expect("stage parameters serialize to JSON")
}

/// The parts of a raw dataset its training stages read: dataset.json, imagesTr and labelsTr
/// (keyed as `dataset/...`, so imagesTs does not invalidate preprocessing).
pub fn dataset_inputs(dataset: &str) -> Vec<StageInput> {
    ["dataset.json", "imagesTr", "labelsTr"]
        .into_iter()
        .map(|part| StageInput {
            name: format!("dataset/{part}"),
            path: format!("{dataset}/{part}"),
        })
        .collect()
}

impl StageContext<'_> {
    /// Appends a line to the stage's log (stages running inside nnflow must not print: stdout
    /// carries `--json` reports).
    pub fn log(&self, line: &str) {
        use std::io::Write;
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_file)
        {
            let _ = writeln!(file, "{line}");
        }
    }
}

/// What stages scoring against the training labels read: dataset.json and labelsTr.
pub fn reference_inputs(dataset: &str) -> Vec<StageInput> {
    ["dataset.json", "labelsTr"]
        .into_iter()
        .map(|part| StageInput {
            name: format!("dataset/{part}"),
            path: format!("{dataset}/{part}"),
        })
        .collect()
}

/// A rayon pool of the stage's thread count, so stages running side by side share the cores.
pub fn thread_pool(ctx: &StageContext) -> Result<rayon::ThreadPool, String> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(ctx.threads.max(1) as usize)
        .build()
        .map_err(|e| format!("cannot start {} threads: {e}", ctx.threads))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_names_its_parameters() {
        for kind in KINDS {
            assert!(!kind.parameter_names().is_empty(), "{}", kind.name);
        }
        let names = |kind: &str| find_kind(kind).unwrap().parameter_names();
        assert_eq!(names("command"), ["cmd", "env", "inputs", "outputs", "params"]);
        let train = names("train");
        for parameter in ["epochs", "augment", "learning_rate", "dataset", "fold"] {
            assert!(train.iter().any(|n| n == parameter), "{parameter}: {train:?}");
        }
        assert!(names("plan").iter().any(|n| n == "gpu_memory_gb"));
    }
}
