//! Reading pipeline files: parsing with positions, following `extends`, applying `--set`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use toml::de::DeTable;

use super::diagnostics::{Diagnostic, Location, Sources};
use super::node::{Node, NodeValue};

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
    Some(Node::from_document(&document, file))
}

/// Applies one `--set NAME=VALUE` (a variable) or `--set STAGE.PARAM=VALUE` (a stage parameter,
/// for every matrix instance). VALUE is read as a TOML value, else taken as a string.
pub fn apply_set(root: &mut Node, arg: &str) -> Result<(), Diagnostic> {
    let location = Location::CommandLine { arg: arg.to_string() };
    let fail = |message: String| Diagnostic::new(Some(location.clone()), message);
    let (name, text) = arg
        .split_once('=')
        .ok_or_else(|| fail("expected NAME=VALUE or STAGE.PARAM=VALUE".into()))?;
    let value = Node::scalar(absolute_if_existing_path(parse_value(text)), location.clone());
    let path: Vec<&str> = name.trim().split('.').collect();
    if path.iter().any(|segment| segment.is_empty()) {
        return Err(fail(format!("`{name}` is not a variable or STAGE.PARAM name")));
    }
    let target: Vec<&str> = if path.len() == 1 {
        vec!["vars", path[0]]
    } else {
        let stage_exists = root.get("stages").and_then(|s| s.get(path[0])).is_some();
        if !stage_exists {
            return Err(fail(format!("no stage named `{}`", path[0])));
        }
        ["stages"].into_iter().chain(path.iter().copied()).collect()
    };
    if root.as_table().is_none() {
        root.value = NodeValue::Table(Default::default());
    }
    root.set_path(&target, value).map_err(fail)
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

fn parse_value(text: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("value = {text}"))
        .ok()
        .and_then(|mut table| table.remove("value"))
        .unwrap_or_else(|| toml::Value::String(text.to_string()))
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
            toml::Value::Array(vec![0.into(), 1.into()])
        );
        assert_eq!(parse_value("5"), toml::Value::Integer(5));
        assert_eq!(parse_value("data/x"), toml::Value::String("data/x".into()));
        assert_eq!(parse_value("\"5\""), toml::Value::String("5".into()));
    }
}
