//! `${...}` substitution in a tree of values: variables, matrix values and other stages' outputs,
//! in a resolved form and a cache-key form, bounded by a substitution budget.

use std::collections::BTreeMap;

use super::diagnostics::{list_or_none, Diagnostic, Location};
use super::node::{Node, NodeValue};
use super::references::{outputs_reference, RefTargets, ReferenceError};
use super::splice::{splice, SpliceError};
use super::template::{self, Piece, TemplateError};
use super::vars::Vars;

/// A string whose `${...}` cannot be substituted; reported as a diagnostic at the string.
#[derive(Debug, thiserror::Error)]
pub(super) enum SubstituteError {
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error(transparent)]
    Splice(#[from] SpliceError),
    #[error(
        "unknown variable `${{{name}}}` (known: {}; write `$${{` for a literal `${{`)",
        list_or_none(.known)
    )]
    UnknownVariable { name: String, known: Vec<String> },
    #[error(
        "substitution expands to more than {SUBSTITUTION_BUDGET} characters here \
         (variables that repeat each other grow exponentially)"
    )]
    OverBudget,
}

pub(super) struct Scope<'a, 'b, 'c> {
    pub(super) vars: &'a Vars,
    pub(super) matrix: &'a BTreeMap<String, toml::Value>,
    pub(super) refs: Option<(&'a RefTargets<'b, 'c>, usize)>,
    /// What substitution may still produce, in characters and values (see [`SUBSTITUTION_BUDGET`]).
    pub(super) budget: std::cell::Cell<usize>,
}

/// Variables may refer to variables: eight lines that each repeat the one before ten times would
/// expand to 10^8 characters. One variable or one stage's parameters may grow to this much.
const SUBSTITUTION_BUDGET: usize = 1 << 20;

/// No matrix values: the scope of `[vars]` and of a stage's common keys.
static NO_MATRIX: BTreeMap<String, toml::Value> = BTreeMap::new();

impl<'a, 'b, 'c> Scope<'a, 'b, 'c> {
    pub(super) fn new(
        vars: &'a Vars,
        matrix: &'a BTreeMap<String, toml::Value>,
        refs: Option<(&'a RefTargets<'b, 'c>, usize)>,
    ) -> Self {
        Scope {
            vars,
            matrix,
            refs,
            budget: std::cell::Cell::new(SUBSTITUTION_BUDGET),
        }
    }

    /// Variables only: no matrix values, no references to other stages.
    pub(super) fn vars_only(vars: &'a Vars) -> Self {
        Scope::new(vars, &NO_MATRIX, None)
    }
}

impl Scope<'_, '_, '_> {
    /// Takes `size` from the budget; an error once it is spent.
    fn spend(&self, size: usize) -> Result<(), SubstituteError> {
        let left = self.budget.get();
        if size > left {
            return Err(SubstituteError::OverBudget);
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
pub(super) struct Substituted {
    pub(super) resolved: Node,
    pub(super) key: Node,
    pub(super) dependencies: Vec<usize>,
}

pub(super) fn substitute(node: &Node, scope: &Scope, errors: &mut Vec<Diagnostic>) -> Substituted {
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
            Err(error) => {
                errors.push(Diagnostic::new(Some(node.location.clone()), error.to_string()));
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
) -> Result<(toml::Value, toml::Value), SubstituteError> {
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

fn lookup_name(name: &str, scope: &Scope) -> Result<toml::Value, SubstituteError> {
    if let Some(value) = scope.matrix.get(name) {
        return Ok(value.clone());
    }
    if let Some(node) = scope.vars.get(name) {
        return Ok(node.to_toml());
    }
    let mut known: Vec<String> = scope.vars.keys().chain(scope.matrix.keys()).cloned().collect();
    known.sort_unstable();
    Err(SubstituteError::UnknownVariable {
        name: name.to_string(),
        known,
    })
}
