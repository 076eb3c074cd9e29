//! `instance_overrides`: parameters set for the instances whose matrix values match an entry's
//! `where`, laid over the stage's own parameters.

use std::collections::BTreeMap;

use super::diagnostics::Diagnostic;
use super::matrix::{matrix_value, plain_text, Expanded};
use super::node::{Node, NodeValue};
use super::raw::{MatrixValue, COMMON_STAGE_KEYS};
use super::substitute::{substitute, Scope};
use super::typed::{select_keys, typed};
use super::vars::Vars;

/// The stage's `instance_overrides` entries: each one's `where` (matrix key -> value as text) and table.
pub(super) fn read_overrides<'a>(
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
    let scope = Scope::vars_only(vars);
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
pub(super) fn instance_params(e: &Expanded) -> Node {
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
