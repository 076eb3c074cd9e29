//! From the merged document to stage instances: variables, matrix expansion, references between
//! stages, and the kind-specific parameters of every instance.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use super::diagnostics::{Diagnostic, Diagnostics, Location, Sources};
use super::every_error::read_all;
use super::load::{apply_set, read_merged, relative_to};
use super::node::{Node, NodeValue};
use super::raw::{
    ExecutorKind, MatrixValue, PipelineSection, SlurmOptions, StageCommon, COMMON_STAGE_KEYS, TOP_LEVEL_KEYS,
};
use super::template::{self, Piece, Select};
use crate::engine::record::file_safe;
use crate::stages::{find_kind, Kind, ParamError, Stage, KINDS};

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
    pub executor: ExecutorKind,
    /// `[pipeline.slurm]`: Slurm settings for every stage.
    pub slurm: SlurmOptions,
    pub sources: Sources,
    pub instances: Vec<Instance>,
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

/// Reads and checks a pipeline file. `sets` are `--set` arguments.
pub fn load(path: &Path, sets: &[String]) -> Result<Pipeline, (Diagnostics, Option<Box<Pipeline>>)> {
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
        if let Err(e) = apply_set(&mut document, arg) {
            errors.push(e);
        }
    }
    let pipeline = resolve(path, &document, sources, &mut errors);
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

fn resolve(path: &Path, document: &Node, sources: Sources, errors: &mut Vec<Diagnostic>) -> Pipeline {
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
    let stages = expand_stages(document.get("stages"), &vars, &state_dir, &mut failed, errors);
    let instances = build_instances(stages, &failed, &vars, errors);
    Pipeline {
        name,
        file: path.to_path_buf(),
        root,
        work_dir,
        state_dir,
        cache_dir,
        executor: section.executor.unwrap_or_default(),
        slurm: section.slurm.clone().unwrap_or_default(),
        sources,
        instances,
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

// ---------------------------------------------------------------------------------------------
// Variables

type Vars = BTreeMap<String, Node>;

/// `[vars]`, with `${other}` references between variables substituted. Each variable is resolved
/// once, after the variables it names, so escapes (`$${`) stay literal and cycles are reported.
fn resolve_vars(node: Option<&Node>, errors: &mut Vec<Diagnostic>) -> Vars {
    let Some(node) = node else { return Vars::new() };
    let Some(table) = node.as_table() else {
        errors.push(Diagnostic::new(
            Some(node.location.clone()),
            "`vars` must be a table",
        ));
        return Vars::new();
    };
    let mut resolved = Vars::new();
    for name in table.keys() {
        resolve_var(name, table, &mut resolved, &mut Vec::new(), errors);
    }
    resolved
}

fn resolve_var(
    name: &str,
    raw: &BTreeMap<String, Node>,
    resolved: &mut Vars,
    in_progress: &mut Vec<String>,
    errors: &mut Vec<Diagnostic>,
) {
    if resolved.contains_key(name) {
        return;
    }
    let node = &raw[name];
    if in_progress.iter().any(|n| n == name) {
        let cycle = format!("{} -> {name}", in_progress.join(" -> "));
        errors.push(Diagnostic::new(
            Some(node.location.clone()),
            format!("variables refer to each other in a cycle: {cycle}"),
        ));
        resolved.insert(name.to_string(), node.clone());
        return;
    }
    in_progress.push(name.to_string());
    for dependency in referenced_names(node) {
        if raw.contains_key(&dependency) {
            resolve_var(&dependency, raw, resolved, in_progress, errors);
        }
    }
    in_progress.pop();
    if resolved.contains_key(name) {
        return; // reached through a cycle and reported there
    }
    let scope = Scope {
        vars: resolved,
        matrix: &BTreeMap::new(),
        refs: None,
        budget: std::cell::Cell::new(SUBSTITUTION_BUDGET),
    };
    let value = substitute(node, &scope, errors).resolved;
    resolved.insert(name.to_string(), value);
}

/// The `${name}` substitutions written anywhere in a value.
fn referenced_names(node: &Node) -> Vec<String> {
    match &node.value {
        NodeValue::Scalar(toml::Value::String(text)) => template::parse(text)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|piece| match piece {
                Piece::Name(name) => Some(name),
                _ => None,
            })
            .collect(),
        NodeValue::Scalar(_) => Vec::new(),
        NodeValue::Array(items) => items.iter().flat_map(referenced_names).collect(),
        NodeValue::Table(table) => table.values().flat_map(referenced_names).collect(),
    }
}

// ---------------------------------------------------------------------------------------------
// Stages and matrix expansion

/// One instance before its parameters are read.
struct Expanded<'a> {
    stage: String,
    id: String,
    node: &'a Node,
    common: StageCommonResolved,
    kind: &'static Kind,
    matrix: BTreeMap<String, toml::Value>,
    out_dir: PathBuf,
    /// The stage's `instance_overrides` entries whose `where` this instance matches, in order.
    overrides: Vec<&'a Node>,
}

struct StageCommonResolved {
    after: Vec<(String, Location)>,
    threads: u32,
    gpus: u32,
    slurm: SlurmOptions,
}

fn expand_stages<'a>(
    stages: Option<&'a Node>,
    vars: &Vars,
    state_dir: &Path,
    failed: &mut HashSet<String>,
    errors: &mut Vec<Diagnostic>,
) -> Vec<Expanded<'a>> {
    let Some(stages) = stages else { return Vec::new() };
    let Some(table) = stages.as_table() else {
        errors.push(Diagnostic::new(
            Some(stages.location.clone()),
            "`stages` must be a table of stage tables",
        ));
        return Vec::new();
    };
    let mut expanded = Vec::new();
    for (name, node) in table {
        let before = errors.len();
        failed.insert(name.clone());
        if !valid_stage_name(name) {
            let message = format!("stage name `{name}` may only contain letters, digits, `_` and `-`");
            errors.push(Diagnostic::new(node.key_location.clone(), message));
            continue;
        }
        if node.as_table().is_none() {
            errors.push(Diagnostic::new(
                Some(node.location.clone()),
                format!("stage `{name}` must be a table"),
            ));
            continue;
        }
        let count = expanded.len();
        expanded.extend(expand_stage(name, node, vars, state_dir, errors));
        if errors.len() == before {
            failed.remove(name);
        } else if expanded.len() == count {
            // The stage's common keys have a mistake, so it has no instances to check; its
            // parameters' mistakes are still reported in this one round.
            check_params_alone(name, node, vars, errors);
        }
    }
    expanded
}

/// Checks the kind's parameters of a stage that has no instances (a mistake in `threads`,
/// `matrix`, ...): values are substituted with `[vars]` only, so a value that still holds a
/// `${...}` (a matrix value, another stage's outputs) is not judged.
fn check_params_alone(name: &str, node: &Node, vars: &Vars, errors: &mut Vec<Diagnostic>) {
    let scope = Scope {
        vars,
        matrix: &BTreeMap::new(),
        refs: None,
        budget: std::cell::Cell::new(SUBSTITUTION_BUDGET),
    };
    let kind = node
        .get("kind")
        .map(|kind| substitute(kind, &scope, &mut Vec::new()).resolved)
        .and_then(|kind| kind.as_str().and_then(find_kind));
    let Some(kind) = kind else {
        return; // an unknown or missing kind is reported already
    };
    let params = select_keys(node, |key| !COMMON_STAGE_KEYS.contains(&key));
    let params = substitute(&params, &scope, &mut Vec::new()).resolved;
    build_params(kind, &params, name, true, errors);
}

/// Reads a stage's parameters with its kind, reporting every mistake. With `unsubstituted`,
/// strings still holding a `${...}` (their substitution failed and was reported, or cannot be done
/// here) are set aside, not judged.
fn build_params(
    kind: &Kind,
    params: &Node,
    stage: &str,
    unsubstituted: bool,
    errors: &mut Vec<Diagnostic>,
) -> Option<Box<dyn Stage>> {
    let unknowable = |path: &[String]| {
        unsubstituted
            && params
                .find(path)
                .and_then(Node::as_str)
                .is_some_and(|text| text.contains("${"))
    };
    match read_all(params.to_toml(), kind.build, unknowable) {
        Ok(stage) => Some(stage),
        Err(problems) => {
            errors.extend(
                problems
                    .iter()
                    .map(|problem| param_diagnostic(params, problem, stage)),
            );
            None
        }
    }
}

fn valid_stage_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn expand_stage<'a>(
    name: &str,
    node: &'a Node,
    vars: &Vars,
    state_dir: &Path,
    errors: &mut Vec<Diagnostic>,
) -> Vec<Expanded<'a>> {
    // Overrides may refer to other stages' outputs, so they are read per instance later.
    let common_node = select_keys(node, |key| {
        COMMON_STAGE_KEYS.contains(&key) && key != "instance_overrides"
    });
    let scope = Scope {
        vars,
        matrix: &BTreeMap::new(),
        refs: None,
        budget: std::cell::Cell::new(SUBSTITUTION_BUDGET),
    };
    let common_node = substitute(&common_node, &scope, errors).resolved;
    let Some(common) = typed::<StageCommon>(&common_node, errors) else {
        return Vec::new();
    };
    let Some(kind) = find_kind(&common.kind) else {
        let known: Vec<&str> = KINDS.iter().map(|k| k.name).collect();
        let message = format!(
            "unknown stage kind `{}` (known kinds: {})",
            common.kind,
            known.join(", ")
        );
        errors.push(Diagnostic::new(
            common_node.get("kind").map(|n| n.location.clone()),
            message,
        ));
        return Vec::new();
    };
    let after_locations = common_node.get("after").map(|n| match &n.value {
        NodeValue::Array(items) => items.iter().map(|i| i.location.clone()).collect(),
        _ => Vec::new(),
    });
    let after = common
        .after
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let location = after_locations
                .as_ref()
                .and_then(|l: &Vec<Location>| l.get(i).cloned());
            (a.clone(), location.unwrap_or_else(|| node.location.clone()))
        })
        .collect::<Vec<_>>();
    let overrides = read_overrides(node, &common.matrix, vars, errors);
    matrix_combinations(&common.matrix)
        .into_iter()
        .map(|matrix| {
            let suffix = matrix_suffix(&matrix);
            let (id, out_dir) = match &suffix {
                None => (name.to_string(), state_dir.join("out").join(name)),
                // matrix values are free text: encoded, so none can name a folder elsewhere
                Some(s) => (
                    format!("{name}[{s}]"),
                    state_dir.join("out").join(name).join(file_safe(s)),
                ),
            };
            Expanded {
                stage: name.to_string(),
                id,
                node,
                common: StageCommonResolved {
                    after: after.clone(),
                    threads: common.threads,
                    gpus: common.gpus,
                    slurm: common.slurm.clone().unwrap_or_default(),
                },
                kind,
                overrides: overrides
                    .iter()
                    .filter(|(matches, _)| {
                        matches
                            .iter()
                            .all(|(k, v)| matrix.get(k).is_some_and(|m| plain_text(m) == *v))
                    })
                    .map(|&(_, node)| node)
                    .collect(),
                matrix,
                out_dir,
            }
        })
        .collect()
}

/// The stage's `instance_overrides` entries: each one's `where` (matrix key -> value as text) and table.
fn read_overrides<'a>(
    node: &'a Node,
    matrix: &BTreeMap<String, Vec<MatrixValue>>,
    vars: &Vars,
    errors: &mut Vec<Diagnostic>,
) -> Vec<(BTreeMap<String, String>, &'a Node)> {
    let Some(list) = node.get("instance_overrides") else {
        return Vec::new();
    };
    let NodeValue::Array(entries) = &list.value else {
        let message = "`instance_overrides` must be a list of tables (`[[stages.NAME.instance_overrides]]`)";
        errors.push(Diagnostic::new(Some(list.location.clone()), message));
        return Vec::new();
    };
    let scope = Scope {
        vars,
        matrix: &BTreeMap::new(),
        refs: None,
        budget: std::cell::Cell::new(SUBSTITUTION_BUDGET),
    };
    let mut read = Vec::new();
    for entry in entries {
        let Some(table) = entry.as_table() else {
            errors.push(Diagnostic::new(
                Some(entry.location.clone()),
                "an override must be a table",
            ));
            continue;
        };
        if let Some((key, value)) = table
            .iter()
            .find(|(k, _)| COMMON_STAGE_KEYS.contains(&k.as_str()))
        {
            let message = format!("`{key}` cannot be overridden per instance (only the kind's parameters)");
            errors.push(Diagnostic::new(value.key_location.clone(), message));
            continue;
        }
        let Some(condition) = entry.get("where") else {
            let message = "an override needs `where = { key = value }` naming the instances it applies to";
            errors.push(Diagnostic::new(Some(entry.location.clone()), message));
            continue;
        };
        let condition = substitute(condition, &scope, errors).resolved;
        let Some(pairs) = typed::<BTreeMap<String, MatrixValue>>(&condition, errors) else {
            continue;
        };
        if let Some(key) = pairs.keys().find(|k| !matrix.contains_key(*k)) {
            let keys: Vec<&str> = matrix.keys().map(String::as_str).collect();
            let message = format!(
                "override `where`: `{key}` is not a matrix key of this stage (its keys: {})",
                if keys.is_empty() {
                    "none".into()
                } else {
                    keys.join(", ")
                }
            );
            errors.push(Diagnostic::new(condition.location.clone().into(), message));
            continue;
        }
        let pairs = pairs
            .iter()
            .map(|(k, v)| (k.clone(), plain_text(&matrix_value(v))))
            .collect();
        read.push((pairs, entry));
    }
    read
}

/// The kind's parameters of an instance: the stage's own, then each matching override on top.
fn instance_params(e: &Expanded) -> Node {
    let mut params = select_keys(e.node, |key| !COMMON_STAGE_KEYS.contains(&key));
    for entry in &e.overrides {
        let (NodeValue::Table(table), Some(overrides)) = (&mut params.value, entry.as_table()) else {
            continue;
        };
        for (key, value) in overrides.iter().filter(|(k, _)| k.as_str() != "where") {
            table.insert(key.clone(), value.clone());
        }
    }
    params
}

/// Every combination of matrix values, keys in sorted order; one empty combination without a matrix.
fn matrix_combinations(matrix: &BTreeMap<String, Vec<MatrixValue>>) -> Vec<BTreeMap<String, toml::Value>> {
    let mut combinations = vec![BTreeMap::new()];
    for (key, values) in matrix {
        combinations = combinations
            .into_iter()
            .flat_map(|partial| {
                values.iter().map(move |value| {
                    let mut next = partial.clone();
                    next.insert(key.clone(), matrix_value(value));
                    next
                })
            })
            .collect();
    }
    combinations
}

fn matrix_value(value: &MatrixValue) -> toml::Value {
    match value {
        MatrixValue::Integer(i) => toml::Value::Integer(*i),
        MatrixValue::String(s) => toml::Value::String(s.clone()),
        MatrixValue::Boolean(b) => toml::Value::Boolean(*b),
    }
}

fn matrix_suffix(matrix: &BTreeMap<String, toml::Value>) -> Option<String> {
    if matrix.is_empty() {
        return None;
    }
    let parts: Vec<String> = matrix
        .iter()
        .map(|(k, v)| format!("{k}={}", plain_text(v)))
        .collect();
    Some(parts.join(","))
}

fn plain_text(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Instances: references, `after`, typed parameters

fn build_instances(
    expanded: Vec<Expanded<'_>>,
    failed: &HashSet<String>,
    vars: &Vars,
    errors: &mut Vec<Diagnostic>,
) -> Vec<Instance> {
    let mut by_stage: HashMap<&str, Vec<usize>> = HashMap::new();
    for (index, e) in expanded.iter().enumerate() {
        by_stage.entry(e.stage.as_str()).or_default().push(index);
    }
    let targets = RefTargets {
        expanded: &expanded,
        by_stage: &by_stage,
        failed,
    };
    let mut instances = Vec::new();
    for (index, e) in expanded.iter().enumerate() {
        let params_node = instance_params(e);
        let scope = Scope {
            vars,
            matrix: &e.matrix,
            refs: Some((&targets, index)),
            budget: std::cell::Cell::new(SUBSTITUTION_BUDGET),
        };
        let before = errors.len();
        let substituted = substitute(&params_node, &scope, errors);
        let mut after = substituted.dependencies.clone();
        for (target, location) in &e.common.after {
            after.extend(targets.resolve_after(target, index, location, errors));
        }
        // Parameters are checked even when a substitution failed (every mistake in one round);
        // the value that could not be substituted is then not judged.
        let substitution_failed = errors.len() > before;
        let built = build_params(
            e.kind,
            &substituted.resolved,
            &e.stage,
            substitution_failed,
            errors,
        );
        let Some(implementation) = built.filter(|_| !substitution_failed) else {
            continue;
        };
        let Ok(key_stage) = (e.kind.build)(substituted.key.to_toml()) else {
            continue;
        };
        after.sort_unstable();
        after.dedup();
        let key_locations = e
            .node
            .as_table()
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.location.clone()))
            .collect();
        instances.push(Instance {
            id: e.id.clone(),
            stage: e.stage.clone(),
            matrix: e.matrix.clone(),
            kind: e.kind,
            implementation,
            key_params: key_stage.params_json(),
            after,
            threads: e.common.threads,
            gpus: e.common.gpus,
            slurm: e.common.slurm.clone(),
            out_dir: e.out_dir.clone(),
            params_node: substituted.resolved.clone(),
            location: e
                .node
                .key_location
                .clone()
                .unwrap_or_else(|| e.node.location.clone()),
            key_locations,
        });
    }
    // Dependencies were recorded as indices into `expanded`; map them to indices into `instances`.
    let position: HashMap<String, usize> = instances
        .iter()
        .enumerate()
        .map(|(i, inst)| (inst.id.clone(), i))
        .collect();
    for instance in &mut instances {
        instance.after = instance
            .after
            .iter()
            .filter_map(|&i| position.get(&expanded[i].id).copied())
            .collect();
    }
    instances
}

struct RefTargets<'a, 'b> {
    expanded: &'a [Expanded<'b>],
    by_stage: &'a HashMap<&'a str, Vec<usize>>,
    /// Stages whose own declaration was reported as an error: references to them are not reported
    /// again as unknown stages.
    failed: &'a HashSet<String>,
}

impl RefTargets<'_, '_> {
    /// Instances of `stage` whose matrix values agree with `from`'s on every shared key.
    fn matching(&self, stage: &str, from: usize) -> Option<Vec<usize>> {
        let candidates = self.by_stage.get(stage)?;
        let own = &self.expanded[from].matrix;
        Some(
            candidates
                .iter()
                .copied()
                .filter(|&c| {
                    self.expanded[c]
                        .matrix
                        .iter()
                        .all(|(k, v)| own.get(k).is_none_or(|mine| mine == v))
                })
                .collect(),
        )
    }

    /// Instances of `stage` whose matrix values equal `filter`'s (compared as text, so `fold=0`
    /// matches the integer 0). Every filter key must be one of the stage's matrix keys.
    fn filtered(&self, stage: &str, filter: &[(String, String)]) -> Result<Option<Vec<usize>>, String> {
        let Some(candidates) = self.by_stage.get(stage) else {
            return Ok(None);
        };
        let keys: Vec<&String> = candidates
            .first()
            .map(|&c| self.expanded[c].matrix.keys().collect())
            .unwrap_or_default();
        if let Some((key, _)) = filter.iter().find(|(k, _)| !keys.contains(&k)) {
            let keys: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
            return Err(format!(
                "`{key}` is not a matrix key of stage `{stage}` (its keys: {})",
                if keys.is_empty() {
                    "none".into()
                } else {
                    keys.join(", ")
                }
            ));
        }
        Ok(Some(
            candidates
                .iter()
                .copied()
                .filter(|&c| {
                    let matrix = &self.expanded[c].matrix;
                    filter
                        .iter()
                        .all(|(k, v)| matrix.get(k).is_some_and(|m| &plain_text(m) == v))
                })
                .collect(),
        ))
    }

    fn names_every_key(&self, stage: &str, filter: &[(String, String)]) -> bool {
        self.by_stage
            .get(stage)
            .and_then(|c| c.first())
            .is_some_and(|&c| {
                self.expanded[c]
                    .matrix
                    .keys()
                    .all(|key| filter.iter().any(|(k, _)| k == key))
            })
    }

    fn instance_names(&self, stage: &str) -> String {
        let ids: Vec<&str> = self
            .by_stage
            .get(stage)
            .into_iter()
            .flatten()
            .map(|&i| self.expanded[i].id.as_str())
            .collect();
        ids.join(", ")
    }

    fn unknown_stage(&self, stage: &str) -> String {
        let mut known: Vec<&str> = self.by_stage.keys().copied().collect();
        known.sort_unstable();
        format!("unknown stage `{stage}` (stages: {})", known.join(", "))
    }

    fn resolve_after(
        &self,
        target: &str,
        from: usize,
        location: &Location,
        errors: &mut Vec<Diagnostic>,
    ) -> Vec<usize> {
        let (stage, all) = match target.strip_suffix("[*]") {
            Some(stage) => (stage, true),
            None => (target, false),
        };
        let found = if all {
            self.by_stage.get(stage).cloned()
        } else {
            self.matching(stage, from)
        };
        match found {
            Some(found) if !found.is_empty() => found,
            Some(_) => {
                let message = format!("no instance of `{stage}` matches this instance's matrix values");
                errors.push(Diagnostic::new(Some(location.clone()), message));
                Vec::new()
            }
            None if self.failed.contains(stage) => Vec::new(),
            None => {
                errors.push(Diagnostic::new(Some(location.clone()), self.unknown_stage(stage)));
                Vec::new()
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Substitution

struct Scope<'a, 'b, 'c> {
    vars: &'a Vars,
    matrix: &'a BTreeMap<String, toml::Value>,
    refs: Option<(&'a RefTargets<'b, 'c>, usize)>,
    /// What substitution may still produce, in characters and values (see [`SUBSTITUTION_BUDGET`]).
    budget: std::cell::Cell<usize>,
}

/// Variables may refer to variables: eight lines that each repeat the one before ten times would
/// expand to 10^8 characters. One variable or one stage's parameters may grow to this much.
const SUBSTITUTION_BUDGET: usize = 1 << 20;

impl Scope<'_, '_, '_> {
    /// Takes `size` from the budget; an error once it is spent.
    fn spend(&self, size: usize) -> Result<(), String> {
        let left = self.budget.get();
        if size > left {
            return Err(format!(
                "substitution expands to more than {SUBSTITUTION_BUDGET} characters here \
                 (variables that repeat each other grow exponentially)"
            ));
        }
        self.budget.set(left - size);
        Ok(())
    }
}

/// Characters and values in a TOML value, for the substitution budget.
fn value_size(value: &toml::Value) -> usize {
    match value {
        toml::Value::String(s) => s.len() + 1,
        toml::Value::Array(items) => 1 + items.iter().map(value_size).sum::<usize>(),
        toml::Value::Table(table) => 1 + table.iter().map(|(k, v)| k.len() + value_size(v)).sum::<usize>(),
        _ => 1,
    }
}

/// A substituted tree in two forms: resolved (what the stage runs with) and key (references to
/// other stages' outputs kept symbolic), plus the instances referenced.
struct Substituted {
    resolved: Node,
    key: Node,
    dependencies: Vec<usize>,
}

fn substitute(node: &Node, scope: &Scope, errors: &mut Vec<Diagnostic>) -> Substituted {
    let mut dependencies = Vec::new();
    let (resolved, key) = substitute_node(node, scope, &mut dependencies, errors);
    Substituted {
        resolved,
        key,
        dependencies,
    }
}

fn substitute_node(
    node: &Node,
    scope: &Scope,
    dependencies: &mut Vec<usize>,
    errors: &mut Vec<Diagnostic>,
) -> (Node, Node) {
    let rebuild = |value: NodeValue| Node {
        value,
        ..node.clone()
    };
    match &node.value {
        NodeValue::Scalar(toml::Value::String(text)) => match substitute_string(text, scope, dependencies) {
            Ok((resolved, key)) => {
                // A value given whole by `--set NAME=...`: a mistake in it is the argument's.
                let location = set_on_command_line(text, scope).unwrap_or_else(|| node.location.clone());
                (
                    Node {
                        key_location: node.key_location.clone(),
                        ..Node::scalar(resolved, location.clone())
                    },
                    Node {
                        key_location: node.key_location.clone(),
                        ..Node::scalar(key, location)
                    },
                )
            }
            Err(message) => {
                errors.push(Diagnostic::new(Some(node.location.clone()), message));
                (node.clone(), node.clone())
            }
        },
        NodeValue::Scalar(_) => (node.clone(), node.clone()),
        NodeValue::Array(items) => {
            let (resolved, key) = items
                .iter()
                .map(|i| substitute_node(i, scope, dependencies, errors))
                .unzip();
            (
                rebuild(NodeValue::Array(resolved)),
                rebuild(NodeValue::Array(key)),
            )
        }
        NodeValue::Table(table) => {
            let mut resolved = BTreeMap::new();
            let mut key = BTreeMap::new();
            for (k, v) in table {
                let (r, kk) = substitute_node(v, scope, dependencies, errors);
                resolved.insert(k.clone(), r);
                key.insert(k.clone(), kk);
            }
            (
                rebuild(NodeValue::Table(resolved)),
                rebuild(NodeValue::Table(key)),
            )
        }
    }
}

/// Substitutes one string. A string that is exactly one `${name}` takes the value's type (a list
/// from `[vars]` stays a list); otherwise values are spliced in as text.
fn substitute_string(
    text: &str,
    scope: &Scope,
    dependencies: &mut Vec<usize>,
) -> Result<(toml::Value, toml::Value), String> {
    let pieces = template::parse(text)?;
    let mut resolved = Vec::new();
    let mut key = Vec::new();
    for piece in &pieces {
        let (r, k) = match piece {
            Piece::Text(t) => (toml::Value::String(t.clone()), toml::Value::String(t.clone())),
            Piece::Name(name) => {
                let value = lookup_name(name, scope)?;
                scope.spend(2 * value_size(&value))?;
                (value.clone(), value)
            }
            Piece::Outputs { stage, select } => outputs_reference(stage, select, scope, dependencies)?,
        };
        resolved.push(r);
        key.push(k);
    }
    if pieces.len() == 1 {
        return Ok((resolved.remove(0), key.remove(0)));
    }
    let written: Vec<bool> = pieces.iter().map(|p| matches!(p, Piece::Text(_))).collect();
    let resolved = splice(&written, &resolved)?;
    scope.spend(resolved.len())?;
    let key = splice(&written, &key)?;
    scope.spend(key.len())?;
    Ok((toml::Value::String(resolved), toml::Value::String(key)))
}

/// The `--set` argument that gave a string written as exactly one `${var}` its value, if any.
fn set_on_command_line(text: &str, scope: &Scope) -> Option<Location> {
    let Ok(pieces) = template::parse(text) else {
        return None;
    };
    let [Piece::Name(name)] = pieces.as_slice() else {
        return None;
    };
    if scope.matrix.contains_key(name) {
        return None;
    }
    let location = &scope.vars.get(name)?.location;
    matches!(location, Location::CommandLine { .. }).then(|| location.clone())
}

/// Joins substituted values into one string (`written[i]`: whether `values[i]` is text written
/// in the template rather than a substituted value). A list becomes space-separated words, and
/// the written text attached to it in the same word (see [`ends_word`]) goes with every item, as
/// in shell brace expansion: `cat ${fit[*].outputs}/model.txt` -> `cat A/model.txt B/model.txt`.
/// Two lists in one word give every combination; an empty list removes its word.
fn splice(written: &[bool], values: &[toml::Value]) -> Result<String, String> {
    let mut text = String::new();
    let mut word = Vec::new();
    for (&is_written, value) in written.iter().zip(values) {
        match value {
            toml::Value::String(literal) if is_written => {
                for c in literal.chars() {
                    if ends_word(c) {
                        text.push_str(&expand_word(&mut word));
                        text.push(c);
                    } else {
                        match word.last_mut() {
                            Some(WordPart::Fixed(fixed)) => fixed.push(c),
                            _ => word.push(WordPart::Fixed(c.to_string())),
                        }
                    }
                }
            }
            toml::Value::Array(items) => {
                let items = items.iter().map(item_text).collect::<Result<_, _>>()?;
                word.push(WordPart::Choice(items));
            }
            toml::Value::Table(_) => return Err(format!("cannot splice a table ({value}) into a string")),
            scalar => {
                let scalar = plain_text(scalar);
                match word.last_mut() {
                    Some(WordPart::Fixed(fixed)) => fixed.push_str(&scalar),
                    _ => word.push(WordPart::Fixed(scalar)),
                }
            }
        }
    }
    text.push_str(&expand_word(&mut word));
    Ok(text)
}

/// Whether a character written in a string separates words, as in the shell: blanks and the
/// operators `;`, `|`, `&`, `<`, `>`, `(`, `)` (`for m in ${fit[*].outputs}; do` stays a loop).
fn ends_word(c: char) -> bool {
    c.is_whitespace() || matches!(c, ';' | '|' | '&' | '<' | '>' | '(' | ')')
}

/// A part of one word of a spliced string: fixed text, or one of a list's items.
enum WordPart {
    Fixed(String),
    Choice(Vec<String>),
}

/// The word's expansions, space-separated; the word is emptied.
fn expand_word(word: &mut Vec<WordPart>) -> String {
    let mut expansions = vec![String::new()];
    for part in word.drain(..) {
        expansions = match part {
            WordPart::Fixed(fixed) => expansions.into_iter().map(|e| e + &fixed).collect(),
            WordPart::Choice(items) => expansions
                .iter()
                .flat_map(|e| items.iter().map(move |item| format!("{e}{item}")))
                .collect(),
        };
    }
    expansions.join(" ")
}

/// A list item as text (a nested list as space-separated words).
fn item_text(item: &toml::Value) -> Result<String, String> {
    match item {
        toml::Value::Array(items) => Ok(items
            .iter()
            .map(item_text)
            .collect::<Result<Vec<_>, _>>()?
            .join(" ")),
        toml::Value::Table(_) => Err(format!("cannot splice a table ({item}) into a string")),
        scalar => Ok(plain_text(scalar)),
    }
}

fn lookup_name(name: &str, scope: &Scope) -> Result<toml::Value, String> {
    if let Some(value) = scope.matrix.get(name) {
        return Ok(value.clone());
    }
    if let Some(node) = scope.vars.get(name) {
        return Ok(node.to_toml());
    }
    let mut known: Vec<&str> = scope
        .vars
        .keys()
        .chain(scope.matrix.keys())
        .map(String::as_str)
        .collect();
    known.sort_unstable();
    Err(format!(
        "unknown variable `${{{name}}}` (known: {}; write `$${{` for a literal `${{`)",
        if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        }
    ))
}

fn outputs_reference(
    stage: &str,
    select: &Select,
    scope: &Scope,
    dependencies: &mut Vec<usize>,
) -> Result<(toml::Value, toml::Value), String> {
    let Some((targets, from)) = scope.refs else {
        return Err(format!(
            "`${{{stage}.outputs}}` cannot be used here (only in stage parameters)"
        ));
    };
    let found = match select {
        Select::Matching => targets.matching(stage, from),
        Select::All => targets.by_stage.get(stage).cloned(),
        Select::Filter(filter) => targets.filtered(stage, filter)?,
    };
    // A filter naming every matrix key picks one instance; any other filter gives a list.
    let as_list = match select {
        Select::Matching => false,
        Select::All => true,
        Select::Filter(filter) => !targets.names_every_key(stage, filter),
    };
    if found.is_none() && targets.failed.contains(stage) {
        // Already reported where that stage is declared; the pipeline is invalid either way.
        let empty = if as_list {
            toml::Value::Array(Vec::new())
        } else {
            toml::Value::String(String::new())
        };
        return Ok((empty.clone(), empty));
    }
    let found = found.ok_or_else(|| targets.unknown_stage(stage))?;
    let folder = |i: usize| toml::Value::String(targets.expanded[i].out_dir.to_string_lossy().into_owned());
    let symbol = |i: usize| toml::Value::String(format!("${{{}.outputs}}", targets.expanded[i].id));
    dependencies.extend(&found);
    if as_list {
        let resolved = found.iter().map(|&i| folder(i)).collect();
        let key = found.iter().map(|&i| symbol(i)).collect();
        return Ok((toml::Value::Array(resolved), toml::Value::Array(key)));
    }
    match found.as_slice() {
        [one] => Ok((folder(*one), symbol(*one))),
        [] => Err(match select {
            Select::Filter(filter) => format!(
                "no instance of `{stage}` has {} (instances: {})",
                filter_text(filter),
                targets.instance_names(stage)
            ),
            _ => format!("no instance of `{stage}` matches this instance's matrix values"),
        }),
        many => Err(format!(
            "`${{{stage}.outputs}}` matches {} instances; write `${{{stage}[*].outputs}}` for the list of all",
            many.len()
        )),
    }
}

fn filter_text(filter: &[(String, String)]) -> String {
    let pairs: Vec<String> = filter.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.join(",")
}

// ---------------------------------------------------------------------------------------------
// Typed reading with positions

fn select_keys(node: &Node, keep: impl Fn(&str) -> bool) -> Node {
    let table = node.as_table().map(|t| {
        t.iter()
            .filter(|(k, _)| keep(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    });
    Node {
        value: NodeValue::Table(table.unwrap_or_default()),
        ..node.clone()
    }
}

/// Deserializes a node into a typed struct, turning a failure into a diagnostic at the offending
/// key or value.
/// Every mistake is reported, not only the first.
fn typed<T: DeserializeOwned>(node: &Node, errors: &mut Vec<Diagnostic>) -> Option<T> {
    let read = |value: toml::Value| {
        serde_path_to_error::deserialize::<_, T>(value).map_err(|err| ParamError {
            path: err.path().iter().map(|s| s.to_string()).collect(),
            message: err.into_inner().message().to_string(),
        })
    };
    match read_all(node.to_toml(), read, |_| false) {
        Ok(value) => Some(value),
        Err(problems) => {
            errors.extend(problems.iter().map(|problem| locate(node, problem, None)));
            None
        }
    }
}

fn param_diagnostic(node: &Node, problem: &ParamError, instance: &str) -> Diagnostic {
    locate(node, problem, Some(instance))
}

/// Points a parameter problem at the key (unknown keys) or the value (wrong types) it concerns.
fn locate(node: &Node, problem: &ParamError, instance: Option<&str>) -> Diagnostic {
    let mut path = super::every_error::plain_path(problem);
    let unknown_key = problem
        .message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split('`').next())
        .map(str::to_string);
    // serde_path_to_error ends the path of an unknown field with the field itself; the key is
    // looked up in its parent table below.
    if unknown_key.is_some() && path.last() == unknown_key.as_ref() {
        path.pop();
    }
    let mut location = node.location.clone();
    if let Some(found) = node.find(&path) {
        location = found.location.clone();
        if let Some(key) = &unknown_key {
            if let Some(child) = found.get(key) {
                location = child
                    .key_location
                    .clone()
                    .unwrap_or_else(|| child.location.clone());
            }
        } else if let Some(key_location) = &found.key_location {
            if problem.message.starts_with("missing field") {
                location = key_location.clone();
            }
        }
    }
    let mut message = problem.message.clone();
    if !path.is_empty() && unknown_key.is_none() {
        message = format!("`{}`: {message}", path.join("."));
    }
    if let Some(instance) = instance {
        message = format!("stage `{instance}`: {message}");
    }
    Diagnostic::new(Some(location), message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> toml::Value {
        toml::Value::String(s.to_string())
    }

    fn list(items: &[&str]) -> toml::Value {
        toml::Value::Array(items.iter().map(|s| text(s)).collect())
    }

    #[test]
    fn a_list_in_a_word_takes_the_word_s_text_with_every_item() {
        let written = [true, false, true];
        // The resolved form (folders) and the key form (symbolic references) splice alike.
        let resolved = [
            text("cat "),
            list(&["/o/fit/0", "/o/fit/1"]),
            text("/model.txt > r"),
        ];
        assert_eq!(
            splice(&written, &resolved).unwrap(),
            "cat /o/fit/0/model.txt /o/fit/1/model.txt > r"
        );
        let key = [
            text("cat "),
            list(&["${fit[fold=0].outputs}", "${fit[fold=1].outputs}"]),
            text("/model.txt > r"),
        ];
        assert_eq!(
            splice(&written, &key).unwrap(),
            "cat ${fit[fold=0].outputs}/model.txt ${fit[fold=1].outputs}/model.txt > r"
        );
    }

    #[test]
    fn prefixes_values_and_two_lists_in_a_word() {
        let written = [true, false, true, false, true, false];
        let values = [
            text("--in="),
            list(&["a", "b"]),
            text(" x"),
            text("-v"),
            text("/"),
            list(&["1", "2"]),
        ];
        // `x`, the substituted `-v` and `/` form one word with the list after them.
        assert_eq!(splice(&written, &values).unwrap(), "--in=a --in=b x-v/1 x-v/2");
        // An empty list removes its word.
        let values = [list(&["a", "b"]), text("\t"), list(&[]), text("-y z")];
        assert_eq!(splice(&[false, true, false, true], &values).unwrap(), "a b\t z");
        let values = [list(&["a", "b"]), text("/"), list(&["1", "2"])];
        assert_eq!(splice(&[false, true, false], &values).unwrap(), "a/1 a/2 b/1 b/2");
        // Shell operators end a word like blanks do.
        let values = [
            text("for m in "),
            list(&["a", "b"]),
            text("; do x>"),
            list(&["1", "2"]),
            text("|y"),
        ];
        assert_eq!(
            splice(&[true, false, true, false, true], &values).unwrap(),
            "for m in a b; do x>1 2|y"
        );
        let table = toml::Value::Table(toml::Table::new());
        assert!(splice(&[true, false], &[text("x"), table])
            .unwrap_err()
            .contains("cannot splice a table"));
    }
}
