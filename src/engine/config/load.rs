//! Reading pipeline files: parsing with positions, following `extends`, applying `--set`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use toml::de::DeTable;

use super::diagnostics::{nearest, Diagnostic, Location, Sources};
use super::node::{Node, NodeValue, SetPathError};
use super::raw::COMMON_STAGE_KEYS;
use crate::engine::stage::{Kind, Registry};

/// Reads `path` and every file it extends, merged base first. Errors are pushed to `errors`; the
/// returned node holds whatever could be read.
pub fn read_merged(path: &Path, sources: &mut Sources, errors: &mut Vec<Diagnostic>) -> Option<Node> {
    let mut chain = Vec::new();
    let mut seen = HashSet::new();
    let mut next = Some((path.to_path_buf(), None::<Location>));
    while let Some((file, referenced_at)) = next.take() {
        let canonical = file.canonicalize().unwrap_or_else(|_| file.clone());
        if !seen.insert(canonical.clone()) {
            errors.push(Diagnostic::new(
                referenced_at,
                format!("`extends` cycle through {}", file.display()),
            ));
            break;
        }
        let node = read_file(&file, referenced_at, sources, errors)?;
        if let Some(extends) = node.get("pipeline").and_then(|p| p.get("extends")) {
            match extends.as_str() {
                Some(base) => {
                    let folder = file.parent().unwrap_or(Path::new("."));
                    next = Some((folder.join(base), Some(extends.location.clone())));
                }
                None => errors.push(Diagnostic::new(
                    Some(extends.location.clone()),
                    "`extends` must be a string: the path of the base pipeline file",
                )),
            }
        }
        chain.push(node);
    }
    let mut merged = chain.pop()?;
    while let Some(over) = chain.pop() {
        merged.merge(over);
    }
    Some(merged)
}

fn read_file(
    path: &Path,
    referenced_at: Option<Location>,
    sources: &mut Sources,
    errors: &mut Vec<Diagnostic>,
) -> Option<Node> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => {
            let message = format!("cannot read pipeline file {}: {e}", path.display());
            errors.push(Diagnostic::new(referenced_at, message));
            return None;
        }
    };
    let file = sources.add(path.to_path_buf(), text.clone());
    let (document, parse_errors) = DeTable::parse_recoverable(&text);
    for error in &parse_errors {
        let location = error.span().map(|span| Location::File { file, span });
        errors.push(Diagnostic::new(
            location,
            format!("invalid TOML: {}", error.message().trim()),
        ));
    }
    if !parse_errors.is_empty() {
        return None;
    }
    Some(Node::from_document(&document, file, errors))
}

/// A `--set` argument that cannot be applied; reported at the argument.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum SetError {
    #[error("expected NAME=VALUE or STAGE.PARAM=VALUE")]
    NotAnAssignment,
    #[error("`{name}` is not a variable or STAGE.PARAM name")]
    BadName { name: String },
    #[error("`{text}` is not a valid TOML value: {}", .source.message().trim())]
    InvalidValue { text: String, source: toml::de::Error },
    /// `hint`: the nearest name, or the valid names.
    #[error("unknown variable `{name}` {hint}")]
    UnknownVariable { name: String, hint: String },
    #[error("no stage named `{stage}` {hint}")]
    UnknownStage { stage: String, hint: String },
    #[error("stage `{stage}` has no parameter `{key}` ({hint})")]
    UnknownParameter {
        stage: String,
        key: String,
        hint: String,
    },
    #[error(transparent)]
    Path(#[from] SetPathError),
}

/// Applies one `--set NAME=VALUE` (a variable) or `--set STAGE.PARAM=VALUE` (a stage parameter,
/// for every matrix instance). VALUE is read as a TOML value, else taken as a string. The variable,
/// stage and parameter must exist: a typo is an error naming the nearest valid name, not a value
/// silently ignored; `kinds` tell a stage's parameters.
pub fn apply_set(root: &mut Node, arg: &str, kinds: Registry) -> Result<(), Diagnostic> {
    let location = Location::CommandLine { arg: arg.to_string() };
    set(root, arg, &location, kinds).map_err(|error| Diagnostic::new(Some(location), error.to_string()))
}

fn set(root: &mut Node, arg: &str, location: &Location, kinds: Registry) -> Result<(), SetError> {
    let (name, text) = arg.split_once('=').ok_or(SetError::NotAnAssignment)?;
    let value = Node::scalar(absolute_if_existing_path(parse_value(text)?), location.clone());
    let path: Vec<&str> = name.trim().split('.').collect();
    if path.iter().any(|segment| segment.is_empty()) {
        return Err(SetError::BadName {
            name: name.to_string(),
        });
    }
    let target: Vec<&str> = if path.len() == 1 {
        check_variable(root, path[0])?;
        vec!["vars", path[0]]
    } else {
        check_stage_key(root, path[0], path[1], kinds)?;
        ["stages"].into_iter().chain(path.iter().copied()).collect()
    };
    if root.as_table().is_none() {
        root.value = NodeValue::Table(Default::default());
    }
    Ok(root.set_path(&target, value)?)
}

/// `--set NAME=...` replaces a variable of `[vars]`; it cannot add one (nothing would read it).
fn check_variable(root: &Node, name: &str) -> Result<(), SetError> {
    let vars: Vec<&str> = root
        .get("vars")
        .and_then(Node::as_table)
        .into_iter()
        .flatten()
        .map(|(key, _)| key.as_str())
        .collect();
    if vars.contains(&name) {
        return Ok(());
    }
    Err(SetError::UnknownVariable {
        name: name.to_string(),
        hint: hint(name, &vars, "variables"),
    })
}

/// `--set STAGE.PARAM=...`: the stage must exist, and PARAM be a key the stage sets, a parameter
/// of its kind (one left at its default too) or a key every stage has (`threads`, `gpus`, ...).
fn check_stage_key(root: &Node, stage: &str, key: &str, kinds: Registry) -> Result<(), SetError> {
    let stages: Vec<&str> = root
        .get("stages")
        .and_then(Node::as_table)
        .into_iter()
        .flatten()
        .map(|(name, _)| name.as_str())
        .collect();
    let Some(node) = root.get("stages").and_then(|s| s.get(stage)) else {
        return Err(SetError::UnknownStage {
            stage: stage.to_string(),
            hint: hint(stage, &stages, "stages"),
        });
    };
    let written: Vec<&str> = node
        .as_table()
        .into_iter()
        .flatten()
        .map(|(k, _)| k.as_str())
        .collect();
    if written.contains(&key) || COMMON_STAGE_KEYS.contains(&key) {
        return Ok(());
    }
    // Without a known kind there is nothing to check against; the kind itself is reported.
    let Some(kind) = stage_kind(root, node, kinds) else {
        return Ok(());
    };
    let parameters = kind.parameter_names();
    if parameters.iter().any(|p| p == key) {
        return Ok(());
    }
    let mut known: Vec<&str> = parameters.iter().map(String::as_str).collect();
    for key in written {
        if !known.contains(&key) && !COMMON_STAGE_KEYS.contains(&key) {
            known.push(key);
        }
    }
    let hint = match nearest(key, known.iter().chain(COMMON_STAGE_KEYS).copied()) {
        Some(near) => format!("did you mean `{near}`?"),
        None => format!(
            "parameters of kind `{}`: {}; keys of every stage: {}",
            kind.name,
            known.join(", "),
            COMMON_STAGE_KEYS.join(", ")
        ),
    };
    Err(SetError::UnknownParameter {
        stage: stage.to_string(),
        key: key.to_string(),
        hint,
    })
}

/// The stage's kind, when it is written as a kind's name or as a `${var}` holding one.
fn stage_kind(root: &Node, stage: &Node, kinds: Registry) -> Option<&'static Kind> {
    let written = stage.get("kind")?.as_str()?;
    let name = match written.strip_prefix("${").and_then(|rest| rest.strip_suffix('}')) {
        Some(var) => root.get("vars")?.get(var.trim())?.as_str()?,
        None => written,
    };
    kinds.find(name)
}

/// "(did you mean `x`?)" for a near name, else the valid names listed.
fn hint(name: &str, valid: &[&str], what: &str) -> String {
    match nearest(name, valid.iter().copied()) {
        Some(near) => format!("(did you mean `{near}`?)"),
        None if valid.is_empty() => format!("(the pipeline has no {what})"),
        None => format!("({what}: {})", valid.join(", ")),
    }
}

/// A relative path typed on the command line means a path from the current folder, while paths in a
/// pipeline file are relative to that file: a `--set` string naming an existing file or folder
/// from here is made absolute so both readings agree.
fn absolute_if_existing_path(value: toml::Value) -> toml::Value {
    match &value {
        toml::Value::String(text)
            if !text.is_empty() && Path::new(text).is_relative() && Path::new(text).exists() =>
        {
            match std::path::absolute(text) {
                Ok(path) => toml::Value::String(path.to_string_lossy().into_owned()),
                Err(_) => value,
            }
        }
        _ => value,
    }
}

/// VALUE of `--set`: a TOML value, else the text as a string. Text that starts like a TOML array,
/// table or quoted string but does not parse is an error, not a string.
fn parse_value(text: &str) -> Result<toml::Value, SetError> {
    match toml::from_str::<toml::Table>(&format!("value = {text}")) {
        Ok(mut table) => Ok(table
            .remove("value")
            .unwrap_or_else(|| toml::Value::String(text.to_string()))),
        Err(source) if text.trim_start().starts_with(['[', '{', '"', '\'']) => Err(SetError::InvalidValue {
            text: text.trim().to_string(),
            source,
        }),
        Err(_) => Ok(toml::Value::String(text.to_string())),
    }
}

/// Resolves a path written in a pipeline file relative to the file's folder.
pub fn relative_to(root: &Path, path: &str) -> PathBuf {
    let path = Path::new(path);
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        root.join(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_values_are_toml_else_strings() {
        assert_eq!(
            parse_value("[0, 1]"),
            Ok(toml::Value::Array(vec![0.into(), 1.into()]))
        );
        assert_eq!(parse_value("5"), Ok(toml::Value::Integer(5)));
        assert_eq!(parse_value("data/x"), Ok(toml::Value::String("data/x".into())));
        assert_eq!(parse_value("\"5\""), Ok(toml::Value::String("5".into())));
        assert_eq!(parse_value(""), Ok(toml::Value::String(String::new())));
        assert_eq!(parse_value("a b"), Ok(toml::Value::String("a b".into())));
        for bad in ["[0,", "[0, x]", "{ a = }", "\"open"] {
            let error = parse_value(bad).unwrap_err().to_string();
            assert!(
                error.starts_with(&format!("`{bad}` is not a valid TOML value: ")),
                "{error}"
            );
        }
    }
}
