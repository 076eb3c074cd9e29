//! Stage instances: each expanded instance's parameters substituted, its dependencies collected
//! (`${stage.outputs}` references and `after`), and its typed parameters built by its kind.

use std::collections::{HashMap, HashSet};

use super::demand::keep_needed;
use super::diagnostics::Diagnostic;
use super::every_error::read_all;
use super::matrix::Expanded;
use super::node::Node;
use super::overrides::instance_params;
use super::raw::COMMON_STAGE_KEYS;
use super::references::RefTargets;
use super::resolve::Instance;
use super::substitute::{substitute, Scope};
use super::typed::{param_diagnostic, select_keys};
use super::vars::Vars;
use crate::engine::stage::{Kind, Registry, Stage};

/// The pipeline's instances, and the ids of `on_demand` instances no other stage needs (left out).
pub(super) fn build_instances(
    expanded: Vec<Expanded<'_>>,
    failed: &HashSet<String>,
    vars: &Vars,
    errors: &mut Vec<Diagnostic>,
) -> (Vec<Instance>, Vec<String>) {
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
    let mut on_demand = Vec::new();
    for (index, e) in expanded.iter().enumerate() {
        let params_node = instance_params(e);
        let scope = Scope::new(vars, &e.matrix, Some((&targets, index)));
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
        on_demand.push(e.common.on_demand);
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
    keep_needed(instances, &on_demand)
}

/// Checks the kind's parameters of a stage that has no instances (a mistake in `threads`,
/// `matrix`, ...): values are substituted with `[vars]` only, so a value that still holds a
/// `${...}` (a matrix value, another stage's outputs) is not judged.
pub(super) fn check_params_alone(
    name: &str,
    node: &Node,
    kinds: Registry,
    vars: &Vars,
    errors: &mut Vec<Diagnostic>,
) {
    let scope = Scope::vars_only(vars);
    let kind = node
        .get("kind")
        .map(|kind| substitute(kind, &scope, &mut Vec::new()).resolved)
        .and_then(|kind| kind.as_str().and_then(|name| kinds.find(name)));
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
