//! Running a pipeline: instances in topological order, independent ones side by side within the
//! job, thread and GPU limits. Each instance is fresh (nothing to do), restored from the cache, or
//! run and committed; a failed instance leaves no cache entry and skips its descendants.
//! This module owns the local scheduler and a run's options and report; each worker brings its
//! instance up to date with [`super::instance`], and [`super::run_record`] keeps how each finished.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::Scope;
use std::time::Instant;

use serde::Serialize;

use super::instance::{clear_not_applicable, execute, Slot, Upstream};
use super::remote::RemoteSummary;
use super::run_record::{Finished, Ledger};
use super::{Engine, RunError};

// what `gc` needs to find staging folders left by killed runs

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

/// Where a cached instance's outputs were restored from.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Restored {
    Local,
    Remote,
}

/// The version of the JSON that `nnflow run --json` and `nnflow status --json` print: raised when
/// a field is removed or changes meaning (fields may be added without it).
pub const JSON_SCHEMA_VERSION: u32 = 1;

#[derive(Serialize, Clone, Debug)]
pub struct StageReport {
    pub id: String,
    pub kind: String,
    pub outcome: Outcome,
    pub seconds: f64,
    pub outputs: PathBuf,
    /// `local` or `remote` when the outputs were restored from that cache; null when the stage
    /// ran, its outputs were already in place, or it did not complete.
    pub restored_from: Option<Restored>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// How many instances ended each way.
#[derive(Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub ran: usize,
    pub cached: usize,
    pub failed: usize,
    /// Skipped because an upstream stage failed, the run stopped, or the stage does not apply.
    pub skipped: usize,
}

#[derive(Serialize, Debug)]
pub struct RunReport {
    pub schema_version: u32,
    pub pipeline: String,
    pub ok: bool,
    pub interrupted: bool,
    pub counts: Counts,
    /// What the run did with the remote cache; null without one.
    pub remote: Option<RemoteSummary>,
    pub stages: Vec<StageReport>,
}

pub fn run(engine: &Engine, options: &RunOptions, cancel: &AtomicBool) -> Result<RunReport, RunError> {
    let (selected, forced) = selection(engine, options)?;
    check_gpu_requests(engine, &selected, options)?;
    let mut scheduler = Scheduler {
        engine,
        options,
        forced,
        cancel,
        ledger: Ledger::new(engine, selected.len(), options.quiet),
        running: BTreeMap::new(),
        free_gpus: options.gpus.clone(),
        failed_any: false,
    };
    let (sender, receiver) = mpsc::channel::<Finished>();
    std::thread::scope(|scope| loop {
        scheduler.start_ready(&selected, scope, &sender);
        if scheduler.running.is_empty() {
            break;
        }
        let Ok(done) = receiver.recv() else { break };
        scheduler.take_back(done);
    });
    Ok(scheduler
        .ledger
        .conclude(&selected, cancel.load(Ordering::SeqCst)))
}

/// The instances a run covers (its targets with their ancestors, in order) and those it forces.
pub(crate) fn selection(
    engine: &Engine,
    options: &RunOptions,
) -> Result<(Vec<usize>, HashSet<usize>), RunError> {
    let targets = engine.select(&options.targets)?;
    let forced: HashSet<usize> = if options.force.is_empty() {
        HashSet::new()
    } else {
        engine.select(&options.force)?.into_iter().collect()
    };
    Ok((engine.dag.with_ancestors(&targets), forced))
}

/// A local run in progress: the instances running (with the threads and GPUs they hold), what is
/// free, and how the others have finished.
struct Scheduler<'a> {
    engine: &'a Engine,
    options: &'a RunOptions,
    forced: HashSet<usize>,
    cancel: &'a AtomicBool,
    ledger: Ledger<'a>,
    running: BTreeMap<usize, (u32, Vec<usize>)>,
    free_gpus: Vec<usize>,
    failed_any: bool,
}

impl<'a> Scheduler<'a> {
    /// Starts the selected instances whose upstream instances have all finished, as far as the
    /// limits allow, and settles those that cannot run. Nothing starts once the run is cancelled,
    /// or after a failure without `keep_going`.
    fn start_ready<'scope>(
        &mut self,
        selected: &[usize],
        scope: &'scope Scope<'scope, '_>,
        sender: &mpsc::Sender<Finished>,
    ) where
        'a: 'scope,
    {
        if self.cancel.load(Ordering::SeqCst) || (self.failed_any && !self.options.keep_going) {
            return;
        }
        let engine = self.engine;
        for &index in selected {
            if self.ledger.get(index).is_some() || self.running.contains_key(&index) {
                continue;
            }
            if let Some(reason) = self.ledger.upstream_not_completed(index) {
                self.ledger.settle(index, Outcome::Skipped, Some(reason));
                continue;
            }
            let deps = engine.dag.dependencies(index);
            if !deps.iter().all(|d| self.ledger.get(*d).is_some()) {
                continue;
            }
            let instance = &engine.pipeline.instances[index];
            if let Some(reason) = instance.implementation.not_applicable(&engine.pipeline.root) {
                let reason = match clear_not_applicable(engine, index) {
                    Ok(()) => reason,
                    Err(e) => format!("{reason}; {e}"),
                };
                self.ledger.settle(index, Outcome::NotApplicable, Some(reason));
                continue;
            }
            if let Some((threads, gpus)) = self.reserve(index) {
                self.start(index, threads, gpus, scope, sender);
            }
        }
    }

    /// The threads and GPUs the instance gets, taken from what is free, when it fits beside the
    /// running instances.
    fn reserve(&mut self, index: usize) -> Option<(u32, Vec<usize>)> {
        let instance = &self.engine.pipeline.instances[index];
        let options = self.options;
        // `threads = 0` asks for every core the run may use.
        let threads = if instance.threads == 0 {
            options.threads.max(1) as u32
        } else {
            instance.threads
        };
        let threads_in_use: u32 = self.running.values().map(|(t, _)| t).sum();
        let fits = self.running.is_empty()
            || (self.running.len() < options.jobs.max(1)
                && threads_in_use + threads <= options.threads.max(1) as u32);
        if !fits || self.free_gpus.len() < instance.gpus as usize {
            return None;
        }
        Some((threads, self.free_gpus.drain(..instance.gpus as usize).collect()))
    }

    /// Starts the instance on a thread of its own, which sends how it finished.
    fn start<'scope>(
        &mut self,
        index: usize,
        threads: u32,
        gpus: Vec<usize>,
        scope: &'scope Scope<'scope, '_>,
        sender: &mpsc::Sender<Finished>,
    ) where
        'a: 'scope,
    {
        let engine = self.engine;
        let cancel = self.cancel;
        let instance = &engine.pipeline.instances[index];
        let upstream = Upstream::Expected(
            engine
                .dag
                .dependencies(index)
                .into_iter()
                .filter_map(|d| Some((d, self.ledger.get(d)?.done.clone()?)))
                .collect(),
        );
        self.running.insert(index, (threads, gpus.clone()));
        self.ledger.progress.started(&instance.id);
        let sender = sender.clone();
        let force = self.forced.contains(&index);
        let status = self.ledger.progress.status_line();
        scope.spawn(move || {
            let slot = Slot {
                gpus: &gpus,
                threads,
                cancel,
                status: &status,
            };
            let _ = sender.send(attempt(engine, index, &upstream, force, &slot));
        });
    }

    /// Takes back the threads and GPUs of an instance that finished, and records how it did.
    fn take_back(&mut self, done: Finished) {
        let (_, gpus) = self.running.remove(&done.index).unwrap_or_default();
        self.free_gpus.extend(gpus);
        self.free_gpus.sort_unstable();
        self.failed_any |= done.outcome == Outcome::Failed;
        self.ledger.record(done);
    }
}

/// Brings one instance up to date on a worker thread; how it finished, in how long.
fn attempt(engine: &Engine, index: usize, upstream: &Upstream, force: bool, slot: &Slot) -> Finished {
    let started = Instant::now();
    let result = execute(engine, index, upstream, force, slot);
    let seconds = started.elapsed().as_secs_f64();
    match result {
        Ok((outcome, done)) => Finished {
            index,
            outcome,
            restored: done.restored,
            done: Some(done),
            seconds,
            error: None,
        },
        Err(error) => Finished {
            index,
            outcome: Outcome::Failed,
            restored: None,
            done: None,
            seconds,
            error: Some(error.to_string()),
        },
    }
}

fn check_gpu_requests(engine: &Engine, selected: &[usize], options: &RunOptions) -> Result<(), RunError> {
    for &index in selected {
        let instance = &engine.pipeline.instances[index];
        if instance.gpus as usize > options.gpus.len() {
            return Err(RunError::NotEnoughGpus {
                id: instance.id.clone(),
                needs: instance.gpus,
                available: options.gpus.len(),
            });
        }
    }
    Ok(())
}
