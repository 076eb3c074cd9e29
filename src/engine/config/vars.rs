//! `[vars]`: the pipeline's variables, each substituted once, after the variables it names, with
//! cycles between them reported.

use std::collections::BTreeMap;

use super::diagnostics::Diagnostic;
use super::node::{Node, NodeValue};
use super::substitute::{substitute, Scope};
use super::template::{self, Piece};

pub(super) type Vars = BTreeMap<String, Node>;

/// `[vars]`, with `${other}` references between variables substituted. Each variable is resolved
/// once, after the variables it names, so escapes (`$${`) stay literal and cycles are reported.
pub(super) fn resolve_vars(node: Option<&Node>, errors: &mut Vec<Diagnostic>) -> Vars {
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
    let scope = Scope::vars_only(resolved);
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
