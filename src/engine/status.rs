//! Whether each stage instance is fresh, stale or new, and why: which parameter changed (old ->
//! new), which input file changed, which upstream stage re-ran; and which cache (local, remote)
//! holds its result. Reads records and manifests and hashes inputs (cheaply, through the stat
//! cache); runs nothing.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use serde::Serialize;

use super::cache::Manifest;
use super::evaluate::{damaged_output, stage_key};
use super::hashing::Digest;
use super::{Engine, RunError};

#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Fresh,
    Stale,
    New,
    /// Does not apply (a configuration the plan did not produce); the reason says why.
    Skipped,
}

/// Which cache holds outputs for an instance's current key.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Stored {
    Local,
    /// In the remote cache only.
    Remote,
    /// In neither.
    #[serde(rename = "none")]
    Neither,
    /// Not known: the key waits for an upstream stage to run, or the remote could not be asked.
    Unknown,
}

#[derive(Serialize, Debug)]
pub struct StageStatus {
    pub id: String,
    pub kind: String,
    pub state: State,
    pub reasons: Vec<String>,
    /// Whether a cache a run reads holds outputs for the instance's current key (a run would
    /// restore them): the local one, or the remote one unless it is used write-only.
    pub in_cache: bool,
    /// Which cache holds them.
    pub cache: Stored,
    /// Seconds the last successful run took.
    pub seconds: Option<f64>,
    pub outputs: PathBuf,
}

pub fn status(engine: &Engine, targets: &[String]) -> Result<Vec<StageStatus>, RunError> {
    let selected = engine.dag.with_ancestors(&engine.select(targets)?);
    let mut known_outputs: HashMap<usize, Digest> = HashMap::new();
    let mut states: HashMap<usize, State> = HashMap::new();
    let mut report = Vec::new();
    for index in selected {
        let instance = &engine.pipeline.instances[index];
        let record = engine.records.get(&instance.id);
        let mut reasons = Vec::new();
        let mut in_cache = false;
        let mut cache = Stored::Unknown;
        let deps = engine.dag.dependencies(index);
        // an upstream instance in a cache is as good as fresh: a run restores it, and its outputs
        // are known from the manifest
        let pending: Vec<&str> = deps
            .iter()
            .filter(|d| {
                !matches!(states.get(d), Some(State::Fresh | State::Skipped))
                    && !known_outputs.contains_key(d)
            })
            .map(|&d| engine.pipeline.instances[d].id.as_str())
            .collect();
        let not_applicable = if pending.is_empty() {
            instance.implementation.not_applicable(&engine.pipeline.root)
        } else {
            None
        };
        let state = if let Some(reason) = not_applicable {
            reasons.push(reason);
            State::Skipped
        } else if !pending.is_empty() {
            reasons.extend(
                pending
                    .iter()
                    .map(|id| format!("upstream stage `{id}` will run first")),
            );
            if record.is_some() {
                State::Stale
            } else {
                State::New
            }
        } else {
            let upstream: BTreeMap<String, Digest> = deps
                .iter()
                .filter_map(|d| Some((engine.pipeline.instances[*d].id.clone(), *known_outputs.get(d)?)))
                .collect();
            match stage_key(&engine.pipeline, instance, upstream, &engine.hasher) {
                Err(error) => {
                    reasons.push(error.to_string());
                    if record.is_some() {
                        State::Stale
                    } else {
                        State::New
                    }
                }
                Ok(key) => {
                    let digest = key.digest();
                    let (stored, manifest) = locate(engine, &digest);
                    cache = stored;
                    let reads_remote = engine.remote.as_ref().is_some_and(|r| r.mode().reads());
                    in_cache = stored == Stored::Local || (stored == Stored::Remote && reads_remote);
                    if let Some(manifest) = manifest.filter(|_| in_cache) {
                        known_outputs.insert(index, manifest.outputs_digest());
                    }
                    match &record {
                        None => {
                            reasons.push("never run".to_string());
                            State::New
                        }
                        Some(record) if record.key == digest => {
                            match damaged_output(&engine.pipeline, instance, record, &engine.hasher) {
                                None => State::Fresh,
                                Some(damage) => {
                                    reasons.push(damage);
                                    State::Stale
                                }
                            }
                        }
                        Some(record) => {
                            reasons.extend(key.differences(&record.components));
                            if reasons.is_empty() {
                                reasons.push("cache key changed".to_string());
                            }
                            State::Stale
                        }
                    }
                }
            }
        };
        if state == State::Fresh {
            if let Some(record) = &record {
                known_outputs.insert(index, record.outputs_digest);
            }
        }
        states.insert(index, state);
        report.push(StageStatus {
            id: instance.id.clone(),
            kind: instance.kind.name.to_string(),
            state,
            reasons,
            in_cache,
            cache,
            seconds: record.map(|r| r.seconds),
            outputs: instance.out_dir.clone(),
        });
    }
    let _ = engine.hasher.save();
    Ok(report)
}

/// Which cache holds the result for `key`, with its manifest (unverified: `status` only reads).
fn locate(engine: &Engine, key: &str) -> (Stored, Option<Manifest>) {
    if let Some(manifest) = engine.cache.manifest(key) {
        return (Stored::Local, Some(manifest));
    }
    match engine.remote.as_ref().map(|remote| remote.manifest(key)) {
        None | Some(Ok(None)) => (Stored::Neither, None),
        Some(Ok(Some(manifest))) => (Stored::Remote, Some(manifest)),
        Some(Err(_)) => (Stored::Unknown, None),
    }
}
