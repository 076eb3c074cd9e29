//! Running a pipeline: instances in topological order, independent ones side by side within the
//! job, thread and GPU limits. Each instance is fresh (nothing to do), restored from the cache, or
//! run and committed; a failed instance leaves no cache entry and skips its descendants.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::cache::{LinkMode, Lookup};
use super::evaluate::{damaged_output, display_path, output_location, stage_key};
use super::hashing::{digest_of_map, Digest};
use super::key::StageKey;
use super::owned::ProjectOutputs;
use super::paths::declared_outputs;
use super::record::{file_safe, write_lock_file, Record};
use super::Engine;
use crate::stages::StageContext;

#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Stage names or instance ids to run (with their ancestors); empty: everything.
    pub targets: Vec<String>,
    /// Stage names or instance ids to run even when fresh.
    pub force: Vec<String>,
    pub keep_going: bool,
    /// Most instances running at once.
    pub jobs: usize,
    /// CPU threads shared by running stages.
    pub threads: usize,
    /// CUDA device indices stages may use.
    pub gpus: Vec<usize>,
    /// Print one JSON object instead of progress lines.
    pub quiet: bool,
}

#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ran,
    Cached,
    Failed,
    Skipped,
    /// Skipped because the stage does not apply (its reason in `error`); dependents still run.
    #[serde(rename = "skipped")]
    NotApplicable,
}

#[derive(Serialize, Clone, Debug)]
pub struct StageReport {
    pub id: String,
    pub kind: String,
    pub outcome: Outcome,
    pub seconds: f64,
    pub outputs: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Serialize, Debug)]
pub struct RunReport {
    pub pipeline: String,
    pub ok: bool,
    pub interrupted: bool,
    pub stages: Vec<StageReport>,
}

/// How one instance finished.
pub(crate) struct Finished {
    pub index: usize,
    pub outcome: Outcome,
    /// What it left, when it completed.
    pub done: Option<Done>,
    pub seconds: f64,
    pub error: Option<String>,
}

/// A completed instance as this run saw it: the digest of its outputs and the key they were
/// stored under, so a dependent can restore exactly those outputs if another run replaced them.
#[derive(Clone)]
pub(crate) struct Done {
    pub outputs_digest: Digest,
    pub key: String,
    pub components: StageKey,
}

/// The upstream outputs a stage reads.
enum Upstream {
    /// Those this run produced or restored (a local run).
    Expected(BTreeMap<usize, Done>),
    /// Whatever the upstream instances' records say now (a Slurm job, whose upstream jobs ended).
    Current,
}

/// Tries at holding a stage's upstream outputs before giving up on a run that keeps replacing them.
const HOLD_ATTEMPTS: usize = 5;

pub fn run(engine: &Engine, options: &RunOptions, cancel: &AtomicBool) -> Result<RunReport, String> {
    let targets = engine.select(&options.targets)?;
    let forced: HashSet<usize> = engine
        .select(&options.force)?
        .into_iter()
        .filter(|_| !options.force.is_empty())
        .collect();
    let selected = engine.dag.with_ancestors(&targets);
    check_gpu_requests(engine, &selected, options)?;
    let progress = Progress::new(selected.len(), options.quiet);

    let mut finished: BTreeMap<usize, Finished> = BTreeMap::new();
    let mut running: BTreeMap<usize, (u32, Vec<usize>)> = BTreeMap::new();
    let mut free_gpus = options.gpus.clone();
    let mut failed_any = false;
    let (sender, receiver) = mpsc::channel::<Finished>();

    std::thread::scope(|scope| loop {
        let stop_launching = cancel.load(Ordering::SeqCst) || (failed_any && !options.keep_going);
        for &index in &selected {
            if stop_launching || finished.contains_key(&index) || running.contains_key(&index) {
                continue;
            }
            let deps = engine.dag.dependencies(index);
            if let Some(bad) = deps.iter().find(|d| {
                finished
                    .get(d)
                    .is_some_and(|f| matches!(f.outcome, Outcome::Failed | Outcome::Skipped))
            }) {
                let reason = format!(
                    "upstream `{}` did not complete",
                    engine.pipeline.instances[*bad].id
                );
                let skipped = Finished {
                    index,
                    outcome: Outcome::Skipped,
                    done: None,
                    seconds: 0.0,
                    error: Some(reason),
                };
                progress.report(engine, &skipped);
                finished.insert(index, skipped);
                continue;
            }
            if !deps.iter().all(|d| finished.contains_key(d)) {
                continue;
            }
            let instance = &engine.pipeline.instances[index];
            if let Some(reason) = instance.implementation.not_applicable(&engine.pipeline.root) {
                let reason = match clear_not_applicable(engine, index) {
                    Ok(()) => reason,
                    Err(e) => format!("{reason}; {e}"),
                };
                let skipped = Finished {
                    index,
                    outcome: Outcome::NotApplicable,
                    done: None,
                    seconds: 0.0,
                    error: Some(reason),
                };
                progress.report(engine, &skipped);
                finished.insert(index, skipped);
                continue;
            }
            // `threads = 0` asks for every core the run may use.
            let threads = if instance.threads == 0 {
                options.threads.max(1) as u32
            } else {
                instance.threads
            };
            let threads_in_use: u32 = running.values().map(|(t, _)| t).sum();
            let fits = running.is_empty()
                || (running.len() < options.jobs.max(1)
                    && threads_in_use + threads <= options.threads.max(1) as u32);
            if !fits || free_gpus.len() < instance.gpus as usize {
                continue;
            }
            let gpus: Vec<usize> = free_gpus.drain(..instance.gpus as usize).collect();
            let upstream = Upstream::Expected(
                deps.iter()
                    .filter_map(|d| Some((*d, finished[d].done.clone()?)))
                    .collect(),
            );
            running.insert(index, (threads, gpus.clone()));
            progress.started(&instance.id);
            let sender = sender.clone();
            let force = forced.contains(&index);
            let status = progress.status_line();
            scope.spawn(move || {
                let started = Instant::now();
                let slot = Slot {
                    gpus: &gpus,
                    threads,
                    cancel,
                    status: &status,
                };
                let result = execute(engine, index, &upstream, force, &slot);
                let seconds = started.elapsed().as_secs_f64();
                let finished = match result {
                    Ok((outcome, done)) => Finished {
                        index,
                        outcome,
                        done: Some(done),
                        seconds,
                        error: None,
                    },
                    Err(error) => Finished {
                        index,
                        outcome: Outcome::Failed,
                        done: None,
                        seconds,
                        error: Some(error),
                    },
                };
                let _ = sender.send(finished);
            });
        }
        if running.is_empty() {
            break;
        }
        let Ok(done) = receiver.recv() else { break };
        let (_, gpus) = running.remove(&done.index).unwrap_or_default();
        free_gpus.extend(gpus);
        free_gpus.sort_unstable();
        failed_any |= done.outcome == Outcome::Failed;
        progress.report(engine, &done);
        finished.insert(done.index, done);
    });
    progress.finish();
    Ok(conclude(
        engine,
        &selected,
        finished,
        cancel.load(Ordering::SeqCst),
    ))
}

/// The run's report from how each selected instance finished (those that never started were held
/// back by a failure or the interruption); writes the lock file and the run history.
pub(crate) fn conclude(
    engine: &Engine,
    selected: &[usize],
    mut finished: BTreeMap<usize, Finished>,
    interrupted: bool,
) -> RunReport {
    let stages: Vec<StageReport> = selected
        .iter()
        .map(|&index| {
            let instance = &engine.pipeline.instances[index];
            let (outcome, seconds, error) = match finished.remove(&index) {
                Some(f) => (f.outcome, f.seconds, f.error),
                None => (
                    Outcome::Skipped,
                    0.0,
                    Some(
                        if interrupted {
                            "interrupted"
                        } else {
                            "not started after a failure"
                        }
                        .to_string(),
                    ),
                ),
            };
            StageReport {
                id: instance.id.clone(),
                kind: instance.kind.name.to_string(),
                outcome,
                seconds,
                outputs: instance.out_dir.clone(),
                error,
            }
        })
        .collect();
    write_lock(engine);
    if let Err(e) = engine.hasher.save() {
        crate::errln!("warning: cannot save the stat cache: {e}");
    }
    append_run_history(engine, selected);
    let ok = stages
        .iter()
        .all(|s| matches!(s.outcome, Outcome::Ran | Outcome::Cached | Outcome::NotApplicable));
    RunReport {
        pipeline: engine.pipeline.name.clone(),
        ok,
        interrupted,
        stages,
    }
}

/// How one instance ended when run on its own (a Slurm job): its upstream instances are complete,
/// their records give the output digests its key needs.
pub struct Alone {
    pub outcome: Outcome,
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
            error: clear_not_applicable(engine, index).err().or(Some(reason)),
        };
    }
    for dep in engine.dag.dependencies(index) {
        let dep_instance = &pipeline.instances[dep];
        let applies = dep_instance
            .implementation
            .not_applicable(&pipeline.root)
            .is_none();
        if applies && engine.records.get(&dep_instance.id).is_none() {
            return Alone {
                outcome: Outcome::Skipped,
                error: Some(format!("upstream `{}` has not completed", dep_instance.id)),
            };
        }
    }
    let status = StatusLine::default();
    let slot = Slot {
        gpus,
        threads,
        cancel,
        status: &status,
    };
    let result = execute(engine, index, &Upstream::Current, force, &slot);
    if let Err(e) = engine.hasher.save() {
        crate::errln!("warning: cannot save the stat cache: {e}");
    }
    match result {
        Ok((outcome, _)) => Alone { outcome, error: None },
        Err(error) => Alone {
            outcome: Outcome::Failed,
            error: Some(error),
        },
    }
}

fn check_gpu_requests(engine: &Engine, selected: &[usize], options: &RunOptions) -> Result<(), String> {
    for &index in selected {
        let instance = &engine.pipeline.instances[index];
        if instance.gpus as usize > options.gpus.len() {
            return Err(format!(
                "stage `{}` needs {} GPU(s) but {} are available (use --gpus to name them)",
                instance.id,
                instance.gpus,
                options.gpus.len()
            ));
        }
    }
    Ok(())
}

/// Brings one instance up to date. Returns its outcome and the digest of its outputs.
/// What a running instance was given: its GPUs and threads, the run's cancel flag, the status line.
struct Slot<'a> {
    gpus: &'a [usize],
    threads: u32,
    cancel: &'a AtomicBool,
    status: &'a StatusLine,
}

fn execute(
    engine: &Engine,
    index: usize,
    upstream: &Upstream,
    force: bool,
    slot: &Slot,
) -> Result<(Outcome, Done), String> {
    let pipeline = &engine.pipeline;
    let instance = &pipeline.instances[index];
    let started = Instant::now();
    // What the stage reads stays as its key says until its result is stored; then one writer per
    // instance, so a concurrent run of the same pipeline waits for this instance only and then
    // finds the result in place or in the cache.
    let (_reading, upstream) = hold_upstream(engine, index, upstream)?;
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
                };
                return Ok((Outcome::Cached, done));
            }
        }
        match engine
            .cache
            .lookup(&digest, &engine.hasher)
            .map_err(|e| e.to_string())?
        {
            Lookup::Hit(manifest) => {
                let outputs_digest = restore_and_remember(engine, index, &manifest, &key, started)?;
                let done = Done {
                    outputs_digest,
                    key: digest,
                    components: key,
                };
                return Ok((Outcome::Cached, done));
            }
            Lookup::Corrupt { reason } => {
                crate::errln!(
                    "warning: cache entry of `{}` is damaged ({reason}); recomputing",
                    instance.id
                );
            }
            Lookup::Miss => {}
        }
    } else {
        // forced: from scratch, not from where an earlier run stopped
        remove_path(&resume_dir(pipeline, &instance.id))?;
    }
    let files = run_instance(engine, index, slot)?;
    // The key must describe exactly what the stage read: inputs edited while it ran are refused.
    let after = stage_key(pipeline, instance, upstream, &engine.hasher)?;
    if after.digest() != digest {
        return Err(format!(
            "inputs changed while the stage ran ({}); its result is not stored",
            after.differences(&key).join("; ")
        ));
    }
    engine
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
        .map_err(|e| format!("cannot store outputs in the cache: {e}"))?;
    let outputs = files.into_iter().map(|(p, (_, d))| (p, d)).collect();
    let outputs_digest = remember(engine, index, digest.clone(), key.clone(), outputs, started)?;
    let done = Done {
        outputs_digest,
        key: digest,
        components: key,
    };
    Ok((Outcome::Ran, done))
}

/// Shared locks on the outputs of every upstream instance the stage reads, once they hold what
/// this run expects (restoring from the cache what another run replaced in between), with the
/// digests that enter the stage's key.
fn hold_upstream(
    engine: &Engine,
    index: usize,
    upstream: &Upstream,
) -> Result<(Vec<fs::File>, BTreeMap<String, Digest>), String> {
    let pipeline = &engine.pipeline;
    let deps: Vec<usize> = match upstream {
        Upstream::Expected(expected) => expected.keys().copied().collect(),
        Upstream::Current => engine
            .dag
            .dependencies(index)
            .into_iter()
            .filter(|&d| {
                pipeline.instances[d]
                    .implementation
                    .not_applicable(&pipeline.root)
                    .is_none()
            })
            .collect(),
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
            let id = &pipeline.instances[dep].id;
            let current = engine.records.get(id).map(|r| r.outputs_digest);
            match (upstream, current) {
                (Upstream::Expected(expected), current) => {
                    let wanted = expected[&dep].outputs_digest;
                    if current == Some(wanted) {
                        digests.insert(id.clone(), wanted);
                    } else {
                        replaced.push(dep);
                    }
                }
                (Upstream::Current, Some(current)) => {
                    digests.insert(id.clone(), current);
                }
                (Upstream::Current, None) => return Err(format!("upstream `{id}` has not completed")),
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
    Err(
        "another run of this pipeline keeps replacing this stage's inputs; run again when it has finished"
            .into(),
    )
}

/// Puts back the outputs this run's `done` describes, which another run (with other parameters)
/// replaced, from the cache entry they were stored under.
fn bring_back(engine: &Engine, index: usize, done: &Done) -> Result<(), String> {
    let instance = &engine.pipeline.instances[index];
    let _writing = lock_outputs(&engine.pipeline.state_dir, &instance.id, LockMode::Exclusive)?;
    if engine
        .records
        .get(&instance.id)
        .is_some_and(|r| r.outputs_digest == done.outputs_digest)
    {
        return Ok(());
    }
    match engine
        .cache
        .lookup(&done.key, &engine.hasher)
        .map_err(|e| e.to_string())?
    {
        Lookup::Hit(manifest) => {
            restore_and_remember(engine, index, &manifest, &done.components, Instant::now())?;
            Ok(())
        }
        _ => Err(format!(
            "another run replaced the outputs of upstream `{}`, and this run's are no longer in the cache",
            instance.id
        )),
    }
}

/// Restores a cache entry into place and records it; returns the digest of its outputs.
fn restore_and_remember(
    engine: &Engine,
    index: usize,
    manifest: &super::cache::Manifest,
    key: &StageKey,
    started: Instant,
) -> Result<Digest, String> {
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
fn clear_not_applicable(engine: &Engine, index: usize) -> Result<(), String> {
    let instance = &engine.pipeline.instances[index];
    let _writing = lock_outputs(&engine.pipeline.state_dir, &instance.id, LockMode::Exclusive)?;
    remove_path(&instance.out_dir)
}

/// Records what the instance's outputs are for this key; returns the digest of those outputs.
fn remember(
    engine: &Engine,
    index: usize,
    digest: String,
    key: StageKey,
    outputs: BTreeMap<String, Digest>,
    started: Instant,
) -> Result<Digest, String> {
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
    engine
        .records
        .put(&record)
        .map_err(|e| format!("cannot write record: {e}"))?;
    Ok(outputs_digest)
}

/// Runs the stage into a fresh temporary folder, moves it into place, and returns every output
/// file (`output/<n>/<path>` for declared project outputs, `out/<path>`) with its place and digest.
fn run_instance(
    engine: &Engine,
    index: usize,
    slot: &Slot,
) -> Result<BTreeMap<String, (PathBuf, Digest)>, String> {
    let Slot {
        gpus,
        threads,
        cancel,
        status,
    } = *slot;
    let pipeline = &engine.pipeline;
    let instance = &pipeline.instances[index];
    let stage = &instance.implementation;
    let project = project_outputs(engine, index)?;
    // Stale outputs from an earlier run must not pass for this run's (only files nnflow wrote go).
    project.clear(engine.records.get(&instance.id).as_ref(), |path| {
        in_cache(engine, path)
    })?;
    let safe_id = file_safe(&instance.id);
    // This run holds the instance's lock: staging folders of its id are left by killed runs.
    remove_staging(&pipeline.state_dir, &safe_id, |_| true);
    let temporary =
        pipeline
            .state_dir
            .join("tmp")
            .join(format!("{safe_id}.{}.{}", std::process::id(), now_nanos()));
    fs::create_dir_all(&temporary).map_err(|e| format!("cannot create {}: {e}", temporary.display()))?;
    let logs = pipeline.state_dir.join("logs");
    fs::create_dir_all(&logs).map_err(|e| format!("cannot create {}: {e}", logs.display()))?;
    let log_file = logs.join(format!("{safe_id}.log"));
    // the log shows this run only: an error must not come with an older run's lines
    remove_path(&log_file)?;
    let resume_dir = resume_dir(pipeline, &instance.id);
    let env: BTreeMap<String, String> = stage
        .env()
        .into_iter()
        .filter_map(|n| Some((n.clone(), std::env::var(&n).ok()?)))
        .collect();
    let context = StageContext {
        root: &pipeline.root,
        out_dir: &temporary,
        log_file: &log_file,
        resume_dir: &resume_dir,
        status: &|text: &str| status.set(&instance.id, text),
        threads,
        gpus,
        env: &env,
        cancel,
    };
    if let Err(error) = stage.run(&context) {
        project.failed();
        let _ = fs::remove_dir_all(&temporary);
        return Err(format!("{error}{}", log_tail(&log_file)));
    }
    let project_files = match project.files(true) {
        Ok(files) => files,
        Err(error) => {
            project.failed();
            let _ = fs::remove_dir_all(&temporary);
            return Err(error);
        }
    };
    project.written(project_files.values().cloned())?;
    remove_path(&instance.out_dir)?;
    if let Some(parent) = instance.out_dir.parent() {
        fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    fs::rename(&temporary, &instance.out_dir)
        .map_err(|e| format!("cannot move outputs into {}: {e}", instance.out_dir.display()))?;

    let mut files = BTreeMap::new();
    for (name, path) in project_files {
        let digest = engine.hasher.digest_file(&path).map_err(|e| e.to_string())?;
        files.insert(name, (path, digest));
    }
    let out_entries = list_folder(&instance.out_dir)?;
    let out = engine
        .hasher
        .digest_tree(&instance.out_dir, &out_entries)
        .map_err(|e| e.to_string())?;
    for (path, digest) in out {
        files.insert(format!("out/{path}"), (instance.out_dir.join(&path), digest));
    }
    Ok(files)
}

/// Whether a file's exact contents are an output nnflow stored: replacing it loses nothing.
fn in_cache(engine: &Engine, path: &Path) -> bool {
    engine
        .hasher
        .digest_file(path)
        .is_ok_and(|digest| engine.cache.has_blob(&digest))
}

/// The instance's declared project outputs, checked again to lie inside the project.
fn project_outputs<'a>(engine: &'a Engine, index: usize) -> Result<ProjectOutputs<'a>, String> {
    let pipeline = &engine.pipeline;
    let instance = &pipeline.instances[index];
    let slots = declared_outputs(pipeline, instance)?;
    Ok(ProjectOutputs::new(
        &pipeline.root,
        &pipeline.state_dir,
        &instance.id,
        slots,
    ))
}

/// Where a stage keeps what lets a later run continue (training checkpoints).
fn resume_dir(pipeline: &super::config::Pipeline, id: &str) -> PathBuf {
    pipeline.state_dir.join("resume").join(file_safe(id))
}

/// Removes the staging folders (`tmp/<id>.<pid>.<nanos>`) of `safe_id` (every id when empty) for
/// which `removable(path)` holds; returns how many went.
pub(crate) fn remove_staging(state_dir: &Path, safe_id: &str, removable: impl Fn(&Path) -> bool) -> usize {
    let Ok(entries) = fs::read_dir(state_dir.join("tmp")) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((id, _, _)) = staging_parts(&name) else {
            continue;
        };
        if (safe_id.is_empty() || id == safe_id)
            && removable(&entry.path())
            && remove_path(&entry.path()).is_ok()
        {
            removed += 1;
        }
    }
    removed
}

/// `<id>.<pid>.<nanos>` split into its parts, for a staging folder's name.
pub(crate) fn staging_parts(name: &str) -> Option<(&str, u32, u128)> {
    let (rest, nanos) = name.rsplit_once('.')?;
    let (id, pid) = rest.rsplit_once('.')?;
    Some((id, pid.parse().ok()?, nanos.parse().ok()?))
}

fn restore(engine: &Engine, index: usize, manifest: &super::cache::Manifest) -> Result<(), String> {
    let instance = &engine.pipeline.instances[index];
    let project = project_outputs(engine, index)?;
    project.clear(engine.records.get(&instance.id).as_ref(), |path| {
        in_cache(engine, path)
    })?;
    remove_path(&instance.out_dir)?;
    fs::create_dir_all(&instance.out_dir)
        .map_err(|e| format!("cannot create {}: {e}", instance.out_dir.display()))?;
    let mut project_files = Vec::new();
    for (path, file) in &manifest.files {
        let destination = output_location(&engine.pipeline, instance, path);
        // Project files may be edited by the user: never hard-link them to the cache.
        let mode = if path.starts_with("out/") {
            LinkMode::HardlinkOrCopy
        } else {
            project_files.push(destination.clone());
            LinkMode::Copy
        };
        engine
            .cache
            .restore_file(file, &destination, mode, &engine.hasher)
            .map_err(|e| format!("cannot restore {path} from the cache: {e}"))?;
    }
    project.written(project_files)
}

fn list_folder(folder: &Path) -> Result<Vec<PathBuf>, String> {
    let entries = fs::read_dir(folder).map_err(|e| format!("cannot list {}: {e}", folder.display()))?;
    let mut names: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| PathBuf::from(e.file_name()))
        .collect();
    names.sort();
    Ok(names)
}

fn remove_path(path: &Path) -> Result<(), String> {
    let result = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(_) => Ok(()),
    };
    result.map_err(|e| format!("cannot remove {}: {e}", path.display()))
}

#[derive(Clone, Copy, PartialEq)]
enum LockMode {
    /// Reading an instance's outputs: other readers may too; nobody may replace them.
    Shared,
    /// Writing them: alone.
    Exclusive,
}

/// The lock on one instance's outputs (its outputs folder, its declared project outputs, its
/// record), held until the returned file is dropped.
fn lock_outputs(state_dir: &Path, id: &str, mode: LockMode) -> Result<fs::File, String> {
    let path = lock_path(state_dir, id);
    let folder = path.parent().unwrap_or(state_dir);
    fs::create_dir_all(folder).map_err(|e| format!("cannot create {}: {e}", folder.display()))?;
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let locked = match mode {
        LockMode::Shared => file.lock_shared(),
        LockMode::Exclusive => file.lock(),
    };
    locked.map_err(|e| format!("cannot lock {}: {e}", path.display()))?;
    Ok(file)
}

pub(crate) fn lock_path(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join("locks").join(format!("{}.lock", file_safe(id)))
}

fn log_tail(log_file: &Path) -> String {
    let Ok(text) = fs::read_to_string(log_file) else {
        return String::new();
    };
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(20)..];
    if tail.is_empty() {
        format!(" (log: {})", log_file.display())
    } else {
        format!(
            "\n--- last lines of {} ---\n{}",
            log_file.display(),
            tail.join("\n")
        )
    }
}

/// Rewrites the lock file from the records of every instance that has one, declared outputs
/// named by where they lie.
pub fn write_lock(engine: &Engine) {
    let pipeline = &engine.pipeline;
    let records: Vec<Record> = engine
        .dag
        .order
        .iter()
        .filter_map(|&i| {
            let instance = &pipeline.instances[i];
            let mut record = engine.records.get(&instance.id)?;
            record.outputs = record
                .outputs
                .into_iter()
                .map(|(path, digest)| (display_path(pipeline, instance, &path), digest))
                .collect();
            Some(record)
        })
        .collect();
    let path = pipeline.state_dir.join("nnflow.lock");
    if let Err(e) = write_lock_file(&path, &pipeline.name, &records) {
        crate::errln!("warning: cannot write {}: {e}", path.display());
    }
}

/// One line per run with the keys it used, so `gc --keep-last N` can keep recent runs' entries.
fn append_run_history(engine: &Engine, selected: &[usize]) {
    use std::io::Write;
    let keys: Vec<String> = selected
        .iter()
        .filter_map(|&i| engine.records.get(&engine.pipeline.instances[i].id))
        .map(|r| r.key)
        .collect();
    let line =
        serde_json::json!({ "pipeline": engine.pipeline.name, "finished_unix": now_unix(), "keys": keys });
    let path = engine.pipeline.work_dir.join("state").join("runs.jsonl");
    let _ = fs::create_dir_all(path.parent().unwrap_or(Path::new(".")));
    if let Ok(mut file) = fs::OpenOptions::new().create(true).append(true).open(&path) {
        let _ = file.write_all(format!("{line}\n").as_bytes());
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// The progress bar's message, for a running stage to say how far it is (a no-op without a bar).
#[derive(Clone, Default)]
struct StatusLine(Option<indicatif::ProgressBar>);

impl StatusLine {
    fn set(&self, id: &str, text: &str) {
        if let Some(bar) = &self.0 {
            bar.set_message(format!("{id}: {text}"));
        }
    }
}

/// Progress on a terminal (a bar), plain lines otherwise, nothing with `--json`.
pub(crate) struct Progress {
    bar: Option<indicatif::ProgressBar>,
    quiet: bool,
}

impl Progress {
    pub(crate) fn new(total: usize, quiet: bool) -> Progress {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(total as u64);
            let style = indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {elapsed} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            bar.set_style(style);
            bar
        });
        Progress { bar, quiet }
    }

    fn status_line(&self) -> StatusLine {
        StatusLine(self.bar.clone())
    }

    pub(crate) fn started(&self, id: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!("running {id}"));
        }
    }

    pub(crate) fn report(&self, engine: &Engine, finished: &Finished) {
        let instance = &engine.pipeline.instances[finished.index];
        let outcome = match finished.outcome {
            Outcome::Ran => "ran",
            Outcome::Cached => "cached",
            Outcome::Failed => "FAILED",
            Outcome::Skipped | Outcome::NotApplicable => "skipped",
        };
        let mut line = format!("{outcome:>8}  {} ({:.2}s)", instance.id, finished.seconds);
        if let Some(error) = &finished.error {
            line.push_str(&format!(": {error}"));
        }
        match &self.bar {
            Some(bar) => {
                bar.inc(1);
                bar.println(line);
            }
            None if !self.quiet => crate::errln!("{line}"),
            None => {}
        }
    }

    pub(crate) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
