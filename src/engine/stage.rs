//! How stages plug into the engine: the [`Stage`] trait a stage implements, the [`Kind`] that
//! describes and builds it, and the [`Registry`] of kinds a pipeline may name. The engine defines
//! no kind itself; whoever links it with stages (the `nnflow` binary, the schema generator) hands
//! it a registry.

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
    fn run(&self, ctx: &StageContext) -> Result<(), StageError>;
}

/// Why a stage failed. The engine runs stages of any kind, so it takes their errors as they come
/// (each kind has its own typed error) and adds which instance failed when it reports one.
pub type StageError = Box<dyn std::error::Error + Send + Sync>;

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
    /// What the kind's results depend on besides its own code, as (component, version) pairs that
    /// enter the cache key: `("libtorch", "2.11.0")` for a kind that runs libtorch code. The kind
    /// says so because the engine knows no library a stage may use.
    pub toolchain: &'static [(&'static str, &'static str)],
    /// JSON schema of the kind's parameters (an object schema).
    pub schema: fn(&mut schemars::SchemaGenerator) -> schemars::Schema,
    pub build: fn(toml::Value) -> Result<Box<dyn Stage>, ParamError>,
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

/// The stage kinds a pipeline may name, handed to the engine by the code that links it with them.
#[derive(Clone, Copy)]
pub struct Registry {
    kinds: &'static [Kind],
}

impl Registry {
    pub const fn new(kinds: &'static [Kind]) -> Registry {
        Registry { kinds }
    }

    pub fn find(self, name: &str) -> Option<&'static Kind> {
        self.kinds.iter().find(|kind| kind.name == name)
    }

    pub fn kinds(self) -> &'static [Kind] {
        self.kinds
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
        // sorted whatever serde_json's map keeps (insertion order under `preserve_order`)
        let mut keys: Vec<&String> = properties.keys().collect();
        keys.sort();
        for name in keys {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A kind of the test's own: the engine loads pipelines of whatever kinds it is handed.
    #[derive(serde::Deserialize, Serialize, schemars::JsonSchema, Debug)]
    #[serde(deny_unknown_fields)]
    struct Echo {
        text: String,
        #[serde(default)]
        times: u32,
    }

    impl Stage for Echo {
        fn params_json(&self) -> serde_json::Value {
            to_json(self)
        }
        fn run(&self, _ctx: &StageContext) -> Result<(), StageError> {
            Ok(())
        }
    }

    static KINDS: &[Kind] = &[Kind {
        name: "echo",
        version: 1,
        toolchain: &[("echo-tool", "1.0")],
        schema: |generator| generator.subschema_for::<Echo>(),
        build: build_typed::<Echo>,
    }];

    /// Loads `pipeline` (written to `folder/p.toml`) with the test's kinds only.
    fn load(folder: &Path, pipeline: &str, sets: &[&str]) -> Result<crate::engine::config::Pipeline, String> {
        let file = folder.join("p.toml");
        std::fs::write(&file, pipeline).unwrap();
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        crate::engine::load_checked(&file, &sets, Registry::new(KINDS)).map_err(|d| d.to_string())
    }

    #[test]
    fn the_engine_knows_the_kinds_it_is_handed() {
        let folder = tempfile::tempdir().unwrap();
        let echo = "[stages.a]\nkind = \"echo\"\ntext = \"hi\"\n";
        let pipeline = load(folder.path(), echo, &["a.times=3"]).unwrap();
        let instance = &pipeline.instances[0];
        assert_eq!(instance.kind.name, "echo");
        assert_eq!(instance.key_params, serde_json::json!({"text": "hi", "times": 3}));
        // the kind's toolchain enters the key, though the engine knows no such tool
        let hasher = crate::engine::hashing::FileHasher::open(&folder.path().join("stat-cache"));
        let key = crate::engine::evaluate::stage_key(&pipeline, instance, BTreeMap::new(), &hasher).unwrap();
        assert_eq!(
            key.toolchain,
            [("echo-tool".to_string(), "1.0".to_string())].into()
        );

        let error = load(folder.path(), echo, &["a.tmes=3"]).err().unwrap();
        assert!(error.contains("did you mean `times`?"), "{error}");
        let command = "[stages.a]\nkind = \"command\"\ncmd = \"true\"\n";
        let error = load(folder.path(), command, &[]).err().unwrap();
        assert!(
            error.contains("unknown stage kind `command` (known kinds: echo)"),
            "{error}"
        );
    }

    #[test]
    fn a_registry_finds_kinds_by_name() {
        let registry = Registry::new(KINDS);
        assert_eq!(registry.find("echo").map(|kind| kind.version), Some(1));
        assert!(registry.find("train").is_none());
        assert_eq!(
            registry.find("echo").unwrap().parameter_names(),
            ["text", "times"]
        );
    }
}
