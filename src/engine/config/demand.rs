//! Stages marked `on_demand`: only the instances another stage needs are kept, the way a build
//! tool builds only what its targets need. A matrix can then cover every value (every
//! configuration's preprocessing) while a run computes only the values its other stages use, e.g.
//! 3d_fullres's preprocessing for the cascade when 3d_fullres itself is not trained.

use std::collections::HashMap;

use super::resolve::Instance;

/// The instances to keep: every one not on demand, and every one a kept instance waits for,
/// transitively. Returns the kept instances (their `after` renumbered) and the ids left out.
pub(super) fn keep_needed(instances: Vec<Instance>, on_demand: &[bool]) -> (Vec<Instance>, Vec<String>) {
    let mut needed: Vec<bool> = on_demand.iter().map(|demand| !demand).collect();
    let mut stack: Vec<usize> = (0..instances.len()).filter(|&i| needed[i]).collect();
    while let Some(i) = stack.pop() {
        for &upstream in &instances[i].after {
            if !needed[upstream] {
                needed[upstream] = true;
                stack.push(upstream);
            }
        }
    }
    let mut position = HashMap::new();
    let mut kept = Vec::new();
    let mut left_out = Vec::new();
    for (old, (instance, needed)) in instances.into_iter().zip(needed).enumerate() {
        if needed {
            position.insert(old, kept.len());
            kept.push(instance);
        } else {
            left_out.push(instance.id);
        }
    }
    for instance in &mut kept {
        // Every upstream of a kept instance is kept, so each index has a new position.
        instance.after = instance.after.iter().map(|i| position[i]).collect();
    }
    (kept, left_out)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::engine::stage::{build_typed, to_json, Kind, Registry, Stage, StageContext, StageError};

    /// A kind of the test's own, with an optional reference to another stage's outputs.
    #[derive(serde::Deserialize, serde::Serialize, schemars::JsonSchema, Debug)]
    #[serde(deny_unknown_fields)]
    struct Step {
        #[serde(default)]
        input: Option<String>,
    }

    impl Stage for Step {
        fn params_json(&self) -> serde_json::Value {
            to_json(self)
        }
        fn run(&self, _ctx: &StageContext) -> Result<(), StageError> {
            Ok(())
        }
    }

    static KINDS: &[Kind] = &[Kind {
        name: "step",
        version: 1,
        toolchain: &[],
        schema: |generator| generator.subschema_for::<Step>(),
        build: build_typed::<Step>,
    }];

    const PIPELINE: &str = r#"
[vars]
used = ["b"]

[stages.prepare]
kind = "step"
matrix = { x = ["a", "b", "c"] }
on_demand = true

[stages.process]
kind = "step"
matrix = { x = ["a", "b", "c"] }
on_demand = true
input = "${prepare.outputs}"

[stages.use]
kind = "step"
matrix = { x = "${used}" }
input = "${process.outputs}"

[[stages.use.instance_overrides]]
where = { x = "c" }
input = "${process[x=a].outputs}"
"#;

    fn ids(folder: &Path, sets: &[&str]) -> (Vec<String>, Vec<String>, Vec<Vec<String>>) {
        let file = folder.join("p.toml");
        std::fs::write(&file, PIPELINE).unwrap();
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let pipeline = crate::engine::load_checked(&file, &sets, Registry::new(KINDS))
            .map_err(|d| d.to_string())
            .unwrap();
        let ids: Vec<String> = pipeline.instances.iter().map(|i| i.id.clone()).collect();
        let after = pipeline
            .instances
            .iter()
            .map(|i| i.after.iter().map(|&a| ids[a].clone()).collect())
            .collect();
        (ids, pipeline.left_out, after)
    }

    #[test]
    fn only_what_other_stages_need_is_kept_transitively() {
        let folder = tempfile::tempdir().unwrap();
        let (kept, left_out, after) = ids(folder.path(), &[]);
        assert_eq!(kept, ["prepare[x=b]", "process[x=b]", "use[x=b]"]);
        assert_eq!(
            left_out,
            ["prepare[x=a]", "prepare[x=c]", "process[x=a]", "process[x=c]"]
        );
        // dependencies are renumbered onto the kept instances
        assert_eq!(
            after,
            [
                vec![],
                vec!["prepare[x=b]".to_string()],
                vec!["process[x=b]".to_string()]
            ]
        );

        // an override's reference makes its target needed, and what that one needs
        let (kept, left_out, _) = ids(folder.path(), &[r#"used=["b", "c"]"#]);
        assert_eq!(
            kept,
            [
                "prepare[x=a]",
                "prepare[x=b]",
                "process[x=a]",
                "process[x=b]",
                "use[x=b]",
                "use[x=c]"
            ]
        );
        assert_eq!(left_out, ["prepare[x=c]", "process[x=c]"]);
    }
}
