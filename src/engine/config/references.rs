//! References between stages: the instances a `${stage.outputs}` (matching, `[*]` or filtered by
//! matrix values) or an `after` entry names, and what such a reference substitutes (the output
//! folders, and a symbolic form for the cache key).

use std::collections::{HashMap, HashSet};

use super::diagnostics::{list_or_none, Diagnostic, Location};
use super::matrix::{plain_text, Expanded};
use super::substitute::Scope;
use super::template::Select;

/// A reference to another stage that names no instance, or not exactly the instances it needs.
#[derive(Debug, thiserror::Error)]
pub(super) enum ReferenceError {
    #[error("unknown stage `{stage}` (stages: {})", .known.join(", "))]
    UnknownStage { stage: String, known: Vec<String> },
    #[error("`{key}` is not a matrix key of stage `{stage}` (its keys: {})", list_or_none(.keys))]
    NotAMatrixKey {
        key: String,
        stage: String,
        keys: Vec<String>,
    },
    #[error("`${{{stage}.outputs}}` cannot be used here (only in stage parameters)")]
    NotInStageParameters { stage: String },
    #[error(
        "no instance of `{stage}` matches this instance's matrix values ({values}; instances: {instances})"
    )]
    NoMatchingInstance {
        stage: String,
        values: String,
        instances: String,
    },
    #[error("no instance of `{stage}` has {filter} (instances: {instances})")]
    NoInstanceWith {
        stage: String,
        filter: String,
        instances: String,
    },
    #[error(
        "`${{{stage}.outputs}}` matches {count} instances; write `${{{stage}[*].outputs}}` for the list of all"
    )]
    SeveralInstances { stage: String, count: usize },
}

pub(super) struct RefTargets<'a, 'b> {
    pub(super) expanded: &'a [Expanded<'b>],
    pub(super) by_stage: &'a HashMap<&'a str, Vec<usize>>,
    /// Stages whose own declaration was reported as an error: references to them are not reported
    /// again as unknown stages.
    pub(super) failed: &'a HashSet<String>,
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
    fn filtered(
        &self,
        stage: &str,
        filter: &[(String, String)],
    ) -> Result<Option<Vec<usize>>, ReferenceError> {
        let Some(candidates) = self.by_stage.get(stage) else {
            return Ok(None);
        };
        let keys: Vec<&String> = candidates
            .first()
            .map(|&c| self.expanded[c].matrix.keys().collect())
            .unwrap_or_default();
        if let Some((key, _)) = filter.iter().find(|(k, _)| !keys.contains(&k)) {
            return Err(ReferenceError::NotAMatrixKey {
                key: key.clone(),
                stage: stage.to_string(),
                keys: keys.into_iter().cloned().collect(),
            });
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

    fn no_matching_instance(&self, stage: &str, from: usize) -> ReferenceError {
        // The values matching compares: the matrix keys both stages have.
        let target_keys = self
            .by_stage
            .get(stage)
            .and_then(|instances| instances.first())
            .map(|&i| &self.expanded[i].matrix);
        let values: Vec<String> = self.expanded[from]
            .matrix
            .iter()
            .filter(|(key, _)| target_keys.is_some_and(|keys| keys.contains_key(*key)))
            .map(|(key, value)| {
                format!(
                    "{key}={}",
                    value.as_str().map_or(value.to_string(), str::to_string)
                )
            })
            .collect();
        ReferenceError::NoMatchingInstance {
            stage: stage.to_string(),
            values: values.join(","),
            instances: self.instance_names(stage),
        }
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

    fn unknown_stage(&self, stage: &str) -> ReferenceError {
        let mut known: Vec<String> = self.by_stage.keys().map(|k| k.to_string()).collect();
        known.sort_unstable();
        ReferenceError::UnknownStage {
            stage: stage.to_string(),
            known,
        }
    }

    pub(super) fn resolve_after(
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
                let error = self.no_matching_instance(stage, from);
                errors.push(Diagnostic::new(Some(location.clone()), error.to_string()));
                Vec::new()
            }
            None if self.failed.contains(stage) => Vec::new(),
            None => {
                let error = self.unknown_stage(stage);
                errors.push(Diagnostic::new(Some(location.clone()), error.to_string()));
                Vec::new()
            }
        }
    }
}

pub(super) fn outputs_reference(
    stage: &str,
    select: &Select,
    scope: &Scope,
    dependencies: &mut Vec<usize>,
) -> Result<(toml::Value, toml::Value), ReferenceError> {
    let Some((targets, from)) = scope.refs else {
        return Err(ReferenceError::NotInStageParameters {
            stage: stage.to_string(),
        });
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
            Select::Filter(filter) => ReferenceError::NoInstanceWith {
                stage: stage.to_string(),
                filter: filter_text(filter),
                instances: targets.instance_names(stage),
            },
            _ => targets.no_matching_instance(stage, from),
        }),
        many => Err(ReferenceError::SeveralInstances {
            stage: stage.to_string(),
            count: many.len(),
        }),
    }
}

fn filter_text(filter: &[(String, String)]) -> String {
    let pairs: Vec<String> = filter.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.join(",")
}
