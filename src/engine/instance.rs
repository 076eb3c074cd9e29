//! Bringing one instance up to date, as a local run's worker or a Slurm job does: hold the
//! upstream outputs its key reads (bringing back those another run replaced), then under its own
//! exclusive lock find it fresh, restore it from the local cache or else the remote one, or run it
//! and commit the result to the cache and its record (and hand it to the remote to upload).

use std::collections::BTreeMap;
use std::fs;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use super::cache::{LinkMode, Lookup, Manifest};
use super::evaluate::{damaged_output, stage_key};
use super::executor::{Outcome, Restored};
use super::hashing::{digest_of_map, Digest};
use super::key::StageKey;
use super::locks::{lock_outputs, LockMode};
use super::outputs::{remove_path, restore, resume_dir, run_instance};
use super::progress::StatusLine;
use super::record::Record;
use super::run_record::now_unix;
use super::{Engine, RunError};

/// A completed instance as this run saw it: the digest of its outputs and the key they were
/// stored under, so a dependent can restore exactly those outputs if another run replaced them.
#[derive(Clone)]
pub(crate) struct Done {
    pub outputs_digest: Digest,
    pub key: String,
    pub components: StageKey,
    /// Which cache the outputs were restored from, when they were.
    pub restored: Option<Restored>,
}

/// The upstream outputs a stage reads.
pub(super) enum Upstream {
    /// Those this run produced or restored (a local run).
    Expected(BTreeMap<usize, Done>),
    /// Whatever the records of these upstream instances say now (a Slurm job, whose upstream
    /// jobs ended).
    Current(Vec<usize>),
}

/// Tries at holding a stage's upstream outputs before giving up on a run that keeps replacing them.
const HOLD_ATTEMPTS: usize = 5;

/// How one instance ended when run on its own (a Slurm job): its upstream instances are complete,
/// their records give the output digests its key needs.
pub struct Alone {
    pub outcome: Outcome,
    /// Why it failed, or why it was skipped (written to the job's receipt).
    pub error: Option<String>,
}

/// Brings one instance up to date by itself, as a Slurm job does on its node: not applicable,
/// fresh, restored from the cache, or run and committed.
pub fn run_alone(
    engine: &Engine,
    index: usize,
    force: bool,
    threads: u32,
    gpus: &[usize],
    cancel: &AtomicBool,
) -> Alone {
    let pipeline = &engine.pipeline;
    let instance = &pipeline.instances[index];
    if let Some(reason) = instance.implementation.not_applicable(&pipeline.root) {
        return Alone {
            outcome: Outcome::NotApplicable,
            error: Some(match clear_not_applicable(engine, index) {
                Ok(()) => reason,
                Err(error) => error.to_string(),
            }),
        };
    }
    // upstream instances that did not apply left no outputs: the stage reads the others
    let applicable: Vec<usize> = engine
        .dag
        .dependencies(index)
        .into_iter()
        .filter(|&dep| {
            pipeline.instances[dep]
                .implementation
                .not_applicable(&pipeline.root)
                .is_none()
        })
        .collect();
    if let Some(&dep) = applicable
        .iter()
        .find(|&&dep| engine.records.get(&pipeline.instances[dep].id).is_none())
    {
        return Alone {
            outcome: Outcome::Skipped,
            error: Some(
                RunError::UpstreamNotCompleted {
                    upstream: pipeline.instances[dep].id.clone(),
                }
                .to_string(),
            ),
        };
    }
    let status = StatusLine::default();
    let slot = Slot {
        gpus,
        threads,
        cancel,
        status: &status,
    };
    let result = execute(engine, index, &Upstream::Current(applicable), force, &slot);
    if let Err(e) = engine.hasher.save() {
        crate::errln!("warning: cannot save the stat cache: {e}");
    }
    // the job's result reaches the remote before the job ends
    if let Some(remote) = &engine.remote {
        remote.finish();
    }
    match result {
        Ok((outcome, _)) => Alone { outcome, error: None },
        Err(error) => Alone {
            outcome: Outcome::Failed,
            error: Some(error.to_string()),
        },
    }
}

/// What a running instance was given: its GPUs and threads, the run's cancel flag, the status line.
pub(super) struct Slot<'a> {
    pub gpus: &'a [usize],
    pub threads: u32,
    pub cancel: &'a AtomicBool,
    pub status: &'a StatusLine,
}

/// Brings one instance up to date. Returns its outcome and the digest of its outputs.
pub(super) fn execute(
    engine: &Engine,
    index: usize,
    upstream: &Upstream,
    force: bool,
    slot: &Slot,
) -> Result<(Outcome, Done), RunError> {
    let pipeline = &engine.pipeline;
    let instance = &pipeline.instances[index];
    let started = Instant::now();
    // What the stage reads stays as its key says until its result is stored; then one writer per
    // instance, so a concurrent run of the same pipeline waits for this instance only and then
    // finds the result in place or in the cache.
    let (_reading, upstream) = hold_upstream(engine, &instance.id, upstream)?;
    let _writing = lock_outputs(&pipeline.state_dir, &instance.id, LockMode::Exclusive)?;
    let key = stage_key(pipeline, instance, upstream.clone(), &engine.hasher)?;
    let digest = key.digest();
    if !force {
        if let Some(record) = engine.records.get(&instance.id) {
            if record.key == digest && damaged_output(pipeline, instance, &record, &engine.hasher).is_none() {
                let done = Done {
                    outputs_digest: record.outputs_digest,
                    key: digest,
                    components: key,
                    restored: None,
                };
                return Ok((Outcome::Cached, done));
            }
        }
        if let Some((manifest, from)) = find_cached(engine, &instance.id, &digest)? {
            let outputs_digest = restore_and_remember(engine, index, &manifest, &key, started)?;
            let done = Done {
                outputs_digest,
                key: digest,
                components: key,
                restored: Some(from),
            };
            return Ok((Outcome::Cached, done));
        }
    } else {
        // forced: from scratch, not from where an earlier run stopped
        remove_path(&resume_dir(pipeline, &instance.id))?;
    }
    let files = run_instance(engine, index, slot)?;
    // The key must describe exactly what the stage read: inputs edited while it ran are refused.
    let after = stage_key(pipeline, instance, upstream, &engine.hasher)?;
    if after.digest() != digest {
        return Err(RunError::InputsChanged {
            id: instance.id.clone(),
            changes: after.differences(&key),
        });
    }
    let manifest = engine
        .cache
        .store_sources_with(&digest, &files, |path| {
            // The stage's own outputs folder is ours: link it into the cache instead of copying.
            // Project files may be edited by the user, so they are copied.
            if path.starts_with("out/") {
                LinkMode::HardlinkOrCopy
            } else {
                LinkMode::Copy
            }
        })
        .map_err(|source| RunError::Store {
            id: instance.id.clone(),
            source,
        })?;
    if let Some(remote) = &engine.remote {
        remote.upload(&engine.cache, &manifest);
    }
    let outputs = files.into_iter().map(|(p, (_, d))| (p, d)).collect();
    let outputs_digest = remember(engine, index, digest.clone(), key.clone(), outputs, started)?;
    let done = Done {
        outputs_digest,
        key: digest,
        components: key,
        restored: None,
    };
    Ok((Outcome::Ran, done))
}

/// The cache entry for `key`: from the local cache, else from the remote (which adds it to the
/// local cache), with where it was found. A damaged local entry is reported and removed.
fn find_cached(engine: &Engine, id: &str, key: &str) -> Result<Option<(Manifest, Restored)>, RunError> {
    match engine.cache.lookup(key, &engine.hasher)? {
        Lookup::Hit(manifest) => return Ok(Some((manifest, Restored::Local))),
        Lookup::Corrupt { reason } => {
            crate::errln!("warning: cache entry of `{id}` is damaged ({reason}); recomputing");
        }
        Lookup::Miss => {}
    }
    let remote = engine.remote.as_ref();
    Ok(remote
        .and_then(|remote| remote.fetch(&engine.cache, &engine.hasher, key))
        .map(|manifest| (manifest, Restored::Remote)))
}

/// Shared locks on the outputs of every upstream instance the stage reads, once they hold what
/// this run expects (restoring from the cache what another run replaced in between), with the
/// digests that enter the stage's key.
fn hold_upstream(
    engine: &Engine,
    id: &str,
    upstream: &Upstream,
) -> Result<(Vec<fs::File>, BTreeMap<String, Digest>), RunError> {
    let pipeline = &engine.pipeline;
    let deps: Vec<usize> = match upstream {
        Upstream::Expected(expected) => expected.keys().copied().collect(),
        Upstream::Current(deps) => deps.clone(),
    };
    for _ in 0..HOLD_ATTEMPTS {
        let mut locks = Vec::new();
        for &dep in &deps {
            locks.push(lock_outputs(
                &pipeline.state_dir,
                &pipeline.instances[dep].id,
                LockMode::Shared,
            )?);
        }
        let mut digests = BTreeMap::new();
        let mut replaced = Vec::new();
        for &dep in &deps {
            let dep_id = &pipeline.instances[dep].id;
            let current = engine.records.get(dep_id).map(|r| r.outputs_digest);
            match (upstream, current) {
                (Upstream::Expected(expected), current) => {
                    let wanted = expected[&dep].outputs_digest;
                    if current == Some(wanted) {
                        digests.insert(dep_id.clone(), wanted);
                    } else {
                        replaced.push(dep);
                    }
                }
                (Upstream::Current(_), Some(current)) => {
                    digests.insert(dep_id.clone(), current);
                }
                (Upstream::Current(_), None) => {
                    return Err(RunError::UpstreamNotCompleted {
                        upstream: dep_id.clone(),
                    })
                }
            }
        }
        if replaced.is_empty() {
            return Ok((locks, digests));
        }
        drop(locks);
        if let Upstream::Expected(expected) = upstream {
            for dep in replaced {
                bring_back(engine, dep, &expected[&dep])?;
            }
        }
    }
    Err(RunError::InputsKeepChanging { id: id.to_string() })
}

/// Puts back the outputs this run's `done` describes, which another run (with other parameters)
/// replaced, from the cache entry they were stored under.
fn bring_back(engine: &Engine, index: usize, done: &Done) -> Result<(), RunError> {
    let instance = &engine.pipeline.instances[index];
    let _writing = lock_outputs(&engine.pipeline.state_dir, &instance.id, LockMode::Exclusive)?;
    if engine
        .records
        .get(&instance.id)
        .is_some_and(|r| r.outputs_digest == done.outputs_digest)
    {
        return Ok(());
    }
    match find_cached(engine, &instance.id, &done.key)? {
        Some((manifest, _)) => {
            restore_and_remember(engine, index, &manifest, &done.components, Instant::now())?;
            Ok(())
        }
        None => Err(RunError::UpstreamReplaced {
            upstream: instance.id.clone(),
        }),
    }
}

/// Restores a cache entry into place and records it; returns the digest of its outputs.
fn restore_and_remember(
    engine: &Engine,
    index: usize,
    manifest: &Manifest,
    key: &StageKey,
    started: Instant,
) -> Result<Digest, RunError> {
    restore(engine, index, manifest)?;
    let outputs = manifest
        .files
        .iter()
        .map(|(p, f)| (p.clone(), f.digest))
        .collect();
    remember(engine, index, manifest.key.clone(), key.clone(), outputs, started)
}

/// An instance that does not apply leaves no outputs: an earlier run's, when it did apply, must
/// not pass for this run's.
pub(super) fn clear_not_applicable(engine: &Engine, index: usize) -> Result<(), RunError> {
    let instance = &engine.pipeline.instances[index];
    let _writing = lock_outputs(&engine.pipeline.state_dir, &instance.id, LockMode::Exclusive)?;
    Ok(remove_path(&instance.out_dir)?)
}

/// Records what the instance's outputs are for this key; returns the digest of those outputs.
fn remember(
    engine: &Engine,
    index: usize,
    digest: String,
    key: StageKey,
    outputs: BTreeMap<String, Digest>,
    started: Instant,
) -> Result<Digest, RunError> {
    let outputs_digest = digest_of_map(&outputs);
    let record = Record {
        id: engine.pipeline.instances[index].id.clone(),
        key: digest,
        components: key,
        outputs,
        outputs_digest,
        finished_unix: now_unix(),
        seconds: started.elapsed().as_secs_f64(),
    };
    engine.records.put(&record).map_err(|source| RunError::Record {
        id: record.id.clone(),
        source,
    })?;
    Ok(outputs_digest)
}
