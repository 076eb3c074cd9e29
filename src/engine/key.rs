//! The cache key of a stage instance: a struct of named components, serialized canonically (JSON
//! with sorted maps, fields in declaration order) and hashed with blake3. No absolute path, mtime
//! or host name enters it, so a cache restored into another checkout or CI job hits.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

use super::hashing::Digest;

/// Bumped when the cache's naming of outputs changes, so no entry is read under other rules.
/// 2: declared project outputs are named by their position (`output/<n>/...`), not their path.
pub const CACHE_LAYOUT: u32 = 2;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct StageKey {
    /// How results are laid out in the cache ([`CACHE_LAYOUT`]); 0 in records of earlier versions.
    #[serde(default)]
    pub cache_layout: u32,
    pub kind: String,
    /// The stage kind's implementation version.
    pub kind_version: u32,
    pub nnflow_version: String,
    /// What the kind's results depend on besides its code, as the kind declares it: component ->
    /// version, e.g. `libtorch` -> `2.11.0` for stages that run libtorch code.
    #[serde(default, alias = "libtorch_version", deserialize_with = "read_toolchain")]
    pub toolchain: BTreeMap<String, String>,
    /// Resolved parameters, references to other stages kept symbolic.
    #[serde(serialize_with = "sorted_json")]
    pub params: serde_json::Value,
    /// Input files (relative to the pipeline folder) and their content digests.
    pub inputs: BTreeMap<String, Digest>,
    /// Upstream instance id -> digest of its outputs.
    pub upstream: BTreeMap<String, Digest>,
    /// Declared environment variables and their values (None when unset).
    pub env: BTreeMap<String, Option<String>>,
}

/// Writes the parameters with every object's keys sorted (see `crate::json_sorted`): the key must
/// not depend on how a parameter table happened to be written or merged.
fn sorted_json<S: serde::Serializer>(value: &serde_json::Value, serializer: S) -> Result<S::Ok, S::Error> {
    crate::json_sorted::sorted_keys(value).serialize(serializer)
}

impl StageKey {
    /// The key as 64 hex characters.
    pub fn digest(&self) -> String {
        let canonical = serde_json::to_vec(self).expect("a stage key serializes to JSON");
        blake3::hash(&canonical).to_hex().to_string()
    }

    /// Human-readable differences from an earlier key, most fundamental first (as DVC checks
    /// staleness cheapest first): implementation, parameters key by key, environment, inputs,
    /// upstream stages.
    pub fn differences(&self, old: &StageKey) -> Vec<String> {
        let mut reasons = Vec::new();
        if self.cache_layout != old.cache_layout {
            reasons.push(format!(
                "cache layout {} -> {} (a newer nnflow)",
                old.cache_layout, self.cache_layout
            ));
        }
        if self.kind != old.kind || self.kind_version != old.kind_version {
            reasons.push(format!(
                "implementation changed: {} v{} -> {} v{}",
                old.kind, old.kind_version, self.kind, self.kind_version
            ));
        }
        if self.nnflow_version != old.nnflow_version {
            reasons.push(format!(
                "nnflow version {} -> {}",
                old.nnflow_version, self.nnflow_version
            ));
        }
        for component in union_keys(&old.toolchain, &self.toolchain) {
            let (before, after) = (old.toolchain.get(component), self.toolchain.get(component));
            if before != after {
                let text = |version: Option<&String>| version.map_or("none".to_string(), String::clone);
                reasons.push(format!("{component} version {} -> {}", text(before), text(after)));
            }
        }
        json_differences("params", &old.params, &self.params, &mut reasons);
        for name in union_keys(&old.env, &self.env) {
            let (before, after) = (
                old.env.get(name).cloned().flatten(),
                self.env.get(name).cloned().flatten(),
            );
            if before != after {
                reasons.push(format!("environment ${name} changed: {before:?} -> {after:?}"));
            }
        }
        map_differences("input", &old.inputs, &self.inputs, &mut reasons);
        for id in union_keys(&old.upstream, &self.upstream) {
            match (old.upstream.get(id), self.upstream.get(id)) {
                (Some(_), None) => reasons.push(format!("no longer depends on `{id}`")),
                (None, Some(_)) => reasons.push(format!("now depends on `{id}`")),
                (a, b) if a != b => {
                    reasons.push(format!("upstream stage `{id}` re-ran with different outputs"))
                }
                _ => {}
            }
        }
        reasons
    }
}

/// Reads `toolchain`, or the `libtorch_version` (a version or null) that records written before
/// it held instead, so `status` still explains a libtorch change against such a record.
fn read_toolchain<'de, D: Deserializer<'de>>(deserializer: D) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Stored {
        Toolchain(BTreeMap<String, String>),
        Libtorch(Option<String>),
    }
    Ok(match Stored::deserialize(deserializer)? {
        Stored::Toolchain(toolchain) => toolchain,
        Stored::Libtorch(version) => version
            .map(|version| ("libtorch".to_string(), version))
            .into_iter()
            .collect(),
    })
}

fn union_keys<'a, V>(
    a: &'a BTreeMap<String, V>,
    b: &'a BTreeMap<String, V>,
) -> std::collections::BTreeSet<&'a String> {
    a.keys().chain(b.keys()).collect()
}

fn map_differences(
    what: &str,
    old: &BTreeMap<String, Digest>,
    new: &BTreeMap<String, Digest>,
    out: &mut Vec<String>,
) {
    for path in union_keys(old, new) {
        match (old.get(path), new.get(path)) {
            (None, Some(_)) => out.push(format!("{what} {path} added")),
            (Some(_), None) => out.push(format!("{what} {path} removed")),
            (a, b) if a != b => out.push(format!("{what} {path} changed")),
            _ => {}
        }
    }
}

/// Differences between two JSON values as `path: old -> new` lines.
fn json_differences(path: &str, old: &serde_json::Value, new: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for key in keys {
                let child = format!("{path}.{key}");
                match (a.get(key), b.get(key)) {
                    (Some(x), Some(y)) => json_differences(&child, x, y, out),
                    (None, Some(y)) => out.push(format!("{child} added: {y}")),
                    (Some(x), None) => out.push(format!("{child} removed (was {x})")),
                    (None, None) => {}
                }
            }
        }
        (a, b) if a != b => out.push(format!("{path}: {a} -> {b}")),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StageKey {
        StageKey {
            cache_layout: 2,
            kind: "command".into(),
            kind_version: 1,
            nnflow_version: "0.1.0".into(),
            toolchain: BTreeMap::new(),
            params: serde_json::json!({"cmd": "echo hi", "params": {"a": 1}}),
            inputs: [("data/x.txt".to_string(), Digest::of_bytes(b"x"))].into(),
            upstream: BTreeMap::new(),
            env: [("LANG".to_string(), None)].into(),
        }
    }

    /// Pinned: a change here means every user's cache is invalidated; bump deliberately.
    #[test]
    fn key_value_is_pinned() {
        assert_eq!(sample().digest(), PINNED_SAMPLE_KEY);
    }

    /// Changed when `libtorch_version` became `toolchain` (issue 15: a kind names what its results
    /// depend on; the engine asks no library).
    const PINNED_SAMPLE_KEY: &str = "f46f1e060eeb613675e05f4cfc2a47ae8f47e60a3d47c09d4667ab88ae76dbde";

    /// Records written before `toolchain` existed hold `libtorch_version` (a version, or null for
    /// stages without libtorch code): they still read, and `status` names a libtorch change.
    #[test]
    fn records_with_libtorch_version_read_and_name_the_change() {
        let stored = |libtorch_version: serde_json::Value| {
            let mut key = serde_json::to_value(sample()).unwrap();
            let fields = key.as_object_mut().unwrap();
            fields.remove("toolchain");
            fields.insert("libtorch_version".into(), libtorch_version);
            serde_json::from_value::<StageKey>(key).unwrap()
        };
        let mut torch = sample();
        torch.toolchain = [("libtorch".to_string(), "2.11.0".to_string())].into();
        let old = stored("2.10.0".into());
        assert_eq!(torch.differences(&old), ["libtorch version 2.10.0 -> 2.11.0"]);
        assert!(sample().differences(&stored(serde_json::Value::Null)).is_empty());
        assert_eq!(stored(serde_json::Value::Null).toolchain, BTreeMap::new());
    }

    #[test]
    fn differences_name_the_parameter() {
        let old = sample();
        let mut new = sample();
        new.params = serde_json::json!({"cmd": "echo hi", "params": {"a": 2}});
        assert_eq!(new.differences(&old), vec!["params.params.a: 1 -> 2".to_string()]);
        assert_ne!(new.digest(), old.digest());
    }
}
