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
use super::evaluate::{damaged_output, expand_patterns, is_glob, output_location, stage_key};
use super::hashing::{digest_of_map, Digest};
use super::key::StageKey;
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
    pub outputs_digest: Option<Digest>,
    pub seconds: f64,
    pub error: Option<String>,
}

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
                    outputs_digest: None,
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
                // outputs of an earlier run, when it did apply, must not pass for this run's
                let reason = match remove_path(&instance.out_dir) {
                    Ok(()) => reason,
                    Err(e) => format!("{reason}; {e}"),
                };
                let skipped = Finished {
                    index,
                    outcome: Outcome::NotApplicable,
                    outputs_digest: None,
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
            let upstream = deps
                .iter()
                .filter_map(|d| {
                    Some((
                        engine.pipeline.instances[*d].id.clone(),
                        finished[d].outputs_digest?,
                    ))
                })
                .collect();
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
                let result = execute(engine, index, upstream, force, &slot);
                let seconds = started.elapsed().as_secs_f64();
                let finished = match result {
                    Ok((outcome, digest)) => Finished {
                        index,
                        outcome,
                        outputs_digest: Some(digest),
                        seconds,
                        error: None,
                    },
                    Err(error) => Finished {
                        index,
                        outcome: Outcome::Failed,
                        outputs_digest: None,
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
        eprintln!("warning: cannot save the stat cache: {e}");
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
            error: remove_path(&instance.out_dir).err().or(Some(reason)),
        };
    }
    let mut upstream = BTreeMap::new();
    for dep in engine.dag.dependencies(index) {
        let dep_instance = &pipeline.instances[dep];
        if dep_instance
            .implementation
            .not_applicable(&pipeline.root)
            .is_some()
        {
            continue;
        }
        match engine.records.get(&dep_instance.id) {
            Some(record) => {
                upstream.insert(dep_instance.id.clone(), record.outputs_digest);
            }
            None => {
                return Alone {
                    outcome: Outcome::Skipped,
                    error: Some(format!("upstream `{}` has not completed", dep_instance.id)),
                }
            }
        }
    }
    let status = StatusLine::default();
    let slot = Slot {
        gpus,
        threads,
        cancel,
        status: &status,
    };
    let result = execute(engine, index, upstream, force, &slot);
    if let Err(e) = engine.hasher.save() {
        eprintln!("warning: cannot save the stat cache: {e}");
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
    upstream: BTreeMap<String, Digest>,
    force: bool,
    slot: &Slot,
) -> Result<(Outcome, Digest), String> {
    let pipeline = &engine.pipeline;
    let instance = &pipeline.instances[index];
    let started = Instant::now();
    let key = stage_key(pipeline, instance, upstream, &engine.hasher)?;
    let digest = key.digest();
    // One lock per instance, so a concurrent run of the same pipeline waits for this instance only,
    // then finds the result in place or in the cache.
    let _lock = lock_instance(&pipeline.state_dir, &instance.id)?;
    if !force {
        if let Some(record) = engine.records.get(&instance.id) {
            if record.key == digest && damaged_output(pipeline, instance, &record, &engine.hasher).is_none() {
                return Ok((Outcome::Cached, record.outputs_digest));
            }
        }
        match engine
            .cache
            .lookup(&digest, &engine.hasher)
            .map_err(|e| e.to_string())?
        {
            Lookup::Hit(manifest) => {
                restore(engine, index, &manifest)?;
                let outputs = manifest
                    .files
                    .iter()
                    .map(|(p, f)| (p.clone(), f.digest))
                    .collect();
                let outputs_digest = remember(engine, index, digest, key, outputs, started)?;
                return Ok((Outcome::Cached, outputs_digest));
            }
            Lookup::Corrupt { reason } => {
                eprintln!(
                    "warning: cache entry of `{}` is damaged ({reason}); recomputing",
                    instance.id
                );
            }
            Lookup::Miss => {}
        }
    }
    let files = run_instance(engine, index, slot)?;
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
    let outputs_digest = remember(engine, index, digest, key, outputs, started)?;
    Ok((Outcome::Ran, outputs_digest))
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
/// file (`project/<path>` or `out/<path>`) with its location and digest.
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
    let project_outputs = stage.project_outputs();
    // Stale outputs from an earlier run must not pass for this run's.
    for output in project_outputs.iter().filter(|o| !is_glob(o)) {
        remove_path(&pipeline.root.join(output))?;
    }
    let safe_id = file_safe(&instance.id);
    let temporary =
        pipeline
            .state_dir
            .join("tmp")
            .join(format!("{safe_id}.{}.{}", std::process::id(), now_nanos()));
    fs::create_dir_all(&temporary).map_err(|e| format!("cannot create {}: {e}", temporary.display()))?;
    let logs = pipeline.state_dir.join("logs");
    fs::create_dir_all(&logs).map_err(|e| format!("cannot create {}: {e}", logs.display()))?;
    let log_file = logs.join(format!("{safe_id}.log"));
    let resume_dir = pipeline.state_dir.join("resume").join(&safe_id);
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
        let _ = fs::remove_dir_all(&temporary);
        return Err(format!("{error}{}", log_tail(&log_file)));
    }
    let project_paths = expand_patterns(&pipeline.root, &project_outputs, "declared output")
        .map_err(|e| format!("{e}: the stage did not produce it"))?;
    remove_path(&instance.out_dir)?;
    if let Some(parent) = instance.out_dir.parent() {
        fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    fs::rename(&temporary, &instance.out_dir)
        .map_err(|e| format!("cannot move outputs into {}: {e}", instance.out_dir.display()))?;

    let mut files = BTreeMap::new();
    let project = engine
        .hasher
        .digest_tree(&pipeline.root, &project_paths)
        .map_err(|e| e.to_string())?;
    for (path, digest) in project {
        files.insert(format!("project/{path}"), (pipeline.root.join(&path), digest));
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

fn restore(engine: &Engine, index: usize, manifest: &super::cache::Manifest) -> Result<(), String> {
    let instance = &engine.pipeline.instances[index];
    remove_path(&instance.out_dir)?;
    fs::create_dir_all(&instance.out_dir)
        .map_err(|e| format!("cannot create {}: {e}", instance.out_dir.display()))?;
    for (path, file) in &manifest.files {
        let destination = output_location(&engine.pipeline, instance, path);
        // Project files may be edited by the user: never hard-link them to the cache.
        let mode = if path.starts_with("project/") {
            LinkMode::Copy
        } else {
            LinkMode::HardlinkOrCopy
        };
        engine
            .cache
            .restore_file(file, &destination, mode, &engine.hasher)
            .map_err(|e| format!("cannot restore {path} from the cache: {e}"))?;
    }
    Ok(())
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

fn lock_instance(state_dir: &Path, id: &str) -> Result<fs::File, String> {
    let folder = state_dir.join("locks");
    fs::create_dir_all(&folder).map_err(|e| format!("cannot create {}: {e}", folder.display()))?;
    let path = folder.join(format!("{}.lock", file_safe(id)));
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    file.lock()
        .map_err(|e| format!("cannot lock {}: {e}", path.display()))?;
    Ok(file)
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

/// Rewrites the lock file from the records of every instance that has one.
pub fn write_lock(engine: &Engine) {
    let records: Vec<Record> = engine
        .dag
        .order
        .iter()
        .filter_map(|&i| engine.records.get(&engine.pipeline.instances[i].id))
        .collect();
    let path = engine.pipeline.state_dir.join("nnflow.lock");
    if let Err(e) = write_lock_file(&path, &engine.pipeline.name, &records) {
        eprintln!("warning: cannot write {}: {e}", path.display());
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
            None if !self.quiet => eprintln!("{line}"),
            None => {}
        }
    }

    pub(crate) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
