//! From the merged document to a checked [`Pipeline`]: the `Pipeline` and `Instance` types and the
//! top-level flow of [`load`]: read the file and its bases, apply `--set`, check the top-level keys
//! and `[pipeline]`, then resolve `[vars]` (`vars`), expand the stages into instances (`matrix`)
//! and build each instance (`instances`).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use super::diagnostics::{Diagnostic, Diagnostics, Location, Sources};
use super::instances::build_instances;
use super::load::{apply_set, read_merged, relative_to};
use super::matrix::expand_stages;
use super::node::Node;
use super::raw::{ExecutorKind, PipelineSection, SlurmOptions, TOP_LEVEL_KEYS};
use super::typed::typed;
use super::vars::resolve_vars;
use crate::engine::stage::{Kind, Registry, Stage};

/// A checked pipeline, ready to be turned into a DAG.
pub struct Pipeline {
    pub name: String,
    /// The pipeline file as given.
    pub file: PathBuf,
    /// The pipeline file's folder (absolute): commands run here, relative paths resolve here.
    pub root: PathBuf,
    pub work_dir: PathBuf,
    /// `<work_dir>/<name>`: this pipeline's outputs, records, logs and locks.
    pub state_dir: PathBuf,
    pub cache_dir: PathBuf,
    /// `[pipeline] remote_cache` as written (checked to be a supported URL without credentials).
    pub remote_cache: Option<String>,
    pub executor: ExecutorKind,
    /// `[pipeline.slurm]`: Slurm settings for every stage.
    pub slurm: SlurmOptions,
    pub sources: Sources,
    pub instances: Vec<Instance>,
    /// Instances of `on_demand` stages that no other stage needs: not part of this pipeline.
    pub left_out: Vec<String>,
}

/// One stage instance: a stage, or one combination of its matrix.
pub struct Instance {
    /// `name`, or `name[key=value,...]` for a matrix instance.
    pub id: String,
    pub stage: String,
    pub matrix: BTreeMap<String, toml::Value>,
    pub kind: &'static Kind,
    pub implementation: Box<dyn Stage>,
    /// Parameters as they enter the cache key: references to other stages' outputs stay symbolic,
    /// so no absolute path reaches the key.
    pub key_params: serde_json::Value,
    /// Instances this one waits for (explicit `after` and `${stage.outputs}` references).
    pub after: Vec<usize>,
    pub threads: u32,
    pub gpus: u32,
    /// The stage's own Slurm settings (on top of the pipeline's).
    pub slurm: SlurmOptions,
    /// The folder holding this instance's outputs.
    pub out_dir: PathBuf,
    /// The instance's parameters as substituted, each value with where it is written.
    pub params_node: Node,
    /// Where `[stages.NAME]` is written, and where each of its keys is.
    pub location: Location,
    pub key_locations: BTreeMap<String, Location>,
}

impl Pipeline {
    pub fn diagnostics(&self, items: Vec<Diagnostic>) -> Diagnostics {
        Diagnostics::new(items, &self.sources)
    }
}

/// Reads and checks a pipeline file. `sets` are `--set` arguments; `kinds` are the stage kinds a
/// stage may name.
pub fn load(
    path: &Path,
    sets: &[String],
    kinds: Registry,
) -> Result<Pipeline, (Diagnostics, Option<Box<Pipeline>>)> {
    let mut sources = Sources::default();
    let mut errors = Vec::new();
    let Some(mut document) = read_merged(path, &mut sources, &mut errors) else {
        return Err((Diagnostics::new(errors, &sources), None));
    };
    if errors.is_empty() && has_no_stages(&document) {
        // An empty file is most likely the wrong file, or one not yet written: never "valid".
        errors.push(Diagnostic::new(
            Some(Location::File { file: 0, span: 0..0 }),
            "the pipeline has no stages (a pipeline needs at least one `[stages.NAME]` table)",
        ));
    }
    for arg in sets {
        if let Err(e) = apply_set(&mut document, arg, kinds) {
            errors.push(e);
        }
    }
    let pipeline = resolve(path, &document, sources, kinds, &mut errors);
    // A mistake in a matrix stage shows up once per instance; report it once.
    let mut seen = std::collections::HashSet::new();
    errors.retain(|d| seen.insert(format!("{:?} {}", d.location, d.message)));
    if errors.is_empty() {
        Ok(pipeline)
    } else {
        let diagnostics = Diagnostics::new(errors, &pipeline.sources);
        Err((diagnostics, Some(Box::new(pipeline))))
    }
}

/// No `stages`, or an empty `[stages]` table (a `stages` that is not a table is reported elsewhere).
fn has_no_stages(document: &Node) -> bool {
    match document.get("stages") {
        None => true,
        Some(stages) => stages.as_table().is_some_and(BTreeMap::is_empty),
    }
}

fn resolve(
    path: &Path,
    document: &Node,
    sources: Sources,
    kinds: Registry,
    errors: &mut Vec<Diagnostic>,
) -> Pipeline {
    for (key, node) in document.as_table().into_iter().flatten() {
        if !TOP_LEVEL_KEYS.contains(&key.as_str()) {
            let message = format!(
                "unknown top-level key `{key}` (expected one of: {})",
                TOP_LEVEL_KEYS.join(", ")
            );
            errors.push(Diagnostic::new(node.key_location.clone(), message));
        }
    }
    let section: PipelineSection = match document.get("pipeline") {
        Some(node) => typed(node, errors).unwrap_or_default(),
        None => PipelineSection::default(),
    };
    let root = absolute(path.parent().unwrap_or(Path::new(".")));
    let work_dir = relative_to(&root, section.work_dir.as_deref().unwrap_or(".nnflow"));
    let cache_dir = match std::env::var_os("NNFLOW_CACHE_DIR") {
        Some(dir) if !dir.is_empty() => absolute(Path::new(&dir)),
        _ => section
            .cache_dir
            .as_deref()
            .map_or_else(|| work_dir.join("cache"), |d| relative_to(&root, d)),
    };
    let remote_cache = section.remote_cache.clone();
    if let Some(url) = &remote_cache {
        check_remote_cache(url, document, errors);
    }
    let name = section.name.clone().unwrap_or_else(|| {
        path.file_stem()
            .map_or("pipeline".into(), |s| s.to_string_lossy().into_owned())
    });
    check_name(&name, document, errors);
    if let Err(problem) = crate::engine::paths::project_relative(&root, &work_dir.to_string_lossy()) {
        let location = document.get("pipeline").and_then(|p| p.get("work_dir"));
        errors.push(Diagnostic::new(
            location.map(|node| node.location.clone()),
            format!("work_dir {problem}: nnflow writes and deletes there, so it must be a folder inside the project"),
        ));
    }
    let vars = resolve_vars(document.get("vars"), errors);
    let state_dir = work_dir.join(&name);
    let mut failed = HashSet::new();
    let stages = expand_stages(
        document.get("stages"),
        kinds,
        &vars,
        &state_dir,
        &mut failed,
        errors,
    );
    let (instances, left_out) = build_instances(stages, &failed, &vars, errors);
    Pipeline {
        name,
        file: path.to_path_buf(),
        root,
        work_dir,
        state_dir,
        cache_dir,
        remote_cache,
        executor: section.executor.unwrap_or_default(),
        slurm: section.slurm.clone().unwrap_or_default(),
        sources,
        instances,
        left_out,
    }
}

/// `remote_cache` must be a URL nnflow can use, without credentials: the pipeline file is committed
/// and shown in messages. A problem with credentials in the URL is reported without pointing at its
/// line, which would print them.
fn check_remote_cache(url: &str, document: &Node, errors: &mut Vec<Diagnostic>) {
    let location = document
        .get("pipeline")
        .and_then(|p| p.get("remote_cache"))
        .map(|node| node.location.clone());
    match crate::engine::remote::Address::parse(url) {
        Err(problem) => {
            let shown = url::Url::parse(url)
                .is_ok_and(|u| u.username().is_empty() && u.password().is_none() && u.query().is_none());
            errors.push(Diagnostic::new(location.filter(|_| shown), problem.to_string()));
        }
        Ok(address) if address.has_credentials() => errors.push(Diagnostic::new(
            None,
            format!(
                "[pipeline] remote_cache `{}` holds credentials (a user, password or query): the pipeline \
                 file is committed and shown in messages, so give them through the environment instead \
                 (the store's own variables, such as AWS_ACCESS_KEY_ID, or NNFLOW_REMOTE_CACHE with the \
                 whole URL)",
                address.shown()
            ),
        )),
        Ok(_) => {}
    }
}

/// The pipeline's name becomes a folder of the work directory: one plain file name.
fn check_name(name: &str, document: &Node, errors: &mut Vec<Diagnostic>) {
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\', '\0'])
        && !name.chars().any(char::is_control);
    if !plain {
        let location = document.get("pipeline").and_then(|p| p.get("name"));
        errors.push(Diagnostic::new(
            location.map(|node| node.location.clone()),
            format!("pipeline name `{name}` must be a plain file name (it names the pipeline's folder in the work directory): no `/`, not `.` or `..`"),
        ));
    }
}

fn absolute(path: &Path) -> PathBuf {
    path.canonicalize()
        .unwrap_or_else(|_| std::env::current_dir().unwrap_or_default().join(path))
}
