//! The pipeline file's tables as typed structs. They deny unknown keys, and their doc comments
//! become the descriptions in `schemas/pipeline.schema.json`.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use crate::engine::slurm::options::SlurmOptions;

/// Top-level keys of a pipeline file.
pub const TOP_LEVEL_KEYS: &[&str] = &["pipeline", "vars", "stages"];

/// The `[pipeline]` table.
#[derive(Deserialize, Serialize, JsonSchema, Default, Debug)]
#[serde(deny_unknown_fields)]
pub struct PipelineSection {
    /// Name shown in logs (default: the pipeline file's name without extension).
    pub name: Option<String>,
    /// A pipeline file this one builds on, relative to this file. Its tables are merged key by key
    /// with this file's; any other value written here replaces the base's.
    pub extends: Option<String>,
    /// Work directory for stage outputs, records and logs, relative to the pipeline file.
    /// Default `.nnflow`.
    pub work_dir: Option<String>,
    /// Cache of stage outputs, shareable between checkouts and CI jobs, relative to the pipeline
    /// file. Default `<work_dir>/cache`. The environment variable `NNFLOW_CACHE_DIR` overrides it.
    pub cache_dir: Option<String>,
    /// A remote cache shared by checkouts, machines and CI jobs, looked up after the local cache
    /// and sent what runs compute: `http(s)://HOST/PATH` (Bazel-style GET/PUT/HEAD, e.g. nginx
    /// with WebDAV), `s3://BUCKET/PREFIX`, `gs://BUCKET/PREFIX`, `az://CONTAINER/PREFIX` or
    /// `file:///FOLDER`. No credentials here: they come from each store's environment variables
    /// (`AWS_*`, `GOOGLE_*`, `AZURE_*`; for HTTP, a user and password in `NNFLOW_REMOTE_CACHE`).
    /// `NNFLOW_REMOTE_CACHE` (empty: none) and `nnflow run --remote-cache` / `--no-remote-cache`
    /// override it.
    pub remote_cache: Option<String>,
    /// Where stages run: `local` (default) or `slurm` (one `sbatch` job or job array per stage;
    /// the work and cache directories must be on a filesystem the compute nodes share).
    /// `nnflow run --executor` overrides it.
    pub executor: Option<ExecutorKind>,
    /// Slurm settings for every stage (a stage's own `slurm` entries replace these).
    pub slurm: Option<SlurmOptions>,
}

/// Where stages run.
#[derive(Deserialize, Serialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorKind {
    /// On this machine, side by side within the thread and GPU limits.
    #[default]
    Local,
    /// As Slurm jobs.
    Slurm,
}

/// A value a matrix dimension can take.
#[derive(Deserialize, Serialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(untagged)]
pub enum MatrixValue {
    Integer(i64),
    String(String),
    Boolean(bool),
}

/// Keys every stage accepts, whatever its kind; the kind's own parameters sit beside them.
#[derive(Deserialize, Serialize, JsonSchema, Debug)]
#[serde(deny_unknown_fields)]
pub struct StageCommon {
    /// What the stage does: one of the registered stage kinds (e.g. `command`).
    pub kind: String,
    /// Free text shown by `nnflow dag`; not part of the cache key.
    pub description: Option<String>,
    /// Stages that must finish first. `"name"` waits for the instances of `name` whose matrix
    /// values match this instance's (all of them when nothing is shared); `"name[*]"` waits for
    /// every instance.
    #[serde(default)]
    pub after: Vec<String>,
    /// One stage instance per combination of these values, e.g. `{ fold = [0, 1, 2, 3, 4] }`.
    /// Values are usable in parameters as `${fold}`; a string `"${var}"` takes a list from `[vars]`.
    #[serde(default)]
    #[schemars(schema_with = "matrix_schema")]
    pub matrix: BTreeMap<String, Vec<MatrixValue>>,
    /// CPU threads the stage uses; the scheduler runs stages side by side within the thread budget.
    /// 0: every core the run may use.
    #[serde(default = "one")]
    pub threads: u32,
    /// GPUs the stage needs; each running stage gets distinct CUDA device indices.
    #[serde(default)]
    pub gpus: u32,
    /// Slurm settings for this stage's jobs, on top of `[pipeline.slurm]`.
    pub slurm: Option<SlurmOptions>,
    /// Run only the instances another stage needs (through `${NAME.outputs}` or `after`), the way a
    /// build tool builds only what its targets need; the others are left out of the pipeline. Lets
    /// a matrix cover every value (e.g. every configuration's preprocessing) while only the values
    /// other stages use are computed.
    #[serde(default)]
    pub on_demand: bool,
    /// Parameters for some instances of a matrix stage only (read on their own, see [`Override`]).
    #[serde(default, skip_deserializing)]
    pub instance_overrides: Vec<Override>,
}

/// `[[stages.NAME.instance_overrides]]`: the instances whose matrix values equal `where` take these
/// parameters instead of the stage's own (a key given here replaces the whole value), e.g. more
/// epochs for one configuration, or other inputs for the cascade. Later overrides win; a pipeline
/// that `extends` another adds its overrides after the base's.
#[derive(Deserialize, Serialize, JsonSchema, Debug)]
pub struct Override {
    /// Matrix values an instance must have, e.g. `{ configuration = "3d_lowres" }`.
    #[serde(rename = "where")]
    pub matches: BTreeMap<String, MatrixValue>,
    /// Any of the stage kind's parameters.
    #[serde(flatten)]
    pub params: BTreeMap<String, serde_json::Value>,
}

/// Keys of [`StageCommon`], split from the kind's parameters before each part is read.
pub const COMMON_STAGE_KEYS: &[&str] = &[
    "kind",
    "description",
    "after",
    "matrix",
    "threads",
    "gpus",
    "slurm",
    "on_demand",
    "instance_overrides",
];

/// Each dimension is a list of values, or a `"${var}"` naming a list in `[vars]` (substituted before
/// the matrix is read, so the schema accepts that string too).
fn matrix_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let values = generator.subschema_for::<Vec<MatrixValue>>();
    schemars::json_schema!({
        "type": "object",
        "additionalProperties": { "anyOf": [values, { "type": "string", "pattern": "^\\$\\{[A-Za-z0-9_-]+\\}$" }] }
    })
}

fn one() -> u32 {
    1
}
