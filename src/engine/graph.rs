//! The DAG of stage instances: explicit and reference dependencies from the pipeline file, plus
//! implicit ones where a stage's input is another stage's declared output (as in DVC). Checks that
//! no two stages claim one output and that there is no cycle.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use petgraph::algo::tarjan_scc;
use petgraph::graph::{DiGraph, NodeIndex};

use super::config::{Diagnostic, Pipeline};
use super::evaluate::is_glob;
use super::paths;

pub struct Dag {
    graph: DiGraph<usize, ()>,
    /// Instance indices in an order where every instance follows its dependencies.
    pub order: Vec<usize>,
}

impl Dag {
    /// Direct dependencies of an instance.
    pub fn dependencies(&self, instance: usize) -> Vec<usize> {
        let mut deps: Vec<usize> = self
            .graph
            .neighbors_directed(NodeIndex::new(instance), petgraph::Direction::Incoming)
            .map(|n| self.graph[n])
            .collect();
        deps.sort_unstable();
        deps
    }

    /// Direct dependents of an instance.
    pub fn dependents(&self, instance: usize) -> Vec<usize> {
        let mut deps: Vec<usize> = self
            .graph
            .neighbors_directed(NodeIndex::new(instance), petgraph::Direction::Outgoing)
            .map(|n| self.graph[n])
            .collect();
        deps.sort_unstable();
        deps
    }

    /// The given instances and everything they depend on, transitively, in execution order.
    pub fn with_ancestors(&self, targets: &[usize]) -> Vec<usize> {
        let mut wanted = vec![false; self.graph.node_count()];
        let mut stack = targets.to_vec();
        while let Some(i) = stack.pop() {
            if !std::mem::replace(&mut wanted[i], true) {
                stack.extend(self.dependencies(i));
            }
        }
        self.order.iter().copied().filter(|&i| wanted[i]).collect()
    }
}

pub fn build(pipeline: &Pipeline) -> Result<Dag, Vec<Diagnostic>> {
    let instances = &pipeline.instances;
    let mut errors = Vec::new();
    let mut graph = DiGraph::new();
    for i in 0..instances.len() {
        graph.add_node(i);
    }
    for (i, instance) in instances.iter().enumerate() {
        for &dep in &instance.after {
            graph.update_edge(NodeIndex::new(dep), NodeIndex::new(i), ());
        }
    }
    // Outputs and inputs compared in one spelling (see `paths`): `x/../out.txt` is `out.txt`.
    let root = &pipeline.root;
    let outputs: Vec<Vec<String>> = instances
        .iter()
        .map(|inst| {
            inst.implementation
                .project_outputs()
                .iter()
                .filter_map(|p| paths::project_relative(root, p).ok())
                .collect()
        })
        .collect();
    errors.extend(paths::check(pipeline));
    for (consumer, instance) in instances.iter().enumerate() {
        for input in instance.implementation.inputs() {
            let Ok(input) = paths::project_relative(root, &input.path) else {
                continue; // outside the project: no stage writes there
            };
            for (producer, produced) in outputs.iter().enumerate() {
                if producer != consumer && produced.iter().any(|out| paths_overlap(&input, out)) {
                    graph.update_edge(NodeIndex::new(producer), NodeIndex::new(consumer), ());
                }
            }
        }
    }
    match declaration_order_toposort(&graph) {
        Some(order) if errors.is_empty() => Ok(Dag { order, graph }),
        Some(_) => Err(errors),
        None => {
            for cycle in tarjan_scc(&graph)
                .into_iter()
                .filter(|c| c.len() > 1 || has_self_loop(&graph, c[0]))
            {
                let mut members: Vec<usize> = cycle.iter().map(|n| graph[*n]).collect();
                members.sort_unstable();
                let names: Vec<&str> = members.iter().map(|&i| instances[i].id.as_str()).collect();
                let first = &instances[members[0]];
                let message = format!("dependency cycle between stages: {}", names.join(" -> "));
                errors.push(Diagnostic::new(Some(first.location.clone()), message));
            }
            Err(errors)
        }
    }
}

/// Kahn's algorithm taking the lowest-numbered ready instance first (stages by name, matrix
/// instances in value order), so runs and listings come out in a stable order. None on a cycle.
fn declaration_order_toposort(graph: &DiGraph<usize, ()>) -> Option<Vec<usize>> {
    let mut indegree: Vec<usize> = graph
        .node_indices()
        .map(|n| graph.neighbors_directed(n, petgraph::Direction::Incoming).count())
        .collect();
    let mut ready: BinaryHeap<Reverse<usize>> = (0..indegree.len())
        .filter(|&i| indegree[i] == 0)
        .map(Reverse)
        .collect();
    let mut order = Vec::with_capacity(indegree.len());
    while let Some(Reverse(i)) = ready.pop() {
        order.push(i);
        for next in graph.neighbors_directed(NodeIndex::new(i), petgraph::Direction::Outgoing) {
            indegree[next.index()] -= 1;
            if indegree[next.index()] == 0 {
                ready.push(Reverse(next.index()));
            }
        }
    }
    (order.len() == indegree.len()).then_some(order)
}

fn has_self_loop(graph: &DiGraph<usize, ()>, node: NodeIndex) -> bool {
    graph.contains_edge(node, node)
}

/// A relative path in a canonical form: no `./`, no trailing `/`, `/` separators.
pub fn normalize(path: &str) -> String {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty() && *p != ".").collect();
    parts.join("/")
}

/// Whether two declared paths (possibly globs) can name the same file: compared component by
/// component over their common length, so a folder overlaps everything inside it. A glob component
/// matches the other side's literal; two globs, or `**`, are taken to overlap.
pub fn paths_overlap(a: &str, b: &str) -> bool {
    let (a, b) = (normalize(a), normalize(b));
    for (x, y) in a.split('/').zip(b.split('/')) {
        if x == "**" || y == "**" {
            return true;
        }
        if !components_compatible(x, y) {
            return false;
        }
    }
    true
}

fn components_compatible(x: &str, y: &str) -> bool {
    let matches =
        |pattern: &str, literal: &str| glob::Pattern::new(pattern).is_ok_and(|p| p.matches(literal));
    match (is_glob(x), is_glob(y)) {
        (false, false) => x == y,
        (true, false) => matches(x, y),
        (false, true) => matches(y, x),
        (true, true) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_paths() {
        assert!(paths_overlap("out/a.txt", "out/a.txt"));
        assert!(paths_overlap("out", "out/a.txt"));
        assert!(paths_overlap("out/*.txt", "out/a.txt"));
        assert!(paths_overlap("data/x", "data/*/y.nii"));
        assert!(!paths_overlap("out/a.txt", "out/b.txt"));
        assert!(!paths_overlap("out2", "out/a.txt"));
        assert!(!paths_overlap("out/*.csv", "out/a.txt"));
        assert!(paths_overlap("out/**", "out/x/y/z"));
        assert_eq!(normalize("./out//a/"), "out/a");
    }
}
