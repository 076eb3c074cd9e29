//! Typed reading with positions: a node deserialized into a typed struct, and every problem found
//! pointed at the key or value it concerns.

use serde::de::DeserializeOwned;

use super::diagnostics::Diagnostic;
use super::every_error::read_all;
use super::node::{Node, NodeValue};
use crate::engine::stage::ParamError;

pub(super) fn select_keys(node: &Node, keep: impl Fn(&str) -> bool) -> Node {
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
pub(super) fn typed<T: DeserializeOwned>(node: &Node, errors: &mut Vec<Diagnostic>) -> Option<T> {
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

pub(super) fn param_diagnostic(node: &Node, problem: &ParamError, instance: &str) -> Diagnostic {
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
