//! Stage expansion: each `[stages.NAME]` table read for its common keys (kind, `after`, threads,
//! matrix, ...) and expanded into one instance per combination of its matrix values, each with its
//! id and output folder.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use super::diagnostics::{Diagnostic, Location};
use super::instances::check_params_alone;
use super::node::{Node, NodeValue};
use super::overrides::read_overrides;
use super::raw::{MatrixValue, SlurmOptions, StageCommon, COMMON_STAGE_KEYS};
use super::substitute::{substitute, Scope};
use super::typed::{select_keys, typed};
use super::vars::Vars;
use crate::engine::record::file_safe;
use crate::engine::stage::{Kind, Registry};

/// One instance before its parameters are read.
pub(super) struct Expanded<'a> {
    pub(super) stage: String,
    pub(super) id: String,
    pub(super) node: &'a Node,
    pub(super) common: StageCommonResolved,
    pub(super) kind: &'static Kind,
    pub(super) matrix: BTreeMap<String, toml::Value>,
    pub(super) out_dir: PathBuf,
    /// The stage's `instance_overrides` entries whose `where` this instance matches, in order.
    pub(super) overrides: Vec<&'a Node>,
}

pub(super) struct StageCommonResolved {
    pub(super) after: Vec<(String, Location)>,
    pub(super) threads: u32,
    pub(super) gpus: u32,
    pub(super) slurm: SlurmOptions,
    pub(super) on_demand: bool,
}

pub(super) fn expand_stages<'a>(
    stages: Option<&'a Node>,
    kinds: Registry,
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
        expanded.extend(expand_stage(name, node, kinds, vars, state_dir, errors));
        if errors.len() == before {
            failed.remove(name);
        } else if expanded.len() == count {
            // The stage's common keys have a mistake, so it has no instances to check; its
            // parameters' mistakes are still reported in this one round.
            check_params_alone(name, node, kinds, vars, errors);
        }
    }
    expanded
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
    kinds: Registry,
    vars: &Vars,
    state_dir: &Path,
    errors: &mut Vec<Diagnostic>,
) -> Vec<Expanded<'a>> {
    // Overrides may refer to other stages' outputs, so they are read per instance later.
    let common_node = select_keys(node, |key| {
        COMMON_STAGE_KEYS.contains(&key) && key != "instance_overrides"
    });
    let scope = Scope::vars_only(vars);
    let common_node = substitute(&common_node, &scope, errors).resolved;
    let Some(common) = typed::<StageCommon>(&common_node, errors) else {
        return Vec::new();
    };
    let Some(kind) = kinds.find(&common.kind) else {
        let known: Vec<&str> = kinds.kinds().iter().map(|k| k.name).collect();
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
                    on_demand: common.on_demand,
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

pub(super) fn matrix_value(value: &MatrixValue) -> toml::Value {
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

pub(super) fn plain_text(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
